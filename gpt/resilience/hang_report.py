"""The files of one attempt's hang report, as the watchdogs of every rank write them (gpt.resilience.watchdog decides
when and who acts):
    hang-<attempt>.json   claimed (created empty) by the rank that acts, then its summary record
    hang-<attempt>.txt    the summary, readable, then every rank's Python stacks, one append per rank
    hang-<attempt>-flight-recorder-rank<R>.pkl   torch's flight recorder of each rank
<attempt> is the attempt's own id, asked when it is needed (launch.run.attempts.hang_report_name).

Every write is best effort where the storage may be what failed: the requeue is done by then, and the report is a
bonus."""
from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from gpt.resilience.flight_recorder import read_dumps
from gpt.run_folder import RunFolder

log = logging.getLogger(__name__)


class HangReport:
    def __init__(self, run_dir: Path, attempt: Callable[[], str], rank: int, host: str, world: int,
                 interval_s: float):
        self.run_dir, self.attempt, self.rank, self.host, self.world = run_dir, attempt, rank, host, world
        self.interval_s = interval_s  # the watchdog's: how fast the other ranks add their parts

    @property
    def json_path(self) -> Path:
        return RunFolder(self.run_dir).hang_report(self.attempt())[0]

    @property
    def text_path(self) -> Path:
        return RunFolder(self.run_dir).hang_report(self.attempt())[1]

    def reported_elsewhere(self) -> bool:
        try:
            return self.json_path.is_file()
        except OSError as e:  # ESTALE, EIO: this rank's own budget still ends the attempt
            log.warning("watchdog: cannot look for a hang report: %s", e)
            return False

    def claim(self) -> bool | None:
        """Create the (empty) report: True for the first rank, False for the others, None when it cannot be."""
        try:
            os.close(os.open(self.json_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            return True
        except FileExistsError:
            if not self.json_path.is_dir():
                return False
            log.warning("watchdog: cannot write the hang report %s: it is a directory", self.json_path)
            return None
        except OSError as e:
            log.warning("watchdog: cannot write the hang report %s: %s", self.json_path, e)
            return None

    def best_effort(self, write: Callable[..., None], *args: object) -> None:
        try:
            write(*args)
        except OSError as e:  # ENOSPC, EDQUOT, EROFS, EIO: the requeue is done; the report is a bonus
            log.warning("watchdog: cannot write the hang report %s: %s", self.text_path, e)

    def write(self, report: dict | None) -> None:
        """This rank's part of the report: the summary and the JSON record if it acts, then its stacks."""
        if report is not None:
            self.best_effort(self._summarise, report)
        else:  # the summary goes first in the readable report
            deadline = time.monotonic() + 2 * self.interval_s + 5
            while self._claimed_but_empty() and time.monotonic() < deadline:
                time.sleep(0.2)
        self._append(f"\n=== rank {self.rank} on {self.host} (pid {os.getpid()}): every thread's stack ===\n"
                     + stacks())

    def _claimed_but_empty(self) -> bool:
        try:
            return self.json_path.stat().st_size == 0
        except OSError:
            return False

    def _summarise(self, report: dict) -> None:
        rows = "\n".join(f"  rank {r}: " + (json.dumps(b) if b else "no heartbeat this attempt")
                         for r, b in enumerate(report["ranks"]))
        key, seconds, used = report["budget"], report["budget_s"], report["idle_s"]
        why = f"{key}={seconds:.1f} s" if seconds else key
        self.best_effort(self._append, f"{report['summary']}\n\nrank {self.rank} on {self.host} saw no progress "
                         f"for {used:.1f} s ({why}).\nEvery rank's last heartbeat:\n{rows}\n")
        tmp = self.json_path.with_name(f".{self.json_path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(report, indent=1))
        os.replace(tmp, self.json_path)  # last: the other ranks wait for it to add their stacks below

    def _append(self, text: str) -> None:
        """One write per part: ranks on several hosts append to the same report."""
        fd = os.open(self.text_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)

    def dumps(self, alive: list[int]) -> dict[int, dict]:
        """Every rank's flight recorder dump, waiting a little for the live ranks' (each dumps as it sees the
        hang: within an interval of this rank)."""
        folder = RunFolder(self.run_dir)
        paths = {r: folder.flight_recorder(self.attempt(), r) for r in range(self.world)}
        deadline = time.monotonic() + 2 * self.interval_s + 2
        while not all(paths[r].exists() for r in alive) and time.monotonic() < deadline:
            time.sleep(0.2)
        return read_dumps({r: p for r, p in paths.items() if p.exists()})

    def dump_flight_recorder(self) -> None:
        """torch's flight recorder: the last collectives this rank's process groups saw (NCCL, and gloo too)."""
        import torch.distributed as dist

        if not dist.is_initialized():
            return
        try:
            from torch._C._distributed_c10d import _dump_fr_trace

            path = RunFolder(self.run_dir).flight_recorder(self.attempt(), self.rank)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_bytes(_dump_fr_trace())
            os.replace(tmp, path)  # the reporting rank never reads half a dump
        except Exception as e:  # the dump is a bonus: the report stands without it
            log.warning("watchdog: no flight recorder dump: %s", e)


def stacks() -> str:
    """Every thread's Python stack, read from the interpreter (no file: /tmp may be the full file system)."""
    names = {t.ident: t.name for t in threading.enumerate()}
    parts = [f"Thread {ident} ({names.get(ident, '?')}):\n" + "".join(traceback.format_stack(frame))
             for ident, frame in sys._current_frames().items()]
    return "\n".join(parts)
