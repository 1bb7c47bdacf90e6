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
from torch.utils.tensorboard import SummaryWriter


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
    from gpt.distributed import sum_over_ranks

    index = {k: i for i, k in enumerate(keys)}
    squares = torch.zeros(len(keys), device=device, dtype=torch.float32)
    for name, grad, copies in local_grads:
        key = layer_key(name)
        if key in index:
            squares[index[key]] += grad.detach().float().pow(2).sum().to(device) / copies
    total = sum_over_ranks(squares)
    return {f"grad_norm/{k}": math.sqrt(max(v, 0.0)) for k, v in zip(keys, total.tolist())}


class MetricsWriter:
    """Writes `metrics/rank{R}.jsonl` and TensorBoard events under `tensorboard/rank{R}`."""

    def __init__(self, run_dir: Path, rank: int, hostname: str, resume_step: int | None = None,
                 keep_val_at_resume: bool = True):
        """resume_step: the step this attempt starts from (its checkpoint's, or 0); records an earlier attempt
        wrote from it on (steps it trained but did not checkpoint) are dropped, here and in TensorBoard
        (purge_step), so the run reads as one continuous run."""
        self.rank, self.hostname = rank, hostname
        self.start = time.time()
        (run_dir / "metrics").mkdir(parents=True, exist_ok=True)
        path = run_dir / "metrics" / f"rank{rank}.jsonl"
        if resume_step is not None and path.exists():
            keep = []
            for line in path.read_text().splitlines():
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:  # cut short by a killed attempt
                    continue
                step = r.get("step", -1)
                if step < resume_step or (step == resume_step and r.get("kind") == "val" and keep_val_at_resume):
                    keep.append(line)
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(x + "\n" for x in keep))
            tmp.replace(path)
        self.jsonl = open(path, "a", buffering=1)
        self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard" / f"rank{rank}"), purge_step=resume_step)

    def write(self, step: int, values: dict[str, float | None], kind: str = "train") -> None:
        record = {"kind": kind, "step": step, "rank": self.rank, "host": self.hostname, "time": time.time(),
                  "elapsed_s": time.time() - self.start, **values}
        self.jsonl.write(json.dumps(record) + "\n")
        for key, value in values.items():
            if isinstance(value, (int, float)) and value is not None and math.isfinite(value):
                self.tb.add_scalar(key if "/" in key else f"{kind}/{key}", value, step)

    def text(self, tag: str, text: str) -> None:
        self.tb.add_text(tag, text)

    def close(self) -> None:
        self.jsonl.close()
        self.tb.close()
