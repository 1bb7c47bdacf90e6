"""`python -m launch.logs RUN [--rank R] [-f]`: a rank's log (RUN/logs/rank<R>.log), which every attempt of the run
appends to; with -f it is followed across requeues and chained jobs until the run's jobs have all ended.
Torch-free: it runs on a login node."""
from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

from gpt.run_folder import RunFolder
from launch.run_status import UNKNOWN, WAITING, job_ids, read_status, standings

POLL_S = 0.5
ASK_EVERY_S = 5.0  # how often -f asks the scheduler whether the run's jobs still run


class Follower:
    """Reads what was appended to a file since the last call; starts over when the file was replaced or cut."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.inode: int | None = None

    def read_new(self) -> str:
        try:
            stat = self.path.stat()
        except OSError:
            return ""
        if stat.st_ino != self.inode or stat.st_size < self.offset:
            self.inode, self.offset = stat.st_ino, 0
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        self.offset += len(data)
        return data.decode(errors="replace")


def still_running(run_dir: Path) -> bool:
    ids = list(job_ids(run_dir))
    # the scheduler not answering: its job may still run, and write to the log
    return bool(ids) and read_status(run_dir, standings(ids)).verdict in (WAITING, UNKNOWN)


def follow(run_dir: Path, rank: int, out=sys.stdout, poll_s: float = POLL_S) -> None:
    reader = Follower(RunFolder(run_dir).log(rank))
    asked, running = 0.0, True
    while True:
        text = reader.read_new()
        if text:
            out.write(text)
            out.flush()
        elif not running:
            return
        if time.monotonic() - asked > ASK_EVERY_S:
            asked, running = time.monotonic(), still_running(run_dir)
        time.sleep(poll_s if running else 0)


def world_size(run_dir: Path) -> int | None:
    """The ranks the run's config asks for (None where it cannot be read)."""
    import yaml

    try:
        config = yaml.safe_load(RunFolder(run_dir).config.read_text())
        return int(config["nodes"]) * int(config["cluster"]["tasks_per_node"])
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError):
        return None


def main(argv: list[str] | None = None) -> None:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `| head` ends it quietly, as any listing
    parser = argparse.ArgumentParser(prog="python -m launch.logs", description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a run folder (runs/NAME, or a sweep's point)")
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("-f", "--follow", action="store_true", help="follow it until the run's jobs have ended")
    args = parser.parse_args(argv)
    log_file = RunFolder(args.run).log(args.rank)
    if not RunFolder(args.run).config.is_file():
        print(f"error: {args.run} is not a run folder (it has no config.yaml)", file=sys.stderr)
        sys.exit(2)
    ranks = world_size(args.run)  # a rank of an earlier attempt on more ranks keeps its log
    if ranks is not None and not 0 <= args.rank < ranks and not log_file.is_file():
        print(f"error: --rank {args.rank}: {args.run} runs ranks 0 to {ranks - 1}", file=sys.stderr)
        sys.exit(2)
    if not args.follow:
        if not log_file.is_file():
            print(f"error: no log of rank {args.rank} yet ({log_file}); its job may still wait: "
                  f"python -m launch.status {args.run}", file=sys.stderr)
            sys.exit(1)
        sys.stdout.write(log_file.read_text(errors="replace"))
        return
    try:
        follow(args.run, args.rank)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
