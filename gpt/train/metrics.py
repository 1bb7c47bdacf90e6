"""Per-rank metrics: one JSONL file and one TensorBoard run per rank in the run folder. A report can be
rebuilt from these files alone, long after the job is gone."""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from collections.abc import Iterable

import psutil
import torch
from tensorboard.compat.proto.summary_pb2 import Summary
from torch.utils.tensorboard.summary import scalar, text

from gpt.collectives.process_group import DistEnv
from gpt.config.credentials import redacted
from gpt.config.parse import to_plain
from gpt.config.schema import RunConfig
from gpt.resilience.disk_faults import Outage, RecordFile
from gpt.run_folder import STEP_COUNTS, RunFolder, in_steps_done
from gpt.train.event_file import EventFile
from gpt.train.tracker import TrackerRun, open_tracker


def memory_stats(device: torch.device) -> dict[str, float]:
    """GiB in use: allocator figures on CUDA, the process's resident set on CPU. On CUDA the peak is the
    window's: it is reset after each reading."""
    gib = 2**30
    if device.type == "cuda":
        stats = {
            "mem/allocated_gib": torch.cuda.memory_allocated(device) / gib,
            "mem/peak_gib": torch.cuda.max_memory_allocated(device) / gib,
            "mem/reserved_gib": torch.cuda.memory_reserved(device) / gib,
        }
        torch.cuda.reset_peak_memory_stats(device)
        return stats
    return {"mem/rss_gib": psutil.Process(os.getpid()).memory_info().rss / gib}


# Parts of a parameter's name that wrappers add: torch.compile, DDP, FSDP1 and checkpoint wrappers.
WRAPPER_PARTS = ("_orig_mod", "module", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")


def layer_key(name: str) -> str:
    """'layers.3.attn.q_proj.weight' -> 'layers.3'; '_orig_mod.wte.weight' -> 'wte'."""
    parts = [p for p in name.split(".") if p not in WRAPPER_PARTS]
    return ".".join(parts[:2]) if parts[0] == "layers" else parts[0]


def layer_keys(names: Iterable[str]) -> list[str]:
    """The layer keys of a full model's parameter names, in model order (the same list on every rank)."""
    return list(dict.fromkeys(layer_key(n) for n in names))


def layer_grad_norms(local_grads: Iterable[tuple[str, torch.Tensor, int]], keys: list[str],
                     device: torch.device) -> dict[str, float]:
    """Gradient norm per transformer layer (and for the embeddings and head) at the cost of one all_reduce.

    `local_grads` yields (parameter name, the part of its gradient this rank holds, how many ranks hold that
    same part): each rank sums its own squares per layer, weighted by 1 / copies, and the sums are added over
    the ranks once. Reading the result synchronises with the device: call it on log steps only."""
    from gpt.collectives.process_group import sum_over_ranks

    index = {k: i for i, k in enumerate(keys)}
    squares = torch.zeros(len(keys), device=device, dtype=torch.float32)
    for name, grad, copies in local_grads:
        key = layer_key(name)
        if key in index:
            squares[index[key]] += grad.detach().float().pow(2).sum().to(device) / copies
    total = sum_over_ranks(squares)
    return {f"grad_norm/{k}": math.sqrt(max(v, 0.0)) for k, v in zip(keys, total.tolist())}


RECORD_FIELDS = ("kind", "step", STEP_COUNTS, "rank", "host", "time", "elapsed_s")  # a record's own fields


def scalars(kind: str, values: dict) -> dict[str, float]:
    """A record's finite numbers under their TensorBoard tags: "loss" of a train record is "train/loss"."""
    return {key if "/" in key else f"{kind}/{key}": value for key, value in values.items()
            if key not in RECORD_FIELDS and isinstance(value, (int, float)) and math.isfinite(value)}


def _ranks_beyond(folder: RunFolder, world_size: int) -> list[int]:
    ranks = [f.stem.removeprefix("rank") for f in folder.metrics_files()]
    return [int(r) for r in ranks if r.isdigit() and int(r) >= world_size]


def _drop_from(path: Path, resume_step: int, keep_val_at_resume: bool, tracker: TrackerRun | None = None) -> None:
    """Keep the records up to `resume_step` steps done (its evaluation only if it is not run again); give the tracker
    those it lacks. An older folder's records are kept as they were written (gpt.run_folder.in_steps_done)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:  # cut short by a killed attempt
            continue
        step = in_steps_done(r).get("step", -1)
        if step < resume_step or (step == resume_step and (r.get("kind") != "val" or keep_val_at_resume)):
            keep.append(line)
            if tracker is not None:
                tracker.log(step, scalars(r.get("kind", "train"), r))
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(x + "\n" for x in keep))
    tmp.replace(path)


class MetricsWriter:
    """Writes `metrics/rank{R}.jsonl` and TensorBoard events under `tensorboard/rank{R}`. A disk that fills (a
    quota, a read-only folder) costs the records written meanwhile, never the run (gpt.resilience.disk_faults): a
    record that does not fit is dropped whole. Both files stay open: a record costs the file system one write to
    each (one TensorBoard event for the whole record), no metadata operation."""

    def __init__(self, run_dir: Path, rank: int, hostname: str, resume_step: int | None = None,
                 keep_val_at_resume: bool = True, world_size: int | None = None, tracker: TrackerRun | None = None):
        """resume_step: the step this attempt starts from (its checkpoint's, or 0); records an earlier attempt
        wrote after it (steps it trained but did not checkpoint) are dropped, here and in TensorBoard
        (purge_step), so the run reads as one continuous run. Rank 0 drops them too from the files of ranks
        beyond `world_size` (an earlier attempt's, before a resume on fewer ranks), which no rank writes now. An
        experiment tracker cannot drop points: it is given the records kept here that it lacks (an earlier attempt
        could not log them), then this attempt's."""
        self.rank, self.hostname, self.tracker = rank, hostname, tracker
        self.start = time.time()
        folder = RunFolder(run_dir)
        folder.metrics.mkdir(parents=True, exist_ok=True)
        path = folder.metrics_file(rank)
        gone: list[int] = []
        if resume_step is not None:
            gone = _ranks_beyond(folder, world_size) if rank == 0 and world_size else []
            for r in [rank, *gone]:
                _drop_from(folder.metrics_file(r), resume_step, keep_val_at_resume, tracker if r == rank else None)
        self.path, self.tb_dir = path, folder.tensorboard_run(rank)
        self.jsonl = RecordFile(path, Outage(f"metrics file {path.name}", path.parent,
                                             "its records are dropped until there is room; training goes on"))
        tb_dir = self.tb_dir
        purge = None if resume_step is None else resume_step + 1  # the records at resume_step are its checkpoint's
        self.events = EventFile(tb_dir, Outage("TensorBoard events", tb_dir,
                                               "they are dropped until there is room; training goes on"), purge)
        for r in gone:
            EventFile(folder.tensorboard_run(r), self.events.file.outage, purge).close()

    def write(self, step: int, values: dict[str, float | None], kind: str = "train") -> None:
        record = {"kind": kind, "step": step, STEP_COUNTS: "done", "rank": self.rank, "host": self.hostname,
                  "time": time.time(), "elapsed_s": time.time() - self.start, **values}
        points = scalars(kind, values)
        self.jsonl.append((json.dumps(record) + "\n").encode())
        self.events.add(step, Summary(value=[v for key, value in points.items() for v in scalar(key, value).value]))
        if self.tracker is not None:
            self.tracker.log(step, points)

    def rewind(self, step: int) -> None:
        """Training goes back to `step` (divergence.policy=rollback): the records of the steps it undid are dropped,
        here and in TensorBoard (purge_step), as at a resume; an experiment tracker keeps its points."""
        self.jsonl.close()
        self.events.close()
        _drop_from(self.path, step, keep_val_at_resume=True)
        self.jsonl = RecordFile(self.path, self.jsonl.outage)
        self.events = EventFile(self.tb_dir, self.events.file.outage, step + 1)

    def text(self, tag: str, text_string: str) -> None:
        self.events.add(0, text(tag, text_string))

    def close(self) -> None:
        self.jsonl.close()
        self.events.close()
        if self.tracker is not None:
            self.tracker.close()


def open_metrics(run: RunConfig, env: DistEnv, run_dir: Path, resume_step: int,
                 keep_val_at_resume: bool) -> MetricsWriter:
    """This rank's metrics writer, with rank 0's experiment tracker (tracking.*), from `resume_step` on: from step 0
    too, since an attempt killed before its first checkpoint left records this one trains again."""
    tracker = open_tracker(run.tracking, run_dir, run.run_name, redacted(to_plain(run))) if env.is_main else None
    return MetricsWriter(run_dir, env.rank, env.hostname, resume_step=resume_step,
                         keep_val_at_resume=keep_val_at_resume, world_size=env.world_size, tracker=tracker)
