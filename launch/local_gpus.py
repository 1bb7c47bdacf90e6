"""This machine's GPUs as the launcher plans for them (how many, how much memory), read without importing torch.

A CUDA build of torch takes seconds to import (5.0-5.8 s cold on an H100; with CUDA's start it delayed the rank by
3.5 s, docs/results.md), and the rank imports torch anyway. NVML (nvidia-ml-py, over the library the NVIDIA
driver installs) answers in milliseconds. Where it cannot (no driver library, a MIG instance or ROCm's GPUs), torch
answers, as it always did. NVML lists GPUs in PCI bus order, CUDA by default fastest first: on a machine of mixed
GPUs the two orders differ, so the planner reads the count and the smallest memory, never "GPU 0".
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Gpu:
    uuid: str  # "GPU-..." as NVML and CUDA_VISIBLE_DEVICES write it
    memory_gib: float


def gpus_visible() -> bool:
    """Whether this process may see a GPU, read without a library: an NVIDIA device file (or ROCm's /dev/kfd),
    unless CUDA_VISIBLE_DEVICES hides them all. False is certain (CUDA and ROCm open these files)."""
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES", "x").strip() in ("", "-1", "NoDevFiles")
    return bool(glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/kfd")) and not hidden


def local_gpus() -> tuple[Gpu, ...]:
    """The GPUs this process's CUDA would see, in CUDA's order: NVML's, else torch's."""
    if not gpus_visible():
        return ()
    found = nvml_gpus()
    return found if found is not None else torch_gpus()


def nvml_gpus() -> tuple[Gpu, ...] | None:
    """The driver's GPUs through NVML, chosen as CUDA_VISIBLE_DEVICES chooses; None where NVML cannot tell."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no nvidia-ml-py, or no driver library (a ROCm machine): torch tells
        return None
    try:
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        every = [Gpu(_text(pynvml.nvmlDeviceGetUUID(h)), pynvml.nvmlDeviceGetMemoryInfo(h).total / 2**30)
                 for h in handles]
        return visible(every, os.environ.get("CUDA_VISIBLE_DEVICES"))
    except pynvml.NVMLError:
        return None
    finally:
        pynvml.nvmlShutdown()


def cuda_visible(spec: str) -> list[str]:
    """The entries of CUDA_VISIBLE_DEVICES that CUDA enumerates, in its order and as it reads them (torch's
    _parse_visible_devices): indices by their leading digits ("1gpu" is 1), else GPU UUIDs ("GPU-...") or MIG slices
    ("MIG-..."), the first entry's kind; up to the first entry of another kind or without digits (-1 ends the list);
    an entry named twice: none at all. Of MIG slices the first alone: CUDA enumerates one MIG device per process.
    Whatever their names, the process then numbers them 0..n-1."""
    entries = [e.strip() for e in spec.split(",")]
    prefix = next((p for p in ("GPU-", "MIG-") if entries[0].startswith(p)), None)
    chosen: list[str] = []
    for entry in entries:
        digits = entry[:len(entry) - len(entry.lstrip("0123456789"))]
        name = (entry if entry.startswith(prefix) else "") if prefix else digits and str(int(digits))
        if not name:
            break
        if name in chosen:
            return []
        chosen.append(name)
    return chosen[:1] if prefix == "MIG-" else chosen


def visible(every: list[Gpu], spec: str | None) -> tuple[Gpu, ...] | None:
    """The GPUs CUDA_VISIBLE_DEVICES names, as CUDA reads it (cuda_visible; and torch's NVML count,
    torch.cuda._device_count_nvml): indices or UUID prefixes, in order, up to the first entry that names none; a GPU
    named twice: none at all. None for MIG instances, which NVML lists elsewhere."""
    if spec is None:
        return tuple(every)
    entries = cuda_visible(spec)
    if entries and entries[0].startswith("MIG-"):
        return None
    chosen: list[Gpu] = []
    for entry in entries:
        if entry.startswith("GPU-"):
            named = [g for g in every if g.uuid.startswith(entry)]
            gpu = named[0] if len(named) == 1 else None
        else:
            gpu = every[int(entry)] if int(entry) < len(every) else None
        if gpu is None:
            break
        if gpu in chosen:
            return ()
        chosen.append(gpu)
    return tuple(chosen)


def torch_gpus() -> tuple[Gpu, ...]:
    import torch

    if not torch.cuda.is_available():
        return ()
    return tuple(Gpu(f"cuda:{i}", torch.cuda.get_device_properties(i).total_memory / 2**30)
                 for i in range(torch.cuda.device_count()))


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
