"""`python -m launch.list [DIR]`: the runs and sweeps under DIR (default runs/), each with its state and last step,
from the run folders and one question to the scheduler. Torch-free: it runs on a login node."""
from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from launch.run_status import job_ids, read_status, run_folders, standings


def listing(root: Path, out=sys.stdout) -> int:
    runs = run_folders(root)
    if not runs:
        print(f"no runs under {root}", file=out)
        return 0
    infos = standings(sorted({j for r in runs for j in job_ids(r)}))
    for r in runs:
        s = read_status(r, infos)
        step = f"step {s.step if s.step is not None else '-'}/{s.max_steps if s.max_steps is not None else '?'}"
        jobs = f"job {','.join(s.job_ids)} {s.shown}" if s.job_ids else "no job"
        print(f"{r.relative_to(root)}: {s.verdict}, {step}, {jobs}", file=out)
    return 0


def main(argv: list[str] | None = None) -> None:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `| head` ends it quietly, as any listing
    parser = argparse.ArgumentParser(prog="python -m launch.list", description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path, nargs="?", default=Path("runs"))
    args = parser.parse_args(argv)
    sys.exit(listing(args.dir))


if __name__ == "__main__":
    main()
