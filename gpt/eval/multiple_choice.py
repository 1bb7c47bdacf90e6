"""Multiple-choice tasks scored in every rank through the validation loss's own forward (the strategy's
`forward_loss`), so they run under every layout validation runs under. Each candidate ending is one row: the context
then the ending, its targets -1 (ignored) except at the ending's tokens, so that the loss times the ending's token
count is the ending's summed negative log-likelihood. `acc` picks the ending with the highest summed log-likelihood
(llm.c's hellaswag.py, lm-evaluation-harness's `acc`), `acc_norm` the highest per character of the ending
(lm-evaluation-harness's `acc_norm`). `forward_loss` is the cross-entropy alone: a mixture of experts' router term is
left out, as from its validation loss.

The examples are split over the data-parallel replicas (every rank of a replica scores the same ones, as its
tensor and pipeline parts need), padded so that every rank runs the same number of forwards, and the counts are
summed in one all-reduce: the figures are the same on any number of ranks."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from gpt.data.tokenizer import Tokenizer
from gpt.collectives.process_group import sum_over_ranks
from gpt.errors import UserError
from gpt.eval.task_file import Example, read_task, task_name

ROUND = 64  # rows are padded to a multiple of this (at most block_size): one shape for every forward
CHECK_EVERY = 8  # examples between two checks for a preemption signal (a small collective each)
ForwardLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Choices:
    """One example as token rows: inputs (k, L), targets (k, L), each ending's token and character counts."""

    x: torch.Tensor
    y: torch.Tensor
    tokens: torch.Tensor
    chars: torch.Tensor
    label: int


def ending_rows(example: Example, tokenizer: Tokenizer, block_size: int, where: str) -> list[tuple[list, list]]:
    """(inputs, targets) of each ending, the ending after a space as the harnesses put it; a context too long for
    block_size loses its start."""
    try:
        context = tokenizer.encode(example.ctx)
        endings = [tokenizer.encode(" " + e) for e in example.endings]
    except UserError as e:
        raise UserError(f"eval.tasks: {where}: {e}") from None
    rows = []
    for ending in endings:
        if len(ending) >= block_size:
            raise UserError(f"eval.tasks: {where}: an ending of {len(ending)} tokens leaves no room for its context "
                            f"in model.block_size={block_size}")
        tokens = (context + ending)[-(block_size + 1):]
        rows.append((tokens[:-1], [-1] * (len(tokens) - 1 - len(ending)) + ending))
    return rows


def padded(rows: list[tuple[list, list]], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.tensor([r[0] + [0] * (length - len(r[0])) for r in rows])
    y = torch.tensor([r[1] + [-1] * (length - len(r[1])) for r in rows])
    return x, y


class TaskScorer:
    """Every task of eval.tasks, tokenized once at start-up."""

    def __init__(self, paths: Sequence[str], limit: int, tokenizer: Tokenizer, block_size: int):
        rows = {task_name(p): [(ending_rows(ex, tokenizer, block_size, f"{p} example {i + 1}"), ex)
                               for i, ex in enumerate(read_task(p, limit))] for p in paths}
        longest = max(len(x) for examples in rows.values() for choice, _ in examples for x, _ in choice)
        self.length = min(-(-longest // ROUND) * ROUND, block_size)
        self.tasks: dict[str, list[Choices]] = {}
        for name, examples in rows.items():
            self.tasks[name] = []
            for choice, ex in examples:
                x, y = padded(choice, self.length)
                self.tasks[name].append(Choices(x, y, (y != -1).sum(1), torch.tensor([len(e) for e in ex.endings]),
                                                ex.label))

    @torch.no_grad()
    def score(self, forward_loss: ForwardLoss, dp_rank: int, dp_size: int, group: object,
              interrupted: Callable[[], bool], device: torch.device) -> dict[str, float] | None:
        """tasks/<name>/acc and acc_norm over every example; None when `interrupted()` (a collective every rank
        calls alike) said a preemption signal came."""
        counts, checked = [], 0
        for examples in self.tasks.values():
            correct = torch.zeros(3, device=device)  # acc, acc_norm, examples scored
            share = -(-len(examples) // dp_size)
            for i in range(dp_rank, share * dp_size, dp_size):  # past the end: a repeat, counted 0 times
                if checked % CHECK_EVERY == 0 and interrupted():
                    return None
                checked += 1
                ex = examples[min(i, len(examples) - 1)]
                x, y = ex.x.to(device), ex.y.to(device)
                losses = torch.stack([forward_loss(x[j:j + 1], y[j:j + 1]) for j in range(len(x))]).float()
                loglik = -losses * ex.tokens.to(device)
                hit = torch.stack([loglik.argmax() == ex.label, (loglik / ex.chars.to(device)).argmax() == ex.label,
                                   torch.ones((), dtype=torch.bool, device=device)])
                correct += hit.float() * (i < len(examples))
            counts.append(correct)
        total = sum_over_ranks(torch.cat(counts), group).tolist()
        scores = {}
        for k, name in enumerate(self.tasks):
            acc, acc_norm, n = total[3 * k:3 * k + 3]
            scores.update({f"tasks/{name}/acc": acc / n, f"tasks/{name}/acc_norm": acc_norm / n})
        return scores
