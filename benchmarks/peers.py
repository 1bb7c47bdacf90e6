"""gptlaunch's training step beside its peers' loops, at the same shapes and tokens per step, on one GPU in one call:
`gpt2_124m` (16 x 1,024, 4 micro-steps) beside nanoGPT's own `model.py` and `configure_optimizers`, and `llama_1b`
(8 x 2,048, 4 micro-steps) beside transformers' `LlamaForCausalLM`. Prints tokens/s, MFU and peak memory of each,
and the ratio of each gptlaunch row to its peer.

    python -m benchmarks.peers --nanogpt ~/nanoGPT               # both pairs, on a GPU
    python -m benchmarks.peers --nanogpt ~/nanoGPT --pair gpt2 --ours fp8=train.precision=fp8
    python -m benchmarks.peers --tiny --nanogpt ~/nanoGPT        # anywhere: tiny shapes on the CPU, a smoke

nanoGPT is not vendored: `git clone https://github.com/karpathy/nanoGPT` (its model.py alone is read; without
--nanogpt the gpt2 pair runs gptlaunch alone). Every row is a process of its own, compiling into empty Inductor and
Triton caches of its own, so that no row reuses another's kernels or memory. gptlaunch runs as a user runs it,
`python -m launch ... train=gpu`, and its figures are its metrics' last window. The peers run the loop their own
training scripts run: bf16 autocast, the model with its loss compiled, fused AdamW, gradients clipped at 1.0, tokens
already on the GPU; `--steps` warm-up steps, then `--steps` timed ones. MFU is gptlaunch's formula
(gpt.model.flops) for every row. `--ours LABEL=OVERRIDES` adds a gptlaunch row with more overrides (comma-separated);
a row whose run fails is printed with its last line and the others go on. `--trace` profiles two more steps of
every row after its timed ones and prints where each row's step went on the device, by family of kernel
(launch.step_trace). Writes benchmarks/results/peers[_PAIR].json.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import REPO, SHARED_TEXT, compose_config, save_results  # noqa: E402

RESULT = "PEER_RESULT "  # the line a peer's process prints its figures on
TRACED = 2  # steps profiled after the timed ones (--trace)


@dataclass(frozen=True)
class Pair:
    name: str
    model: tuple[str, ...]  # the model overrides both sides build
    micro: int
    accum: int
    peer: str  # nanogpt or hf


PAIRS = {"gpt2": Pair("gpt2", ("model=gpt2_124m",), 16, 4, "nanogpt"),
         "llama": Pair("llama", ("model=llama_1b",), 8, 4, "hf")}
# the BPE corpus's vocabulary: the smallest a run on it takes
TINY_MODEL = ("model.n_layer=2", "model.n_head=4", "model.n_embd=64", "model.block_size=32", "model.vocab_size=2048")
TINY = {"gpt2": Pair("gpt2", ("model=gpt2_124m", *TINY_MODEL), 2, 2, "nanogpt"),
        "llama": Pair("llama", ("model=llama_124m", *TINY_MODEL, "model.n_query_groups=2"), 2, 2, "hf")}
OURS_GPU = ("train=gpu",)
OURS_CPU = ("train.device=cpu", "train.precision=fp32", "train.compile=false")


def data_overrides() -> list[str]:
    """Ours trains on Tiny Shakespeare's BPE (the tokens change nothing a step costs): the tree's copy of the corpus
    (carried to a GPU machine), else the shared one."""
    text = REPO / "data" / "tinyshakespeare" / "input.txt"
    return ["data=shakespeare_bpe", f"data.text_path={text if text.exists() else SHARED_TEXT}"]


def ours_command(pair: Pair, steps: int, tiny: bool, extra: list[str], run_dir: Path, trace: bool = False) -> list[str]:
    total = 2 * steps + (TRACED if trace else 0)  # the traced steps after the timed window, which they leave alone
    batch = [f"train.global_batch_size={pair.micro * pair.accum}", f"train.micro_batch_size={pair.micro}",
             f"train.max_steps={total}", f"train.decay_steps={total}", f"train.log_interval={steps}",
             *([f"profile.steps={2 * steps}-{total - 1}"] if trace else [])]
    quiet = ["train.eval_interval=0", "train.progress=false", "checkpoint.interval_steps=0", "resume=none"]
    return [sys.executable, "-m", "launch", f"hydra.run.dir={run_dir}", *pair.model, *data_overrides(),
            *(OURS_CPU if tiny else OURS_GPU), *batch, *quiet, *extra]


def fresh_env(folder: Path) -> dict[str, str]:
    from benchmarks.shakespeare import fresh_caches

    # the caller's PYTHONPATH too: the GPU round's packages (benchmarks/gpu_round.sh) are found through it
    path = [p for p in (os.environ.get("PYTHONPATH"), str(REPO)) if p]
    return {**fresh_caches(folder), "PYTHONPATH": os.pathsep.join(path)}


def run_ours(pair: Pair, steps: int, tiny: bool, extra: list[str], folder: Path, trace: bool = False) -> dict:
    """`python -m launch` as a user runs it; the logged window of the steps after the warm-up's."""
    from gpt.run_folder import RunFolder
    from launch.step_trace import summarize

    run_dir = folder / "run"
    start = time.perf_counter()
    proc = subprocess.run(ours_command(pair, steps, tiny, extra, run_dir, trace), cwd=REPO, capture_output=True,
                          text=True, env=fresh_env(folder))
    if proc.returncode:
        return {"error": f"exit {proc.returncode}: {(proc.stderr.strip().splitlines() or ['?'])[-1]}"}
    lines = (run_dir / "metrics" / "rank0.jsonl").read_text().splitlines()
    timed = next(r for r in map(json.loads, lines) if r["kind"] == "train" and r["step"] == 2 * steps)
    out = {"tokens_per_s": timed["tokens_per_s"], "step_s": (pair.micro * pair.accum * block(pair))
           / timed["tokens_per_s"], "mfu": timed.get("mfu"), "peak_gib": timed.get("mem/peak_gib"),
           "reserved_gib": timed.get("mem/reserved_gib"), "loss": timed["loss"],
           "command_s": time.perf_counter() - start}
    traces = RunFolder(run_dir).profile_traces()
    if trace and traces:
        out["trace"] = asdict(summarize(json.loads(traces[0].read_text())))
    return out


def run_peer(pair: Pair, steps: int, tiny: bool, peer_dir: Path | None, folder: Path, trace: bool = False) -> dict:
    """A peer's loop in a process of its own (this module's --worker)."""
    cmd = [sys.executable, "-m", "benchmarks.peers", "--worker", pair.peer, "--pair", pair.name,
           "--steps", str(steps), *(["--tiny"] if tiny else []), *(["--nanogpt", str(peer_dir)] if peer_dir else []),
           *(["--trace-to", str(folder / "peer.pt.trace.json")] if trace else [])]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=fresh_env(folder))
    found = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    if proc.returncode or not found:
        return {"error": f"exit {proc.returncode}: {(proc.stderr.strip().splitlines() or ['?'])[-1]}"}
    return json.loads(found[-1][len(RESULT):])


@functools.lru_cache
def model_of(pair: Pair):
    """The ModelConfig both sides build (composed once: Hydra takes a second)."""
    return compose_config(list(pair.model)).model


def block(pair: Pair) -> int:
    return model_of(pair).block_size


# --- the peers' loops, in their own process -------------------------------------------------------------------

def nanogpt_model(pair: Pair, checkout: Path, device: str):
    """nanoGPT's GPT from its checkout's model.py, of our model's shape, and its own optimizer setup."""
    spec = importlib.util.spec_from_file_location("nanogpt_model", checkout / "model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # torch.compile imports the module of the code it traces by its name
    spec.loader.exec_module(module)
    cfg = model_of(pair)
    conf = module.GPTConfig(block_size=cfg.block_size, vocab_size=cfg.vocab_size, n_layer=cfg.n_layer,
                            n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=0.0, bias=cfg.bias)
    model = module.GPT(conf).to(device)
    with contextlib.redirect_stdout(sys.stderr):  # it prints its parameter count and fused choice
        opt = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), device)
    return model, opt, (lambda x, y: model(x, y)[1])


def hf_model(pair: Pair, device: str):
    """transformers' LlamaForCausalLM of our model's shape (gpt.hf.architecture's mapping), SDPA, fused AdamW; the
    loss as its training computes it, compiled with the model."""
    import torch
    import torch.nn.functional as F
    import transformers

    from gpt.hf.architecture import hf_config

    cfg = model_of(pair)
    conf = hf_config(cfg, None)
    conf.use_cache = False
    model = transformers.AutoModelForCausalLM.from_config(conf, attn_implementation="sdpa").to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=device == "cuda")

    def loss(x, y):
        logits = model(input_ids=x).logits
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1))
    return model, opt, loss


def timed_loop(pair: Pair, steps: int, device: str, model, opt, loss_fn, trace_to: Path | None = None) -> dict:
    """`steps` warm-up steps then `steps` timed ones of `accum` micro-steps each, with bf16 autocast and the loss
    compiled on a GPU (fp32, eager on the CPU: the smoke); with `trace_to`, TRACED more under torch.profiler, each a
    `train step N` range as gptlaunch's traces have them, and where they went (launch.step_trace)."""
    import torch

    cuda = device == "cuda"
    cfg = model_of(pair)
    step_fn = torch.compile(loss_fn) if cuda else loss_fn
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    batches = [torch.randint(0, cfg.vocab_size, (2, pair.micro, cfg.block_size), device=device)
               for _ in range(pair.accum)]

    def one_step() -> torch.Tensor:
        for x, y in batches:
            with autocast():
                loss = step_fn(x, y) / pair.accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    for _ in range(steps):
        one_step()
    torch.cuda.synchronize() if cuda else None
    start = time.perf_counter()
    for _ in range(steps):
        loss = one_step()
    torch.cuda.synchronize() if cuda else None
    step_s = (time.perf_counter() - start) / steps
    tokens_per_s = pair.micro * pair.accum * cfg.block_size / step_s
    out = {"tokens_per_s": tokens_per_s, "step_s": step_s, "mfu": mfu_of(cfg, tokens_per_s, device),
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
           "reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None, "loss": loss.item() * pair.accum}
    if trace_to is not None:
        out["trace"] = traced(one_step, 2 * steps, cuda, trace_to)
    return out


def traced(one_step, first: int, cuda: bool, path: Path) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from launch.step_trace import summarize

    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]) as prof:
        for step in range(first, first + TRACED):
            with record_function(f"train step {step}"):
                one_step()
        torch.cuda.synchronize() if cuda else None
    prof.export_chrome_trace(str(path))
    return asdict(summarize(json.loads(path.read_text())))


def mfu_of(cfg, tokens_per_s: float, device: str) -> float | None:
    import torch

    from gpt.model.flops import flops_per_token, peak_flops

    peak = peak_flops(torch.cuda.get_device_name(0), "bf16") if device == "cuda" else None
    return tokens_per_s * flops_per_token(cfg) / peak if peak else None


def worker(args: argparse.Namespace) -> None:
    import torch

    pair = (TINY if args.tiny else PAIRS)[args.pair[0]]
    device = "cpu" if args.tiny else "cuda"
    torch.manual_seed(0)
    if args.tiny:
        torch.set_num_threads(1)
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
    built = nanogpt_model(pair, args.nanogpt, device) if args.worker == "nanogpt" else hf_model(pair, device)
    print(RESULT + json.dumps(timed_loop(pair, args.steps, device, *built, trace_to=args.trace_to)), flush=True)


# --- the table ------------------------------------------------------------------------------------------------

def rows_of(args: argparse.Namespace) -> list[tuple[Pair, str, str, list[str]]]:
    """(pair, label, side, overrides): gptlaunch, the peer, then each --ours variant, pair by pair (the comparison
    the pair is for first, should a time limit stop the rest)."""
    rows = []
    for name in args.pair or list(PAIRS):
        pair = (TINY if args.tiny else PAIRS)[name]
        rows.append((pair, "gptlaunch", "ours", []))
        if pair.peer == "hf" or args.nanogpt:
            rows.append((pair, "nanoGPT" if pair.peer == "nanogpt" else "transformers Llama", "peer", []))
        for label, overrides in args.ours:
            rows.append((pair, f"gptlaunch {label}", "ours", overrides))
    return rows


def measure(args: argparse.Namespace, keep) -> list[dict]:
    """Each row in turn, printed and handed to `keep` as it ends: a call stopped at its time limit keeps the rows it
    ran, their traces with them."""
    from launch.step_trace import StepTime

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (pair, label, side, overrides) in enumerate(rows_of(args)):
            folder = Path(tmp) / f"row{i}"
            r = (run_ours(pair, args.steps, args.tiny, overrides, folder, args.trace) if side == "ours"
                 else run_peer(pair, args.steps, args.tiny, args.nanogpt, folder, args.trace))
            micro = next((int(o.split("=", 1)[1]) for o in reversed(overrides)
                          if o.startswith("train.micro_batch_size=")), pair.micro)
            row = {"pair": pair.name, "label": label, "side": side, "overrides": overrides,
                   "shape": f"{micro} x {block(pair):,} x {pair.micro * pair.accum // micro}", **r}
            shown = r.get("error") or f"{r['tokens_per_s']:,.0f} tokens/s"
            traced = f"; traced: {StepTime(**r['trace']).line()}" if "trace" in r else ""
            print(f"  {pair.name} {label}: {shown}{traced}", flush=True)
            out.append(row)
            keep(out)
    return out


def ratio(row: dict, other: dict | None) -> str:
    """A gptlaunch row's tokens/s over another row's."""
    ok = row["side"] == "ours" and other is not None and other is not row
    return f"{row['tokens_per_s'] / other['tokens_per_s']:.2f}x" if ok else "-"


def table(rows: list[dict]) -> str:
    """One line a row; the ratio of each gptlaunch row to its pair's peer (and to its pair's first row)."""
    lines = ["| pair | row | micro x block x accumulation | tokens/s | s a step | MFU | peak (reserved) GiB "
             "| vs peer | vs gptlaunch |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        mates = [r for r in rows if r["pair"] == row["pair"] and "error" not in r]
        peer = next((r for r in mates if r["side"] == "peer"), None)
        base = next((r for r in mates if r["side"] == "ours"), None)
        if "error" in row:
            lines.append(f"| {row['pair']} | {row['label']} | {row['shape']} | {row['error']} | | | | | |")
            continue
        mfu = f"{row['mfu']:.1%}" if row.get("mfu") is not None else "-"
        # reserved: a CUDA graph's pool, which its replays allocate nothing from, shows there and not in the peak
        reserved = f" ({row['reserved_gib']:.1f})" if row.get("reserved_gib") is not None else ""
        peak = f"{row['peak_gib']:.1f}{reserved}" if row.get("peak_gib") is not None else "-"
        lines.append(f"| {row['pair']} | {row['label']} | {row['shape']} | {row['tokens_per_s']:,.0f} | "
                     f"{row['step_s']:.4f} | {mfu} | {peak} | {ratio(row, peer)} | {ratio(row, base)} |")
    return "\n".join(lines)


def trace_table(rows: list[dict]) -> str:
    """One line a traced row: the span of a step where it ran (the device, or the host on a CPU), how busy, and the
    time of each family of kernel, the families in the first traced row's order."""
    traced = [r for r in rows if "trace" in r]
    families = list(traced[0]["trace"]["families"])
    lines = [f"| pair | row | where | span | busy | {' | '.join(families)} |",
             "|---|---|---|" + "---:|" * (2 + len(families))]
    for r in traced:
        t = r["trace"]
        lines.append(f"| {r['pair']} | {r['label']} | {t['source']} | {t['span_ms']:.1f} | {t['busy_ms']:.1f} | "
                     + " | ".join(f"{t['families'].get(f, 0.0):.1f}" for f in families) + " |")
    return "\n".join(lines)


def variant(text: str) -> tuple[str, list[str]]:
    label, _, overrides = text.partition("=")
    if not overrides:
        raise argparse.ArgumentTypeError(f"LABEL=OVERRIDE[,OVERRIDE...], not {text!r}")
    return label, overrides.split(",")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nanogpt", type=Path, help="a nanoGPT checkout (its model.py is read)")
    ap.add_argument("--pair", action="append", choices=list(PAIRS), help="only this pair (repeatable)")
    ap.add_argument("--ours", action="append", type=variant, default=[], metavar="LABEL=OVERRIDES",
                    help="another gptlaunch row, e.g. fp8=train.precision=fp8 (repeatable)")
    ap.add_argument("--steps", type=int, default=10, help="warm-up steps, and as many timed ones")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU, eager and fp32: a smoke")
    ap.add_argument("--trace", action="store_true", help=f"profile {TRACED} more steps a row: where each went")
    ap.add_argument("--worker", choices=["nanogpt", "hf"], help=argparse.SUPPRESS)
    ap.add_argument("--trace-to", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.nanogpt and not (args.nanogpt / "model.py").is_file():
        ap.error(f"--nanogpt {args.nanogpt}: no model.py there (git clone https://github.com/karpathy/nanoGPT)")
    if args.worker:
        return worker(args)
    import torch

    if not args.tiny and not torch.cuda.is_available():
        sys.exit("NO GPU WORK DONE: no CUDA GPU here; --tiny runs the rows at tiny shapes on the CPU")
    device = "cpu (tiny shapes)" if args.tiny else torch.cuda.get_device_name(0)
    name = "_".join(["peers", *(["tiny"] if args.tiny else []), *(args.pair or [])])  # a file a call
    saved: list[Path] = []
    rows = measure(args, lambda rows: saved.append(save_results(name, {"device": device, "steps": args.steps,
                                                                     "rows": rows})))
    print(f"\n{device}, torch {torch.__version__}, {args.steps} warm-up and {args.steps} timed steps a row\n")
    print(table(rows))
    if any("trace" in r for r in rows):
        print(f"\nwhere a step went (ms a step, {TRACED} profiled steps after the timed ones):\n")
        print(trace_table(rows))
    print(f"\nresults: {saved[-1]}")
    if all("error" in r for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
