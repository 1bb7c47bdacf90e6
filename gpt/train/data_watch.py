"""The prepared data folder watched while a run trains on it. Ranks keep the files they opened, so a folder prepared
again under a running job changes nothing it trains on, until the next attempt (a requeue, a restart) opens the new
files and is refused as other data. Rank 0 says so in one line when it happens, not hundreds of steps later."""
from __future__ import annotations

import logging
import time
from pathlib import Path

from gpt.data import data_identity
from gpt.train.hooks import LoopHook, RunningLoop

log = logging.getLogger(__name__)
EVERY_S = 60.0  # one read of the folder's meta.json a minute, by rank 0 only


class DataWatch(LoopHook):
    def __init__(self, data_dir: str | Path, is_main: bool, every_s: float = EVERY_S):
        self.data_dir, self.every_s = Path(data_dir), every_s
        self.on = is_main
        self.fingerprint: str | None = None
        self.looked = 0.0

    def started(self, loop: RunningLoop) -> None:
        self.fingerprint = loop.data_fingerprint
        self.on = self.on and self.fingerprint is not None  # a folder prepared before fingerprints: nothing to hold
        self.looked = time.monotonic()

    def after_step(self, step: int) -> None:
        if not self.on or time.monotonic() < self.looked + self.every_s:
            return
        self.looked = time.monotonic()
        try:
            now = data_identity(self.data_dir)
        except (OSError, ValueError) as e:
            now = f"unreadable ({e})"
        if now != self.fingerprint:
            self.on = False  # said once
            log.warning("step %d: the prepared data in %s changed under this run (its fingerprint %s is now %s): this "
                        "attempt trains on the files it opened, but the next one (a requeue, a restart) will be "
                        "refused as other data. Put the folder back as it was, or train on the new data as a new run "
                        "(run=NAME)", step, self.data_dir, self.fingerprint, now)
