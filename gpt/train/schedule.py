"""The learning-rate schedules, pure functions of the step (a resumed run follows its schedule without stored
scheduler state), and what of a schedule the steps already taken depend on.

- `cosine`: linear warm-up, then a cosine decay to min_lr at train.decay_steps (or max_steps). Every step after the
  warm-up depends on the decay's end, so a longer run must keep it (train.decay_steps=OLD_MAX_STEPS).
- `wsd`, warmup-stable-decay (TorchTitan's decay_ratio, Megatron's WSD): warm-up, then lr held, then a decay to
  min_lr over the last train.decay_fraction of max_steps. The steps before the decay do not depend on max_steps: a
  run extends, and a decay branches off, from any checkpoint of its stable phase.
Torch-free: the launcher compares schedules on the login node."""
from __future__ import annotations

import math
from typing import Any

from gpt.config.train import TrainConfig

COSINE_KEY = "train.decay_steps (or max_steps)"
WSD_KEY = "train.decay (wsd: from step, to step, shape)"


def lr_at(step: int, t: TrainConfig) -> float:
    """The learning rate of optimizer step `step` (0-based)."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.schedule == "wsd":
        start, length = t.decay_start, t.max_steps - t.decay_start
        if step < start:
            return t.lr
        progress = min(1.0, (step - start) / length)  # Megatron's: the decay's first step is still at lr
        return t.min_lr + decay_coefficient(progress, t.decay_shape) * (t.lr - t.min_lr)
    if step >= t.decay_end:
        return t.min_lr
    progress = (step - t.warmup_steps) / max(1, t.decay_end - t.warmup_steps)
    return t.min_lr + decay_coefficient(progress, "cosine") * (t.lr - t.min_lr)


def decay_coefficient(progress: float, shape: str) -> float:
    """From 1 (lr) at progress 0 to 0 (min_lr) at 1."""
    if shape == "linear":
        return 1.0 - progress
    if shape == "sqrt":
        return 1.0 - math.sqrt(progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def identity(t: TrainConfig) -> dict[str, Any]:
    """The schedule's part of a run's identity (run.json) and of a checkpoint's fingerprint; lr, min_lr and
    warmup_steps are keys of their own."""
    if t.schedule == "wsd":
        return {WSD_KEY: [t.decay_start, t.max_steps, t.decay_shape]}
    return {COSINE_KEY: t.decay_end}


def settle(saved: dict[str, Any], current: dict[str, Any], step: int) -> dict[str, Any]:
    """`saved` with its wsd decay taken as `current`'s when neither had started by `step`: every step taken was
    warm-up or stable, the same under both, so the run continues exactly with the new max_steps."""
    old, new = saved.get(WSD_KEY), current.get(WSD_KEY)
    if old and new and step <= min(old[0], new[0]):
        return {**saved, WSD_KEY: new}
    return saved


def first_max_steps(step: int, fraction: float) -> int:
    """The smallest train.max_steps whose wsd decay starts at `step` or later (an anneal from `step`)."""
    m = max(step, math.ceil(step / (1 - fraction)) - 1) if fraction < 1 else step
    while m - round(fraction * m) < step:
        m += 1
    return m


def hint(key: str, saved: dict[str, Any], t: TrainConfig, step: int, stable: str | None) -> str:
    """What to type when the schedule of a run at `step` changed to `t`'s; `stable`: the run's newest checkpoint
    before its decay, to branch from. Empty for other keys."""
    current = identity(t)
    if key == COSINE_KEY and key in saved and key in current:
        return (f": add train.decay_steps={saved[key]} to this command to train on with the run's schedule (or "
                f"start new runs with train.schedule=wsd, which extends with nothing)")
    old, new = saved.get(WSD_KEY), current.get(WSD_KEY)
    if key != WSD_KEY or not (old and new):
        return ""
    if step > old[0]:
        branch = (f"resume={stable} run=NEW_NAME" if stable else "resume=CHECKPOINT run=NEW_NAME")
        return (f": its decay began at step {old[0]} and it is at step {step}; extend or anneal from a checkpoint "
                f"of its stable phase into a new run: {branch} train.max_steps=M")
    return (f": this decay would begin at step {new[0]}, before the run's step {step}; train.max_steps="
            f"{first_max_steps(step, t.decay_fraction)} or more begins it after")
