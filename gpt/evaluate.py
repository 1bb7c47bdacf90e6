"""Validation loss and perplexity of a checkpoint on its data's validation split.

    python -m gpt.evaluate RUN_OR_CHECKPOINT_DIR [--batches 50] [--batch-size 16]
"""
from __future__ import annotations

import argparse
import json
import math
import sys

import torch

from gpt.checkpoint import load_model
from gpt.data.loader import TokenDataset, ValBatches
from gpt.errors import UserError


@torch.no_grad()
def evaluate(model, data_dir: str, batches: int, batch_size: int, seed: int, device: str) -> float:
    val = ValBatches(TokenDataset(data_dir, "val"), seed, model.cfg.block_size, batch_size, batches, 0, 1,
                     torch.device(device))
    losses = [model(x, y)[1].item() for x, y in val]
    return sum(losses) / len(losses)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gpt.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("path", help="a run folder (its newest checkpoint is used) or a checkpoint folder")
    parser.add_argument("--batches", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    try:
        model, meta, path = load_model(args.path, args.device)
        loss = evaluate(model, meta["data_dir"], args.batches, args.batch_size, args.seed, args.device)
    except UserError as e:
        sys.exit(f"error: {e}")
    print(json.dumps({"checkpoint": str(path), "step": meta["step"], "val_loss": round(loss, 4),
                      "perplexity": round(math.exp(loss), 3)}))


if __name__ == "__main__":
    main()
