"""The eval section: downstream multiple-choice tasks scored during training, beside the validation loss
(train.eval_interval), from local files only (gpt.eval.task_file); and what scores each checkpoint once it is saved
(after_save). Torch-free."""
from __future__ import annotations

from dataclasses import dataclass, field

from gpt.errors import ConfigError
from gpt.eval.task_file import KEY, read_task, task_name

AFTER_SAVE = ("none", "job")


@dataclass(frozen=True)
class EvalConfig:
    # local HellaSwag-format JSONL files, each a task named by its file (tasks/<name>/acc in the metrics)
    tasks: list[str] = field(default_factory=list)
    limit: int = 0  # score only each file's first `limit` examples; 0: all of them
    # job: each checkpoint rank 0 commits gets an evaluation job of its own (python -m gpt.evaluate, cluster=slurm),
    # its figures in metrics/eval_jobs.jsonl and tensorboard/eval_jobs; none: the training's own evaluations only
    after_save: str = "none"

    def validate(self) -> None:
        if self.after_save not in AFTER_SAVE:
            raise ConfigError("eval.after_save", self.after_save, " or ".join(AFTER_SAVE))
        if self.limit < 0:
            raise ConfigError("eval.limit", self.limit, "0 (every example) or a positive number of examples")
        names: dict[str, str] = {}
        for path in self.tasks:
            name = task_name(path)
            if name in names:
                raise ConfigError(KEY, list(self.tasks), f"files with different names (tasks/<name>/acc): {path} "
                                  f"and {names[name]} are both '{name}'")
            names[name] = path

    def check_files(self) -> None:
        """Every task file read and checked: by planning, once (validate runs at every read of a run's config.yaml,
        by any process in any folder, and reads no file)."""
        for path in self.tasks:
            read_task(path, self.limit)

    def check_interval(self, eval_interval: int) -> None:
        """The tasks are scored with the validation loss: they need train.eval_interval."""
        if self.tasks and eval_interval == 0 and self.after_save == "none":
            raise ConfigError("train.eval_interval", 0, "a positive number of steps with eval.tasks set (the tasks "
                              "are scored beside the validation loss)")
