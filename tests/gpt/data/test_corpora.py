"""Real corpora made by the tests (no download): a folder of text files, JSONL, Parquet, a tokenizer.json trained
here, a nanoGPT .bin pair and llm.c shards; documents and end-of-text, whole-document validation, vocabularies,
mixtures, and a killed preparation resumed to byte-identical shards."""
from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from gpt.config.data import DataConfig, SourceConfig
from gpt.data import check_vocab, data_identity, ensure_prepared, read_meta, write_mixture
from gpt.data.loader import TokenDataset, TrainBatches
from gpt.data.prepare import prepare
from gpt.data.pretokenized import write_llmc
from gpt.data.tokenizer import BPETokenizer, CharTokenizer, load_tokenizer
from gpt.errors import ConfigError, UserError
from helpers import REPO, SHAKESPEARE, launch, losses, read_metrics

TEXT = SHAKESPEARE.read_text(encoding="utf-8")
DOCS = [d for d in TEXT[:200_000].split("\n\n") if d.strip()]  # speeches: about 800 documents
VOCAB = 300  # not a multiple of 64: a model takes 320


def tokens(data_dir: Path, split: str) -> list[int]:
    return np.concatenate([s.map() for s in TokenDataset(data_dir, split).shards]).tolist()


def documents_of(ids: list[int], eot: int, tok) -> list[str]:
    assert ids[-1] == eot
    out, start = [], 0
    for i, t in enumerate(ids):
        if t == eot:
            out.append(tok.decode(ids[start:i]))
            start = i + 1
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("corpus")
    tok = BPETokenizer.train(TEXT, VOCAB)
    (root / "tok").mkdir()
    tok.save(root / "tok")
    folder = root / "owt"
    for i, doc in enumerate(DOCS):
        path = folder / f"{i // 100:02d}" / f"doc_{i:04d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(doc, encoding="utf-8")
    (root / "jsonl").mkdir()
    for k in range(2):
        lines = "\n".join(json.dumps({"id": i, "content": d}) for i, d in enumerate(DOCS) if i % 2 == k) + "\n"
        with (gzip.open if k else open)(root / "jsonl" / f"part_{k}.jsonl{'.gz' if k else ''}", "wt") as f:
            f.write(lines)  # the second one compressed, as corpora are often shipped
    (root / "parquet").mkdir()
    pq.write_table(pa.table({"body": DOCS, "n": list(range(len(DOCS)))}), root / "parquet" / "train.parquet",
                   row_group_size=100)
    ids = [t for d in DOCS for t in [*tok.encode(d), tok.eot]]
    cut = int(len(ids) * 0.9)
    (root / "nanogpt").mkdir()
    np.asarray(ids[:cut], dtype="<u2").tofile(root / "nanogpt" / "train.bin")
    np.asarray(ids[cut:], dtype="<u2").tofile(root / "nanogpt" / "val.bin")
    (root / "llmc").mkdir()
    half = cut // 2
    write_llmc(root / "llmc" / "tiny_val_000000.bin", ids[cut:])
    write_llmc(root / "llmc" / "tiny_train_000001.bin", ids[:half])
    write_llmc(root / "llmc" / "tiny_train_000002.bin", ids[half:cut])
    return {"root": root, "tokenizer": root / "tok" / "tokenizer.json", "text": folder, "jsonl": root / "jsonl",
            "parquet": root / "parquet", "nanogpt": root / "nanogpt", "llmc": root / "llmc", "ids": ids, "cut": cut}


FIELDS = {"text": "text", "jsonl": "content", "parquet": "body"}


@pytest.mark.parametrize("fmt", ["text", "jsonl", "parquet"])
@pytest.mark.slow
def test_documents_end_with_end_of_text_and_validate_whole(fmt, corpus, tmp_path):
    out = prepare(corpus[fmt], tmp_path / fmt, "hf", tokenizer_file=corpus["tokenizer"], fmt=fmt,
                  field=FIELDS[fmt], workers=1)
    tok, meta = load_tokenizer(out), read_meta(out)
    assert meta["end_of_text"] == tok.eot == 0 and meta["source"]["files"] == {"text": len(DOCS), "jsonl": 2,
                                                                                 "parquet": 1}[fmt]
    train, val = (documents_of(tokens(out, s), tok.eot, tok) for s in ("train", "val"))
    assert 0.05 < len(val) / len(DOCS) < 0.15  # val_fraction=0.1 of the documents, each whole
    assert sorted(train + val) == sorted(DOCS)
    assert check_vocab(None, out) == 320  # someone else's tokenizer: padded up to a multiple of 64


@pytest.mark.slow  # seconds of CPU: out of make test-fast's slice
def test_a_separate_validation_path_and_the_character_tokenizer(corpus, tmp_path):
    out = prepare(f"{corpus['text']}/0[0-5]/*.txt", tmp_path / "c", "char", val_path=corpus["text"] / "06")
    tok = load_tokenizer(out)
    assert isinstance(tok, CharTokenizer) and tok.eot == tok.vocab_size - 1 == len(set("".join(DOCS[:700])))
    assert documents_of(tokens(out, "val"), tok.eot, tok) == DOCS[600:700]
    assert documents_of(tokens(out, "train"), tok.eot, tok) == DOCS[:600]
    assert check_vocab(None, out) == tok.vocab_size  # our own tokenizer: unpadded, as before


@pytest.mark.parametrize("fmt", ["nanogpt", "llmc"])
def test_pretokenized_shards_are_read_in_place(fmt, corpus, tmp_path):
    out = prepare(corpus[fmt], tmp_path / fmt, "hf", tokenizer_file=corpus["tokenizer"], fmt=fmt)
    assert sorted(p.name for p in out.iterdir()) == ["inputs.json", "meta.json", "tokenizer.json"]  # nothing copied
    assert tokens(out, "train") == corpus["ids"][:corpus["cut"]]
    assert tokens(out, "val") == corpus["ids"][corpus["cut"]:]
    ds = TokenDataset(out, "train")
    assert all(m.path.parent == corpus[fmt] for m in ds.shards)


def test_bad_shards_and_vocabularies_are_user_errors(corpus, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    np.zeros(300, dtype="<i4").tofile(bad / "x_train_0.bin")
    np.zeros(300, dtype="<i4").tofile(bad / "x_val_0.bin")
    with pytest.raises(UserError, match="not an llm.c token shard.*20240520"):
        prepare(bad, tmp_path / "o", "hf", tokenizer_file=corpus["tokenizer"], fmt="llmc")
    write_llmc(bad / "x_train_0.bin", np.full(100, 999))  # token 999 >= the vocabulary of 300
    write_llmc(bad / "x_val_0.bin", np.zeros(100))
    with pytest.raises(UserError, match="token 999"):
        prepare(bad, tmp_path / "o", "hf", tokenizer_file=corpus["tokenizer"], fmt="llmc")
    with pytest.raises(ConfigError, match="data.tokenizer=.char"):
        DataConfig(format="nanogpt").validate()
    cfg = DataConfig(text_path=str(corpus["jsonl"]), dir=str(tmp_path / "j"), format="jsonl", field="content",
                     tokenizer="hf", tokenizer_file=str(corpus["tokenizer"]))
    with pytest.raises(ConfigError, match="model.vocab_size=256 .*at least 300"):
        ensure_prepared(cfg, model_vocab_size=256)
    assert not (tmp_path / "j").exists()  # refused before any preparation
    with pytest.raises(UserError, match="data.field='text'"):
        prepare(corpus["jsonl"], tmp_path / "j", "hf", tokenizer_file=corpus["tokenizer"], fmt="jsonl")
    assert not list(tmp_path.glob(".j.tmp-*"))  # nothing a later preparation would take for a killed one's work


@pytest.fixture(scope="module")
def mixture(corpus, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mix")
    cfg = DataConfig(dir=str(root / "mix"), tokenizer="hf", tokenizer_file=str(corpus["tokenizer"]), sources=[
        SourceConfig(text_path=str(corpus["jsonl"]), dir=str(root / "j"), weight=7, format="jsonl", field="content"),
        SourceConfig(text_path=str(corpus["llmc"]), dir=str(root / "l"), weight=3, format="llmc")])
    return ensure_prepared(cfg)


def test_a_mixture_keeps_its_weights_and_its_order_on_any_world_size(mixture):
    ds = TokenDataset(mixture, "train")
    assert ds.weights.tolist() == pytest.approx([0.7, 0.3])
    first_llmc = int(ds.shard_starts[ds.groups.tolist().index(1)])
    drawn = np.concatenate([ds.sample_offsets(5, step, 64, 32) for step in range(100)])
    share = float(np.mean(drawn >= first_llmc))
    assert abs(share - 0.3) < 4 * (0.3 * 0.7 / drawn.size) ** 0.5  # within 4 standard errors of 6400 draws

    def global_batch(dp_size: int, micro: int, step: int) -> torch.Tensor:
        parts = []
        for rank in range(dp_size):
            loader = TrainBatches(ds, 5, 32, 16, micro, rank, dp_size)
            parts += [loader.get(step, m)[0] for m in range(loader.grad_accum_steps)]
        return torch.cat(parts)

    for step in (0, 7):
        reference = global_batch(1, 16, step)
        assert all(torch.equal(global_batch(n, m, step), reference) for n, m in [(2, 4), (4, 2)])
    resumed = TrainBatches(TokenDataset(mixture, "train"), 5, 32, 16, 4, 1, 2)
    resumed.load_state_dict({"seed": 5, "step": 7, "global_batch_size": 16, "samples_seen": 112})
    assert torch.equal(resumed.get(resumed.step, 0)[0], global_batch(1, 16, 7)[8:12])


def test_a_mixture_has_an_identity_and_is_never_mixed_again_in_place(mixture):
    """Its fingerprint is its sources' with their weights; other weights into the same folder are refused, the
    same ones change nothing."""
    meta, sources = read_meta(mixture), [Path(s["dir"]) for s in read_meta(mixture)["sources"]]
    assert data_identity(mixture) == meta["fingerprint"] and len(meta["fingerprint"]) == 32
    assert write_mixture(mixture, sources, [7, 3]) == mixture and read_meta(mixture) == meta
    with pytest.raises(UserError, match=f"{mixture} holds another mixture of data.sources"):
        write_mixture(mixture, sources, [1, 1])
    assert read_meta(mixture) == meta


PREPARE = """
import sys, time
import gpt.data.parts as parts, gpt.data.prepare as p
p.PART_BYTES = 20_000  # many small parts
slow = parts.tokenize_part
def tokenize_part(*a, **k):
    time.sleep(float(sys.argv[3]))
    return slow(*a, **k)
parts.tokenize_part = tokenize_part
p.prepare(sys.argv[1], sys.argv[2], "bpe", vocab_size=300, workers=1)
"""


@pytest.mark.slow
def test_a_killed_preparation_resumes_to_byte_identical_shards(corpus, tmp_path):
    def run(out: Path, delay: float) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", PREPARE, str(corpus["text"]), str(out), str(delay)],
                                cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})

    assert run(tmp_path / "whole", 0).wait(timeout=120) == 0
    proc = run(tmp_path / "killed", 0.3)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".killed.tmp-*/part_000002.json")):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (work,) = tmp_path.glob(".killed.tmp-*")
    done = {p.name: p.stat().st_mtime_ns for p in work.glob("part_*.json")}
    assert 3 <= len(done) < len(list((tmp_path / "whole").glob("part_*.json")))
    assert run(tmp_path / "killed", 0).wait(timeout=120) == 0
    assert {p: (tmp_path / "killed" / p).stat().st_mtime_ns for p in done} == done  # kept, not redone
    whole = {p.name: p.read_bytes() for p in (tmp_path / "whole").iterdir()}
    assert {p.name: p.read_bytes() for p in (tmp_path / "killed").iterdir()} == whole


@pytest.mark.slow
def test_parallel_workers_write_what_one_writes(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr("gpt.data.prepare.PART_BYTES", 50_000)
    one = prepare(corpus["text"], tmp_path / "one", "hf", tokenizer_file=corpus["tokenizer"], workers=1)
    two = prepare(corpus["text"], tmp_path / "two", "hf", tokenizer_file=corpus["tokenizer"], workers=2)
    assert len(read_meta(one)["splits"]["train"]["shards"]) > 2
    assert {p.name: p.read_bytes() for p in one.iterdir()} == {p.name: p.read_bytes() for p in two.iterdir()}


@pytest.mark.slow
def test_every_format_trains_in_one_mixture_and_resumes_on_another_world_size(corpus, tmp_path):
    """A mixture of all five formats: DDP on 2 ranks to step 4, then one process resumes it and follows a
    one-process run (the samples are the same by global index; 2-rank vs 1-rank reduction order: not bitwise)."""
    formats = [("text", "text"), ("jsonl", "content"), ("parquet", "body"), ("nanogpt", "text"), ("llmc", "text")]
    sources = ",".join(f"{{text_path:'{corpus[fmt]}',dir:'{tmp_path / fmt}',format:{fmt},field:{field},"
                       f"weight:{i + 1}}}" for i, (fmt, field) in enumerate(formats))
    args = ["model=tiny", "train.global_batch_size=8", "train.max_steps=8", "train.decay_steps=8",
            "train.warmup_steps=2", "train.lr=3e-3", "train.log_interval=1", "train.eval_interval=0",
            "checkpoint.interval_steps=0", "data.tokenizer=hf", f"data.tokenizer_file={corpus['tokenizer']}",
            f"data.dir={tmp_path / 'mix'}", f"data.sources=[{sources}]"]
    launch(*args, "train.max_steps=4", "strategy=ddp", "nodes=2", run_dir=tmp_path / "two")
    launch(*args, f"resume={tmp_path / 'two'}", run_dir=tmp_path / "one")
    launch(*args, run_dir=tmp_path / "baseline")
    one, baseline = losses(tmp_path / "one"), losses(tmp_path / "baseline")
    assert [r["step"] for r in read_metrics(tmp_path / "one")] == list(range(5, 9))
    assert one == pytest.approx(baseline[4:], rel=1e-5)
