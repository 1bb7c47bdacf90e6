"""A local run's ranks end with their launcher: killed outright (kill -9), it cannot stop them itself, and
orphaned ranks would train on, holding the run folder. Each rank asks the kernel for one of its preemption signals
when its parent dies, which it treats as a preemption: every rank saves at the next step and stops.

And they pause with it: a plain SIGSTOP to the launcher's process group (`kill -STOP -PGID`) stops the launcher, which
cannot catch it, but not the ranks, which run in sessions of their own. Each rank stops itself once it sees its
launcher stopped; the launcher's SIGCONT handler resumes them (launch.backends.local), as after Ctrl-Z."""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from pathlib import Path

LAUNCHER_PID = "GPTLAUNCH_LAUNCHER_PID"
PARENT_PID = "GPTLAUNCH_PARENT_PID"  # the rank's parent when it is not the launcher: the server it forked from, whose
# end follows the launcher's (launch.rank.forked)
STORE_FD = "GPTLAUNCH_STORE_FD"  # rank 0's: the descriptor of its store's listening socket (launch.rank.forked)
PR_SET_PDEATHSIG = 1
PAUSE_POLL_S = 0.5  # how often a rank looks at its launcher's state: a procfs read, no file system, no scheduler


def end_with_launcher(signum: int = signal.SIGTERM) -> None:
    """`signum`: a signal this rank handles as a preemption (preemption.signals), else one that ends it."""
    parent = os.environ.get(PARENT_PID) or os.environ.get(LAUNCHER_PID, "")
    if not parent.isdigit() or not sys.platform.startswith("linux"):  # not set (or mangled) by our launcher
        return
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signum))
    if os.getppid() != int(parent):  # it died before the request was in place
        os.kill(os.getpid(), signum)


def pause_with_launcher() -> None:
    """A thread that stops this rank whenever its launcher is stopped (a stop of the launcher alone, as the debugger's
    't', is not this)."""
    launcher = os.environ.get(LAUNCHER_PID, "")
    if not launcher.isdigit() or not sys.platform.startswith("linux"):
        return
    stat = Path(f"/proc/{launcher}/stat")

    def watch() -> None:
        while True:
            time.sleep(PAUSE_POLL_S)
            try:  # the state follows the command's closing parenthesis: "PID (COMM) S ..."
                state = stat.read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                return  # the launcher is gone: end_with_launcher's signal takes over
            if state == "T":
                os.kill(os.getpid(), signal.SIGSTOP)

    threading.Thread(target=watch, name="gptlaunch-pause-with-launcher", daemon=True).start()
