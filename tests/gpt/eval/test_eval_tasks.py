"""Multiple-choice tasks during training (eval.tasks): the file refused in one line before anything runs, the
scoring rule against log-likelihoods computed by hand, and a task made here from the corpus that a trained tiny
model beats chance on, with the same figure on 1 and 2 ranks as in one process from the final checkpoint."""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers import SHAKESPEARE, launch, read_metrics
from gpt.checkpoint.writer import load_model
from gpt.config.evaluation import EvalConfig
from gpt.config.model import ModelConfig
from gpt.config.parse import section
from gpt.data.tokenizer import CharTokenizer, load_tokenizer
from gpt.errors import ConfigError, UserError
from gpt.eval.multiple_choice import TaskScorer
from gpt.model.transformer import GPT
from launch.report.build import write_report

CHANCE = 0.25  # four endings
MARGIN = 0.35  # a trained model's accuracy is at least chance plus this


def write_task(path: Path, lines: list) -> str:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return str(path)


def corpus_task(path: Path, n: int, seed: int = 0) -> str:
    """`n` examples from the corpus: 40 characters of context, and as endings its next 12 characters and three
    shuffles of them (the same letters: only a model that learned the text's order tells them apart)."""
    text, rng = SHAKESPEARE.read_text(), random.Random(seed)
    lines = []
    while len(lines) < n:
        at = rng.randrange(len(text) - 60)
        ctx, true = text[at:at + 40], text[at + 41:at + 53]  # the space after the context is the ending's
        if text[at + 40] != " " or len(set(true)) < 6:
            continue
        wrong: list[str] = []
        while len(wrong) < 3:
            shuffled = "".join(rng.sample(true, len(true)))
            if shuffled != true and shuffled not in wrong and not shuffled.startswith(" "):
                wrong.append(shuffled)
        label = rng.randrange(4)
        lines.append({"ctx": ctx, "endings": wrong[:label] + [true] + wrong[label:], "label": label})
    return write_task(path, lines)


GOOD = {"ctx": "To be or", "endings": ["not", "yes"], "label": 0}


@pytest.mark.parametrize("line, says", [
    ("{not json", "not JSON"),
    ({"endings": ["a", "b"], "label": 0}, "ctx is not a non-empty string"),
    ({"ctx": "x", "endings": ["a"], "label": 0}, "2 or more non-empty strings"),
    ({"ctx": "x", "endings": ["a", "b"], "label": 2}, "label 2 is not an index"),
    ({"ctx": "x", "endings": ["a", "b", "c"], "label": 0}, "as many endings as the first (2)"),
])
def test_a_bad_line_is_refused_naming_the_file_and_line(tmp_path, line, says):
    path = write_task(tmp_path / "t.jsonl", [GOOD, line])
    with pytest.raises(ConfigError, match=rf"eval\.tasks='{tmp_path}/t\.jsonl:2' is not valid: .*{re.escape(says)}"):
        section(EvalConfig, "eval", {"tasks": [path]}).check_files()


def test_missing_files_same_names_a_negative_limit_and_no_interval_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="gptlaunch downloads nothing"):
        section(EvalConfig, "eval", {"tasks": [str(tmp_path / "absent.jsonl")]}).check_files()
    (tmp_path / "a").mkdir()
    same = [write_task(tmp_path / "t.jsonl", [GOOD]), write_task(tmp_path / "a" / "t.jsonl", [GOOD])]
    with pytest.raises(ConfigError, match="both 't'"):
        section(EvalConfig, "eval", {"tasks": same})
    with pytest.raises(ConfigError, match=r"eval\.limit=-1"):
        section(EvalConfig, "eval", {"limit": -1})
    with pytest.raises(ConfigError, match=r"train\.eval_interval=0 .*eval\.tasks"):
        section(EvalConfig, "eval", {"tasks": same[:1]}).check_interval(0)
    section(EvalConfig, "eval", {"tasks": same[:1], "after_save": "job"}).check_interval(0)  # each save's job scores


def test_text_the_tokenizer_cannot_encode_is_refused_naming_the_example(tmp_path):
    path = write_task(tmp_path / "t.jsonl", [GOOD, {"ctx": "Zebra", "endings": ["a", "b"], "label": 0}])
    tokenizer = CharTokenizer(sorted(set("To be ornotyesab ")))
    with pytest.raises(UserError, match=r"t\.jsonl example 2: character 'Z'"):
        TaskScorer([path], 0, tokenizer, 64)


def by_hand(model: GPT, tokenizer: CharTokenizer, ctx: str, endings: list[str]) -> tuple[int, int]:
    """The endings llm.c and lm-evaluation-harness pick: the highest summed log-likelihood of the ending's tokens
    after the context, and the highest per character of the ending."""
    sums = []
    for ending in endings:
        tail = tokenizer.encode(" " + ending)
        tokens = torch.tensor([(tokenizer.encode(ctx) + tail)[-(model.cfg.block_size + 1):]])  # the context's end
        logp = F.log_softmax(model(tokens[:, :-1])[0][0], dim=-1)
        first = tokens.size(1) - len(tail) - 1  # where the ending's first token is predicted
        sums.append(sum(logp[first + i, t].item() for i, t in enumerate(tail)))
    lengths = [len(e) for e in endings]
    return max(range(len(sums)), key=sums.__getitem__), max(range(len(sums)), key=lambda i: sums[i] / lengths[i])


def test_the_scores_are_the_summed_and_per_character_log_likelihoods_computed_by_hand(tmp_path):
    rng = random.Random(3)
    letters = "abcdefgh"
    tokenizer = CharTokenizer(sorted(set(letters + " ")))
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=tokenizer.vocab_size)).eval()
    lines = []
    for _ in range(40):  # endings of different lengths, so that acc and acc_norm differ
        endings = ["".join(rng.choices(letters, k=rng.randint(1, 8))) for _ in range(4)]
        lines.append({"ctx": "".join(rng.choices(letters, k=rng.randint(3, 30))), "endings": endings,
                      "label": rng.randrange(4)})
    path = write_task(tmp_path / "mix.jsonl", lines)
    picks = [by_hand(model, tokenizer, x["ctx"], x["endings"]) for x in lines]
    scorer = TaskScorer([path], 0, tokenizer, 32)  # contexts longer than the block lose their start, as here
    scores = scorer.score(lambda x, y: model(x, y)[1], 0, 1, None, lambda: False, torch.device("cpu"))
    acc = sum(p[0] == x["label"] for p, x in zip(picks, lines)) / len(lines)
    acc_norm = sum(p[1] == x["label"] for p, x in zip(picks, lines)) / len(lines)
    assert any(p[0] != p[1] for p in picks)
    assert scores == pytest.approx({"tasks/mix/acc": acc, "tasks/mix/acc_norm": acc_norm}, abs=1e-9)


def test_an_interrupted_evaluation_gives_none(tmp_path):
    tokenizer = CharTokenizer(sorted(set("To be ornotyes")))
    scorer = TaskScorer([write_task(tmp_path / "t.jsonl", [GOOD])], 0, tokenizer, 64)
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=64, vocab_size=tokenizer.vocab_size))
    assert scorer.score(lambda x, y: model(x, y)[1], 0, 1, None, lambda: True, torch.device("cpu")) is None


# the tiny model tells the text's order from shuffles after 10 steps (0.71 of 63 on one process) and 20 (0.90)
TRAIN = ["model=tiny", "train.max_steps=20", "train.warmup_steps=5", "train.lr=3e-3", "train.global_batch_size=8",
         "train.eval_interval=10", "train.eval_batches=2", "checkpoint.interval_steps=0"]
N = 63  # odd: on 2 replicas one rank scores a repeat it does not count
# layout -> (overrides, examples by which the in-training figure may differ from one process's): the same forward
# on every rank agrees exactly; matmuls split over tensor-parallel ranks add in another order, which can turn a
# near tie
LAYOUTS = {
    "1-rank": (["strategy=single"], 0),
    "ddp-2-ranks": (["strategy=ddp", "cluster.tasks_per_node=2"], 0),
    "fsdp-2-ranks": (["strategy=fsdp", "cluster.tasks_per_node=2"], 0),
    "zero3-2-ranks": (["strategy=deepspeed", "strategy.stage=3", "cluster.tasks_per_node=2"], 0),
    "pipeline-2-stages": (["strategy=pipeline", "strategy.microbatches=4", "cluster.tasks_per_node=2"], 0),
    "tp2-sequence-parallel": (["strategy=fsdp", "parallel.tp=2", "parallel.sequence_parallel=true",
                               "cluster.tasks_per_node=2"], 1),
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_trained_tiny_model_beats_chance_and_scores_alike_on_any_number_of_ranks(layout, data_overrides,
                                                                                   tmp_path):
    overrides, flips = LAYOUTS[layout]
    task = corpus_task(tmp_path / "order.jsonl", N)
    launch(*TRAIN, *data_overrides, *overrides, f"eval.tasks=[{task}]", run_dir=tmp_path / "run")
    val = read_metrics(tmp_path / "run", kind="val")
    assert [r["step"] for r in val] == [10, 20]
    assert val[-1]["tasks/order/acc"] >= CHANCE + MARGIN, val
    model, meta, _ = load_model(tmp_path / "run")  # the model the last evaluation scored, in one process
    scorer = TaskScorer([task], 0, load_tokenizer(meta["data_dir"]), model.cfg.block_size)
    alone = scorer.score(lambda x, y: model.eval()(x, y)[1], 0, 1, None, lambda: False, torch.device("cpu"))
    assert alone == pytest.approx({k: v for k, v in val[-1].items() if k.startswith("tasks/")}, abs=flips / N + 1e-9)
    if layout == "1-rank":  # TensorBoard and the report show it too
        events = EventAccumulator(str(tmp_path / "run" / "tensorboard" / "rank0"))
        events.Reload()
        assert [e.step for e in events.Scalars("tasks/order/acc")] == [10, 20]
        report = (write_report(tmp_path / "run") / "scaling.md").read_text()
        assert f"| run | order | 20 | {100 * val[-1]['tasks/order/acc']:.1f}% |" in report
