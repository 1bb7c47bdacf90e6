"""The command line shared by the commands that read a checkpoint (gpt.generate, gpt.evaluate): the run or
checkpoint folder, a seed and a device; and a user's mistake said in one line (exit code 2), not a traceback."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from gpt.errors import EXIT_USER, ConfigError, UserError


def checkpoint_parser(module: str, doc: str) -> argparse.ArgumentParser:
    """`python -m MODULE PATH [--seed N] [--device D]`, described by the first line of the module's `doc`."""
    import torch

    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=doc.splitlines()[0])
    parser.add_argument("path", help="a run folder (its newest checkpoint is used) or a checkpoint folder")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


@contextmanager
def user_errors() -> Iterator[None]:
    try:
        yield
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USER)


@contextmanager
def option_errors(flag: str) -> Iterator[None]:
    """A file given on the command line, checked by code that names a config key: the error names the flag."""
    try:
        yield
    except ConfigError as e:
        raise UserError(f"{flag} {e.value}: {e.valid}") from None
