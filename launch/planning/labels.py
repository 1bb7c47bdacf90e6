"""A sweep point's name: the keys that vary across the sweep, with this point's values (`nodes=2`,
`train.lr=0.001,strategy=fsdp`). It names the point's folder and every line about it; the overrides that all
points share are left out, so names stay short."""
from __future__ import annotations

import re
from collections.abc import Sequence

UNSAFE = re.compile(r"[^\w.,=+\-]")


def _pairs(overrides: Sequence[str]) -> list[tuple[str, str]]:
    return [tuple(o.split("=", 1)) if "=" in o else (o, "") for o in overrides]


def varying_keys(job_overrides: Sequence[Sequence[str]]) -> list[str]:
    """Keys whose value differs between points (or that some points lack), in command-line order."""
    points = [dict(_pairs(o)) for o in job_overrides]
    keys = list(dict.fromkeys(k for p in points for k in p))
    return [k for k in keys if len({p.get(k) for p in points}) > 1]


def point_labels(job_overrides: Sequence[Sequence[str]], swept: Sequence[str] = ()) -> list[str]:
    """One label per point; empty where nothing varies (a one-point sweep), for the caller to fill in. `swept`:
    keys that name every point, whether or not their values differ within these points."""
    keys = list(dict.fromkeys([*varying_keys(job_overrides), *swept]))
    labels = []
    for overrides in job_overrides:
        values = dict(_pairs(overrides))
        label = ",".join(f"{k}={values[k]}" for k in keys if k in values)
        labels.append(UNSAFE.sub("_", label.lstrip("+~")))
    return labels
