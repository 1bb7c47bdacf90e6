"""The work of hydra_plugins.gptlaunch_optuna (hydra/sweeper=optuna): an Optuna study over the launcher's points.

The study lives in a storage that outlives this process (`sqlite:///SWEEP/optuna.db` unless hydra.sweeper.storage
names one), so the same command resumes it: trials already complete or failed are not run again, n_trials counts
every trial of the study, and trials an earlier sweeper left running (it was stopped mid-batch) are launched again
with their own values and number: their run folders, trial=N,..., are the same, so the launcher picks up their jobs,
or their results, or resumes their runs. Each batch of n_jobs trials is asked from the study (Optuna's ask/tell API),
launched together, and told back: the objective each point's PointReturn gives (launcher.objective), or FAIL for a
point whose run failed or whose objective is missing or not finite; the search goes on without it.

Detached (hydra.launcher.detach=true), the command submits one batch and returns: a job of the search's own, queued
after that batch (the queue's submit_search), runs the same command without detach, which resumes the study as
above.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import optuna
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf
from optuna.trial import TrialState

from gpt.errors import EXIT_FAILED, EXIT_USER
from gpt.run_folder import CANCELLED, CTRL_C, RunFolder
from launch.run.job_record import cancelled_by_user
from launch.optuna_space import SearchSpace, search_space

DB = "optuna.db"
FINISHED = (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)


def run_search(sweeper: Any, arguments: list[str]) -> None:
    sweep_dir = _sweep_dir(sweeper)
    params = [f"{k}={v}" for k, v in (sweeper.params or {}).items()]
    try:  # a search Optuna cannot run: one line, before anything
        if sweeper.n_jobs < 1:
            raise ValueError(f"hydra.sweeper.n_jobs={sweeper.n_jobs} is not valid: the trials launched together, "
                             "at least 1")
        space = search_space(params + list(arguments))
        sampler, n_trials = _sampler(sweeper.sampler, space, sweeper.n_trials)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER)
    storage, db = _storage(sweeper.storage, sweep_dir)
    new_db = db is not None and not db.exists()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # a line per trial: the launcher says what each does
    study = optuna.create_study(storage=storage, study_name=sweeper.study_name or sweep_dir.name, sampler=sampler,
                                direction=sweeper.direction.name, load_if_exists=True)
    left = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    to_ask = max(0, n_trials - len(study.get_trials(deepcopy=False, states=FINISHED)) - len(left))
    print(f"optuna: study {study.study_name} in {storage}: {len(study.trials)} trial(s) so far, {to_ask} to ask "
          f"(n_trials={n_trials})", flush=True)
    if left:
        print(f"optuna: trial(s) {', '.join(str(t.number) for t in left)} were running when the last search ended: "
              "launched again (a job still queued or running is picked up, a finished run is read back)", flush=True)
    detach = bool(OmegaConf.select(sweeper.config, "hydra.launcher.detach"))
    while left or to_ask > 0:
        if left:
            batch, left = left[:sweeper.n_jobs], left[sweeper.n_jobs:]
        else:
            batch = [study.ask(space.distributions) for _ in range(min(sweeper.n_jobs, to_ask))]
            to_ask -= len(batch)
        if detach:  # once the batch is submitted, a job of its own goes on with the search (launch.hydra_launcher)
            sweeper.launcher.search = (_search_args(sweeper.config, sweep_dir),
                                       math.ceil((len(left) + to_ask) / sweeper.n_jobs))
        if _run_batch(sweeper, study, space, batch, db if new_db else None):
            return
        new_db = False
    _results(study, sweep_dir, storage)


def _search_args(config: Any, sweep_dir: Path) -> list[str]:
    """The command that goes on with a detached search: this one, waiting for each batch, in this sweep folder."""
    return ["-m", *config.hydra.overrides.hydra, *config.hydra.overrides.task, f"hydra.sweep.dir={sweep_dir}",
            "hydra.launcher.detach=false", "hydra.launcher.progress=false"]


def _run_batch(sweeper: Any, study: optuna.Study, space: SearchSpace, batch: list, new_db: Path | None) -> bool:
    """Launch the batch and tell the study each trial's outcome; True where the launcher detached instead (the
    trials stay running, for the search's job). A batch the launcher refuses before anything runs (exit 2: a bad
    point) fails its trials, and leaves no new database behind when nothing else is in it."""
    try:
        returns = []
        for run in _consecutive(batch):  # the launcher numbers (names) a call's points from its first index
            returns += sweeper.launcher.launch([space.overrides(t.params) for t in run], initial_job_idx=run[0].number)
    except SystemExit as e:
        ran = [t.number for t in batch if _ran(_sweep_dir(sweeper), t.number)]
        if e.code == EXIT_USER and ran:  # Ctrl-C or SIGTERM: every rank saved; the trials stay running
            print(f"optuna: trial(s) {', '.join(map(str, ran))} interrupted: left running in the study; the same "
                  "command continues them from their newest checkpoints, then the search", file=sys.stderr, flush=True)
        elif e.code == EXIT_USER:
            for trial in batch:
                _tell(study, trial.number, None)
            if new_db is not None:  # this command made it, for this batch alone
                new_db.unlink(missing_ok=True)
        raise
    if getattr(sweeper.launcher, "search_job", None):
        return True
    held = []
    for trial, ret in zip(batch, returns):
        value, why = _outcome(ret, trial.number)
        if value is None and (how := _interrupted(ret)):  # not the trial's fault: its run goes on later
            held.append((trial.number, how))
            continue
        if why:
            print(f"optuna: trial {trial.number} failed: {why}; the study records it as failed and the search goes on",
                  file=sys.stderr, flush=True)
        _tell(study, trial.number, value)
    if held:
        _stop(held)
    return False


def _sweep_dir(sweeper: Any) -> Path:
    return Path(str(sweeper.config.hydra.sweep.dir)).absolute()


def _ran(sweep: Path, number: int) -> bool:
    """Whether trial `number`'s run began (its run folder has an attempt), where a refusal at planning runs none."""
    return any((d / "attempts.jsonl").exists() or (d / "attempt.json").exists()
               for d in (*sweep.glob(f"trial={number},*"), sweep / f"trial={number}"))


def _interrupted(ret: JobReturn) -> str:
    """How a trial's run stopped without failing, by recovery's line in its run folder: cancelled by the user, or
    stopped after it saved and was not requeued (a preemption that cancels, Ctrl-C); '' otherwise."""
    value = ret._return_value
    run_dir = value.get("run_dir") if isinstance(value, dict) else None
    if not run_dir:
        return ""
    attempts = RunFolder(Path(run_dir)).attempts.read()
    last = attempts[-1] if attempts else None
    if cancelled_by_user(Path(run_dir)) or (last is not None and last.ended == CANCELLED):
        return CANCELLED
    if last is not None and not last.requeued and (last.ended.startswith("preempted") or last.ended == CTRL_C):
        return f"stopped ({last.ended})"
    return ""


def _stop(held: list[tuple[int, str]]) -> None:
    """The search ends with its interrupted trials left running in the study: the same command continues their runs
    from their newest checkpoints, then the search. Exit 0 where the user cancelled them all, 1 (stopped) else."""
    for number, how in held:
        print(f"optuna: trial {number} {how}: left running in the study; the same command continues it from its "
              "newest checkpoint, then the search", file=sys.stderr, flush=True)
    sys.exit(0 if all(how == CANCELLED for _, how in held) else EXIT_FAILED)


def _tell(study: optuna.Study, number: int, value: float | None) -> None:
    """The trial's value, or FAIL where it has none."""
    state = TrialState.FAIL if value is None else TrialState.COMPLETE
    try:
        study.tell(number, value, state=state, skip_if_finished=True)
    except RuntimeError as e:  # the grid sampler stops the study at its last point: told already, nothing to stop
        if "Study.stop" not in str(e):
            raise


def _consecutive(batch: list) -> list[list]:
    runs: list[list] = []
    for trial in batch:
        if runs and runs[-1][-1].number + 1 == trial.number:
            runs[-1].append(trial)
        else:
            runs.append([trial])
    return runs


def _outcome(ret: JobReturn, number: int) -> tuple[float | None, str | None]:
    """(objective, None), or (None, why the trial failed)."""
    if ret.status != JobStatus.COMPLETED:
        value = ret._return_value  # a local run's exception; a job's result (reading return_value would raise it)
        if isinstance(value, BaseException):
            return None, f"{type(value).__name__}: {value}"
        value = value if isinstance(value, dict) else {}
        which = f"its job {value['job_id']}" if "job_id" in value else "its run"  # a job's, or a local run's
        return None, f"{which} failed (run folder {value.get('run_dir', '?')})"
    try:
        objective = float(ret.return_value)
    except (TypeError, ValueError) as e:
        return None, str(e)
    if not math.isfinite(objective):
        return None, f"its objective is {objective} ({ret.return_value.get('run_dir', f'trial {number}')})"
    return objective, None


def _sampler(make: Any, space: SearchSpace, n_trials: int) -> tuple[optuna.samplers.BaseSampler, int]:
    """The configured sampler (Hydra instantiates it partially); the grid sampler gets the grid, and runs each point
    of it once at most."""
    if getattr(make, "func", None) is optuna.samplers.GridSampler:
        grid = space.grid()
        return make(search_space=grid), min(n_trials, math.prod(len(v) for v in grid.values()))
    return make(), n_trials


def _storage(storage: str | None, sweep_dir: Path) -> tuple[str, Path | None]:
    """The storage URL, and the sqlite file of the default one (in the sweep folder, beside the trials' runs)."""
    if storage:
        return storage, None
    sweep_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{sweep_dir / DB}", sweep_dir / DB


def _results(study: optuna.Study, sweep_dir: Path, storage: str) -> None:
    """SWEEP/optimization_results.yaml (the best trial), and a line for the trials that failed; exit 1 when none of
    the study's trials completed."""
    failed = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))]
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if failed:
        print(f"optuna: {len(failed)} of {len(failed) + len(complete)} trial(s) failed: "
              f"{', '.join(map(str, failed))} (their run folders say why)", file=sys.stderr, flush=True)
    if not complete:
        print(f"error: none of the study's {len(failed)} trial(s) completed", file=sys.stderr, flush=True)
        sys.exit(EXIT_FAILED)
    best = study.best_trial
    OmegaConf.save(OmegaConf.create({
        "name": "optuna", "best_params": best.params, "best_value": best.value, "best_trial": best.number,
        "study_name": study.study_name, "storage": storage, "complete": len(complete), "failed": len(failed)}),
        sweep_dir / "optimization_results.yaml")
    print(f"optuna: best trial {best.number}: {best.value} with {best.params} "
          f"({sweep_dir / 'optimization_results.yaml'})", flush=True)
