"""Preparation at scale: a generated corpus of many text files (shuffled Tiny Shakespeare lines, one document per
file) tokenized with a tokenizer.json, by 1 and by 2 processes; prints MB/s, tokens/s and the peak memory of the
whole process tree (sampled every 50 ms), at two corpus sizes; also the CPU seconds spent (MB per CPU-second shows
what parallelism costs where other work takes the cores).

    python -m benchmarks.data_prepare --gb 1.0 0.25
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

from benchmarks.common import REPO, SHARED_TEXT, save_results

FILE_MB = 4


def make_corpus(folder: Path, gb: float, seed: int = 0) -> int:
    """gb of text in FILE_MB files under folder/NN/; returns the bytes written."""
    lines = np.array(SHARED_TEXT.read_text(encoding="utf-8").splitlines(keepends=True), dtype=object)
    rng = np.random.default_rng(seed)
    total, n = 0, 0
    while total < gb * 1e9:
        path = folder / f"{n // 100:02d}" / f"doc_{n:05d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(lines[rng.integers(0, len(lines), size=FILE_MB * 30_000)])
        path.write_text(text, encoding="utf-8")
        total += len(text.encode())
        n += 1
    return total


def make_tokenizer(folder: Path) -> Path:
    from gpt.data.tokenizer import BPETokenizer

    BPETokenizer.train(SHARED_TEXT.read_text(encoding="utf-8"), 2048).save(folder)
    return folder / "tokenizer.json"


def peak_rss(proc: subprocess.Popen) -> tuple[int, float]:
    """(peak resident bytes of proc and its children together, seconds) until proc exits."""
    start, peak = time.perf_counter(), 0
    parent = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            procs = [parent, *parent.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in procs))
        except psutil.Error:
            pass
        time.sleep(0.05)
    return peak, time.perf_counter() - start


def prepare_once(corpus: Path, tokenizer: Path, out: Path, workers: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cmd = [sys.executable, "-m", "gpt.data.prepare", "--text", str(corpus), "--out", str(out), "--tokenizer", "hf",
           "--tokenizer-file", str(tokenizer), "--workers", str(workers)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak, seconds = peak_rss(proc)
    if proc.returncode:
        raise RuntimeError(proc.stderr.read().decode()[-3000:])
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)  # the workers too: their parent waited for them
    cpu_s = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime
    meta = json.loads((out / "meta.json").read_text())
    tokens = sum(meta["splits"][s]["tokens"] for s in ("train", "val"))
    mb = meta["source"]["bytes"] / 1e6
    shutil.rmtree(out, ignore_errors=True)
    return {"workers": workers, "mb": round(mb), "files": meta["source"]["files"], "seconds": round(seconds, 1),
            "mb_per_s": round(mb / seconds, 2), "tokens_per_s": round(tokens / seconds), "tokens": tokens,
            "peak_rss_mib": round(peak / 2 ** 20), "cpu_s": round(cpu_s, 1),
            "mb_per_cpu_s": round(mb / cpu_s, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=float, nargs="+", default=[1.0, 0.25], help="corpus sizes")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dir", default=None, help="where to generate (default: a temporary folder)")
    args = parser.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="data_prepare_"))
    tokenizer = make_tokenizer(root / "tok")
    rows = []
    for gb in args.gb:
        corpus = root / f"corpus_{gb}gb"
        shutil.rmtree(corpus, ignore_errors=True)
        make_corpus(corpus, gb)
        for workers in args.workers:
            rows.append({"gb": gb, **prepare_once(corpus, tokenizer, root / "out", workers)})
            print(json.dumps(rows[-1]), flush=True)
        shutil.rmtree(corpus, ignore_errors=True)
    for gb in args.gb:
        one, two = ([r for r in rows if r["gb"] == gb and r["workers"] == w] for w in (1, 2))
        if one and two:
            print(f"{gb} GB: 2 processes {two[0]['mb_per_s'] / one[0]['mb_per_s']:.2f}x one", flush=True)
    print(save_results("data_prepare", {"rows": rows, "load_avg": psutil.getloadavg()}))


if __name__ == "__main__":
    main()
