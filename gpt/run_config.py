"""The run's own config groups (checkpoint, preemption, resume, rendezvous, watchdog, health, debug), checked
before anything runs: an unknown key or a bad value is one line naming the key, the value and what is valid,
before any job is submitted or any rank started. Torch-free: the launcher checks them on a login node."""
from __future__ import annotations

import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Mapping

from gpt.errors import ConfigError


def plain(cfg: Any) -> Any:
    """OmegaConf nodes as plain dicts and lists (resolved), anything else as it is."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg


def _known(section: str, d: Mapping[str, Any], names: tuple[str, ...]) -> None:
    for key in d:
        if key not in names:
            raise ConfigError(f"{section}.{key}", d[key], f"known {section} keys are {', '.join(sorted(names))}")


def _int(key: str, value: Any, minimum: int, what: str, none_ok: bool = False) -> int | None:
    if value is None and none_ok:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(key, value, what)
    return value


def _number(key: str, value: Any, what: str, none_ok: bool = True, minimum: float = 0.0) -> float | None:
    if value is None and none_ok:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < minimum:
        raise ConfigError(key, value, what)
    return float(value)


def _flag(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, value, "true or false")
    return value


def signal_names(key: str, names: Any) -> list[str]:
    """Signal names that can be caught (never KILL or STOP): ['SIGTERM', 'SIGUSR2']."""
    if isinstance(names, str) or not isinstance(names, (list, tuple)):
        names = [names]
    out = []
    for name in names:
        text = str(name).upper()
        text = text if text.startswith("SIG") else "SIG" + text
        if not isinstance(getattr(signal, text, None), signal.Signals) or text in ("SIGKILL", "SIGSTOP"):
            raise ConfigError(key, name, "signal names that can be caught, e.g. [SIGTERM, SIGUSR2]")
        out.append(text)
    return out


def _minutes(value: Any) -> float | str | None:
    if value == "auto":
        return value
    return _number("checkpoint.interval_minutes", value, "a positive number of minutes, auto, or null", minimum=1e-9)


@dataclass(frozen=True)
class CheckpointConfig:
    interval_steps: int = 500
    interval_minutes: float | str | None = None  # or "auto": Young/Daly (gpt.goodput)
    keep: int = 3
    async_save: bool = False

    @classmethod
    def from_cfg(cls, cfg: Mapping[str, Any]) -> CheckpointConfig:
        """From the whole config: its `checkpoint` section."""
        c = plain(cfg.get("checkpoint")) or {}
        _known("checkpoint", c, ("interval_steps", "interval_minutes", "keep", "async"))
        return cls(
            _int("checkpoint.interval_steps", c.get("interval_steps", 500), 0,
                 "0 (only at the end) or a positive number of steps"),
            _minutes(c.get("interval_minutes")),
            _int("checkpoint.keep", c.get("keep", 3), 1, "a positive number of checkpoints to keep"),
            _flag("checkpoint.async", c.get("async", False)))


@dataclass(frozen=True)
class PreemptionConfig:
    enabled: bool = True
    signals: tuple[str, ...] = ("SIGTERM", "SIGUSR2")
    max_restarts: int = 10

    @classmethod
    def from_cfg(cls, c: Mapping[str, Any]) -> PreemptionConfig:
        c = plain(c) or {}
        _known("preemption", c, ("enabled", "signals", "max_restarts"))
        return cls(_flag("preemption.enabled", c.get("enabled", True)),
                   tuple(signal_names("preemption.signals", c.get("signals", list(cls.signals)))),
                   _int("preemption.max_restarts", c.get("max_restarts", 10), 0, "an integer >= 0"))


@dataclass(frozen=True)
class RendezvousConfig:
    timeout_s: float | None = 180.0

    @classmethod
    def from_cfg(cls, c: Mapping[str, Any]) -> RendezvousConfig:
        c = plain(c) or {}
        _known("rendezvous", c, ("timeout_s",))
        return cls(_number("rendezvous.timeout_s", c.get("timeout_s", 180), "a positive number of seconds, or null",
                           minimum=1e-3))


@dataclass(frozen=True)
class WatchdogConfig:
    """How long a rank may make no progress before its watchdog (gpt.watchdog) reports a hang and ends the
    attempt. Each budget counts from the rank's last progress mark (a step, a collective entered or left, a save,
    an evaluation batch); startup_s counts from the rank's start to its first step."""

    enabled: bool = True
    startup_s: float = 600.0
    step_s: float | str = "auto"  # auto: max(step_floor_s, step_factor x p99 of this attempt's step times)
    step_floor_s: float = 60.0
    step_factor: float = 10.0
    save_s: float = 600.0
    eval_s: float = 300.0
    interval_s: float = 1.0  # how often the watchdog looks, and writes this rank's heartbeat
    collective_timeout_s: float | str = "auto"  # the process group's own timeout, a backstop behind the watchdog

    KEYS = ("enabled", "startup_s", "step_s", "step_floor_s", "step_factor", "save_s", "eval_s", "interval_s",
            "collective_timeout_s")

    def process_group_timeout(self) -> float:
        """auto: a minute longer than the longest fixed watchdog budget, so the watchdog always speaks first;
        without a watchdog, torch's usual 600 s."""
        if self.collective_timeout_s != "auto":
            return float(self.collective_timeout_s)
        if not self.enabled:
            return 600.0
        fixed = [self.startup_s, self.save_s, self.eval_s, self.step_floor_s]
        return max(fixed + ([float(self.step_s)] if self.step_s != "auto" else [])) + 60.0

    @classmethod
    def from_cfg(cls, c: Mapping[str, Any]) -> WatchdogConfig:
        c = plain(c) or {}
        _known("watchdog", c, cls.KEYS)

        def seconds(key: str, auto: bool = False) -> float | str:
            value = c.get(key, getattr(cls, key))
            if auto and value == "auto":
                return value
            what = "a positive number of seconds" + (", or auto" if auto else "")
            return _number(f"watchdog.{key}", value, what, none_ok=False, minimum=1e-3)

        return cls(_flag("watchdog.enabled", c.get("enabled", True)), seconds("startup_s"), seconds("step_s", True),
                   seconds("step_floor_s"), _number("watchdog.step_factor", c.get("step_factor", 10.0),
                                                    "a factor >= 1", none_ok=False, minimum=1.0),
                   seconds("save_s"), seconds("eval_s"), seconds("interval_s"), seconds("collective_timeout_s", True))


@dataclass(frozen=True)
class HealthConfig:
    """Node health checks before training (gpt.health): compute, storage, and the preflight all-reduce."""

    enabled: bool = True
    min_fraction: float = 0.8  # a node below this share of the median node's matmul speed is flagged
    action: str = "warn"  # or exclude: requeue the job without the flagged nodes (Slurm)
    matmul_size: int = 256
    rounds: int = 3  # the nodes measure one after another, this many times; each node keeps its best

    @classmethod
    def from_cfg(cls, c: Mapping[str, Any]) -> HealthConfig:
        c = plain(c) or {}
        _known("health", c, tuple(cls.__dataclass_fields__))
        fraction = _number("health.min_fraction", c.get("min_fraction", 0.8), "a fraction between 0 and 1",
                           none_ok=False)
        if fraction > 1:
            raise ConfigError("health.min_fraction", c["min_fraction"], "a fraction between 0 and 1")
        action = c.get("action", "warn")
        if action not in ("warn", "exclude"):
            raise ConfigError("health.action", action, "warn or exclude")
        return cls(_flag("health.enabled", c.get("enabled", True)), fraction, action,
                   _int("health.matmul_size", c.get("matmul_size", 256), 16, "a matrix size >= 16"),
                   _int("health.rounds", c.get("rounds", 3), 1, "a number of rounds >= 1"))


@dataclass(frozen=True)
class DebugConfig:
    """Fault injection for tests and demonstrations (README: test-only); all off by default."""

    delay_rank: int | None = None
    delay_s: float = 0.0
    save_sleep_s: float = 0.0
    save_sleep_step: int | None = None
    signal_at_step: int | list[int] | None = None
    signal_rank: int = 0
    signal_name: str = "SIGUSR2"
    unreadable_rank: int | None = None
    hang_rank: int | None = None  # this rank hangs in the run's first attempt, at hang_step (null: before it starts)
    hang_step: int | None = None
    kill_rank: int | None = None  # this rank kills itself (SIGKILL) at kill_step, in the run's first attempt
    kill_step: int = 0
    straggler_rank: int | None = None  # this rank lags by straggler_s per step, in the run's first attempt only
    straggler_s: float = 0.0
    slow_node: int | None = None  # this node (its index in the job) is slow in the health check, first attempt only

    @property
    def signal_steps(self) -> list[int]:
        at = self.signal_at_step
        return [] if at is None else [at] if isinstance(at, int) else list(at)

    @classmethod
    def from_cfg(cls, c: Mapping[str, Any]) -> DebugConfig:
        c = plain(c) or {}
        _known("debug", c, tuple(cls.__dataclass_fields__))
        return cls(
            delay_rank=_int("debug.delay_rank", c.get("delay_rank"), 0, "a rank (>= 0), or null", none_ok=True),
            delay_s=_number("debug.delay_s", c.get("delay_s", 0.0), "seconds >= 0", none_ok=False),
            save_sleep_s=_number("debug.save_sleep_s", c.get("save_sleep_s", 0.0), "seconds >= 0", none_ok=False),
            save_sleep_step=_int("debug.save_sleep_step", c.get("save_sleep_step"), 0, "a step, or null", True),
            signal_at_step=_steps("debug.signal_at_step", c.get("signal_at_step")),
            signal_rank=_int("debug.signal_rank", c.get("signal_rank", 0), 0, "a rank (>= 0)"),
            signal_name=signal_names("debug.signal_name", c.get("signal_name", "SIGUSR2"))[0],
            unreadable_rank=_int("debug.unreadable_rank", c.get("unreadable_rank"), 0, "a rank, or null", True),
            hang_rank=_int("debug.hang_rank", c.get("hang_rank"), 0, "a rank, or null", True),
            hang_step=_int("debug.hang_step", c.get("hang_step"), 0, "a step, or null (before the first step)", True),
            kill_rank=_int("debug.kill_rank", c.get("kill_rank"), 0, "a rank, or null", True),
            kill_step=_int("debug.kill_step", c.get("kill_step", 0), 0, "a step"),
            straggler_rank=_int("debug.straggler_rank", c.get("straggler_rank"), 0, "a rank, or null", True),
            straggler_s=_number("debug.straggler_s", c.get("straggler_s", 0.0), "seconds >= 0", none_ok=False),
            slow_node=_int("debug.slow_node", c.get("slow_node"), 0, "a node index, or null", True))


def _steps(key: str, value: Any) -> int | list[int] | None:
    if isinstance(value, list):
        return [_int(key, v, 0, "a step, a list of steps, or null") for v in value]
    return _int(key, value, 0, "a step, a list of steps, or null", none_ok=True)


def check_resume(value: Any) -> str:
    """auto, none, or a checkpoint or run folder that exists."""
    if value in ("auto", "none"):
        return value
    if value is None or not isinstance(value, str) or not Path(value).exists():
        raise ConfigError("resume", value, "auto, none, or an existing checkpoint or run folder")
    return value


def check_run_sections(cfg: Mapping[str, Any]) -> None:
    """Every run-level group the trainer and the worker read, checked as they will read it."""
    cfg = plain(cfg)
    CheckpointConfig.from_cfg(cfg)
    PreemptionConfig.from_cfg(cfg.get("preemption") or {})
    RendezvousConfig.from_cfg(cfg.get("rendezvous") or {})
    WatchdogConfig.from_cfg(cfg.get("watchdog") or {})
    HealthConfig.from_cfg(cfg.get("health") or {})
    DebugConfig.from_cfg(cfg.get("debug") or {})
    check_resume(cfg.get("resume", "auto"))
