"""Imported by the local backend's rank server alone (launch.rank.forked): what every rank imports, once, and a
session of its own. Out of the launcher's process group, a signal to the group (`kill -TERM -PGID`, a closed
terminal, Ctrl-Z) is the launcher's to relay; the server ends when the launcher does (multiprocessing's forkserver
reads its end of a pipe from the launcher)."""
import os

os.setsid()

import launch.rank.worker  # noqa: E402,F401
import gpt.train.trainer  # noqa: E402,F401
import torch._dynamo  # noqa: E402,F401  DDP's and FSDP's constructors import it: seconds of every round's model build
