"""`make setup` (and `make run`, `make test`, which run it first) picks torch's build by the machine: the CUDA build
from PyTorch's index where nvidia-smi answers with a GPU, the CPU wheel constraints.txt pins anywhere else, CI
included. Read from `make -n` with a stand-in nvidia-smi first on PATH: nothing is installed or downloaded."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from helpers import REPO

# today's CPU line, word for word: a CPU machine installs exactly what it did (with torchao since fp8)
CPU_LINE = "DS_BUILD_OPS=0 {venv}/bin/pip install -q -c constraints.txt -e '.[dev,deepspeed,tracking,hf,eval,sweep,fp8]'"
SMI = {"gpu": 'echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-5e4b)"',
       # installed, but no driver answers (a login node with the tools, a container without the GPU)
       "no driver": "echo \"NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\"; exit 9"}


def setup_lines(tmp_path, smi: str | None, **env: str) -> list[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    if smi is not None:
        (bin_dir / "nvidia-smi").write_text(f"#!/bin/sh\n{SMI[smi]}\n")
        (bin_dir / "nvidia-smi").chmod(0o755)
    make = shutil.which("make")
    if make is None:
        pytest.fail("make is not installed: the Makefile is the front door (README.md)")
    keep = {k: v for k, v in os.environ.items() if k not in ("TORCH_BUILD", "CUDA", "MAKEFLAGS", "MAKELEVEL")}
    done = subprocess.run([make, "-n", "-B", "setup", f"VENV={tmp_path / 'venv'}"], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env={**keep, **env, "PATH": f"{bin_dir}:/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


@pytest.mark.parametrize("smi", [None, "no driver"])
def test_a_machine_without_a_working_gpu_installs_the_pinned_cpu_wheel_as_before(tmp_path, smi):
    lines = setup_lines(tmp_path, smi)
    assert CPU_LINE.format(venv=tmp_path / "venv") in lines
    assert not any("download.pytorch.org" in x or "cu1" in x for x in lines), lines
    assert lines[-1] == f"touch {tmp_path / 'venv'}/.installed-cpu"


def test_a_machine_with_an_nvidia_gpu_installs_torchs_cuda_build_of_the_pinned_version(tmp_path):
    lines = setup_lines(tmp_path, "gpu")
    venv = tmp_path / "venv"
    cuda = (f"{venv}/bin/pip install -q -c constraints.txt --extra-index-url https://download.pytorch.org/whl/cu128 "
            "'torch==2.13.0+cu128'")
    assert lines.index(cuda) < lines.index(CPU_LINE.format(venv=venv)), lines  # torch first: the rest keeps it
    assert lines[-1] == f"touch {venv}/.installed-cuda"  # a CPU venv on this machine is set up again


def test_a_gpu_machine_may_keep_the_cpu_wheel_or_name_its_cuda(tmp_path):
    assert not any("cu1" in x for x in setup_lines(tmp_path / "a", "gpu", TORCH_BUILD="cpu"))
    assert any(x.endswith("/whl/cu126 'torch==2.13.0+cu126'") for x in setup_lines(tmp_path / "b", "gpu", CUDA="cu126"))
