"""What a W&B run already holds, read from its local transaction logs (RUN_DIR/wandb/*/run-<id>.wandb): one per
attempt, written in offline and online mode alike. An attempt asks before it logs, because W&B's service process
dies with the preemption signal (SIGTERM reaches every process of a Slurm step), after it has written some of the
attempt's points and before it could write the rest. Torch-free.

The files are LevelDB-style logs of wandb's protobuf Records: a 7-byte file header (":W&B", magic, version),
then 32 KiB blocks of chunks, each with a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last).
"""
from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024
HEADER = 7


def records(path: Path) -> Iterator[Any]:
    """The Records of one transaction log, up to the first torn one (a process killed mid-write)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, parts = path.read_bytes(), HEADER, b""
    if data[:4] != b":W&B":
        return
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # a block's tail too short for a chunk header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        parts += data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            try:
                record.ParseFromString(parts)
            except Exception:  # noqa: BLE001 - protobuf's DecodeError: the log ends in a torn record
                return
            parts = b""
            yield record


def segments(run_dir: Path, run_id: str) -> list[Path]:
    return sorted((run_dir / "wandb").glob(f"*-{run_id}*/run-{run_id}.wandb"))


def history(run_dir: Path, run_id: str) -> Iterator[tuple[int, str, Any]]:
    """(step, key, value) of every point the run's segments hold, in the order they were written."""
    for path in segments(run_dir, run_id):
        for record in records(path):
            if record.WhichOneof("record_type") == "history":
                step = record.history.step.num
                for item in record.history.item:
                    key = "/".join(item.nested_key) or item.key
                    if not key.startswith("_"):  # wandb's own _step, _runtime, _timestamp
                        yield step, key, json.loads(item.value_json)


def last_steps(run_dir: Path, run_id: str) -> dict[str, int]:
    """key -> the last step the run holds a point of."""
    last: dict[str, int] = {}
    for step, key, _ in history(run_dir, run_id):
        last[key] = max(step, last.get(key, -1))
    return last
