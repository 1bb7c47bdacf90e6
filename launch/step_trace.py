"""`python -m launch.step_trace RUN_OR_TRACE...`: where a traced step's time went (profile.steps), from the Chrome
traces torch.profiler wrote: per step, the device's span and how busy it was, and its time by family of kernel
(matmul, attention, fused Triton, optimizer, communication, copies, elementwise, the rest). On a CPU run, which has
no device kernels, the host's operators by the same families, each counted by its own time (not its children's).

    python -m launch.step_trace runs/gpt2                       # every trace of the run, one line each
    python -m launch.step_trace runs/gpt2/profiles/attempt-1/rank0.pt.trace.json
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from gpt.run_folder import RunFolder

# first match wins: Inductor's kernels first, by the names it gives them after the ops they fused (a Triton kernel
# named after SDPA is the copy that feeds it, one named after an all-reduce its epilogue): its templates are matmuls
# (flex attention's attention), the rest fused ones; then cuDNN's attention before cuBLAS; clipping's foreach
# kernels go with the optimizer's
FAMILIES = (
    ("attention", r"^triton_tem.*flex_attention"),
    ("matmul", r"^triton_tem"),
    ("fused (Triton)", r"^triton|cpp_fused"),
    ("communication", r"nccl|gloo|all_?reduce|all_?gather|reduce_?scatter|broadcast|c10d::"),
    ("attention", r"flash|fmha|attention|scaled_dot_product|cudnn"),
    ("optimizer", r"adam|multi_tensor_apply|foreach"),
    ("matmul", r"gemm|cutlass|xmma|nvjet|cublas|wgmma|\bmm\b|addmm|bmm|matmul"),
    ("copies", r"memcpy|memset|copy_|_to_copy"),
    ("elementwise", r"elementwise|reduce_kernel|norm|gelu|silu|softmax|nll|cross_entropy|fill_|\badd|\bmul|\bsum"),
)
DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
STEP = re.compile(r"^train step (\d+)$")
TOP = 30  # kernels (or host operators) kept by name, the longest: families can be drawn again without the trace


@dataclass
class StepTime:
    """One trace's steps: the time of each family, the span and the busy time, per step (ms)."""

    source: str  # "device" (GPU kernels) or "host" (CPU operators, their own time)
    steps: int
    span_ms: float
    busy_ms: float
    families: dict[str, float] = field(default_factory=dict)
    top: list[tuple[str, float]] = field(default_factory=list)  # (name, ms a step), the longest first

    def line(self) -> str:
        shares = ", ".join(f"{name} {ms:.1f}" for name, ms in self.families.items() if ms >= 0.05)
        busy = f", busy {self.busy_ms / self.span_ms:.0%}" if self.span_ms else ""
        return f"{self.source} {self.span_ms:.1f} ms a step over {self.steps} step(s){busy}: {shares}"


def family(name: str) -> str:
    lowered = name.lower()
    return next((f for f, pattern in FAMILIES if re.search(pattern, lowered)), "other")


def own_times(ops: list[dict]) -> list[tuple[str, float]]:
    """Each host operator's own time: its duration less its direct children's on the same thread."""
    out = []
    by_thread: dict[tuple, list[dict]] = {}
    for op in ops:
        by_thread.setdefault((op.get("pid"), op.get("tid")), []).append(op)
    for thread in by_thread.values():
        thread.sort(key=lambda e: (e["ts"], -e["dur"]))
        own = [e["dur"] for e in thread]
        stack: list[int] = []
        for i, op in enumerate(thread):
            while stack and thread[stack[-1]]["ts"] + thread[stack[-1]]["dur"] <= op["ts"]:
                stack.pop()
            if stack:
                own[stack[-1]] -= op["dur"]
            stack.append(i)
        out += [(op["name"], max(t, 0.0)) for op, t in zip(thread, own)]
    return out


def busy(intervals: list[tuple[float, float]]) -> float:
    """The length of the union of (start, end) intervals: kernels on several streams overlap."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def device_period(events: list[dict], intervals: list[tuple[float, float]]) -> tuple[float, float] | None:
    """(span, busy) in us of one step on the device, from where each traced step began there (its `train step N`
    range as CUDA saw it, gpu_user_annotation): the first's start to the last's over the steps between, so the gap
    before each next step counts, which the last kernel's end would leave out. None with fewer than two."""
    starts = sorted(float(e["ts"]) for e in events
                    if e.get("cat") == "gpu_user_annotation" and STEP.match(e.get("name", "")))
    if len(starts) < 2:
        return None
    first, last = starts[0], starts[-1]
    inside = [(max(a, first), min(b, last)) for a, b in intervals if b > first and a < last]
    return (last - first) / (len(starts) - 1), busy(inside) / (len(starts) - 1)


def summarize(trace: dict) -> StepTime:
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]
    steps = [e for e in events if e.get("cat") == "user_annotation" and STEP.match(e.get("name", ""))]
    n = max(len(steps), 1)
    kernels = [e for e in events if e.get("cat") in DEVICE_CATEGORIES]
    if kernels:
        timed = [(e["name"], float(e["dur"])) for e in kernels]
        intervals = [(float(e["ts"]), float(e["ts"]) + e["dur"]) for e in kernels]
        source = "device"
    else:  # a CPU run: the host's operators inside the traced steps
        ops = [e for e in events if e.get("cat") == "cpu_op"]
        timed = own_times(ops)
        intervals = [(float(e["ts"]), float(e["ts"]) + e["dur"]) for e in steps] or \
            [(float(e["ts"]), float(e["ts"]) + e["dur"]) for e in ops]
        source = "host"
    span = (max(b for _, b in intervals) - min(a for a, _ in intervals)) / n if intervals else 0.0
    used = sum(us for _, us in timed) / n if source == "host" else busy(intervals) / n
    if source == "device":
        span, used = device_period(events, intervals) or (span, used)
    families = {name: 0.0 for name, _ in FAMILIES} | {"other": 0.0}
    by_name: dict[str, float] = {}
    for name, us in timed:
        families[family(name)] += us
        by_name[name] = by_name.get(name, 0.0) + us
    ordered = dict(sorted(((k, v / n / 1e3) for k, v in families.items()), key=lambda kv: -kv[1]))
    top = sorted(((k, v / n / 1e3) for k, v in by_name.items()), key=lambda kv: -kv[1])[:TOP]
    return StepTime(source, n, span / 1e3, used / 1e3, ordered, top)


def traces_of(path: Path) -> list[Path]:
    return [path] if path.is_file() else RunFolder(path).profile_traces()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", type=Path, nargs="+", help="a run folder (each of its traces) or a trace file")
    args = ap.parse_args(argv)
    found = [t for p in args.paths for t in traces_of(p)]
    if not found:
        print(f"no profiler trace in {', '.join(map(str, args.paths))}: a run traces with profile.steps=A-B",
              file=sys.stderr)
        return 1
    for trace in found:
        print(f"{trace}: {summarize(json.loads(trace.read_text())).line()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
