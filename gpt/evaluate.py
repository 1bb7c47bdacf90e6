"""Score a checkpoint after the fact: its validation loss and perplexity, multiple-choice tasks, text files.

    python -m gpt.evaluate RUN_OR_CHECKPOINT_DIR [--step N] [--tasks FILE ...] [--text FILE ...]
        [--limit N] [--batches 50] [--batch-size 16] [--device cpu|cuda] [--record]

--tasks takes task files in HellaSwag's format, scored as `eval.tasks` scores them during training (the same
`tasks/<name>/acc` and `acc_norm`); --text takes text files, each read with the run's tokenizer
(`text/<name>/loss` and `perplexity`). One JSON line on stdout; with --record (a run folder's checkpoint, as
eval.after_save=job scores each) also a line of kind "eval_job" in its metrics/eval_jobs.jsonl and the figures in
its tensorboard/eval_jobs, which the report reads.
"""
from __future__ import annotations

import json
import math
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


@torch.no_grad()
def evaluate(model, data_dir: str, batches: int, batch_size: int, seed: int, device: str) -> float:
    val = ValBatches(TokenDataset(data_dir, "val"), seed, model.cfg.block_size, batch_size, batches, 0, 1,
                     torch.device(device))
    losses = [model(x, y)[1].item() for x, y in val]
    return sum(losses) / len(losses)


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
    loss = evaluate(model, meta["data_dir"], args.batches, args.batch_size, args.seed, args.device)
    out = {"val_loss": round(loss, 4), "perplexity": round(math.exp(loss), 3)}
    if args.tasks or args.text:
        tokenizer = load_tokenizer(meta["data_dir"])
    if args.tasks:
        with option_errors("--tasks"):
            tasks = TaskScorer(args.tasks, args.limit, tokenizer, model.cfg.block_size)
        out.update(tasks.score(lambda x, y: model(x, y)[1], 0, 1, None, lambda: False, torch.device(args.device)))
    for path in args.text:
        out.update(text_loss(model, path, tokenizer, args.batch_size, args.limit, args.device))
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
    parser.add_argument("--tasks", nargs="+", default=[], metavar="FILE", help="multiple-choice task files")
    parser.add_argument("--text", nargs="+", default=[], metavar="FILE", help="text files: loss and perplexity")
    parser.add_argument("--limit", type=int, default=0, help="each task's first N examples, each text's first N rows")
    parser.add_argument("--batches", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--record", action="store_true", help="also into the run folder's metrics and TensorBoard")
    args = parser.parse_args(argv)
    with user_errors():
        if args.record and not RunFolder(Path(args.path)).is_run():
            raise UserError(f"--record: {args.path} is not a run folder (its config.yaml beside metrics/)")
        path = args.path if args.step is None else at_step(Path(args.path), args.step)
        model, meta, path = load_model(path, args.device)
        figures = scores(model, meta, args)
    line = {"checkpoint": str(path), "step": meta["step"], **figures}
    if args.record:
        record(Path(args.path), line)
    print(json.dumps(line))


if __name__ == "__main__":
    main()
