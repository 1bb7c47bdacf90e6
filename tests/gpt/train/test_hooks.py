"""A feature reaches the training loop through a LoopHook, called at the loop's fixed points; the loop returns a typed
summary, whose plain form is the run's summary.json."""
from __future__ import annotations

import contextlib
import json

from helpers import SHAKESPEARE, plan
from gpt.collectives.process_group import DistEnv
from gpt.config import schema
from gpt.train.hooks import LoopHook
from gpt.train.summary import FitSummary
from gpt.train.trainer import Trainer


class Recorder(LoopHook):
    def __init__(self):
        self.calls: list[tuple] = []

    def started(self, loop):
        self.calls.append(("started", loop.first_step, loop.step, loop.data_fingerprint is not None))

    def before_step(self, step):
        self.calls.append(("before", step))

    @contextlib.contextmanager
    def around_step(self, step):
        self.calls.append(("enter", step))
        yield
        self.calls.append(("exit", step))

    def after_step(self, step):
        self.calls.append(("after", step))

    def saved(self, step, path):
        self.calls.append(("saved", step, path.name, (path / "meta.json").is_file()))


def test_a_callers_hook_sees_the_loop_at_its_fixed_points(tmp_path_factory):
    run_dir = plan(tmp_path_factory.mktemp("run"), "model=tiny", "train.max_steps=2", "train.log_interval=1",
                   "train.eval_interval=0", "train.progress=false", f"data.text_path={SHAKESPEARE}",
                   f"data.dir={tmp_path_factory.getbasetemp() / 'trainer-data'}")
    hook = Recorder()
    summary = Trainer(schema.load(run_dir / "config.yaml"), DistEnv(), run_dir, hooks=[hook]).fit()
    assert hook.calls == [("started", 0, 0, True), ("before", 0), ("enter", 0), ("exit", 0), ("after", 0),
                          ("before", 1), ("enter", 1), ("exit", 1), ("after", 1),
                          ("saved", 2, "step_00000002", True)]  # rank 0's final save, once committed
    assert (summary.first_step, summary.last_step, summary.preempted) == (0, 2, None)
    assert summary.train_loss is not None and summary.spent["steps"] == 2


def test_the_summarys_plain_form_holds_the_values_set():
    """What summary.json gets: each task's score under its own key (a sweep's objective may name one), and no
    field left unset."""
    summary = FitSummary(first_step=4, last_step=8, spent={"steps": 4.0})
    summary.logged({"loss": 2.5, "tokens_per_s": 10.0, "lr": 1e-3})
    summary.evaluated({"loss": 2.4, "tasks/hellaswag/acc": 0.3})
    assert summary.as_dict() == {"first_step": 4, "last_step": 8, "train_loss": 2.5, "tokens_per_s": 10.0,
                                 "val_loss": 2.4, "tasks/hellaswag/acc": 0.3, "spent": {"steps": 4.0}}
    summary.preempted, summary.failed_saves = "SIGUSR2", [6]
    assert json.loads(json.dumps(summary.as_dict()))["preempted"] == "SIGUSR2"
    assert summary.as_dict()["failed_saves"] == [6]
