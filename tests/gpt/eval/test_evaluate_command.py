"""`python -m gpt.evaluate` scores any checkpoint of a run after the fact: a step chosen by --step, task files
scored with the figures training logged for that step, text files' perplexity, and bad input in one line."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from helpers import REPO, launch, read_metrics
from gpt.eval.perplexity import text_loss, text_rows
from gpt import evaluate
from gpt.errors import UserError
from test_eval_tasks import corpus_task

TRAIN = ["model=tiny", "train.max_steps=20", "train.warmup_steps=5", "train.lr=3e-3", "train.global_batch_size=8",
         "train.eval_interval=10", "train.eval_batches=2", "checkpoint.interval_steps=10", "checkpoint.keep=2"]


def scored(capsys, *argv: str) -> dict:
    evaluate.main([*argv, "--device", "cpu"])
    return json.loads(capsys.readouterr().out)


@pytest.mark.slow
def test_a_checkpoint_scores_after_the_fact_what_training_logged_at_its_step(data_overrides, tmp_path, capsys):
    """By default over the run's own validation set (its seed, eval_batches and global batch, which its micro-batches
    split): the validation loss it logged at that step."""
    task = corpus_task(tmp_path / "order.jsonl", 31)
    text = tmp_path / "held_out.txt"
    text.write_text("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 6)
    launch(*TRAIN, *data_overrides, f"eval.tasks=[{task}]", "train.micro_batch_size=2", run_dir=tmp_path / "run")
    logged = {r["step"]: r for r in read_metrics(tmp_path / "run", kind="val")}
    for step in (10, 20):
        figures = scored(capsys, str(tmp_path / "run"), "--step", str(step), "--tasks", task, "--text", str(text))
        assert figures["step"] == step and figures["checkpoint"].endswith(f"step_{step:08d}")
        assert figures["val_loss"] == pytest.approx(logged[step]["loss"], abs=2e-4)
        assert figures["tasks/order/acc"] == pytest.approx(logged[step]["tasks/order/acc"], abs=1e-4)
        assert figures["tasks/order/acc_norm"] == pytest.approx(logged[step]["tasks/order/acc_norm"], abs=1e-4)
        assert figures["text/held_out/perplexity"] == pytest.approx(2.718281828 ** figures["text/held_out/loss"],
                                                                    rel=1e-3)
    assert scored(capsys, str(tmp_path / "run"))["step"] == 20  # without --step: the newest
    (tmp_path / "other.txt").write_text(text.read_text().upper())
    both = scored(capsys, str(tmp_path / "run"), "--text", str(text), "--text", str(tmp_path / "other.txt"))
    assert "text/held_out/loss" in both and "text/other/loss" in both  # a second --text adds, as `--text A B`
    evaluate.main([str(tmp_path / "run"), "--device", "cpu", "--batches", "3", "--batch-size", "4"])  # another set
    out, err = capsys.readouterr()
    assert json.loads(out)["val_loss"] != pytest.approx(logged[20]["loss"], abs=2e-4)
    assert err == ("note: the validation loss is over 3 batches of 4 sequences drawn with seed 1337, not the run's "
                   "set (2 of 8, seed 1337): it differs from the loss the run logged\n")
    with pytest.raises(SystemExit) as stop:
        scored(capsys, str(tmp_path / "run"), "--step", "15")
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().endswith("has no complete checkpoint of that step (steps it has: 10, 20)")
    with pytest.raises(SystemExit):
        scored(capsys, str(tmp_path / "run"), "--tasks", str(text))
    assert capsys.readouterr().err.startswith(f"error: --tasks {text}:1: a JSONL file of")

    # exported with the task, as a user runs it: two lines, no library's warning (DeepSpeed's accelerator line)
    out = tmp_path / "hf"
    export = subprocess.run([sys.executable, "-m", "gpt.export", str(tmp_path / "run"), str(out), "--lm-eval-task",
                             task], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert export.returncode == 0 and export.stdout == "", export.stdout[-3000:] + export.stderr[-3000:]
    assert export.stderr.splitlines() == [
        f"exported {tmp_path / 'run' / 'checkpoints' / 'step_00000020'} to {out}",
        f"score its tasks: cd {out} && HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 lm_eval --model hf --model_args "
        f"pretrained=.,prefix_token_id=0 --include_path lm_eval --tasks order",
        f"train from it: python -m launch init=hf:{out} data.tokenizer=hf data.tokenizer_file={out}/tokenizer.json "
        f"data.dir={out}-data model.block_size=64 model.bias=true "
        f"model.norm=layernorm ..."], export.stderr[-3000:]
    assert (out / "lm_eval" / "order.yaml").is_file() and (out / "lm_eval" / "order.jsonl").is_file()


@pytest.mark.parametrize("n_expert", [0, 4])  # a mixture of experts: the cross-entropy alone, no router term
def test_a_text_file_is_scored_on_every_token_after_its_first(n_expert, tmp_path):
    from gpt.config.model import ModelConfig
    from gpt.data.tokenizer import CharTokenizer
    from gpt.model.transformer import GPT

    tokenizer = CharTokenizer(sorted(set("abcdefgh ")))
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=tokenizer.vocab_size,
                            n_expert=n_expert, moe_aux_loss_weight=0.5)).eval()
    text = tmp_path / "t.txt"
    text.write_text("abc defgh abcdefg ")  # 18 tokens: rows of 8, 8 and 1 predicted tokens
    x, y = text_rows(str(text), tokenizer, 8, 0)
    assert x.shape == (3, 8) and (y != -1).sum().item() == 17
    tokens = torch.tensor(tokenizer.encode(text.read_text()))
    pieces = [tokens[start:start + 9] for start in (0, 8, 16)]  # each row's inputs and its next tokens
    with torch.no_grad():
        summed = sum(float(torch.nn.functional.cross_entropy(model(p[None, :-1])[0][0], p[1:], reduction="sum"))
                     for p in pieces)
    expected = summed / 17
    figures = text_loss(model, str(text), tokenizer, batch_size=2, limit=0, device="cpu")
    assert figures["text/t/loss"] == pytest.approx(expected, rel=1e-5)
    assert text_rows(str(text), tokenizer, 8, 2)[0].shape == (2, 8)  # --limit: the first rows


def test_a_checkpoint_from_before_the_record_scores_its_run_folders_eval_batches(tmp_path, capsys):
    """Checkpoints written before they recorded train.eval_batches: the run folder's config.yaml says it."""
    from argparse import Namespace

    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000020"
    checkpoint.mkdir(parents=True)
    (tmp_path / "run" / "config.yaml").write_text("train:\n  eval_batches: 7\n")
    meta = {"data": {"seed": 5, "global_batch_size": 8}}
    args = Namespace(seed=None, batches=None, batch_size=None, checkpoint=checkpoint)
    assert evaluate.validation_set(meta, args) == (5, 7, 8) and capsys.readouterr().err == ""
    (tmp_path / "run" / "config.yaml").unlink()
    with pytest.raises(UserError, match="give --batches"):
        evaluate.validation_set(meta, args)
