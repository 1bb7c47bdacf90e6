"""python -m launch.report RUN_OR_SWEEP_DIR: rebuild the report from the run folders' files alone."""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from launch.report.build import write_report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.report",
                                     description="Scaling report of a run folder or a sweep folder.")
    parser.add_argument("dir", type=Path, help="a run folder (config.yaml, metrics/) or a sweep folder of them")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.dir.is_dir():
        print(f"error: {args.dir} is not a folder", file=sys.stderr)
        return 2
    try:
        out = write_report(args.dir)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print((out / "scaling.md").read_text())
    print(f"report: {out}\ntensorboard --logdir {args.dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
