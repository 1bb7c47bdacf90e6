"""Ranks forked from a preloaded server instead of started as fresh interpreters (the local backend's rank start).

A rank's imports (torch, DCP, the trainer, torch._dynamo that DDP's and FSDP's constructors import) take 3-5 CPU-s
before it does anything: most of a small run, and of every in-job restart. The local backend starts one
multiprocessing forkserver per launcher that imports them once (launch.rank.rank_server), and forks each rank of
every round and sweep point from it. The server never runs anything else: no CUDA, no OpenMP team, so each fork
starts as clean as a fresh interpreter. With GPUs visible the ranks are fresh interpreters all the same
(multiprocessing's spawn): a fork after anything touched CUDA cannot use it, and the forked start has not been
measured on a GPU yet.

`start` is each rank's entry, in a forked (or spawned) child. Its stdout and stderr are the launcher's as they are
when the rank starts (`Stdio`, sent with the request): the server keeps those it was started with, and a process
that launches more than once (a test worker, a notebook) may have redirected its own since. Rank 0 also gets the
socket its store serves on (`StoreSocket`), bound and listening since the launcher chose its port.
"""
from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
import os
import sys
import time

from launch.rank.parent import STORE_FD

PRELOAD = ["launch.rank.rank_server"]


class Stdio:
    """The starting process's file descriptors 1 and 2, duplicated into the rank as multiprocessing sends file
    descriptors to a child (the server receives them with the request; spawn inherits them)."""

    def __reduce__(self):
        from multiprocessing.reduction import DupFd

        return _attach_stdio, (DupFd(1), DupFd(2))


def _attach_stdio(out, err) -> None:
    for fd, sent in ((1, out.detach()), (2, err.detach())):
        if sent != fd:
            os.dup2(sent, fd)
            os.close(sent)


class StoreSocket:
    """The launcher's listening socket for rank 0's store, duplicated into the rank as Stdio's descriptors are: the
    port stays bound from the moment the launcher chose it (a port found free and bound later could be taken in
    between, by another run's store or anything else); the store serves on it (TCPStore's master_listen_fd)."""

    def __init__(self, fd: int):
        self.fd = fd

    def __reduce__(self):
        from multiprocessing.reduction import DupFd

        return _detach, (DupFd(self.fd),)


def _detach(sent) -> int:
    return sent.detach()


def start(run_dir: str, environ: dict[str, str], imports_from: float | None, stdio: None = None,
          store_fd: int | None = None) -> None:
    """Become rank RANK of `environ`: the environment a fresh rank would have been started with, whole.
    `imports_from`: when the server this rank forked from began its imports, if it began them for this attempt (its
    start-up breakdown counts them); otherwise the imports were done before, and count nothing. `stdio`: a `Stdio`,
    attached as it arrived (unpickled to None). `store_fd`: rank 0's, a `StoreSocket` as it arrived (a descriptor)."""
    entered = time.time()
    os.setsid()  # a session of its own, as the spawned ranks had: the terminal's Ctrl-C reaches the launcher alone
    # The server's end should follow the launcher's alone (launch.rank.parent): a rank keeps no hold on it.
    alive = multiprocessing.forkserver._forkserver._forkserver_alive_fd
    if alive is not None:
        os.close(alive)
        multiprocessing.forkserver._forkserver._forkserver_alive_fd = None
    # multiprocessing made this child's default start method the server's: a fresh interpreter's default again (with
    # it, a lock that tqdm or a library makes would be a named semaphore, left for the launcher's tracker to report)
    multiprocessing.set_start_method(None, force=True)
    os.environ.clear()
    os.environ.update(environ)
    if store_fd is not None:
        os.environ[STORE_FD] = str(store_fd)
    sys.argv = ["launch.rank.worker", run_dir]
    from gpt.resilience.progress import PROGRESS
    from launch.rank import worker

    PROGRESS.restart()

    worker.STARTED = imports_from or entered
    worker.main()  # ends the process: os._exit with the rank's exit code
