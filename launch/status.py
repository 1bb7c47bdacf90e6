"""`python -m launch.status RUN_OR_SWEEP`: where each job of a run or a sweep stands, without the launcher.

One line per run: its job(s) and the scheduler's state (and why it waits: held, priority, dependency), step of max
steps, tokens/s, ETA, attempts, restarts, the nodes they were kept off, and goodput; a sweep's report job last, and
a detached search's job. Exit code 0 when every run finished, 1 when any failed or stopped, 3 while any (or the
report's or the search's job) still runs or waits, 4 when the scheduler does not answer for a run that has not
finished (its state is unknown, never taken for failed).
Torch-free: it runs on a login node.
"""
from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from gpt.errors import EXIT_UNKNOWN
from launch.run_status import (FAILED, SEARCH_JOB, STOPPED, UNKNOWN, WAITING, RunStatus, job_ids, read_status,
                               report_job, run_folders, shown, standings, sweep_job)

EXIT_RUNNING = 3


def line(s: RunStatus, root: Path) -> str:
    name = str(s.run_dir.relative_to(root)) if s.run_dir != root else s.run_dir.name
    jobs = ",".join(s.job_ids)
    state = s.shown + (f" ({s.reason})" if s.reason else "")
    step = f"step {s.step if s.step is not None else '-'}/{s.max_steps if s.max_steps is not None else '?'}"
    links = f" (chain: {', '.join(s.links)})" if s.links else ""
    parts = [f"{name}: job {jobs} {state}{links}" if s.job_ids else f"{name}: no job", step]
    if s.tokens_per_s:
        parts.append(f"{s.tokens_per_s:,.0f} tokens/s")
    if s.eta_s is not None and s.verdict == WAITING:
        parts.append(f"ETA {_duration(s.eta_s)}")
    parts.append(f"{s.attempts} attempt(s), {s.restarts} restart(s)"
                 + (f" (last interrupted: {s.interrupted})" if s.interrupted else ""))
    if s.excluded:  # as the report's Nodes table names them
        parts.append(f"excluded {', '.join(s.excluded)}")
    if s.goodput is not None:
        parts.append(f"goodput {100 * s.goodput:.0f}%")
    parts.append(s.verdict)
    notes = [n for n in (s.failed_saves, f"it will not start by itself: {s.stuck}" if s.stuck else "") if n]
    return ", ".join(parts) + "".join(f"; {n}" for n in notes)


def _duration(seconds: float) -> str:
    minutes, s = divmod(int(seconds), 60)
    h, m = divmod(minutes, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def status(target: Path, out=sys.stdout) -> int:
    runs = run_folders(target)
    if not runs:
        print(f"error: no run folder at or under {target} (a folder with a config.yaml)", file=sys.stderr)
        return 2
    report, search = report_job(target), sweep_job(target, SEARCH_JOB)
    infos = standings(sorted({j for r in runs for j in job_ids(r)} | {j for j in (report, search) if j}))
    statuses = [read_status(r, infos) for r in runs]
    for s in statuses:
        print(line(s, target), file=out)
        for restart in s.in_job:
            print(f"  {restart}", file=out)
    if report:
        reason = infos[report].reason if report in infos else ""
        print(f"report: job {report} {shown(infos, report)}{f' ({reason})' if reason else ''}; {target / 'report'}",
              file=out)
    if search:
        print(f"search: job {search} {shown(infos, search)}; its log: {target / 'slurm' / f'search-{search}.out'}",
              file=out)
    verdicts = {s.verdict for s in statuses}
    if WAITING in verdicts or any(j in infos and infos[j].state.live for j in (report, search)):  # a report half
        # written is not the sweep's
        return EXIT_RUNNING
    return 1 if verdicts & {FAILED, STOPPED} else EXIT_UNKNOWN if UNKNOWN in verdicts else 0


def main(argv: list[str] | None = None) -> None:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `| head` ends it quietly, as any listing
    parser = argparse.ArgumentParser(prog="python -m launch.status", description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a run folder (runs/NAME) or a sweep folder (runs/sweeps/NAME)")
    args = parser.parse_args(argv)
    sys.exit(status(args.run))


if __name__ == "__main__":
    main()
