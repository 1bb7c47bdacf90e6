"""The progress rule that bounds every recovery inside a job (a lost rank's, a hang's): no second one in a row
without a newer checkpoint, since a fault that repeats (running out of memory, or hanging, at the same step) would
repeat on every restart. Torch-free: the task wrappers and the watchdog apply it alike."""
from __future__ import annotations

from typing import Any


def repeated_recovery(earlier: list[dict[str, Any]], began: int | None, newest: int | None) -> str | None:
    """`earlier`: the attempts log; `began`: the step this attempt resumed from; `newest`: the newest checkpoint's
    step now. When the attempt before ended in a recovery too and nothing newer was saved since, how it ended
    ("lost a rank", "hung"); else None."""
    last = earlier[-1] if earlier else {}
    how = "lost a rank" if last.get("lost_rank") is not None else "hung" if last.get("ended") == "hang" else None
    return how if how and (newest or 0) <= (began or 0) else None
