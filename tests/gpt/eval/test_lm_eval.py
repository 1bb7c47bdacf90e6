"""After training: an exported folder runs under lm-evaluation-harness (`lm_eval --model hf`, the command
`python -m gpt.export --lm-eval-task` prints) on a local task made here and written beside the model, and scores what gptlaunch's own `eval.tasks` scores on the same
file: the same `acc` and `acc_norm`. lm-eval is installed by `make setup` (the `eval` extra); nothing is downloaded."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import SHAKESPEARE
from gpt.config.model import load_preset
from gpt.data.tokenizer import CharTokenizer
from gpt.eval.lm_eval_task import lm_eval_command, write_lm_eval_tasks
from gpt.eval.multiple_choice import TaskScorer
from gpt.export import hf_model
from gpt.hf.tokenizer import save_tokenizer
from gpt.model.transformer import GPT
from test_eval_tasks import CHANCE, corpus_task

N = 40


def trained_char_model(tokenizer: CharTokenizer, steps: int = 150) -> GPT:
    """The tiny model trained in this process on the corpus, long enough to tell the text's order from shuffles."""
    data = torch.tensor(tokenizer.encode(SHAKESPEARE.read_text()))
    cfg = dataclasses.replace(load_preset("tiny"), vocab_size=tokenizer.vocab_size)
    torch.manual_seed(0)
    model = GPT(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        at = torch.randint(len(data) - cfg.block_size - 1, (16,))
        x = torch.stack([data[i:i + cfg.block_size] for i in at])
        y = torch.stack([data[i + 1:i + 1 + cfg.block_size] for i in at])
        _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


def lm_eval_scores(folder: Path, task: str, tmp_path: Path) -> dict[str, float]:
    """`lm_eval` on the exported folder, offline, from inside it, on the task that `python -m gpt.export
    --lm-eval-task` writes beside the model (relative paths: the folder is moved first); its acc and acc_norm."""
    assert write_lm_eval_tasks([task], folder) == ["order"]
    folder = folder.rename(tmp_path / "moved")
    command = lm_eval_command(["order"], 0).split()[2:]  # after its two environment variables, set below
    assert command == ["lm_eval", "--model", "hf", "--model_args", "pretrained=.,prefix_token_id=0",
                       "--include_path", "lm_eval", "--tasks", "order"]
    command[4] += ",dtype=float32"
    out = tmp_path / "lm_eval_out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf"),
           "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", *command, "--device", "cpu", "--batch_size", "16",
                           "--output_path", str(out)],
                          capture_output=True, text=True, env=env, timeout=600, cwd=folder)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]["order"]
    return {"acc": results["acc,none"], "acc_norm": results["acc_norm,none"]}


@pytest.mark.slow
def test_an_exported_folder_scores_under_lm_eval_as_gptlaunch_scores_it(tmp_path):
    tokenizer = CharTokenizer.train(SHAKESPEARE.read_text())
    model = trained_char_model(tokenizer)
    folder = tmp_path / "hf"
    hf_model(model, tokenizer.eot).save_pretrained(folder, safe_serialization=True)  # what python -m gpt.export writes
    save_tokenizer(tokenizer, model.cfg.block_size, folder)
    # lm-eval moves a context's trailing whitespace into every ending: a constant for `acc`, not for `acc_norm`
    task = corpus_task(tmp_path / "all.jsonl", 2 * N)
    lines = [x for x in map(json.loads, Path(task).read_text().splitlines()) if not x["ctx"][-1].isspace()][:N]
    task = tmp_path / "order.jsonl"
    task.write_text("".join(json.dumps(x) + "\n" for x in lines))

    ours = TaskScorer([str(task)], 0, tokenizer, model.cfg.block_size).score(
        lambda x, y: model(x, y)[1], 0, 1, None, lambda: False, torch.device("cpu"))
    theirs = lm_eval_scores(folder, str(task), tmp_path)
    assert ours["tasks/order/acc"] >= CHANCE + 0.2, ours  # a model that learned something, so that scores differ
    # the same log-likelihoods from two implementations (transformers' GPT-2 and gptlaunch's, 1e-5 apart): equal,
    # unless two endings tie within that, which would flip one example
    assert theirs == pytest.approx({"acc": ours["tasks/order/acc"], "acc_norm": ours["tasks/order/acc_norm"]},
                                   abs=1 / N + 1e-9)
