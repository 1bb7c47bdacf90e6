"""The launcher's GPUs come from the driver's NVML, chosen as CUDA_VISIBLE_DEVICES chooses, without torch; torch
answers only where NVML cannot."""
from __future__ import annotations

import pytest
import torch

from cuda_standin import StrictCuda, StrictNvml
from launch.local_gpus import Gpu, local_gpus, visible

FOUR = [Gpu(f"GPU-{c}{c}{c}-0000", 80.0) for c in "abcd"]


@pytest.mark.parametrize("spec,chosen", [
    (None, "abcd"), ("0,1,2,3", "abcd"), ("2,0", "ca"), ("3", "d"),
    ("1,7,2", "b"),            # the first index it does not have ends the list
    ("0,-1,2", "a"),           # so does a negative one
    ("1,1", ""),               # a GPU named twice: none at all
    ("GPU-ccc,GPU-a", "ca"),   # UUID prefixes
    ("GPU-,1", ""),            # a prefix of several GPUs names none
    ("1abc,2", "bc"),          # CUDA reads an index's leading digits
    ("", ""), ("x", ""),
])
def test_cuda_visible_devices_chooses_as_cuda_reads_it(spec, chosen):
    assert "".join(g.uuid[4] for g in visible(FOUR, spec)) == chosen


def test_mig_instances_are_left_to_torch():
    assert visible(FOUR, "MIG-1234") is None


def test_the_launcher_counts_and_sizes_gpus_without_torch(monkeypatch):
    cuda = StrictCuda(devices=4).install(monkeypatch)
    for name in ("is_available", "device_count", "get_device_properties"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: pytest.fail("the launcher asked torch"))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    gpus = local_gpus()
    assert len(gpus) == 4 and gpus[0].memory_gib == cuda.MEMORY / 2**30
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    assert [g.uuid for g in local_gpus()] == [gpus[3].uuid, gpus[1].uuid]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # hides them all: no device to open
    assert local_gpus() == ()


def test_nvml_is_shut_down_after_each_answer(monkeypatch):
    StrictCuda(devices=2).install(monkeypatch)
    nvml = StrictNvml([1 << 30] * 2).install(monkeypatch)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert [g.memory_gib for g in local_gpus()] == [1.0, 1.0] and nvml.inits == 0


def test_where_nvml_cannot_tell_torch_answers(monkeypatch):
    """NVML fails to start, as the real one does on this machine (nvidia-ml-py without the driver's library) and
    on a machine of ROCm's GPUs: torch (the stand-in here) is asked."""
    import pynvml

    StrictCuda(devices=2).install(monkeypatch)
    monkeypatch.setattr(pynvml, "nvmlInit", lambda: (_ for _ in ()).throw(
        pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert [g.uuid for g in local_gpus()] == ["cuda:0", "cuda:1"]


def test_the_fit_check_reads_the_smallest_of_mixed_gpus(monkeypatch):
    """NVML's order (PCI bus) is not CUDA's (fastest first): no GPU is read as "the first"."""
    from launch.backends import Backend

    StrictCuda(devices=2).install(monkeypatch)
    StrictNvml([80 << 30, 40 << 30]).install(monkeypatch)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert Backend().device_memory_gib(None, "cuda") == 40.0
