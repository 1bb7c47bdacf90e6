"""The loss and perplexity of a model on a text file of the user's (a held-out document, a perplexity set), read
with the run's tokenizer: the text cut into rows of block_size tokens, each predicting the next, every token after
the first counted once."""
from __future__ import annotations

from pathlib import Path

import torch

from gpt.data.tokenizer import Tokenizer
from gpt.errors import UserError
from gpt.eval.task_file import task_name


def text_rows(path: str, tokenizer: Tokenizer, block_size: int, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets (n, block_size) of `path`'s tokens; the last row shorter, its tail targets -1 (ignored);
    only the first `limit` rows when limit > 0."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"--text {path}: no such file (a UTF-8 text file; gptlaunch downloads nothing)")
    try:
        tokens = tokenizer.encode(file.read_text(encoding="utf-8"))
    except (UserError, UnicodeDecodeError) as e:
        raise UserError(f"--text {path}: {e}") from None
    if len(tokens) < 2:
        raise UserError(f"--text {path}: {len(tokens)} token(s): nothing to predict")
    n = -(-(len(tokens) - 1) // block_size)
    n = min(n, limit) if limit > 0 else n
    x = torch.zeros(n, block_size, dtype=torch.long)
    y = torch.full((n, block_size), -1, dtype=torch.long)
    for row in range(n):
        piece = tokens[row * block_size:(row + 1) * block_size + 1]
        x[row, :len(piece) - 1] = torch.tensor(piece[:-1])
        y[row, :len(piece) - 1] = torch.tensor(piece[1:])
    return x, y


@torch.no_grad()
def text_loss(model, path: str, tokenizer: Tokenizer, batch_size: int, limit: int, device: str) -> dict[str, float]:
    """text/<name>/loss (mean over the predicted tokens) and text/<name>/perplexity."""
    x, y = text_rows(path, tokenizer, model.cfg.block_size, limit)
    total, count = 0.0, 0
    for start in range(0, len(x), batch_size):
        xb, yb = x[start:start + batch_size].to(device), y[start:start + batch_size].to(device)
        tokens = int((yb != -1).sum())
        # the cross-entropy alone (no MoE router term), the mean over the targets not ignored
        total += float(model(xb, yb, with_aux=False)[1]) * tokens
        count += tokens
    loss = total / count
    name = task_name(path)
    return {f"text/{name}/loss": loss, f"text/{name}/perplexity": float(torch.tensor(loss).exp())}
