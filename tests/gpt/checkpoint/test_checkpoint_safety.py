"""A checkpoint is data, not code: a crafted one whose unpickling would run a command (in its DCP metadata, a DCP
shard's item or a rank's file) is refused with one line (by resume=PATH and by gpt.generate), and the command never
runs; a checkpoint someone else owns is warned about."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from gpt.checkpoint.store import META, manifest
from helpers import REPO, launch

RUN = ["model=tiny", "train.max_steps=4", "train.warmup_steps=2", "train.eval_interval=0", "checkpoint.interval_steps=4"]


class RunsACommand:
    """What an attacker pickles: unpickling it calls os.system."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, data_overrides) -> Path:
    run_dir = tmp_path_factory.mktemp("safety") / "run"
    launch(*RUN, *data_overrides, run_dir=run_dir)
    return run_dir / "checkpoints" / "step_00000004"


def crafted(checkpoint: Path, tmp_path: Path, part: str) -> tuple[Path, Path]:
    folder, marker = tmp_path / "crafted", tmp_path / "the-command-ran"
    shutil.copytree(checkpoint, folder)
    if part == ".metadata":
        (folder / ".metadata").write_bytes(pickle.dumps(RunsACommand(marker)))
    elif part == "__0_0.distcp":
        write_item(checkpoint, folder, RunsACommand(marker))
    else:
        torch.save({"rng": RunsACommand(marker)}, folder / part)
    meta = json.loads((folder / META).read_text())  # the attacker writes a manifest that holds
    meta["files"] = {name: size for name, size in manifest(folder).items() if name != META}
    (folder / META).write_text(json.dumps(meta))
    return folder, marker


def write_item(checkpoint: Path, folder: Path, item: object) -> None:
    """Write `folder` as DCP writes a checkpoint, with `item` as a param group's lr: DCP torch.saves each non-tensor
    item into its shard, at the offset .metadata names."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    state = _load_state_dict_from_keys(checkpoint_id=checkpoint)  # everything the genuine checkpoint holds
    lr = next(key for key in state["optim"] if key.startswith("param_groups.") and key.endswith(".lr"))
    state["optim"][lr] = item
    dcp.save(state, checkpoint_id=folder, no_dist=True)


def generate(path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gpt.generate", str(path), "--tokens", "4", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_generate_refuses_what_it_cannot_sample_in_one_line_and_samples_greedily_at_temperature_0(checkpoint):
    for args, line in ((["--prompt", "é"], "error: character 'é' is not in this character tokenizer's vocabulary"),
                       (["--prompt="], "error: --prompt is empty"), (["--top-k", "-1"], "error: --top-k -1: at least 0"),
                       (["--temperature", "nan"], "error: --temperature nan: at least 0")):
        proc = generate(checkpoint, *args)
        assert proc.returncode == 2 and proc.stderr.strip().startswith(line) and "\n" not in proc.stderr.strip(), (
            args, proc.stderr)  # one line, no usage block above it
    greedy = [generate(checkpoint, "--temperature", "0", "--seed", str(seed)) for seed in (1, 2)]
    assert greedy[0].returncode == 0 and greedy[0].stdout == greedy[1].stdout, greedy[0].stderr[-2000:]
    assert generate(checkpoint, "--top-k", "0").returncode == 0  # 0: every token


@pytest.mark.slow
def test_generate_refuses_crafted_dcp_metadata(checkpoint, tmp_path):
    folder, marker = crafted(checkpoint, tmp_path, ".metadata")
    proc = generate(folder)
    assert proc.returncode == 2 and not marker.exists(), proc.stderr[-3000:]
    assert proc.stderr.strip() == (f"error: checkpoint {folder}: {folder / '.metadata'} names posix.system is not "
                                   "part of a checkpoint's metadata: refused, unpickling it could run code")


@pytest.mark.parametrize("part", [".metadata", "__0_0.distcp", "ranks/rank0.pt"])
@pytest.mark.slow
def test_resume_from_a_crafted_checkpoint_is_refused(part, checkpoint, tmp_path, data_overrides):
    folder, marker = crafted(checkpoint, tmp_path, part)
    proc = launch(*RUN, *data_overrides, f"resume={folder}", "train.max_steps=6", run_dir=tmp_path / "new",
                  check=False)
    out = proc.stdout + proc.stderr + (tmp_path / "new" / "logs" / "rank0.log").read_text()
    assert proc.returncode == 2 and not marker.exists(), out[-3000:]
    assert "Traceback" not in out
    assert f"{folder / part} names posix.system" in out and "refused, unpickling it could run code" in out, out[-3000:]


@pytest.mark.slow
def test_a_checkpoint_someone_else_owns_is_warned_about(checkpoint, tmp_path):
    folder = tmp_path / "theirs"
    shutil.copytree(checkpoint, folder)
    for path in [folder, *folder.rglob("*")]:
        os.chown(path, 65534, 65534)  # nobody's (the tests run as root, who may give files away)
    proc = generate(folder)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"checkpoint {folder} belongs to " in proc.stderr and "not to you" in proc.stderr
    assert "not to you" not in generate(checkpoint).stderr


@pytest.mark.slow
def test_deepspeed_engine_files_load_as_data_and_a_crafted_one_is_refused(tmp_path):
    """DeepSpeed's engine reads its files through load_deepspeed_file (weights_only=True): what its ZeRO optimizer
    state pickles loads, a pickle that would run a command is refused in one line and the command never runs."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    from gpt.checkpoint.safe_load import Refused, load_deepspeed_file

    state = {"optimizer_state_dict": {"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.gradients,
                                      "dynamic": DynamicLossScaler(2.0**16, 1000, 1.0, 2, False),
                                      "mapping": {"w": fragment_address(numel=4, start=0)}, "w": torch.ones(4)}}
    torch.save(state, tmp_path / "optim_states.pt")
    loaded = load_deepspeed_file(tmp_path / "optim_states.pt", map_location=lambda storage, loc: storage)
    assert loaded["optimizer_state_dict"]["zero_stage"] == ZeroStageEnum.gradients
    assert loaded["optimizer_state_dict"]["dynamic"].cur_scale == 2.0**16
    marker = tmp_path / "the-command-ran"
    torch.save({"optimizer_state_dict": RunsACommand(marker)}, tmp_path / "crafted.pt")
    with pytest.raises(Refused, match=r"crafted.pt names posix.system, which a DeepSpeed checkpoint does not hold"):
        load_deepspeed_file(tmp_path / "crafted.pt")
    assert not marker.exists()


@pytest.mark.slow
def test_deepspeeds_own_readers_load_data_only(tmp_path):
    """zero_to_fp32, which puts a DeepSpeed checkpoint's weights together for export and generation, calls
    torch.load(weights_only=False): inside deepspeed_files_as_data that loads data only, and a crafted file is
    refused, naming the engine's folder, before its command runs."""
    from gpt.checkpoint.safe_load import Refused, deepspeed_files_as_data

    marker = tmp_path / "the-command-ran"
    torch.save({"optimizer_state_dict": RunsACommand(marker)}, tmp_path / "crafted.pt")
    with pytest.raises(Refused, match=rf"{tmp_path} names posix.system, which a DeepSpeed checkpoint does not hold"):
        with deepspeed_files_as_data(tmp_path):
            torch.load(tmp_path / "crafted.pt", weights_only=False)
    assert not marker.exists()
    torch.save({"w": torch.ones(2)}, tmp_path / "plain.pt")
    with deepspeed_files_as_data(tmp_path):
        assert torch.equal(torch.load(tmp_path / "plain.pt", weights_only=False)["w"], torch.ones(2))
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ
