"""DCP's file writer with several threads, whose errors are not lost. torch 2.13's FileSystemWriter starts its extra
writer threads as plain threads: an error in one of them (the disk full) is printed as a thread's traceback and
dropped, and the save goes on without that file's items. Here every thread's error is kept and raised by the save,
as the single-threaded writer raises its own."""
from __future__ import annotations

import io
import threading
from collections.abc import Generator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem


class _KeptErrors(FileSystem):
    """Every write goes through create_stream: an error opening or writing a file is kept, and the rest of that file
    goes nowhere; the writer raises the first error once every thread is done."""

    def __init__(self) -> None:
        super().__init__()
        self.errors: list[BaseException] = []
        self.lock = threading.Lock()

    def keep(self, error: BaseException) -> None:
        with self.lock:
            self.errors.append(error)

    @contextmanager
    def create_stream(self, path: str | Path, mode: str) -> Generator[Any, None, None]:
        try:  # the file's close flushes it: the disk full may come only then
            with ExitStack() as opened:
                try:
                    stream = opened.enter_context(super().create_stream(path, mode))
                except Exception as e:  # noqa: BLE001 - raised again by ThreadedWriter.write_data, on the save's thread
                    self.keep(e)
                    stream = io.BytesIO()
                yield stream
        except Exception as e:  # noqa: BLE001 - as above
            self.keep(e)


class ThreadedWriter(FileSystemWriter):
    """FileSystemWriter(folder, thread_count=threads, ...) whose threads' errors reach the save."""

    def __init__(self, folder: Path, **options: Any):
        super().__init__(folder, **options)
        self.fs = _KeptErrors()

    def write_data(self, plan, planner):
        written = super().write_data(plan, planner)
        if self.fs.errors:
            error, self.fs.errors = self.fs.errors[0], []
            raise error
        return written
