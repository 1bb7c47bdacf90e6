"""cluster=slurm: whether the time limit leaves an attempt room to train. Slurm sends the time-limit warning
(`--signal=SIG@cluster.signal_delay_s`) up to 60 s earlier than asked (sbatch(1): "Due to the resolution of event
handling by Slurm, the signal may be sent up to 60 seconds earlier than specified"), and an attempt trains only after
its start-up: from its first step to as early as the limit less the lead less those 60 s. Planning says, one line
each, a limit that leaves too little of each attempt to train, and a run that needs more allocations at that limit
than cluster.chain and preemption.max_restarts allow (launch.planning.time_limit)."""
from __future__ import annotations

import math

from launch.backends.slurm.resources import SlurmResources

SIGNAL_EARLY_S = 60  # how much earlier than asked Slurm may send the warning
SHORT = 0.5  # a limit whose attempts may train less than this share of it is too short


def time_limit_lines(res: SlurmResources, times) -> list[str]:
    """`times`: launch.planning.time_limit.AttemptTimes. None without a warning (cluster.signal_delay_s=0)."""
    if not res.signal_delay_s:
        return []
    short = too_short(res, times)
    return [line for line in (short, too_few_allocations(res, times, bool(short))) if line]


def train_s(res: SlurmResources, startup_s: float, early_s: float) -> float:
    """Seconds an attempt trains when the warning comes `early_s` before it was asked for."""
    return res.time_min * 60 - res.signal_delay_s - early_s - startup_s


def too_short(res: SlurmResources, times) -> str:
    worst = train_s(res, times.startup_s, SIGNAL_EARLY_S)
    if worst >= SHORT * res.time_min * 60:
        return ""
    return (f"cluster.time_min={res.time_min} leaves as little as {max(worst, 0):.0f} s of an attempt to train: Slurm "
            f"may send the warning (cluster.signal_delay_s={res.signal_delay_s}) up to {SIGNAL_EARLY_S} s earlier than "
            f"asked, and start-up takes about {times.startup_s:.0f} s ({times.startup_source}); what would work: "
            f"cluster.time_min={not_short(res, times)} or more")


def not_short(res: SlurmResources, times) -> int:
    """The shortest time limit whose attempts train at least SHORT of it, however early the warning comes."""
    return math.ceil((res.signal_delay_s + SIGNAL_EARLY_S + times.startup_s) / (60 * (1 - SHORT)))


def too_few_allocations(res: SlurmResources, times, short: bool) -> str:
    """With a measured step time, whether the steps left fit in the allocations allowed (the warning coming half
    its 60 s early); without one, the time they hold in all, said where the limit is short already."""
    allowed = res.chain + res.restarts
    typical = max(train_s(res, times.startup_s, SIGNAL_EARLY_S / 2), 0.0)
    if times.step_s is None or times.step_s <= 0:
        return (f"the job stops after {allowed} allocation(s) of cluster.time_min={res.time_min} "
                f"({allowed_by(res)}): about {allowed * typical / 60:.1f} min of training in all") if short else ""
    per = int(typical // times.step_s)
    if times.steps_left <= allowed * per:
        return ""
    each = math.ceil(times.steps_left / allowed) * times.step_s + res.signal_delay_s + SIGNAL_EARLY_S / 2
    fits = max(math.ceil((each + times.startup_s) / 60), not_short(res, times))
    needed = math.ceil(times.steps_left / per) if per else None
    more = f" or preemption.max_restarts={needed - res.chain}" if needed and res.requeue else ""
    need = f"need about {needed} allocations, more than" if needed else "need more allocations than"
    return (f"at cluster.time_min={res.time_min} an attempt trains {f'about {per} steps' if per else 'hardly a step'} "
            f"({times.step_s:.3g} s a step, measured): the {times.steps_left} steps left {need} the {allowed} that "
            f"{allowed_by(res)} allow, and the run would stop about {times.steps_left - allowed * per} steps short; "
            f"what would work: cluster.time_min={fits}{more}")


def allowed_by(res: SlurmResources) -> str:
    """What bounds the job's allocations, in the keys that set it."""
    chain = f"cluster.chain={res.chain} and " if res.chain > 1 else ""
    return chain + (f"preemption.max_restarts={res.restarts}" if res.requeue else "cluster.requeue=false")
