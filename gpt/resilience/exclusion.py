"""Whether removing a straggler's host pays (stragglers.action=exclude).

In synchronous training every step waits for the slowest rank, so a straggler costs the run its excess busy time
(its own time per step minus the other ranks' median, as measured by resilience.stragglers) on every remaining step.
Removing its host costs a checkpoint save and a restart (the requeue, the scheduler, the next attempt's start-up), both
measured in this run where it has seen them, else priors. The host goes when keeping it costs more.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from gpt.run_folder import AttemptLine

from gpt.resilience.stragglers import StragglerEvent

PRIOR_RESTART_S = 60.0  # a requeue, the scheduler and a start-up, until this run has measured one
EXCLUDED_IN_VAIN = 2  # a rank still slow after this many of its hosts were excluded: its host is not the cause


def restart_cost(attempts: list[AttemptLine]) -> tuple[float, str]:
    """Seconds from an attempt's stop to the next one's first step, from this run's attempts log, or the prior."""
    seen = [a.startup.get("to_first_step_s", 0.0) + a.startup.get("scheduler_s", 0.0)
            for a in attempts if a.restart > 0 and a.startup]
    if seen:
        return sum(seen) / len(seen), f"measured over {len(seen)} restart(s)"
    return PRIOR_RESTART_S, "a prior until this run has restarted"


@dataclass(frozen=True)
class ExclusionDecision:
    rank: int
    host: str
    step: int
    excess_s: float  # per step
    remaining_steps: int
    keep_s: float  # the straggler's cost over the remaining steps
    save_s: float
    restart_s: float
    restart_source: str
    kept: str = ""  # why the host stays whatever it costs: the scheduler cannot leave it out, or excluding did not help

    @property
    def leave_s(self) -> float:
        return self.save_s + self.restart_s

    @property
    def pays(self) -> bool:
        """The host goes: removing it costs less than keeping it, and it can be removed."""
        return self.keep_s > self.leave_s and not self.kept

    def message(self) -> str:
        figures = (f"keeping it costs {self.keep_s:.0f} s ({self.excess_s * 1e3:.0f} ms x {self.remaining_steps} "
                   f"steps left), removing it {self.leave_s:.0f} s (a save {self.save_s:.1f} s + a restart "
                   f"{self.restart_s:.0f} s, {self.restart_source})")
        if self.pays:
            return f"straggler: excluding {self.host} (rank {self.rank}) at step {self.step}: {figures}"
        if self.kept:
            return f"straggler: keeping {self.host} (rank {self.rank}), training goes on: {self.kept}; {figures}"
        return f"straggler: keeping {self.host} (rank {self.rank}): it does not pay; {figures}"

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "leave_s": self.leave_s, "pays": self.pays}


def decide(event: StragglerEvent, others_s: float, remaining_steps: int, save_s: float,
           attempts: list[AttemptLine]) -> ExclusionDecision:
    """`others_s`: the median busy time of the other ranks, what a step takes without the straggler."""
    restart_s, source = restart_cost(attempts)
    excess = max(event.busy_s - others_s, 0.0)
    return ExclusionDecision(event.rank, event.host, event.step, excess, remaining_steps, excess * remaining_steps,
                             save_s, restart_s, source, follows_the_rank(event.rank, attempts))


def follows_the_rank(rank: int, attempts: list[AttemptLine]) -> str:
    """Why excluding another host would not help: the rank was excluded EXCLUDED_IN_VAIN times already, and is slow
    again on the hosts it ran on since ('' when not)."""
    hosts = [a.extra["straggler"].get("host") for a in attempts
             if isinstance(a.extra.get("straggler"), dict) and a.extra["straggler"].get("rank") == rank]
    if len(hosts) < EXCLUDED_IN_VAIN:
        return ""
    return (f"rank {rank} stayed slow after {', '.join(map(str, hosts))} were excluded: the slowness follows the "
            "rank, not the host")
