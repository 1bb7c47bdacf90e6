"""Resume's check of a checkpoint costs the shared file system the same at any world size: rank 0 alone stats the
files meta.json lists, the other ranks only see that the folder is whole, and every rank learns the verdict. Real gloo
ranks of one simulated job; each counts its stats of the checkpoint's files."""
from __future__ import annotations

import json
import os
import pathlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from gpt.collectives.process_group import DistEnv, init_process_group, leave
from gpt.train.resume import Resume
from helpers import spawn_ranks

WORLD, FILES = 4, 20


def checkpoint(folder: Path) -> Path:
    folder.mkdir()
    files = {f"__{i}_0.distcp": 64 for i in range(FILES)}
    for name, size in files.items():
        (folder / name).write_bytes(b"x" * size)
    (folder / ".metadata").write_bytes(b"m")
    (folder / "meta.json").write_text(json.dumps({"step": 4, "files": files}))
    return folder


def _rank(rank: int, world: int, port: int, out) -> None:
    torch.set_num_threads(1)
    env = DistEnv(rank=rank, world_size=world, master_addr="127.0.0.1", master_port=port, hostname=f"h{rank}")
    init_process_group(env, torch.device("cpu"), timeout_s=60)
    whole, truncated = Path(out["whole"]), Path(out["truncated"])
    stats = []
    real = pathlib.Path.stat

    def counted(self, *args, **kwargs):
        if self.parent == whole and self.suffix == ".distcp":
            stats.append(self.name)
        return real(self, *args, **kwargs)

    pathlib.Path.stat = counted
    resume = SimpleNamespace(env=env, faults=SimpleNamespace(unreadable=lambda newest: None))
    problems = [Resume.readable_everywhere(resume, path, newest=True) for path in (whole, truncated)]
    pathlib.Path.stat = real
    out[rank] = {"stats": len(stats), "problems": problems}
    leave()


@pytest.mark.slow  # real ranks: a minute of start-up on a loaded machine
@pytest.mark.timeout(300)
def test_only_rank_0_stats_the_manifest_and_a_truncated_file_is_still_named_on_every_rank(tmp_path):
    whole, truncated = checkpoint(tmp_path / "step_00000004"), checkpoint(tmp_path / "step_00000008")
    shard = truncated / "__3_0.distcp"
    os.truncate(shard, 10)
    got = spawn_ranks(_rank, WORLD, {"whole": str(whole), "truncated": str(truncated)})
    # before: every rank stat'ed every listed file twice (is_file, then its size): 2 * FILES * WORLD in all
    assert [got[r]["stats"] for r in range(WORLD)] == [2 * FILES] + [0] * (WORLD - 1)
    line = f"rank 0 on h0: shard {shard} has 10 bytes, 64 were written (truncated or corrupt)"
    assert [got[r]["problems"] for r in range(WORLD)] == [[None, line]] * WORLD
