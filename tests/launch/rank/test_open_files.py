"""A rank raises its open-file soft limit to the hard limit as it starts: every socket is a file, and rank 0 holds a
few per rank of the job (the store's, and gloo's gathers), which a soft limit of 1,024 refuses from about a
thousand ranks."""
from __future__ import annotations

import json
import resource
import subprocess
import sys

from helpers import REPO
from launch.rank.open_files import OpenFiles

RAISE = """
import json, resource
from launch.rank.open_files import raise_open_files
files = raise_open_files()
print(json.dumps([files.before, files.now, resource.getrlimit(resource.RLIMIT_NOFILE)[0]]))
"""


def _low_soft_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))


def test_the_soft_limit_is_raised_to_the_hard_one():
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    done = subprocess.run([sys.executable, "-c", RAISE], cwd=REPO, capture_output=True, text=True, check=True,
                          preexec_fn=_low_soft_limit)
    before, now, soft = json.loads(done.stdout)
    assert before == 256 and now == soft == (hard if hard != resource.RLIM_INFINITY else now) and now > 256


def test_rank_0_is_warned_where_the_hard_limit_is_short_of_the_job():
    assert OpenFiles(1024, 1024).describe() == "open files: soft limit 1024 (the hard limit)"
    assert OpenFiles(1024, 65536).describe() == "open files: soft limit 1024, raised to the hard limit 65536"
    assert OpenFiles(1024, 65536).short_for(8192) is None
    warning = OpenFiles(1024, 1024).short_for(8192)
    assert warning.startswith("open files: rank 0 may need about 25600 at 8192 ranks and may open 1024")
