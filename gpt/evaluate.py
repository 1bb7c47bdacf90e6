"""Score a checkpoint after the fact: its validation loss and perplexity, multiple-choice tasks, text files.

    python -m gpt.evaluate RUN_OR_CHECKPOINT_DIR [--step N] [--tasks FILE ...] [--text FILE ...]
        [--limit N] [--batches N] [--batch-size B] [--seed S] [--device cpu|cuda] [--record]

The validation loss is over the run's own validation set (train.eval_batches batches of its global batch, drawn with
its seed, as its checkpoint records them): the loss training logged at that step. --batches, --batch-size and --seed
draw another set instead, and say so.

--tasks takes task files in HellaSwag's format, scored as `eval.tasks` scores them during training (the same
`tasks/<name>/acc` and `acc_norm`); --text takes text files, each read with the run's tokenizer
(`text/<name>/loss` and `perplexity`). One JSON line on stdout; with --record (a run folder's checkpoint, as
eval.after_save=job scores each) also a line of kind "eval_job" in its metrics/eval_jobs.jsonl and the figures in
its tensorboard/eval_jobs, which the report reads.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch
from tensorboard.compat.proto.summary_pb2 import Summary
from torch.utils.tensorboard.summary import scalar

from gpt.checkpoint.store import list_checkpoints, step_of
from gpt.checkpoint.writer import load_model
from gpt.cli import checkpoint_parser, option_errors, user_errors
from gpt.data.loader import TokenDataset, ValBatches
from gpt.data.tokenizer import load_tokenizer
from gpt.errors import UserError
from gpt.eval.multiple_choice import TaskScorer
from gpt.eval.perplexity import text_loss
from gpt.resilience.disk_faults import Outage
from gpt.run_folder import RunFolder
from gpt.train.event_file import EventFile
from gpt.train.metrics import scalars


# Sequences per forward pass at most (the text files' rows too): a run's global batch, which its ranks shared in
# micro-batches, may not fit one device in one pass.
FORWARD_ROWS = 16


def forward_rows(batch_size: int) -> int:
    """The largest divisor of `batch_size` up to FORWARD_ROWS: equal passes, so their mean loss is the batch's."""
    return max(d for d in range(1, min(batch_size, FORWARD_ROWS) + 1) if batch_size % d == 0)


@torch.no_grad()
def evaluate(model, data_dir: str, batches: int, batch_size: int, seed: int, device: str) -> float:
    val = ValBatches(TokenDataset(data_dir, "val"), seed, model.cfg.block_size, batch_size, batches, 0, 1,
                     torch.device(device), forward_rows(batch_size))
    losses = [model(x, y, with_aux=False)[1].item() for x, y in val]
    return sum(losses) / len(losses)


def validation_set(meta: dict, args) -> tuple[int, int, int]:
    """(seed, batches, batch size) to score: the run's validation set, as its checkpoint records it, with what
    --seed, --batches and --batch-size override; a note on stderr when that is another set."""
    data = meta.get("data") or {}
    run = (data.get("seed"), meta.get("eval_batches") or run_eval_batches(args.checkpoint),
           data.get("global_batch_size"))
    given = (args.seed, args.batches, args.batch_size)
    chosen = tuple(g if g is not None else r for g, r in zip(given, run))
    missing = [flag for flag, value in zip(("--seed", "--batches", "--batch-size"), chosen) if value is None]
    if missing:  # a checkpoint written before checkpoints recorded their validation set
        raise UserError(f"this checkpoint does not record the run's validation set: give {' and '.join(missing)} "
                        f"(the run's seed, train.eval_batches and train.global_batch_size score the loss it logged)")
    if chosen != run:
        print(f"note: the validation loss is over {chosen[1]} batches of {chosen[2]} sequences drawn with seed "
              f"{chosen[0]}, not the run's set ({run[1]} of {run[2]}, seed {run[0]}): it differs from the loss "
              f"the run logged", file=sys.stderr)
    return chosen


def run_eval_batches(checkpoint: Path) -> int | None:
    """train.eval_batches of the run folder a checkpoint written before checkpoints recorded it sits in
    (RUN/checkpoints/step_N), from its config.yaml."""
    from omegaconf import OmegaConf

    config = checkpoint.parent.parent / "config.yaml"
    try:
        value = OmegaConf.select(OmegaConf.load(config), "train.eval_batches")
    except (OSError, ValueError):
        return None
    return value if isinstance(value, int) else None


def at_step(path: Path, step: int) -> Path:
    """The checkpoint of `step` in the run folder `path`; the steps it has, when it has not that one."""
    found = list_checkpoints(RunFolder(path).checkpoints)
    for checkpoint in found:
        if step_of(checkpoint) == step:
            return checkpoint
    have = ", ".join(str(step_of(c)) for c in found) or "none"
    raise UserError(f"--step {step}: {path} has no complete checkpoint of that step (steps it has: {have})")


def scores(model, meta: dict, args) -> dict[str, float]:
    """Every figure asked for, keyed as in a run's metrics."""
    seed, batches, batch_size = validation_set(meta, args)
    loss = evaluate(model, meta["data_dir"], batches, batch_size, seed, args.device)
    out = {"val_loss": round(loss, 4), "perplexity": round(math.exp(loss), 3)}
    if args.tasks or args.text:
        tokenizer = load_tokenizer(meta["data_dir"])
    if args.tasks:
        with option_errors("--tasks"):
            tasks = TaskScorer(args.tasks, args.limit, tokenizer, model.cfg.block_size)
        def forward_loss(x, y):  # the cross-entropy alone, as training scores tasks
            return model(x, y, with_aux=False)[1]
        out.update(tasks.score(forward_loss, 0, 1, None, lambda: False, torch.device(args.device)))
    for path in args.text:
        out.update(text_loss(model, path, tokenizer, args.batch_size or FORWARD_ROWS, args.limit, args.device))
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


def record(run_dir: Path, line: dict) -> None:
    """The figures of one checkpoint, appended to the run's metrics/eval_jobs.jsonl (one write: evaluation jobs of
    several checkpoints may append at once) and its tensorboard/eval_jobs."""
    folder = RunFolder(run_dir)
    folder.metrics.mkdir(parents=True, exist_ok=True)
    with folder.eval_jobs_metrics.open("a") as f:
        f.write(json.dumps({"kind": "eval_job", "time": time.time(), **line}) + "\n")
    points = scalars("eval_job", {k: v for k, v in line.items() if k != "step"})
    events = EventFile(folder.eval_jobs_board, Outage("TensorBoard events", folder.eval_jobs_board, "not recorded"))
    events.add(line["step"], Summary(value=[v for key, value in points.items() for v in scalar(key, value).value]))
    events.close()


def main(argv: list[str] | None = None) -> None:
    parser = checkpoint_parser("gpt.evaluate", __doc__)
    parser.add_argument("--step", type=int, help="the run's checkpoint of this step (default: its newest)")
    parser.add_argument("--tasks", nargs="+", action="extend", default=[], metavar="FILE",
                        help="multiple-choice task files")
    parser.add_argument("--text", nargs="+", action="extend", default=[], metavar="FILE",
                        help="text files: loss and perplexity")
    parser.add_argument("--limit", type=int, default=0, help="each task's first N examples, each text's first N rows")
    parser.add_argument("--batches", type=int, help="validation batches (default: the run's train.eval_batches)")
    parser.add_argument("--batch-size", type=int,
                        help="sequences per validation batch (default: the run's global batch), per text file's "
                             f"forward pass (default: {FORWARD_ROWS})")
    parser.set_defaults(seed=None)  # the run's own, which its checkpoint records
    parser.add_argument("--record", action="store_true", help="also into the run folder's metrics and TensorBoard")
    args = parser.parse_args(argv)
    with user_errors():
        if args.record and not RunFolder(Path(args.path)).is_run():
            raise UserError(f"--record: {args.path} is not a run folder (its config.yaml beside metrics/)")
        path = args.path if args.step is None else at_step(Path(args.path), args.step)
        model, meta, path = load_model(path, args.device)
        args.checkpoint = Path(path)
        figures = scores(model, meta, args)
    line = {"checkpoint": str(path), "step": meta["step"], **figures}
    if args.record:
        record(Path(args.path), line)
    print(json.dumps(line))


if __name__ == "__main__":
    main()
