"""A multiple-choice task file in HellaSwag's JSONL format (as llm.c's hellaswag.py reads it): one example a line,
{"ctx": "...", "endings": ["...", ...], "label": i}. Read and checked before anything runs, the first bad line named
in one line. Torch-free: planning reads it on the login node."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from gpt.errors import ConfigError

KEY = "eval.tasks"
FORMAT = 'a JSONL file of {"ctx": "...", "endings": ["...", ...], "label": i} lines (HellaSwag\'s format)'


@dataclass(frozen=True)
class Example:
    ctx: str
    endings: tuple[str, ...]
    label: int


def task_name(path: str) -> str:
    """A task's name in the metrics (tasks/<name>/acc): its file's name without the extension."""
    return Path(path).name.split(".")[0]


def read_task(path: str, limit: int = 0) -> list[Example]:
    """The examples of `path` (its first `limit` when limit > 0). Every example has as many endings as the first:
    each rank then runs the same number of forwards, which sharded layouts need."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(KEY, path, f"local files: {FORMAT} (gptlaunch downloads nothing)")
    examples: list[Example] = []
    with file.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            examples.append(_example(line, f"{path}:{number}", examples[0] if examples else None))
            if 0 < limit == len(examples):
                break
    if not examples:
        raise ConfigError(KEY, path, f"{FORMAT}; this file holds no example")
    return examples


def _example(line: str, where: str, first: Example | None) -> Example:
    try:
        data = json.loads(line)
    except json.JSONDecodeError as e:
        raise ConfigError(KEY, where, f"{FORMAT}; this line is not JSON ({e.msg})") from None
    ctx, endings, label = (data.get(k) for k in ("ctx", "endings", "label")) if isinstance(data, dict) else (None,) * 3
    if not isinstance(ctx, str) or not ctx:
        raise ConfigError(KEY, where, f"{FORMAT}; its ctx is not a non-empty string")
    if not isinstance(endings, list) or len(endings) < 2 or not all(isinstance(e, str) and e for e in endings):
        raise ConfigError(KEY, where, f"{FORMAT}; its endings are not a list of 2 or more non-empty strings")
    if first is not None and len(endings) != len(first.endings):
        raise ConfigError(KEY, where, f"{FORMAT}, every line with as many endings as the first "
                          f"({len(first.endings)}); this one has {len(endings)}")
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(endings):
        raise ConfigError(KEY, where, f"{FORMAT}; its label {label!r} is not an index into its "
                          f"{len(endings)} endings")
    return Example(ctx, tuple(endings), label)
