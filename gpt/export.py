"""Write a trained model as a Hugging Face folder that transformers loads with from_pretrained, no custom code.

    python -m gpt.export RUN_OR_CHECKPOINT_DIR OUT_DIR [--dtype bf16] [--max-shard-size 5GB] [--lm-eval-task FILE ...]

OUT_DIR gets model.safetensors, config.json, generation_config.json and the tokenizer; a model over the shard size is
written as several safetensors files and their index (transformers' save_pretrained shards it). With --lm-eval-task,
each task file (HellaSwag's format) becomes an lm-evaluation-harness task in OUT_DIR/lm_eval/. The checkpoint may
come from any layout (FSDP, tensor parallel, pipeline, DeepSpeed): its full weights are read in this one process.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from gpt.cli import option_errors, user_errors
from gpt.errors import UserError


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def hf_model(model: Any, eot: int | None, dtype: str = "fp32") -> Any:
    """The transformers model computing what gptlaunch's `model` (a GPT) computes, with its weights in `dtype` (fp32
    as checkpoints hold them, or bf16); `eot` the tokenizer's end of text (bos and eos), or None."""
    import transformers
    from transformers.modeling_utils import no_init_weights

    from gpt.hf.architecture import hf_config
    from gpt.hf.weights import to_hf

    config = hf_config(model.cfg, eot, str(DTYPES[dtype]).removeprefix("torch."))
    with no_init_weights():  # every weight is replaced below
        hf = getattr(transformers, config.architectures[0])(config)
    shapes = {k: v.shape for k, v in hf.state_dict().items()}
    hf.load_state_dict(to_hf(model.state_dict(), model.cfg, shapes), strict=True)
    hf.generation_config = transformers.GenerationConfig(bos_token_id=eot, eos_token_id=eot)
    return hf.to(DTYPES[dtype]).eval()


def accelerator_chosen_quietly() -> None:
    """save_pretrained imports accelerate, which imports DeepSpeed where it is installed, whose first choice of an
    accelerator prints a warning on a machine without a GPU: chosen here first, that line left out."""
    if importlib.util.find_spec("deepspeed") is None:
        return
    logging.disable(logging.WARNING)
    try:
        from deepspeed.accelerator import get_accelerator

        get_accelerator()
    finally:
        logging.disable(logging.NOTSET)


def train_from(out: Path, model: Any) -> str:
    """The overrides that start a run from the exported folder `out` (init=hf:PATH) of `model` (a ModelConfig): its
    tokenizer, data prepared with it in a folder of its own, and what config.json does not say: the block size it
    was trained at, and (GPT-2's config has no such keys) its biases and its norm."""
    return (f"init=hf:{out} data.tokenizer=hf data.tokenizer_file={out / 'tokenizer.json'} data.dir={out}-data "
            f"model.block_size={model.block_size} model.bias={str(model.bias).lower()} model.norm={model.norm}")


def export(path: Path, out: Path, dtype: str = "fp32", max_shard_size: str = "5GB",
           tasks: Sequence[str] = ()) -> tuple[Path, str | None, Any]:
    """Export the checkpoint at `path` (a run folder: its newest) to `out`, in `dtype`, in safetensors files of at most
    `max_shard_size`, with `tasks` for lm-eval; returns the checkpoint used, the lm-eval command that scores the
    tasks (None without tasks) and the model's config."""
    from gpt.checkpoint.writer import load_model
    from gpt.data.tokenizer import load_tokenizer
    from gpt.eval.lm_eval_task import lm_eval_command, write_lm_eval_tasks
    from gpt.eval.task_file import read_task
    from gpt.hf.architecture import architecture
    from gpt.hf.tokenizer import save_tokenizer

    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} is not empty: export into a new folder")
    check_shard_size(max_shard_size)
    with option_errors("--lm-eval-task"):
        for task in tasks:
            read_task(task)  # refused before anything is written
    model, meta, checkpoint = load_model(path)
    architecture(model.cfg)  # refused before anything is written
    tokenizer = load_tokenizer(meta["data_dir"])
    hf = hf_model(model, tokenizer.eot, dtype)
    out.mkdir(parents=True, exist_ok=True)
    accelerator_chosen_quietly()
    hf.save_pretrained(str(out), safe_serialization=True, max_shard_size=max_shard_size)
    readable_as_the_rest(out)
    save_tokenizer(tokenizer, model.cfg.block_size, out)
    if not tasks:
        return checkpoint, None, model.cfg
    names = write_lm_eval_tasks(list(tasks), out)
    return checkpoint, lm_eval_command(names, 0 if tokenizer.eot is None else None), model.cfg


def readable_as_the_rest(out: Path) -> None:
    """safetensors writes its files 0600 whatever the umask; the folder's other files follow the umask, and an
    exported model is made to be shared (a group's model folder, a hub upload from another account)."""
    mask = os.umask(0)
    os.umask(mask)
    for f in out.glob("*.safetensors"):
        f.chmod(0o666 & ~mask)


def check_shard_size(text: str) -> None:
    """--max-shard-size as transformers' save_pretrained reads it, before anything is written (a bad one failed
    after config.json, and the folder, no longer empty, refused the retry)."""
    from huggingface_hub.serialization._base import parse_size_to_int

    try:
        parse_size_to_int(text)
    except ValueError:
        raise UserError(f"--max-shard-size {text}: a number and a unit (KB, MB, GB, TB), e.g. 5GB or 500MB") from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gpt.export", description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help="a run folder (its newest checkpoint is used) or a checkpoint folder")
    parser.add_argument("out", type=Path, help="the Hugging Face folder to write (new or empty)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                        help="the weights' type: fp32 as checkpoints hold them, or bf16 (half the size)")
    parser.add_argument("--max-shard-size", default="5GB",
                        help="the largest safetensors file; a bigger model is sharded with an index (default 5GB)")
    parser.add_argument("--lm-eval-task", nargs="+", action="extend", default=[], metavar="FILE",
                        help="task files (HellaSwag's format) to write as lm-eval tasks beside the model")
    args = parser.parse_args(argv)
    with user_errors(), torch.no_grad():
        checkpoint, command, model = export(args.path, args.out, args.dtype, args.max_shard_size,
                                                 args.lm_eval_task)
    print(f"exported {checkpoint} to {args.out}", file=sys.stderr)
    if command:
        print(f"score its tasks: cd {args.out} && {command}", file=sys.stderr)
    print(f"train from it: python -m launch {train_from(args.out.absolute(), model)} ...", file=sys.stderr)


if __name__ == "__main__":
    main()
