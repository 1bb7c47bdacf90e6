"""Validation loss and perplexity of a checkpoint on its data's validation split.

    python -m gpt.evaluate RUN_OR_CHECKPOINT_DIR [--batches 50] [--batch-size 16]
"""
from __future__ import annotations

import json
import math

import torch

from gpt.checkpoint.writer import load_model
from gpt.cli import checkpoint_parser, user_errors
from gpt.data.loader import TokenDataset, ValBatches


@torch.no_grad()
def evaluate(model, data_dir: str, batches: int, batch_size: int, seed: int, device: str) -> float:
    val = ValBatches(TokenDataset(data_dir, "val"), seed, model.cfg.block_size, batch_size, batches, 0, 1,
                     torch.device(device))
    losses = [model(x, y)[1].item() for x, y in val]
    return sum(losses) / len(losses)


def main(argv: list[str] | None = None) -> None:
    parser = checkpoint_parser("gpt.evaluate", __doc__)
    parser.add_argument("--batches", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)
    with user_errors():
        model, meta, path = load_model(args.path, args.device)
        loss = evaluate(model, meta["data_dir"], args.batches, args.batch_size, args.seed, args.device)
    print(json.dumps({"checkpoint": str(path), "step": meta["step"], "val_loss": round(loss, 4),
                      "perplexity": round(math.exp(loss), 3)}))


if __name__ == "__main__":
    main()
