"""One rank's TensorBoard event file, opened once. TensorBoard's own writer, without TensorFlow, opens its file
again at every flush (a metadata operation per record and rank on a shared file system) and writes from a thread,
where a full disk surfaces late; this one appends each event whole, in the caller's thread, to a file kept open."""
from __future__ import annotations

import io
import itertools
import os
import socket
import time
from pathlib import Path

from tensorboard.compat.proto.event_pb2 import Event, SessionLog
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.summary.writer.record_writer import RecordWriter

from gpt.resilience.disk_faults import Outage, RecordFile

_serial = itertools.count()  # two files of one process in one second still differ


def _records(events: list[Event]) -> bytes:
    buffer = io.BytesIO()
    writer = RecordWriter(buffer)  # TFRecord framing with its checksums
    for event in events:
        writer.write(event.SerializeToString())
    return buffer.getvalue()


class EventFile:
    """`events.out.tfevents.*` in `log_dir`, named as TensorBoard names its own. With `purge_step`, TensorBoard
    drops the events earlier files of the folder hold from that step on (an attempt's steps after its checkpoint)."""

    def __init__(self, log_dir: Path, outage: Outage, purge_step: int | None = None):
        log_dir.mkdir(parents=True, exist_ok=True)
        # TensorBoard reads a folder's files in name order, and a purge acts on the files before it: the serial is
        # zero-padded, or a process's 10th file of a second would sort before its 9th
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.{next(_serial):06d}"
        self.file = RecordFile(log_dir / name, outage)
        head = [Event(wall_time=time.time(), file_version="brain.Event:2")]
        if purge_step is not None:
            head.append(Event(wall_time=time.time(), step=purge_step, session_log=SessionLog(status=SessionLog.START)))
        self.head = _records(head)  # kept until it is written: a full disk at the open must not lose the purge
        self.append([])

    def add(self, step: int, summary: Summary) -> bool:
        return self.append([Event(wall_time=time.time(), step=step, summary=summary)])

    def append(self, events: list[Event]) -> bool:
        if not self.file.append(self.head + _records(events)):
            return False
        self.head = b""
        return True

    def close(self) -> None:
        self.file.close()
