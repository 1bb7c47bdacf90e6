"""Tokenizers, prepare (split, shards, idempotence, atomicity) and the deterministic reshardable loaders."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import gpt.data.inputs as inputs
import gpt.data.prepare as prepare_module
from gpt.config.data import DataConfig
from gpt.config.parse import section
from gpt.data import check_vocab, ensure_prepared, read_meta
from gpt.data.loader import Prefetcher, TokenDataset, TrainBatches, ValBatches, global_batch_offsets
from gpt.data.prepare import main as prepare_main
from gpt.data.prepare import prepare, token_dtype
from gpt.data.tokenizer import BPETokenizer, CharTokenizer, load_tokenizer
from gpt.errors import ConfigError, UserError
from helpers import REPO

CORPUS = REPO.parent / "shared/data/tinyshakespeare/input.txt"
TEXT = CORPUS.read_text(encoding="utf-8")
SPLIT = int(len(TEXT) * 0.9)  # nanoGPT: the first 90% of characters train
BPE_VOCAB = 512


@pytest.fixture(scope="module")
def char_dir(tmp_path_factory) -> Path:
    return prepare(CORPUS, tmp_path_factory.mktemp("char") / "shakespeare_char", "char")


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory) -> Path:
    # Small chunks and shards so that chunked encoding and multi-shard loading are exercised on the real corpus.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(inputs, "READ_CHARS", 50_000)
        return prepare(CORPUS, tmp_path_factory.mktemp("bpe") / "shakespeare_bpe", "bpe", vocab_size=BPE_VOCAB,
                       shard_tokens=100_000)


def split_tokens(data_dir: Path, split: str) -> np.ndarray:
    ds = TokenDataset(data_dir, split)
    return np.concatenate([s.map() for s in ds.shards])


# --- tokenizers ---------------------------------------------------------------------------------------
def test_char_tokenizer_round_trips_the_whole_corpus(tmp_path):
    tok = CharTokenizer.train(TEXT)
    assert tok.vocab_size == 65
    ids = tok.encode(TEXT)
    assert len(ids) == len(TEXT) and max(ids) == 64
    assert tok.decode(ids) == TEXT
    tok.save(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, CharTokenizer) and loaded.encode(TEXT[:1000]) == ids[:1000]
    with pytest.raises(UserError, match="'~'"):
        tok.encode("~")


@pytest.mark.slow
def test_bpe_trains_locally_and_round_trips(bpe_dir):
    tok = load_tokenizer(bpe_dir)
    assert isinstance(tok, BPETokenizer)
    assert tok.vocab_size == BPE_VOCAB == read_meta(bpe_dir)["vocab_size"]
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT
    assert len(ids) < 0.7 * len(TEXT)  # it learned merges
    assert tok.decode(tok.encode("Zebra ünïcode ✓")) == "Zebra ünïcode ✓"  # byte-level: nothing is unknown


def test_load_tokenizer_missing_is_user_error(tmp_path):
    with pytest.raises(UserError, match="tokenizer.json"):
        load_tokenizer(tmp_path)


# --- prepare ------------------------------------------------------------------------------------------
def test_prepare_char_writes_split_shards_and_meta(char_dir):
    meta = read_meta(char_dir)
    assert meta["tokenizer"] == "char" and meta["vocab_size"] == 65 and meta["dtype"] == "uint16"
    assert meta["splits"]["train"]["tokens"] == SPLIT == 1_003_854
    assert meta["splits"]["val"]["tokens"] == len(TEXT) - SPLIT == 111_540
    assert meta["splits"]["train"]["shards"] == [{"file": "train_000000_0000.bin", "tokens": SPLIT}]
    assert (char_dir / "train_000000_0000.bin").stat().st_size == 2 * SPLIT
    assert meta["source"] == {"path": str(CORPUS.resolve()), "files": 1, "bytes": 1_115_394}
    assert meta["end_of_text"] is None  # one document: nothing to separate
    tok = load_tokenizer(char_dir)
    assert tok.decode(split_tokens(char_dir, "train").tolist()) == TEXT[:SPLIT]
    assert tok.decode(split_tokens(char_dir, "val").tolist()) == TEXT[SPLIT:]


@pytest.mark.slow
def test_prepare_bpe_chunked_and_sharded_equals_one_encode(bpe_dir):
    meta = read_meta(bpe_dir)
    tok = load_tokenizer(bpe_dir)
    train = split_tokens(bpe_dir, "train")
    assert len(meta["splits"]["train"]["shards"]) > 1
    assert all(s["tokens"] == 100_000 for s in meta["splits"]["train"]["shards"][:-1])
    assert train.tolist() == tok.encode(TEXT[:SPLIT])  # chunk boundaries did not change the tokens
    assert tok.decode(split_tokens(bpe_dir, "val").tolist()) == TEXT[SPLIT:]


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_prepare_is_idempotent_and_never_prepares_a_folder_again_in_place(tmp_path):
    """Runs read a prepared folder (and requeued ones open it again later): other settings, a changed source or a
    damaged shard are refused in one line saying what differs, and the folder stays as it was."""
    text = tmp_path / "input.txt"
    text.write_text(TEXT[:50_000])
    out = tmp_path / "out"
    prepare(text, out)
    stamp = (out / "meta.json").stat().st_mtime_ns
    t0 = time.monotonic()
    assert prepare(text, out) == out
    assert time.monotonic() - t0 < 0.5 and (out / "meta.json").stat().st_mtime_ns == stamp
    before = _tree(out)

    with pytest.raises(UserError, match="other inputs or settings \\(val_fraction was 0.1, now 0.2\\).*another "
                       "directory") as e:
        prepare(text, out, val_fraction=0.2)
    assert "\n" not in str(e.value) and _tree(out) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dirs left
    (out / "val_000001_0000.bin").write_bytes(b"\0\0")  # damaged: refused too, the runs reading it see it
    with pytest.raises(UserError, match="is incomplete"):
        prepare(text, out)
    text.write_text(TEXT[:60_000])  # changed source
    with pytest.raises(UserError, match=f"{text} changed \\(50,000 -> 60,000 bytes, modified "):
        prepare(text, out)
    prepare(text, tmp_path / "other", val_fraction=0.2)  # other data goes into another folder
    assert read_meta(tmp_path / "other")["splits"]["val"]["tokens"] == 60_000 - int(60_000 * 0.8)


def test_of_two_preparations_at_once_into_one_folder_exactly_one_lands(tmp_path, monkeypatch):
    """Preparation B finishes while A writes its meta.json (both passed the first check): A's rename into the
    folder is refused by the file system, B's data stays whole, and A leaves no temp folder."""
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(TEXT[:20_000])
    b.write_text(TEXT[20_000:45_000])
    out, write = tmp_path / "out", prepare_module._write_synced

    def b_lands_meanwhile(path, data):
        write(path, data)
        monkeypatch.setattr(prepare_module, "_write_synced", write)
        prepare(b, out)

    monkeypatch.setattr(prepare_module, "_write_synced", b_lands_meanwhile)
    with pytest.raises(UserError, match="holds data prepared from other inputs"):
        prepare(a, out)
    assert read_meta(out)["source"]["path"] == str(b.resolve())
    assert prepare_module.is_source_prepared(b, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt", "out"]


def test_a_preparation_of_the_same_inputs_finished_meanwhile_is_taken_as_this_ones(tmp_path, monkeypatch):
    """Two launches prepare the same inputs at once, in one temp folder: B finishes and moves it into place just
    before A writes its meta.json there; A then returns B's data, which is its own, instead of failing."""
    text, out = tmp_path / "a.txt", tmp_path / "out"
    text.write_text(TEXT[:20_000])
    write = prepare_module._write_synced

    def b_lands_first(path, data):
        monkeypatch.setattr(prepare_module, "_write_synced", write)
        prepare(text, out)  # B, start to end, in the temp folder A has filled
        write(path, data)

    monkeypatch.setattr(prepare_module, "_write_synced", b_lands_first)
    assert prepare(text, out) == out
    assert prepare_module.is_source_prepared(text, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "out"]


def test_less_than_a_parts_worth_of_input_is_tokenized_in_this_process(tmp_path, monkeypatch):
    """Tiny Shakespeare (1 MB, under PART_BYTES) on a machine with several CPUs: a pool's interpreters would cost
    more than they save, so none is started."""
    def no_pool(method):
        raise AssertionError(f"a {method} pool for {text.stat().st_size} bytes")

    text, out = tmp_path / "a.txt", tmp_path / "out"
    text.write_text(TEXT[:20_000])
    monkeypatch.setattr(prepare_module.multiprocessing, "get_context", no_pool)
    assert prepare(text, out, workers=2) == out and prepare_module.is_source_prepared(text, out)


@pytest.mark.timeout(120)
def test_a_pool_whose_temp_folder_another_preparation_moved_into_place_takes_its_data(tmp_path, monkeypatch):
    """Two launches prepare the same inputs at once (seen with five GPU smoke rows started together): B moves the
    shared temp folder into place just as A's pool of workers starts. A's workers find no tokenizer there; A takes
    B's data, which is its own, instead of hanging (a pool replaces a worker whose initializer failed, forever)."""
    text, out = tmp_path / "a.txt", tmp_path / "out"
    text.write_text(TEXT[:20_000])
    monkeypatch.setattr(prepare_module, "PART_BYTES", 5_000)  # more than a part's worth of input: a pool
    run_parts = prepare_module._run_parts

    def b_lands_first(todo, tmp, *args):
        monkeypatch.setattr(prepare_module, "_run_parts", run_parts)
        prepare(text, out, workers=1)  # B, start to end, in the temp folder A made
        assert len(todo) > 1 and not tmp.exists()  # A's parts go to a pool, for a folder that is gone
        yield from run_parts(todo, tmp, *args)

    monkeypatch.setattr(prepare_module, "_run_parts", b_lands_first)
    assert prepare(text, out, workers=2) == out
    assert prepare_module.is_source_prepared(text, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "out"]


def test_two_processes_preparing_other_data_into_one_folder_at_once(tmp_path):
    """Whichever way they interleave, one lands and the other is refused in one line (exit 2), and the folder holds
    the winner's data, whole."""
    inputs = [tmp_path / "a.txt", tmp_path / "b.txt"]
    inputs[0].write_text(TEXT[:30_000])
    inputs[1].write_text(TEXT[30_000:70_000])
    out = tmp_path / "out"
    procs = [subprocess.Popen([sys.executable, "-m", "gpt.data.prepare", "--text", str(f), "--out", str(out),
                               "--workers", "1"], cwd=REPO, stderr=subprocess.PIPE, text=True) for f in inputs]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 2], results
    [(winner, _)] = [(f, e) for f, (code, e) in zip(inputs, results) if code == 0]
    [said] = [line for code, e in results if code == 2 for line in e.splitlines() if line.startswith("error:")]
    assert said.startswith(f"error: {out} holds data prepared from other inputs"), said  # the log aside, one line
    assert read_meta(out)["source"]["path"] == str(winner.resolve()) and prepare_module.is_source_prepared(winner, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt", "out"]


def test_prepare_failure_leaves_no_complete_looking_dir_and_resumes(tmp_path, monkeypatch):
    text = tmp_path / "input.txt"
    text.write_text(TEXT[:20_000])

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    with monkeypatch.context() as mp:
        mp.setattr(prepare_module, "_write_synced", crash)  # dies while writing meta.json
        with pytest.raises(RuntimeError):
            prepare(text, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (work,) = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]  # kept for the next run
    assert sorted(p.name for p in work.glob("part_*.json")) == ["part_000000.json", "part_000001.json"]
    monkeypatch.setattr("gpt.data.parts.tokenize_part", crash)  # finished parts are not tokenized again
    prepare(text, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["input.txt", "out"]


def test_prepare_refuses_to_replace_an_unrelated_dir(tmp_path):
    text = tmp_path / "input.txt"
    text.write_text(TEXT[:20_000])
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a prepared data directory"):
        prepare(text, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_missing_text_file_is_user_error_naming_the_path(tmp_path, capsys):
    missing = tmp_path / "nowhere" / "input.txt"
    with pytest.raises(UserError) as e:
        prepare(missing, tmp_path / "out")
    assert str(missing) in str(e.value) and "char-rnn" in str(e.value) and "make data" in str(e.value)
    assert prepare_main(["--text", str(missing), "--out", str(tmp_path / "out")]) == 2
    assert str(missing) in capsys.readouterr().err


def test_the_standalone_command_words_its_refusals_in_its_own_flags(tmp_path, capsys):
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text('{"body": 1}\n')
    assert prepare_main(["--text", str(corpus), "--format", "jsonl", "--field", "body", "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.endswith(f"error: {corpus}:1: --field 'body' is int, not a string\n")
    corpus.write_text('{"body": "one document"}\n')
    assert prepare_main(["--text", str(corpus), "--format", "jsonl", "--field", "body", "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.endswith("too few documents for --val-fraction 0.1; give --val or more documents\n")


@pytest.mark.parametrize("kwargs, key", [
    ({"tokenizer": "word"}, "data.tokenizer"),
    ({"tokenizer": "bpe", "vocab_size": 256}, "data.vocab_size"),
    ({"tokenizer": "char", "vocab_size": 100}, "data.vocab_size"),
    ({"val_fraction": 0.5}, "data.val_fraction"),
    ({"val_fraction": 0}, "data.val_fraction"),
    ({"shard_tokens": 0}, "data.shard_tokens"),
])
def test_bad_settings_are_config_errors(kwargs, key):
    with pytest.raises(ConfigError) as e:
        DataConfig(**kwargs).validate()
    assert e.value.key == key


def test_bpe_without_a_vocab_size_learns_the_documented_2048(tmp_path):
    DataConfig(tokenizer="bpe").validate()
    text = tmp_path / "input.txt"
    text.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(400)))
    out = prepare(text, tmp_path / "out", "bpe")
    assert json.loads((out / "meta.json").read_text())["requested_vocab_size"] == 2048


def test_yaml_configs_fill_the_data_config():
    for name, tokenizer, vocab in [("shakespeare_char", "char", None), ("shakespeare_bpe", "bpe", 2048)]:
        raw = yaml.safe_load((REPO / "configs/data" / f"{name}.yaml").read_text())
        cfg = section(DataConfig, "data", raw)
        assert (cfg.name, cfg.tokenizer, cfg.vocab_size, cfg.dir) == (name, tokenizer, vocab, f"data/{name}")
    for name, fmt in [("openwebtext", "text"), ("slimpajama", "jsonl")]:
        raw = yaml.safe_load((REPO / "configs/data" / f"{name}.yaml").read_text())
        cfg = section(DataConfig, "data", raw)
        assert (cfg.name, cfg.format, cfg.tokenizer) == (name, fmt, "hf") and cfg.tokenizer_file
    with pytest.raises(ConfigError, match="data.vocab"):
        section(DataConfig, "data", {"vocab": 3})


def test_ensure_prepared_and_check_vocab(char_dir, tmp_path):
    cfg = DataConfig(text_path=str(CORPUS), dir=str(char_dir))
    assert ensure_prepared(cfg) == char_dir
    with pytest.raises(ValueError, match="absolute"):
        ensure_prepared(DataConfig(text_path="data/x.txt", dir=str(tmp_path)))
    assert check_vocab(None, char_dir) == 65
    assert check_vocab(128, char_dir) == 128
    with pytest.raises(ConfigError) as e:
        check_vocab(50, char_dir)
    assert e.value.key == "model.vocab_size" and "65" in str(e.value)
    with pytest.raises(UserError, match="meta.json"):
        check_vocab(None, tmp_path)


# --- loader -------------------------------------------------------------------------------------------
def test_batches_are_deterministic_per_seed_and_step(char_dir):
    ds = TokenDataset(char_dir, "train")
    a = TrainBatches(ds, 1337, 32, 16, 4)
    b = TrainBatches(TokenDataset(char_dir, "train"), 1337, 32, 16, 4)
    x1, y1 = a.get(5, 2)
    x2, y2 = b.get(5, 2)
    assert x1.dtype == y1.dtype == torch.int64 and x1.shape == y1.shape == (4, 32)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(a.get(6, 2)[0], x1)
    assert not torch.equal(TrainBatches(ds, 1338, 32, 16, 4).get(5, 2)[0], x1)


def test_prefetching_reads_the_next_step_off_the_training_thread_and_changes_no_batch(char_dir):
    ds = TokenDataset(char_dir, "train")
    plain, ahead = TrainBatches(ds, 1337, 32, 16, 4, 1, 2), TrainBatches(ds, 1337, 32, 16, 4, 1, 2)
    readers: dict[int, set[str]] = {}
    read = ahead.read

    def traced(step: int, micro_step: int):
        readers.setdefault(step, set()).add(threading.current_thread().name)
        return read(step, micro_step)

    ahead.read = traced
    prefetch = Prefetcher(ahead)
    for step in [3, 4, 5, 6, 9, 10]:  # 9: not the step read ahead (a resume elsewhere), read on the spot
        micro = prefetch.take(step)
        expected = [plain.get(step, m) for m in range(plain.grad_accum_steps)]
        assert all(torch.equal(a, b) for got, want in zip(micro, expected, strict=True) for a, b in zip(got, want))
        assert ahead.step == plain.step == step + 1
        assert prefetch.read_s > 0  # the loader's own cost of this step, for the step breakdown
    prefetch.close()
    main = threading.current_thread().name
    assert readers[3] == readers[9] == {main}
    assert all(readers[s] and main not in readers[s] for s in (4, 5, 6, 10))


@pytest.mark.slow  # seconds of CPU: out of make test-fast's slice
@pytest.mark.parametrize("data", ["char_dir", "bpe_dir"])
def test_resharding_keeps_the_global_batch_in_order(data, request):
    ds = TokenDataset(request.getfixturevalue(data), "train")
    gbs, block = 16, 24

    def global_batch(dp_size: int, micro: int, step: int) -> torch.Tensor:
        parts = []
        for rank in range(dp_size):
            loader = TrainBatches(ds, 7, block, gbs, micro, rank, dp_size)
            parts += [loader.get(step, m)[0] for m in range(loader.grad_accum_steps)]
        return torch.cat(parts)

    for step in (0, 3):
        reference = global_batch(1, 16, step)
        for dp_size, micro in [(1, 4), (2, 8), (2, 2), (4, 4), (4, 1)]:
            assert torch.equal(global_batch(dp_size, micro, step), reference), (dp_size, micro)
    # micro-steps partition one rank's share: rank 1 of 2 holds samples 8..15 of the global batch
    rank1 = TrainBatches(ds, 7, block, gbs, 2, 1, 2)
    offsets = global_batch_offsets(7, 3, gbs, ds.shard_sizes, block)[8:16]
    assert rank1.grad_accum_steps == 4
    assert torch.equal(torch.cat([rank1.get(3, m)[0] for m in range(4)]),
                       torch.from_numpy(ds.windows(offsets, block + 1)[:, :-1]))


def test_targets_are_inputs_shifted_and_decode_to_corpus_text(char_dir, bpe_dir):
    block = 64
    loader = TrainBatches(TokenDataset(char_dir, "train"), 3, block, 8, 8)
    x, y = loader.get(0, 0)
    assert torch.equal(x[:, 1:], y[:, :-1])
    tok = load_tokenizer(char_dir)
    for off, row, target in zip(loader.offsets(0), x.tolist(), y.tolist()):
        assert tok.decode(row) == TEXT[off:off + block]  # char tokens sit at their character offsets
        assert tok.decode(row + target[-1:]) == TEXT[off:off + block + 1]
    bpe = load_tokenizer(bpe_dir)
    x, y = TrainBatches(TokenDataset(bpe_dir, "train"), 3, block, 8, 4).get(1, 1)
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row in x.tolist():
        assert bpe.decode(row) in TEXT


def test_state_dict_resumes_on_another_world_size(char_dir):
    ds = TokenDataset(char_dir, "train")
    a = TrainBatches(ds, 11, 16, 8, 2, 0, 2)
    for step in range(3):
        for m in range(a.grad_accum_steps):
            a.get(step, m)
    state = a.state_dict()
    assert state == {"seed": 11, "step": 3, "global_batch_size": 8, "samples_seen": 24, "skipped_batches": 0}
    b = TrainBatches(ds, 11, 16, 8, 4, 0, 1)
    b.load_state_dict(state)
    assert b.step == 3
    with pytest.raises(UserError, match="global batch size of 8"):
        TrainBatches(ds, 11, 16, 16, 4).load_state_dict(state)
    with pytest.raises(UserError, match="seed 11"):
        TrainBatches(ds, 12, 16, 8, 4).load_state_dict(state)


def test_batches_passed_over_stay_passed_over(char_dir):
    """A rollback moves step 3 to batch 6 (divergence.policy=rollback): a loader resumed from its state does too."""
    ds = TokenDataset(char_dir, "train")
    a = TrainBatches(ds, 11, 16, 8, 8)
    six = a.read(6, 0)
    a.skip_to(3, 6)
    assert a.index(3) == 6 and torch.equal(a.read(3, 0)[0], six[0])
    b = TrainBatches(ds, 11, 16, 8, 8)
    b.load_state_dict(a.state_dict())
    assert b.index(4) == 7 and torch.equal(b.read(3, 0)[0], six[0])
    ahead = TrainBatches(ds, 11, 16, 8, 8)
    prefetch = Prefetcher(ahead)
    prefetch.take(3)  # reads step 4's batch ahead
    ahead.skip_to(4, 9)
    assert torch.equal(prefetch.take(4)[0][0], ahead.read(4, 0)[0]) and ahead.index(4) == 9  # not the stale batch 4
    prefetch.close()


def test_batch_sizes_must_divide(char_dir):
    ds = TokenDataset(char_dir, "train")
    with pytest.raises(UserError, match="multiple of the data-parallel size 4"):
        TrainBatches(ds, 0, 16, 6, 1, 0, 4)
    with pytest.raises(UserError, match="micro batch size 3"):
        TrainBatches(ds, 0, 16, 8, 3, 0, 2)
    with pytest.raises(UserError, match="block_size=2000000"):
        TrainBatches(ds, 0, 2_000_000, 8, 8).get(0, 0)


def test_validation_batches_are_fixed_and_split_across_ranks(char_dir):
    ds = TokenDataset(char_dir, "val")
    whole = [x for x, _ in ValBatches(ds, 1, 32, 8, 5)]
    assert len(whole) == 5 and all(x.shape == (8, 32) for x in whole)
    assert all(torch.equal(p, q) for p, q in zip(whole, [x for x, _ in ValBatches(ds, 1, 32, 8, 5)]))
    for dp_size in (2, 4):
        shares = [list(ValBatches(ds, 1, 32, 8, 5, rank, dp_size)) for rank in range(dp_size)]
        for j in range(5):
            assert torch.equal(torch.cat([shares[r][j][0] for r in range(dp_size)]), whole[j])
    x, y = next(iter(ValBatches(ds, 1, 32, 8, 5)))
    assert torch.equal(x, whole[0]) and torch.equal(x[:, 1:], y[:, :-1])
    assert not torch.equal(x, whole[1]) and x.max() < 65
    # a micro-batch size slices each rank's share into equal forward passes of the same samples
    sliced = [x for x, _ in ValBatches(ds, 1, 32, 8, 5, 1, 2, micro_batch_size=2)]
    assert len(sliced) == 10 and all(x.shape == (2, 32) for x in sliced)
    assert all(torch.equal(torch.cat(sliced[2 * j:2 * j + 2]), whole[j][4:]) for j in range(5))
    with pytest.raises(UserError, match="micro batch size 3 must divide the per-rank validation batch 4"):
        ValBatches(ds, 1, 32, 8, 5, 0, 2, micro_batch_size=3)


def test_offsets_never_cross_shards():
    sizes, block = [10, 3, 10, 5], 4  # valid starts per shard: 6, 0, 6, 1
    offsets = global_batch_offsets(0, 0, 5000, sizes, block)
    assert set(offsets.tolist()) == set(range(0, 6)) | set(range(13, 19)) | {23}


def test_uint32_shards_for_large_vocabularies(tmp_path):
    assert token_dtype(65_536) == np.uint16 and token_dtype(65_537) == np.uint32
    shards = [np.arange(70_000, 70_050, dtype="<u4"), np.arange(100_000, 100_030, dtype="<u4")]
    meta = {"vocab_size": 200_000, "dtype": "uint32", "splits": {"train": {"shards": []}}}
    for i, shard in enumerate(shards):
        shard.tofile(tmp_path / f"train_{i:06d}.bin")
        meta["splits"]["train"]["shards"].append({"file": f"train_{i:06d}.bin", "tokens": shard.size})
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    ds = TokenDataset(tmp_path, "train")
    assert ds.vocab_size == 200_000 and ds.num_tokens == 80
    x, y = TrainBatches(ds, 0, 8, 64, 64).get(0, 0)
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.all(y - x == 1)  # consecutive ids, never across shards
    assert x.min() >= 70_000 and x.max() > 100_000
