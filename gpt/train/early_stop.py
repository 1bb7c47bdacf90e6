"""Early stopping across a sweep (launcher.early_stop=asha): asynchronous successive halving, as ASHA (Li et al.,
2020) and Ray Tune's AsyncHyperBand do it. The rungs are evaluations at steps rung_steps * eta**k. At each, rank 0
records the point's validation loss in the sweep's rung folder, SWEEP_DIR/rungs/step_<S>/<point>.json (a file per
point, written atomically: no lock, whatever the shared file system), and reads the other points' results there. A
point worse than the best 1/eta of them saves and stops, and its resources go to the next point; a point with no
result to compare with goes on. Points that run at once each see what the others have recorded so far. Torch-free:
StopControl sends rank 0's verdict to every rank."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from gpt.config.launcher import LauncherConfig
from gpt.run_folder import STOPPED_EARLY, write_json

RUNGS = "rungs"  # beside the points of the sweep


def rung_of(step: int, first: int, eta: int) -> int | None:
    """k where step == first * eta**k; None when `step` is no rung."""
    k, at = 0, first
    while at < step:
        at, k = at * eta, k + 1
    return k if at == step else None


def ranked(loss: float) -> float:
    """A loss as it ranks: a non-finite one (a diverged point's NaN) last. A NaN sorts anywhere and compares false,
    so as a cutoff it would stop every later point at the rung, the best included."""
    return loss if math.isfinite(loss) else math.inf


def cutoff(others: list[float], eta: int) -> float | None:
    """The loss a point must not exceed to go on: the worst of the best 1/eta (rounded up) of the other points'
    results at the rung (infinite when those are not finite: nothing to beat). None: no other result yet."""
    if not others:
        return None
    return sorted(map(ranked, others))[math.ceil(len(others) / eta) - 1]


@dataclass(frozen=True)
class Cut:
    """Why a point stopped at a rung."""

    step: int
    rung: int
    loss: float
    cutoff: float
    others: int
    eta: int

    def describe(self) -> str:
        return (f"{STOPPED_EARLY} at step {self.step} (rung {self.rung}): val loss {self.loss:.4f}, worse than "
                f"{self.cutoff:.4f}, the best 1/{self.eta} of the {self.others} other point(s) at that rung "
                "(launcher.early_stop=asha)")


@dataclass(frozen=True)
class Rungs:
    """The rungs of one point of a sweep."""

    folder: Path  # SWEEP_DIR/rungs
    point: str  # the point's run folder name
    first: int  # the first rung's step
    eta: int

    @classmethod
    def of(cls, launcher: LauncherConfig, eval_interval: int, run_dir: Path) -> Rungs | None:
        """None without early stopping."""
        if launcher.early_stop != "asha":
            return None
        return cls(run_dir.parent / RUNGS, run_dir.name, launcher.rung_steps or eval_interval, launcher.eta)

    def at(self, step: int) -> bool:
        return rung_of(step, self.first, self.eta) is not None

    def judge(self, step: int, loss: float) -> Cut | None:
        """Record this point's loss at the rung `step` and compare it with the others' (rank 0 only)."""
        here = self.folder / f"step_{step:08d}"
        here.mkdir(parents=True, exist_ok=True)
        write_json(here / f"{self.point}.json", {"point": self.point, "step": step, "val_loss": loss})
        others = [json.loads(p.read_text())["val_loss"] for p in sorted(here.glob("*.json")) if p.stem != self.point]
        bar = cutoff(others, self.eta)
        if bar is None or ranked(loss) <= bar:
            return None
        return Cut(step, rung_of(step, self.first, self.eta) or 0, loss, bar, len(others), self.eta)
