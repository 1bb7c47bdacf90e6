"""The first run on a GPU machine: every strategy for a few steps on the GPUs found (1, 2, 4 or 8), with a checkpoint,
a resume and a USR2 preemption each; then the figures only a GPU can check (MFU at bf16 and fp32, eager and
compiled). One Markdown table, to paste into the README.

    python -m benchmarks.gpu_smoke              # on a machine with 1, 2, 4 or 8 GPUs
    python -m benchmarks.gpu_smoke --dry-run    # anywhere: plan every row for 8 GPUs, run nothing
    python -m benchmarks.gpu_smoke --kind smoke --jobs 4   # the smoke rows only, four at a time

Each run goes through `python -m launch` (cluster=local) as a user's would. A "smoke" row, in one run folder:
  1. train 12 steps, checkpointing every 6;
  2. the same command with train.max_steps=18 resumes from step 12 (the run folder's newest checkpoint);
  3. train.max_steps=24 with debug.signal_at_step=20: rank 0 sends itself SIGUSR2, every rank saves at step 20 and
     the run exits non-zero (preempted; outside Slurm nothing requeues it); the same command again finishes at 24.
A "figure" row trains once and reports its last MFU and throughput; a "once" row trains once, expecting the exit
code it names (a rank killed on purpose ends the run). A row's check reads the run folder for what it is about
(each rank's own GPU, the straggler found on device compute, the health record, the attempts line naming the rank
really lost). `--dry-run` plans every row (layout, batch, options) as the launcher would for 8 GPUs, and fails
naming the rows that cannot run.
Writes benchmarks/results/gpu_smoke.json.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import REPO, SHARED_TEXT, compose_config, save_results  # noqa: E402

PREEMPTED = "nonzero"  # a preempted local run exits non-zero: "run the same command again"
PIPELINE = ["strategy=pipeline", "strategy.microbatches=4", "model.n_layer=8"]
SMOKE = ["model=tiny", "train.precision=bf16", "train.device=cuda", "train.global_batch_size=16",
         "train.log_interval=1", "train.eval_interval=6", "train.eval_batches=2", "train.progress=false",
         "checkpoint.interval_steps=6", "checkpoint.async=true",
         "train.decay_steps=24"]  # one schedule for all four attempts: a run refuses a resume that would change it
PREEMPT = ["train.max_steps=24", "debug.signal_at_step=20", "debug.signal_name=SIGUSR2"]
ATTEMPTS = [("train", ["train.max_steps=12"], 0), ("resume", ["train.max_steps=18"], 0),
            ("preempt", PREEMPT, PREEMPTED), ("same command again", PREEMPT, 0)]
FIGURE = ["model=gpt2_124m", "train.device=cuda", "train.max_steps=60", "train.global_batch_size=16",
          "train.log_interval=20", "train.eval_interval=0", "train.progress=false", "checkpoint.interval_steps=0",
          "data=shakespeare_bpe"]


@dataclass(frozen=True)
class Row:
    name: str
    overrides: tuple[str, ...]
    need: int = 1  # the fewest GPUs it needs
    most: int | None = None  # the most it uses; None: all of them
    kind: str = "smoke"  # smoke: train, resume, preempt, resume; figure: one run of FIGURE, its MFU; once: one run
    check: str | None = None  # a function of CHECKS that reads the run folder
    fails: bool = False  # a "once" row that must end non-zero

    def folder(self, parent: Path) -> Path:
        """The row's run folder: its name in characters a Hydra override takes as they are (not "(" or "=")."""
        return parent / re.sub(r"[^\w.-]+", "_", self.name).strip("_")

    def ranks(self, world: int) -> int:
        return min(world, self.most or world)

    def command_overrides(self, world: int) -> list[str]:
        base = FIGURE if self.kind == "figure" else SMOKE
        return [*base, *self.overrides, "nodes=1", f"cluster.tasks_per_node={self.ranks(world)}"]


ONCE = ["train.max_steps=40", "train.log_interval=5", "train.eval_interval=0", "checkpoint.interval_steps=10"]
STRAGGLER = ["debug.delay_rank=1", "debug.delay_s=0.05", "stragglers.windows=2"]
ROWS = [
    Row("single", ("strategy=single",), most=1),  # one process is the point of that row
    Row("ddp", ("strategy=ddp",), check="gpus"),
    Row("zero1", ("strategy=zero1",)),
    Row("fsdp", ("strategy=fsdp",)),
    Row("fsdp cpu_offload", ("strategy=fsdp", "strategy.cpu_offload=true")),
    Row("fsdp x tp", ("strategy=fsdp", "parallel.tp=2", "parallel.sequence_parallel=true"), need=2),
    Row("hsdp", ("strategy=fsdp", "parallel.dp_replicate=2"), need=2),
    Row("deepspeed ZeRO-1", ("strategy=deepspeed", "strategy.stage=1")),
    Row("deepspeed ZeRO-2", ("strategy=deepspeed", "strategy.stage=2")),
    Row("deepspeed ZeRO-3", ("strategy=deepspeed", "strategy.stage=3")),
    Row("pipeline 1f1b", (*PIPELINE, "strategy.schedule=1f1b"), need=2, most=2),
    Row("pipeline interleaved", (*PIPELINE, "strategy.schedule=interleaved", "strategy.dp=fsdp"), need=2),
    # fused AdamW over a stage of DTensor and plain parameters, with one data-parallel replica
    Row("pipeline x tp, dp 1", (*PIPELINE, "strategy.schedule=1f1b", "parallel.tp=2"), need=4, most=4),
    # tensor-parallel ranks must draw the same dropout masks on replicated activations
    Row("tp with dropout", ("strategy=fsdp", "parallel.tp=2", "model.dropout=0.1"), need=2),
    Row("ddp compiled", ("strategy=ddp", "train.compile=true")),
    Row("fsdp compiled", ("strategy=fsdp", "train.compile=true")),
    Row("hsdp compiled", ("strategy=fsdp", "parallel.dp_replicate=2", "train.compile=true"), need=2),
    Row("fsdp x tp compiled", ("strategy=fsdp", "parallel.tp=2", "train.compile=true"), need=2),
    # a rank whose device computes 50 ms longer each step: equal step times, found on device compute
    Row("straggler on the device", ("strategy=ddp", *ONCE, *STRAGGLER), need=2, kind="once", check="straggler"),
    # ...where its peers wait for it inside forward and backward: FSDP's all-gathers, the pipeline's receives (the
    # slow rank is the last stage, without the token embedding); found by the compute probe
    Row("straggler under fsdp", ("strategy=fsdp", *ONCE, *STRAGGLER), need=2, kind="once", check="straggler"),
    Row("straggler under pipeline", (*PIPELINE, "strategy.schedule=1f1b", *ONCE, *STRAGGLER), need=2, most=2,
        kind="once", check="straggler"),
    Row("health", ("strategy=ddp", "train.max_steps=1"), need=2, kind="once", check="health"),
    # NCCL aborts the survivors of a killed rank: the attempts line names the rank really lost
    Row("a rank killed under NCCL", ("strategy=ddp", *ONCE, "debug.kill_rank=1", "debug.kill_step=12",
                                     "preemption.in_job_restarts=0"), need=2,
        kind="once", check="lost_rank", fails=True),
    Row("gpt2_124m bf16 MFU", ("strategy=single", "train.precision=bf16"), most=1, kind="figure"),
    Row("gpt2_124m fp32 (TF32) MFU", ("strategy=single", "train.precision=fp32"), most=1, kind="figure"),
    Row("gpt2_124m bf16 compiled MFU", ("strategy=single", "train.precision=bf16", "train.compile=true"), most=1,
        kind="figure"),
    Row("gpt2_124m train=gpu MFU", ("strategy=single", "train=gpu"), most=1, kind="figure"),  # the GPU preset
    Row("gpt2_124m tp2 bf16 MFU", ("strategy=fsdp", "parallel.tp=2", "train.precision=bf16"), need=2, most=2,
        kind="figure"),
]


def world_for(gpus: int) -> int:
    return max(n for n in (1, 2, 4, 8) if n <= gpus) if gpus else 0


def rows_for(world: int, kinds: list[str] | None = None) -> list[Row]:
    return [r for r in ROWS if r.need <= world and (not kinds or r.kind in kinds)]


def plan_error(row: Row, world: int) -> str | None:
    """Why the launcher would refuse this row on `world` GPUs of one node, or None: the config, the layout, the
    batch, the strategy's options, as planning checks them (no GPU needed)."""
    from gpt.errors import ConfigError
    from gpt.parallel import plan_layout

    try:
        run = compose_config(row.command_overrides(world))
        ranks = row.ranks(world)
        train = dataclasses.replace(run.train, device="cuda")
        dims = plan_layout(run.strategy, run.parallel, run.model, ranks, ranks, train)
        train.micro_batches(dims.dp)
    except (ConfigError, ValueError) as e:
        return str(e).splitlines()[0]
    return None


def command(run_dir: Path, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "launch", f"hydra.run.dir={run_dir}", f"data.text_path={SHARED_TEXT}",
            *overrides]


def last_line(proc: subprocess.CompletedProcess) -> str:
    return (proc.stderr.strip().splitlines() or ["?"])[-1]


def failure(label: str, proc: subprocess.CompletedProcess, run_dir: Path) -> dict:
    """A failed attempt: its last line for the table, and what says why (the launcher's error lines and the tail
    of each rank's log) for the JSON and the console, since the run folder may be a temporary one."""
    logs = {p.name: p.read_text(errors="replace").splitlines()[-25:] for p in sorted(run_dir.glob("logs/rank*.log"))}
    return {"error": f"{label}: exit {proc.returncode}: {last_line(proc)}",
            "stderr": proc.stderr.strip().splitlines()[-25:], "rank_logs": logs}


def train_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics" / "rank0.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


def smoke(row: Row, world: int, folder: Path) -> dict:
    """The four attempts of one row in one run folder; stops at the first that does not end as expected."""
    run_dir = row.folder(folder)
    out: dict = {"attempts": []}
    for label, extra, expected in ATTEMPTS:
        proc = subprocess.run(command(run_dir, [*row.command_overrides(world), *extra]), cwd=REPO,
                              capture_output=True, text=True)
        out["attempts"].append(label)
        if (proc.returncode == 0) != (expected == 0):
            return {**out, **failure(label, proc, run_dir)}
    train = train_records(run_dir)
    return {**out, "steps": [r["step"] for r in train] == list(range(1, 25)), **figures(train[-1])}


def figure(row: Row, world: int, folder: Path) -> dict:
    run_dir = row.folder(folder)
    proc = subprocess.run(command(run_dir, row.command_overrides(world)), cwd=REPO, capture_output=True, text=True)
    if (proc.returncode != 0) != row.fails:
        return failure("run", proc, run_dir)
    train = train_records(run_dir)
    return figures(train[-1]) if train else {}


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def check_gpus(run_dir: Path) -> str:
    """Each rank drives a GPU of its own, and records its name."""
    envs = [read_json(p) for p in sorted((run_dir / "environment").glob("rank*.json"))]
    gpus = {(e["host"], e["gpu_plan"]["gpu"]) for e in envs}
    ok = len(gpus) == len(envs) and all(e.get("device") == f"cuda:{e['gpu_plan']['index']}" for e in envs)
    return f"{len(envs)} ranks on {len(gpus)} GPUs ({envs[0].get('gpu')}): {'ok' if ok else 'SHARED OR WRONG'}"


def check_straggler(run_dir: Path) -> str:
    """Rank 1, and rank 1 alone, is found on device compute while step times stay equal; where the peers wait inside
    forward/backward, rank 0's wait found by the probe (its hidden_wait_s) is shown too."""
    train = [r for r in train_records(run_dir) if "stragglers/count" in r]
    found = any(r["stragglers/count"] == 1 and r.get("stragglers/top1_rank") == 1 for r in train)
    last = train[-1] if train else {}
    spread = last.get("stragglers/step_time_max_s", 0) / max(last.get("stragglers/step_time_min_s", 1e-9), 1e-9)
    busy = [last.get(f"rank_busy_s/rank{r}") for r in (0, 1)]
    hidden = f"; rank 0 waited {last['hidden_wait_s']:.3f} s inside fwd/bwd" if "hidden_wait_s" in last else ""
    return f"flagged: {'yes' if found else 'NO'}; step time max/min {spread:.2f}; compute_s {busy}{hidden}"


def check_health(run_dir: Path) -> str:
    record = read_json(next(run_dir.glob("health-*.json")))
    tflops = [g["tflops"] for g in record.get("gpus", [])]
    bus = record.get("bus") or {}
    return (f"matmul TFLOP/s per GPU {min(tflops):.0f}-{max(tflops):.0f}; busbw intra {bus.get('intra_gbps')} / "
            f"inter {bus.get('inter_gbps')} GB/s; {record.get('seconds')} s; flagged {record.get('flagged')}")


def check_lost_rank(run_dir: Path) -> str:
    attempts = [json.loads(x) for x in (run_dir / "attempts.jsonl").read_text().splitlines()]
    named = [a.get("lost_rank") for a in attempts]
    return f"attempts lines {len(attempts)}, lost rank {named}: {'ok' if named == [1] else 'WRONG'}"


CHECKS = {"gpus": check_gpus, "straggler": check_straggler, "health": check_health, "lost_rank": check_lost_rank}


def figures(record: dict) -> dict:
    return {"loss": record["loss"], "tokens_per_s": record["tokens_per_s"], "mfu": record.get("mfu"),
            "peak_gib": record.get("mem/peak_gib")}


def table(results: dict) -> str:
    lines = [f"{results['device']} x {results['world']}, torch {results['torch']}", "",
             "| row | ranks | result | loss | tokens/s | MFU | peak GiB | check |",
             "|---|---:|---|---:|---:|---:|---:|---|"]
    for name, r in results["rows"].items():
        status = r.get("error") or ("train, resume, USR2 + resume: ok" if r.get("attempts") else "ok")
        if r.get("attempts") and not r.get("error") and not r.get("steps"):
            status = "steps missing"
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
        peak = f"{r['peak_gib']:.2f}" if r.get("peak_gib") is not None else "-"
        loss = f"{r['loss']:.3f}" if "loss" in r else "-"
        tokens, check = f"{r.get('tokens_per_s', 0):,.0f}", r.get("check", "")
        lines.append(f"| {name} | {r['ranks']} | {status} | {loss} | {tokens} | {mfu} | {peak} | {check} |")
    return "\n".join(lines)


def run_row(row: Row, world: int, folder: Path) -> dict:
    out = {"ranks": row.ranks(world), **(smoke if row.kind == "smoke" else figure)(row, world, folder)}
    if row.check and "error" not in out:
        try:
            out["check"] = CHECKS[row.check](row.folder(folder))
        except (OSError, KeyError, ValueError, StopIteration) as e:
            out["check"] = f"unreadable: {e!r}"
    return out


def run_rows(rows: list[Row], world: int, folder: Path, jobs: int, into: dict) -> None:
    """Rows `jobs` at a time (each row is its own `python -m launch` processes and run folder), in table order."""
    with concurrent.futures.ThreadPoolExecutor(max(1, jobs)) as pool:
        done = pool.map(lambda row: run_row(row, world, folder), rows)
        for row, out in zip(rows, done):
            into[row.name] = out
            print(f"  {row.name}: {out.get('error', 'ok')}", flush=True)
            for line in [*out.get("stderr", []), *(x for log in out.get("rank_logs", {}).values() for x in log)]:
                print(f"    | {line}", flush=True)


def dry_run() -> int:
    """Plan every row for 8 GPUs; non-zero when any cannot plan."""
    errors = {r.name: plan_error(r, 8) for r in ROWS}
    for row in ROWS:
        print(f"  {row.name:30} {row.ranks(8)} rank(s), {row.kind:6}: {errors[row.name] or 'plans'}"
              f"   [{' '.join(row.overrides)}]")
    failed = [name for name, e in errors.items() if e]
    print(f"\nNO GPU WORK DONE (--dry-run): {len(ROWS) - len(failed)} of {len(ROWS)} rows plan for 8 GPUs"
          + (f"; cannot plan: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="plan every row for 8 GPUs and run nothing")
    ap.add_argument("--kind", action="append", choices=["smoke", "once", "figure"], help="only rows of this kind")
    ap.add_argument("--runs", type=Path, help="keep the run folders here (default: a temporary folder)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="smoke and once rows run this many at a time (figure rows always run alone: an MFU "
                         "measured beside other runs is theirs too)")
    args = ap.parse_args()
    if args.dry_run:
        sys.exit(dry_run())
    if args.runs and args.runs.exists() and any(args.runs.iterdir()):  # its rows would resume the last session's runs
        sys.exit(f"--runs {args.runs} is not empty: give an empty or new folder")
    import torch

    world = world_for(torch.cuda.device_count())
    if not world:
        sys.exit("NO GPU WORK DONE: this machine has no CUDA GPU; `--dry-run` plans the rows anywhere")
    results: dict = {"world": world, "device": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": {}}
    rows = rows_for(world, args.kind)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.runs or Path(tmp)
        run_rows([r for r in rows if r.kind != "figure"], world, folder, args.jobs, results["rows"])
        run_rows([r for r in rows if r.kind == "figure"], world, folder, 1, results["rows"])
    print("\n" + table(results))
    print(f"\nresults: {save_results('gpu_smoke', results)}")


if __name__ == "__main__":
    main()
