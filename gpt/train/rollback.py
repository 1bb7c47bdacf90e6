"""divergence.policy=rollback inside the running process (PaLM's recovery): every rank loads the newest checkpoint from
before the step that diverged, and the data position moves past the batches trained since, so that the restored
weights never see them again. Checkpoints saved from then on carry the new position (`skipped_batches`), so a resumed
run does not replay them either."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from gpt.checkpoint.store import list_checkpoints, step_of
from gpt.collectives.process_group import from_rank0_object
from gpt.train.divergence import Diverged, Rollback
from gpt.train.resume import Resume

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RolledBack:
    path: Path  # the checkpoint restored
    step: int  # its step, where training goes on
    first_batch: int  # the batches passed over, by index: first_batch..last_batch
    last_batch: int

    def record(self, diverged_at: int, count: int) -> dict[str, int]:
        """The metrics record of the rollback (kind "rollback", at the restored step)."""
        return {"diverged_at": diverged_at, "rollback": count, "skipped_batches_from": self.first_batch,
                "skipped_batches_to": self.last_batch}


def roll_back(r: Rollback, resume: Resume, max_rollbacks: int) -> RolledBack:
    """Every rank alike. Diverged when no checkpoint from before `r.step` exists or it cannot be loaded."""
    checkpointer, batches = resume.checkpointer, resume.state.batches
    last_batch = batches.index(r.step)
    checkpointer.close()  # a save in flight is from before the divergence was read: it completes
    good = [p for p in list_checkpoints(checkpointer.root) if step_of(p) <= r.step]
    chosen = from_rank0_object(str(good[-1]) if good else None)
    if chosen is None:
        raise Diverged(f"the run diverged at {r}; divergence.policy=rollback found no checkpoint from before it")
    path = Path(chosen)
    problem = resume.load_everywhere(path)
    if problem is not None:
        raise Diverged(f"the run diverged at {r}; divergence.policy=rollback could not load {path}: {problem}")
    step = resume.restore(path).step
    checkpointer.diverged(r.step)  # loading took the restored checkpoint's mark: the saves from now on are after it
    first_batch = batches.index(step)
    batches.skip_to(step, last_batch + 1)
    if resume.env.is_main:
        log.warning("step %d: %s; divergence.policy=rollback: restored %s (step %d), and the batches trained since "
                    "(%d..%d) are passed over (rollback %d of at most %d without progress)", r.step, r.what, path,
                    step, first_batch, last_batch, r.count, max_rollbacks)
    return RolledBack(path, step, first_batch, last_batch)
