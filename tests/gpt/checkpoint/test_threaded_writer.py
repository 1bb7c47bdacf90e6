"""DCP's writer with several threads: an error in any thread (the disk full) reaches the save."""
from __future__ import annotations

import errno
import threading

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystem

from gpt.checkpoint.threaded_writer import ThreadedWriter


def test_an_error_in_an_extra_writer_thread_fails_the_save_instead_of_dropping_its_file(tmp_path, monkeypatch):
    opened, helper_failed = FileSystem.create_stream, threading.Event()

    def full_for_the_extra_thread(self, path, mode):
        if threading.current_thread() is threading.main_thread():
            helper_failed.wait(10)  # the extra thread takes a file first, whatever the scheduling
            return opened(self, path, mode)
        helper_failed.set()
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(FileSystem, "create_stream", full_for_the_extra_thread)
    state = {f"w{i}": torch.full((64,), float(i)) for i in range(4)}
    with pytest.raises(CheckpointException, match="No space left on device"):
        dcp.save(state, storage_writer=ThreadedWriter(tmp_path, thread_count=2), no_dist=True)
