"""A local run's ranks end with their launcher: killed outright (kill -9), it cannot stop them itself, and
orphaned ranks would train on, holding the run folder. Each rank asks the kernel for one of its preemption signals
when its parent dies, which it treats as a preemption: every rank saves at the next step and stops."""
from __future__ import annotations

import ctypes
import os
import signal
import sys

LAUNCHER_PID = "GPTLAUNCH_LAUNCHER_PID"
PR_SET_PDEATHSIG = 1


def end_with_launcher(signum: int = signal.SIGTERM) -> None:
    """`signum`: a signal this rank handles as a preemption (preemption.signals), else one that ends it."""
    launcher = os.environ.get(LAUNCHER_PID, "")
    if not launcher.isdigit() or not sys.platform.startswith("linux"):  # not set (or mangled) by our launcher
        return
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signum))
    if os.getppid() != int(launcher):  # it died before the request was in place
        os.kill(os.getpid(), signum)
