"""Hydra's own errors as the one line (exit code 2) that every other bad key or value gets: an unknown key or a
value of the wrong type (refused by the schema, gpt.config.schema), a preset that does not exist, an override Hydra
cannot parse.

Hydra prints these itself, over several lines and with exit code 1, unless HYDRA_FULL_ERROR=1 makes it raise
them. The app sets that variable while Hydra composes the primary config (`composing`), and puts it back as the
user had it before anything runs (`composed`), so that Hydra reports our bugs as it always does.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from launch.launch_config import valid_for
from gpt.errors import EXIT_USER, ConfigError, UserError
from gpt.resilience.disk_faults import WHY, cause, os_error

FULL_ERROR = "HYDRA_FULL_ERROR"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"  # strategy=NAME has no folder: its registry stores them
SITE_PROFILES = "a profile site/NAME.yaml in the folder named by GPTLAUNCH_SITE_DIR or hydra.searchpath=[file:///DIR]"
_users: list[str | None] = []  # HYDRA_FULL_ERROR as the user had it, while Hydra composes


@contextlib.contextmanager
def composing(overrides: Sequence[str]) -> Iterator[None]:
    """Around the Hydra app: its composition errors become one line and exit code 2."""
    _users.append(os.environ.get(FULL_ERROR))
    os.environ[FULL_ERROR] = "1"
    try:
        yield
    except Exception as e:
        error = user_error(e, overrides)
        if error is None:
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(EXIT_USER)
    finally:
        composed()


def composed() -> None:
    """Hydra has composed the config: the environment as the user left it (ranks and jobs inherit it)."""
    if _users:
        user = _users.pop()
        if user is None:
            os.environ.pop(FULL_ERROR, None)
        else:
            os.environ[FULL_ERROR] = user


def user_error(e: Exception, overrides: Sequence[str]) -> UserError | None:
    """A composition error of Hydra's as a UserError naming the key; None for anything else (a bug)."""
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
    from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

    cause = e.__cause__
    if isinstance(e, UserError):  # ours, from a callback before the stock launcher submits (already one line)
        return e
    if isinstance(e, MissingConfigException) and e.options:
        group, _, name = (e.missing_cfg_file or "").rpartition("/")
        where = SITE_PROFILES if group == "site" else f"configs/{group}/" if (CONFIGS / group).is_dir() else ""
        return ConfigError(group, name, f"one of {', '.join(e.options)}" + (f" ({where})" if where else ""))
    if isinstance(e, ConfigCompositionException) and isinstance(cause, MissingMandatoryValue):
        return ConfigError(cause.full_key, "???", "a value: this key has no default")
    if isinstance(e, ConfigCompositionException) and isinstance(cause, OmegaConfBaseException) and cause.full_key:
        key = cause.full_key
        named, value = override_of(key, overrides)
        value = cause.value if cause.value is not None else value
        if key == "site":  # no site/ folder on the search path, so Hydra took site=NAME for a value
            return ConfigError(key, value, f"{SITE_PROFILES}; no site/ folder is on the search path")
        return ConfigError(named, value, valid_for(key))
    if isinstance(e, ConfigCompositionException) and (found := re.search(r"full_key: (\S+)", str(e))):
        where = str(e).split(":")[0]  # In 'strategy/mine'
        return UserError(f"{where}: {found[1]} is not valid: {valid_for(found[1])}")
    if isinstance(e, OverrideParseException):
        return UserError(f"an override Hydra cannot parse: {one_line(e)}")
    if isinstance(e, (ConfigCompositionException, OmegaConfBaseException)):
        return UserError(one_line(e) + (f" ({one_line(cause)})" if cause is not None else ""))
    return storage_error(e)


def storage_error(e: BaseException) -> UserError | None:
    """A run folder Hydra cannot write (its log file, the folder itself) on a read-only, full or foreign file
    system: what it is and what to do, in one line, before anything ran."""
    error = os_error(e)
    if error is None or error.errno not in WHY:
        return None
    where = error.filename or "the run folder"
    todo = {errno.ENOSPC: "free space there", errno.EDQUOT: "free space or ask for more quota",
            errno.EROFS: "remount it read-write (or ask your site why it went read-only)"}.get(
        error.errno, "make it writable for you")
    return UserError(f"cannot write {where}: {cause(error)}; nothing started: {todo} and run the same command "
                     f"again, or give the run another folder (hydra.run.dir=DIR; a sweep: hydra.sweep.dir=DIR)")


def override_of(key: str, overrides: Sequence[str]) -> tuple[str, Any]:
    """The key the command line named at or under `key` (Hydra names the first unknown part: `metrics` for
    metrics.straggler_windows=5) and the value it gave it (as Hydra parses it: 1 is an int); `key` and '' when
    none."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for text in overrides:
        named = text.lstrip("+~").split("=")[0]
        if "=" in text and (named == key or named.startswith(key + ".")):
            override = parser.parse_override(text)
            return named, override.value() if not override.is_sweep_override() else text.split("=", 1)[1]
    return key, ""


def one_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip() and not line.startswith("See https")]
    return "; ".join(lines) or type(e).__name__
