"""Checkpoints under bad conditions, in one process: a kill -9 in the middle of a save, a corrupt or missing shard,
a checkpoint of another model config, a read-only folder; also retention, time-based and asynchronous saves."""
from __future__ import annotations

import contextlib
from collections import Counter
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from helpers import REPO, SHAKESPEARE, compose, launch, losses, make_plan_of
from gpt.checkpoint.store import list_checkpoints, step_of
from gpt.data import read_meta
from gpt.data.prepare import prepare
from gpt.collectives.process_group import DistEnv
from gpt.errors import UserError
from gpt.train.trainer import Trainer
from gpt.config import schema
from gpt.config.strategy import StrategyConfig
from gpt.train.resume import what_to_do
from launch import launch_config

BASE = ["model=tiny", "train.max_steps=12", "train.warmup_steps=2", "train.log_interval=1", "train.eval_interval=0",
        "train.progress=false", "train.lr=3e-3", f"data.text_path={SHAKESPEARE}", "checkpoint.interval_steps=4"]


@pytest.fixture
def trainer(tmp_path_factory):
    prepared = tmp_path_factory.getbasetemp() / "resilience-data"

    def make(run_dir: Path, *overrides: str) -> Trainer:
        cfg = compose(*BASE, f"data.dir={prepared}", *overrides)
        make_plan_of(launch_config.parse(cfg), run_dir)
        return Trainer(schema.load(run_dir / "config.yaml"), DistEnv(), run_dir)

    return make


@pytest.fixture
def full(trainer, tmp_path) -> Path:
    run_dir = tmp_path / "full"
    trainer(run_dir).fit()
    return run_dir


@pytest.mark.slow
def test_retention_keeps_the_newest_k_and_each_holds_every_part(full):
    found = list_checkpoints(full / "checkpoints")
    assert [p.name for p in found] == ["step_00000004", "step_00000008", "step_00000012"]
    meta = json.loads((found[-1] / "meta.json").read_text())
    assert meta["step"] == 12 and meta["tokens_seen"] == 12 * meta["data"]["global_batch_size"] * 64
    assert "model.n_layer" in meta["fingerprint"] and (found[-1] / "ranks" / "rank0.pt").is_file()
    assert all(size > 0 for size in meta["files"].values())


@pytest.mark.slow
def test_corrupt_newest_checkpoint_falls_back_to_the_previous_with_a_warning(trainer, full, tmp_path, caplog):
    run_dir = tmp_path / "copy"
    shutil.copytree(full, run_dir)
    newest = run_dir / "checkpoints" / "step_00000012"
    shard = next(newest.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])  # truncated
    t = trainer(run_dir, "train.max_steps=16", "train.decay_steps=12")
    assert t.step == 8
    assert f"shard {shard} has 100 bytes" in caplog.text and "falling back" in caplog.text
    # an explicit resume=PATH does not fall back: it names the file
    with pytest.raises(UserError, match=f"cannot resume from {newest}: rank 0 on [^:]+: shard {shard}"):
        trainer(tmp_path / "explicit", f"resume={newest}")
    # a missing shard too
    (run_dir / "checkpoints" / "step_00000008" / shard.name).unlink()
    t = trainer(run_dir, "train.max_steps=16", "train.decay_steps=12")
    assert t.step == 4 and "is missing" in caplog.text


@pytest.mark.parametrize("meta, strategy, advice", [
    ({"strategy": "ddp"}, StrategyConfig("pipeline"), "they were written with strategy=ddp: continue with that, or "),
    ({"strategy": "deepspeed", "strategy_keys": {"stage": 2}}, StrategyConfig("deepspeed", stage=3),
     "they were written with strategy=deepspeed strategy.stage=2: continue with that, or "),
    ({"strategy": "deepspeed"}, StrategyConfig("deepspeed", stage=3),  # written before meta.json recorded the stage
     "if they were written with another strategy.stage, continue with that; else remove the broken ones, or "),
    ({"strategy": "ddp"}, StrategyConfig("ddp"), "remove the broken ones, or "),
])
def test_when_no_checkpoint_loads_the_advice_fits_the_likely_cause(tmp_path, meta, strategy, advice):
    """Whole checkpoints (their files were checked) that do not load, written with other strategy settings than
    this run's, are in a layout it cannot read: not broken."""
    (tmp_path / "meta.json").write_text(json.dumps({"step": 4, **meta}))
    assert what_to_do(tmp_path, strategy) == advice + "start a new run under another name (run=NAME)"


@pytest.mark.slow  # seconds of CPU: out of make test-fast's slice
def test_a_checkpoint_of_another_model_config_lists_the_mismatching_keys(trainer, full):
    with pytest.raises(UserError) as e:
        trainer(full, "model.n_layer=3", "train.lr=1e-3")
    text = str(e.value)
    assert "model.n_layer: checkpoint 2, this run 3" in text or "model.n_layer: checkpoint" in text
    assert "train.lr: checkpoint 0.003, this run 0.001" in text and "model.n_embd" not in text


@pytest.mark.slow
def test_a_checkpoint_records_its_data_and_resumes_only_on_the_same(trainer, tmp_path):
    """The data folder deleted and prepared again from other text under the run: the resume (a requeue, an in-job
    round) is refused in one line naming both fingerprints; a checkpoint from before the record resumes."""
    data, run_dir = tmp_path / "data", tmp_path / "run"
    trainer(run_dir, f"data.dir={data}", "train.max_steps=4").fit()
    fingerprint = read_meta(data)["fingerprint"]
    [ckpt] = list_checkpoints(run_dir / "checkpoints")
    assert json.loads((ckpt / "meta.json").read_text())["data_fingerprint"] == fingerprint
    shutil.rmtree(data)
    prepare(SHAKESPEARE, data, val_fraction=0.2)  # other tokens under the same vocabulary
    run = schema.load(run_dir / "config.yaml")  # as a rank reads it: no planning in between
    with pytest.raises(UserError, match=f"trained on data with fingerprint {fingerprint} .*now holds data with "
                       f"fingerprint {read_meta(data)['fingerprint']}") as e:
        Trainer(run, DistEnv(), run_dir)
    assert "\n" not in str(e.value)
    meta = json.loads((ckpt / "meta.json").read_text())
    del meta["data_fingerprint"]  # written before checkpoints recorded their data
    (ckpt / "meta.json").write_text(json.dumps(meta))
    assert Trainer(run, DistEnv(), run_dir).step == 4


def test_read_only_checkpoint_folder_is_a_clear_error_naming_it(trainer, tmp_path):
    run_dir = tmp_path / "ro"
    (run_dir / "checkpoints").mkdir(parents=True)
    folder = run_dir / "checkpoints"
    if os.geteuid() == 0:  # root ignores permission bits: make the folder immutable instead
        if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
            pytest.skip("chattr +i is not available here")
    else:
        folder.chmod(0o555)
    try:
        t = trainer(run_dir, "train.max_steps=2", "checkpoint.interval_steps=0")
        with pytest.raises(UserError, match=rf"cannot write checkpoint {folder}/\.tmp-step_00000002: "):
            t.fit()
    finally:
        subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
        folder.chmod(0o755)


@pytest.mark.slow  # seconds of CPU: out of make test-fast's slice
def test_resume_none_starts_over_and_a_config_typo_is_named(trainer, full):
    assert trainer(full, "resume=none").step == 0
    from gpt.errors import ConfigError
    with pytest.raises(ConfigError, match="checkpoint.keep"):
        trainer(full, "checkpoint.keep=0")


@pytest.mark.slow
def test_async_and_time_based_saves_match_sync_bitwise(trainer, full, tmp_path):
    run_dir = tmp_path / "async"
    t = trainer(run_dir, "checkpoint.async=true", "checkpoint.interval_minutes=0.0001")
    t.fit()
    assert losses(run_dir) == losses(full)
    steps = [int(p.name[5:]) for p in list_checkpoints(run_dir / "checkpoints")]
    assert steps[-1] == 12 and len(steps) == 3  # every step was due by the clock; the newest 3 are kept
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))
    resumed = trainer(run_dir, "train.max_steps=12")
    assert resumed.step == 12


@pytest.mark.slow
def test_kill_9_while_writing_a_checkpoint_leaves_the_previous_one_and_the_same_command_resumes(
        tmp_path, data_overrides):
    args = [*BASE[:-1], *data_overrides, "checkpoint.interval_steps=4"]
    reference = tmp_path / "reference"
    launch(*args, run_dir=reference)
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "launch", f"hydra.run.dir={run_dir}", *args, "debug.save_sleep_s=60",
           "debug.save_sleep_step=8"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    partial = run_dir / "checkpoints" / ".tmp-step_00000008"
    deadline = time.monotonic() + 120
    try:
        while not (partial / ".metadata").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the run never reached its step-8 save"
            time.sleep(0.1)
    finally:  # kill -9 of this test's launcher and its rank (which runs in a session of its own)
        for pid in [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == ["step_00000004"]
    launch(*args, run_dir=run_dir)  # the same command
    assert "resumed from" in (run_dir / "logs" / "rank0.log").read_text()
    assert not partial.exists()
    assert losses(run_dir) == losses(reference)


@pytest.mark.slow
def test_checkpoints_are_kept_and_resumed_by_write_order_not_by_step(trainer, tmp_path):
    """A run that resumed from step 8 (step 12 was unreadable) and saved step 10 has written 10 after 12: 12 is
    the abandoned one. The newest `keep` usable ones by write order are kept, 12 counting for nothing (before, with
    keep=2, it was kept and 8, the sound one, went), and the next resume takes 10."""
    run_dir = tmp_path / "run"
    trainer(run_dir, "train.decay_steps=12", "checkpoint.keep=2").fit()  # writes 4, 8, 12; keeps 8, 12
    resumed = trainer(run_dir, "train.decay_steps=12", "checkpoint.keep=2", "train.max_steps=10",
                      "debug.unreadable_rank=0")
    assert resumed.step == 8
    resumed.fit()  # writes 10, then keeps 8 and 10: 12, unusable, goes once 10 is complete
    assert [step_of(p) for p in list_checkpoints(run_dir / "checkpoints")] == [8, 10]
    again = trainer(run_dir, "train.decay_steps=12", "checkpoint.keep=2", "train.max_steps=10")
    assert again.step == 10


@pytest.mark.slow
def test_saving_a_step_again_replaces_it_only_once_the_new_copy_is_whole(trainer, full):
    """The previous copy moves aside (.old-step_N) before the new one goes in: a crash between the two renames
    leaves it listed and loadable, and the next save clears it away."""
    ckpts = full / "checkpoints"
    os.replace(ckpts / "step_00000012", ckpts / ".old-step_00000012")  # as a crash between the renames leaves it
    assert [p.name for p in list_checkpoints(ckpts)][-1] == ".old-step_00000012"
    t = trainer(full, "train.max_steps=12")
    assert t.step == 12
    t.saver.checkpointer.save(12, t.strategy, t.saver.meta(12, eval_pending=False), t.resume.state.rank_state(12))
    assert [p.name for p in list_checkpoints(ckpts)] == ["step_00000004", "step_00000008", "step_00000012"]
    assert not list(ckpts.glob(".old-*")) and trainer(full, "train.max_steps=12").step == 12


@pytest.mark.slow  # seconds of CPU: out of make test-fast's slice
def test_every_file_and_folder_is_fsynced_before_the_rename_and_the_rename_before_the_prune(trainer, tmp_path,
                                                                                          monkeypatch):
    """What a power cut would lose cannot be made here, so the order is watched instead: os.fsync, os.replace and
    shutil.rmtree are recorded (each still does its work), with the path an fsynced descriptor names."""
    events = []
    fsync, replace, rmtree = os.fsync, os.replace, shutil.rmtree
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(a), str(b))), replace(a, b))[1])
    monkeypatch.setattr(shutil, "rmtree", lambda p, **kw: (events.append(("rmtree", str(p))), rmtree(p, **kw))[1])
    run_dir = tmp_path / "run"
    trainer(run_dir, "train.max_steps=8", "checkpoint.keep=1").fit()
    ckpts = run_dir / "checkpoints"
    tmp, final = str(ckpts / ".tmp-step_00000008"), str(ckpts / "step_00000008")
    commit = events.index(("replace", tmp, final))
    synced = [e[1].removesuffix(".tmp") for e in events[:commit] if e[0] == "fsync"]  # DCP's .metadata: as .tmp
    files = [str(p).replace(final, tmp) for p in Path(final).rglob("*") if p.is_file()]
    assert set(files) <= set(synced) and f"{tmp}/meta.json" in synced and tmp in synced
    prune = events.index(("rmtree", str(ckpts / "step_00000004")))
    assert ("fsync", str(ckpts)) in events[commit:prune]


@pytest.mark.slow
def test_a_checkpoint_a_user_copied_aside_is_left_alone(tmp_path, data_overrides):
    """A copy of a checkpoint that a user sets aside in checkpoints/ (step_N.bak, step_N-copy, step_x) is not one of
    the run's: launch.status, planning, resume and the next saves and prunes skip it, with one line at most, and
    retention never deletes it."""
    run_dir, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    args = ["model=tiny", "train.max_steps=12", "train.warmup_steps=2", "train.eval_interval=0",
            "checkpoint.interval_steps=4", "checkpoint.keep=1", *data_overrides]
    launch(*args, "debug.signal_at_step=6", "debug.signal_name=SIGTERM", run_dir=run_dir, check=False)
    saved = list_checkpoints(ckpts)[-1]
    copies = [ckpts / f"{saved.name}.bak", ckpts / f"{saved.name}-copy", ckpts / "step_x"]
    for copy in copies:
        shutil.copytree(saved, copy)
    status = subprocess.run([sys.executable, "-m", "launch.status", str(run_dir)], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert "Traceback" not in status.stdout + status.stderr and "step 6" in status.stdout, status.stderr[-3000:]
    launch(*args, run_dir=run_dir)  # the same command: planning, resume, the saves of steps 8 and 12, their prunes
    assert [p.name for p in list_checkpoints(ckpts)] == ["step_00000012"] and all(c.is_dir() for c in copies)
    log = (run_dir / "logs" / "rank0.log").read_text()
    assert all(log.count(f"{copy} is not a checkpoint of the run") <= 1 for copy in copies), log[-3000:]


def test_each_rank_syncs_its_own_file(tmp_path, monkeypatch):
    """On a shared file system rank 0's fsync at the commit does not flush what another node still caches: the rank
    that writes ranks/rank<R>.pt syncs it, and the folder's entry for it, before its part of the save is done."""
    from gpt.checkpoint.writer import Checkpointer

    synced = []
    fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), fsync(fd))[1])
    (tmp_path / "tmp").mkdir()
    Checkpointer(tmp_path, rank=3, is_main=False)._write_rank_state(tmp_path / "tmp", {"rng": [1, 2]})
    assert synced == [str(tmp_path / "tmp" / "ranks" / "rank3.pt"), str(tmp_path / "tmp" / "ranks")]


def test_the_commit_syncs_the_folders_and_leaves_each_file_to_the_writer_that_synced_it(tmp_path, monkeypatch):
    """DCP's writer fsyncs each file it writes (sync_files), as each rank does its rank file: rank 0 opening and
    syncing every rank's files again at the commit cost a metadata operation per file, and flushed nothing that
    another node still cached. Each file is synced once; the folders, whose entries the commit needs, by rank 0."""
    import torch

    from gpt.checkpoint.writer import Checkpointer
    from gpt.parallel.base import Strategy
    from gpt.parallel.layout import ParallelDims

    synced: Counter[str] = Counter()
    fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.update([os.readlink(f"/proc/self/fd/{fd}")]), fsync(fd))[1])
    strategy = Strategy(None, DistEnv(), torch.device("cpu"), "fp32", ParallelDims())
    strategy.setup(torch.nn.Linear(4, 4), 1e-3, 0.1, (0.9, 0.95))
    path = Checkpointer(tmp_path / "checkpoints").save(1, strategy, {}, rank_state={"rng": [1]})
    files = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
    tmp = next(Path(p).parent for p in synced if p.endswith("meta.json"))
    # DCP syncs .metadata under its temporary name, then renames it
    once = {f: synced[str(tmp / f)] + synced[str(tmp / f"{f}.tmp")] for f in files}
    assert once == {f: 1 for f in files}  # before: 2 for every file but meta.json, rank 0 syncing each again
    assert synced[str(tmp)] >= 1 and synced[str(tmp / "ranks")] >= 1 and synced[str(tmp.parent)] >= 1
