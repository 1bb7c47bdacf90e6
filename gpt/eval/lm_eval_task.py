"""A task file of gptlaunch's format as an lm-evaluation-harness task beside an exported model: the examples copied
into `<export>/lm_eval/<name>.jsonl` and the task's YAML next to them, its data path relative to the export folder,
so that the folder scores anywhere it is copied to (run lm_eval from inside it)."""
from __future__ import annotations

import shutil
from pathlib import Path

from gpt.eval.task_file import task_name

FOLDER = "lm_eval"
TEMPLATE = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder}/{name}.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{ctx}}}}"
doc_to_choice: "{{{{endings}}}}"
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def write_lm_eval_tasks(paths: list[str], out: Path) -> list[str]:
    """Each task of `paths` (task files already checked) written under `out/lm_eval/`; their names."""
    folder = out / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for path in paths:
        name = task_name(path)
        shutil.copyfile(path, folder / f"{name}.jsonl")
        (folder / f"{name}.yaml").write_text(TEMPLATE.format(name=name, folder=FOLDER))
        names.append(name)
    return names


def lm_eval_command(names: list[str], prefix_token_id: int | None) -> str:
    """The command that scores the tasks, run from inside the export folder."""
    prefix = "" if prefix_token_id is None else f",prefix_token_id={prefix_token_id}"
    return (f"HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 lm_eval --model hf --model_args pretrained=.{prefix} "
            f"--include_path {FOLDER} --tasks {','.join(names)}")
