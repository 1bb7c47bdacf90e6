"""Imported by the local backend's rank server alone (launch.rank.forked): what every rank imports, once, and a
session of its own. Out of the launcher's process group, a signal to the group (`kill -TERM -PGID`, a closed
terminal, Ctrl-Z) is the launcher's to relay; the server ends when the launcher does (multiprocessing's forkserver
reads its end of a pipe from the launcher)."""
import os
import signal

# Started ignoring Ctrl-C and SIGTERM (launch.backends.local): one sent to the launcher's group before this process
# leaves it is the launcher's alone.
os.setsid()
signal.signal(signal.SIGTERM, signal.SIG_DFL)
# Each rank forks with Ctrl-C ignored (multiprocessing's forkserver gives it the handler the server had before its own
# SIG_IGN) until its flag is in place: the launcher holds a Ctrl-C for a rank until then.

import launch.rank.worker  # noqa: E402,F401
import gpt.train.trainer  # noqa: E402,F401
import torch._dynamo  # noqa: E402,F401  DDP's and FSDP's constructors import it: seconds of every round's model build
