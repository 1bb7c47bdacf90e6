"""A run is one folder from its first submission to its last step (runs/<run>; a sweep's points under
runs/sweeps/<run>/). Submitting the same command again continues it. Before anything runs, the launcher checks
that no job of the run waits in the queue or runs (RUN_DIR/slurm_job.json), that no other live run holds it
(launch.run.take_lease), that the folder's run is this run (RUN_DIR/run.json records what must not change: model,
data, optimiser schedule, seed, and the prepared data's fingerprint), and whether it has already finished. Nothing
is written into the folder before that, and the record is written only once the whole plan has passed
(FolderCheck.record).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpt.checkpoint.store import list_checkpoints, newest_sound, step_of
from launch.launch_config import LaunchConfig
from gpt.config.parse import to_plain
from gpt.config.train import TrainConfig
from gpt.data import data_identity, identities, read_meta
from gpt.data.content import corpus_change, corpus_record
from gpt.data.inputs import Corpus
from gpt.errors import UserError
from gpt.run_folder import AttemptLine, RunFolder, write_json
from gpt.train import schedule
from launch.backends.job_state import JobState
from launch.rank.job_env import JobEnvironment
from launch.run.take_lease import AskJob, check_free

# What must be equal for a run to continue exactly, besides its schedule's own part (gpt.train.schedule: train.max_steps
# may grow where the steps taken do not depend on it) and its numerics (TrainConfig.numerics).
KEYS = ("seed", "model", "data.text_md5", "data.tokenizer", "data.vocab_size", "data.val_fraction",
        "train.global_batch_size", "train.lr", "train.min_lr", "train.warmup_steps", "train.weight_decay",
        "train.betas", "train.grad_clip")


def flat(d: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dict as {'train.lr': 3e-4, ...}."""
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def identity(run: LaunchConfig, corpus: Corpus, known_text: dict[str, Any] | None = None
             ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(what must not change, flattened; the `corpus`'s size, mtime, listing and md5: run.json's corpus record, its
    content read only where `known_text`, the record before, and the prepared folders do not tell it)."""
    c = flat(to_plain(run))
    record = corpus_record(corpus.files, known_text, corpus.prepared)
    values = {"seed": run.seed, **{k: v for k, v in c.items() if k.startswith("model.")},
              "data.text_md5": record["md5"], **schedule.identity(run.train), **run.train.numerics()}
    for key in KEYS:
        if key not in values and key != "model":
            values[key] = c[key]
    return values, record


@dataclass(frozen=True)
class Existing:
    step: int | None  # the newest complete checkpoint's step
    finished: bool  # nothing to train: at train.max_steps, or stopped early by a sweep that still stops early
    stopped_early: str | None = None  # why its last attempt stopped at a rung (gpt.train.early_stop)

    def done(self) -> str:
        """What a launcher says of a run it has nothing to do for."""
        if self.stopped_early and self.step is not None:
            return f"{self.stopped_early}; train it on with launcher.early_stop=none"
        return f"finished at step {self.step}"


def stopped_early(run_dir: Path, run: LaunchConfig) -> str | None:
    """Why the run's last attempt stopped at a rung, while `run` still stops early (launcher.early_stop)."""
    why = AttemptLine.stopped_early_why(RunFolder(run_dir).attempts.read())
    return why if why and run.launcher.early_stop != "none" else None


def newest_step(run_dir: Path) -> int | None:
    """The step of the newest sound checkpoint by write order (its manifest holds): the one resume=auto continues
    from. A truncated newest one does not make a run finished."""
    found, _ = newest_sound(RunFolder(run_dir).checkpoints)
    return step_of(found) if found else None


def stable_checkpoint(run_dir: Path, decay: list | None) -> str | None:
    """The newest checkpoint of a wsd run from before its decay (`decay`: its [start, end, shape]), to branch from."""
    if not decay:
        return None
    before = [p for p in list_checkpoints(RunFolder(run_dir).checkpoints) if step_of(p) <= decay[0]]
    return str(before[-1]) if before else None


def check_queued_job(run_dir: Path, job: JobEnvironment, job_state: AskJob) -> None:
    """Refuse while the job submitted for this folder waits in the queue (pending, held, requeued, suspended) or
    runs: it trains with the folder's config when it starts, and a second job would rewrite that config under it."""
    try:
        queued = json.loads(RunFolder(run_dir).slurm_job.read_text())["job_id"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    if queued == job.job_id:
        return
    found = job_state(str(queued))
    # ending: its processes are ending, and its lease says so
    if found is not None and found.state in (JobState.PENDING, JobState.RUNNING):
        raise UserError(f"the run folder {run_dir} belongs to job {queued}, which is {found.shown}: it continues this "
                        f"run when it runs. Wait for it ({found.watch}), or cancel it ({found.cancel}) and run this "
                        "command again")


def prepared_data(data_dir: str) -> dict[str, Any] | None:
    """The data's identity as run.json records it (its folder and fingerprint), once it is prepared."""
    try:
        return {"dir": data_dir, "fingerprint": data_identity(data_dir)}
    except (UserError, OSError, ValueError):  # not prepared yet (data.prepare_on=job): its rank 0 records it
        return None


def check_same_data(run_dir: Path, saved: dict[str, Any] | None, data_dir: str, step: int | None
                    ) -> dict[str, Any] | None:
    """A run with checkpoints continues only on the data it was trained on (`saved`: run.json's record of it).
    Returns the identity of the data in `data_dir` now (prepared_data)."""
    current = prepared_data(data_dir)
    if step is None or not saved or not current or None in (saved.get("fingerprint"), current["fingerprint"]):
        return current
    if saved["fingerprint"] != current["fingerprint"] and saved["fingerprint"] not in identities(
            read_meta(current["dir"])):
        raise UserError(f"{run_dir} was trained (to step {step}) on data with fingerprint {saved['fingerprint']} "
                        f"(in {saved.get('dir')}), but {current['dir']} now holds data with fingerprint "
                        f"{current['fingerprint']}: continue it on its own data, or start a new run under another "
                        "name (run=NAME)")


def record_data(run_dir: Path, data_dir: str, fingerprint: str | None) -> None:
    """Rank 0, as it starts: the data this attempt trains on, into run.json (a preparation job's data was not
    prepared when the launcher wrote it)."""
    path = RunFolder(run_dir).identity
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if record.get("data") != (data := {"dir": data_dir, "fingerprint": fingerprint}):
        write_record(run_dir, {**record, "data": data})


@dataclass(frozen=True)
class FolderCheck:
    """What check_run_folder found (None for a new run), and the identity record to write once planning passed."""
    existing: Existing | None
    identity: dict[str, Any]
    data_dir: str

    def record(self, run_dir: Path) -> None:
        """Written after planning prepared the data: its identity as it is now (checked again: planning may have
        prepared it just now), else as recorded before."""
        now = check_same_data(run_dir, self.identity.get("data"), self.data_dir, self.existing and self.existing.step)
        data = now or self.identity.get("data")
        write_record(run_dir, {**self.identity, **({"data": data} if data else {})})


def check_same_run(run_dir: Path, record: dict[str, Any], now: tuple[dict[str, Any], dict[str, Any]], step: int,
                   train: TrainConfig, corpus: Corpus) -> None:
    """The run run_dir holds (its run.json `record`) is this command's (`now`: identity()'s, of its `train` section
    and `corpus`), or UserError listing the keys that differ."""
    current, now_corpus = now
    stable = stable_checkpoint(run_dir, record["identity"].get(schedule.WSD_KEY))  # the run's own decay
    saved = same_corpus_before(record["identity"], record.get("corpus"), now_corpus)
    saved = schedule.settle(saved, current, step)
    diffs = [f"{k}: the run has {saved.get(k, '<unset>')!r}, this command {current.get(k, '<unset>')!r}"
             + schedule.hint(k, saved, train, step, stable) if k != "data.text_md5" else
             corpus_change(corpus.files, corpus.prepared, record.get("corpus"), now_corpus)
             for k in sorted(set(current) | set(saved)) if saved.get(k) != current.get(k)]
    if diffs:
        raise UserError(other_settings(run_dir, step, diffs))


def other_settings(run_dir: Path, step: int, diffs: list[str]) -> str:
    """The refusal of a command whose settings differ from the run's in `diffs`: one line for one key; for several,
    a line that says it all, then one line per key."""
    what = f"{run_dir} holds a run with other settings (step {step}); it cannot continue with these"
    advice = "Run it with its own settings, or start a new run under another name (run=NAME)."
    if len(diffs) == 1:
        return f"{what}: {diffs[0]}. {advice}"
    return f"{what}. {advice} The {len(diffs)} keys that differ:\n  " + "\n  ".join(diffs)


def same_corpus_before(saved: dict[str, Any], known: dict[str, Any] | None, corpus: dict[str, Any]) -> dict[str, Any]:
    """A run.json written before corpora were identified by content recorded a corpus of several files by its
    listing: when that is the listing of the files as they are now, they are unchanged since, and the run's corpus
    is their content."""
    if known and "listing" not in known and saved.get("data.text_md5") == corpus["listing"]:
        return {**saved, "data.text_md5": corpus["md5"]}
    return saved


def check_run_folder(run: LaunchConfig, corpus: Corpus, run_dir: Path, job: JobEnvironment,
                     job_state: AskJob | None = None) -> FolderCheck:
    """Before anything runs: what the folder holds (no checkpoint: None), once it is known to be this run
    (`corpus`: its data section's, gpt.data.inputs.corpus_of).
    Raises UserError when a job of the run is queued or running, when another run holds the folder, when its run
    differs (the keys are listed), or when resume=none would start over on top of it."""
    record_path = RunFolder(run_dir).identity
    record = json.loads(record_path.read_text()) if record_path.is_file() else None
    job_state = job_state or job.job_state
    check_queued_job(run_dir, job, job_state)
    check_free(run_dir, job.job_id, job.restart, job_state)  # a late beat is no proof: as long as rank 0 waits
    step = newest_step(run_dir)
    early = stopped_early(run_dir, run) if step is not None else None
    current, corpus_now = identity(run, corpus, (record or {}).get("corpus"))
    if step is not None and run.resume == "none":
        raise UserError(f"{run_dir} already holds this run at step {step}: resume=none would start over on top of "
                        f"it. Continue it (resume=auto), or start a new run under another name (run=NAME), or delete "
                        f"the folder")
    if record is not None and step is not None:
        check_same_run(run_dir, record, (current, corpus_now), step, run.train, corpus)
    data_dir = run.data.dir
    check_same_data(run_dir, (record or {}).get("data"), data_dir, step)
    existing = None if step is None else Existing(step, step >= run.train.max_steps or early is not None, early)
    return FolderCheck(existing, {"identity": current, "corpus": corpus_now, "data": (record or {}).get("data"),
                                  "created": (record or {}).get("created", time.time())}, data_dir)


def write_record(run_dir: Path, record: dict[str, Any]) -> None:
    path = RunFolder(run_dir).identity
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, record, indent=1)  # every task of a job may write it at once
