"""benchmarks/shakespeare.py's side-by-side run without a GPU: nanoGPT's evaluations read as its train.py prints
them (a stand-in train.py here, nanoGPT's line format), the table of both curves, and when each reached the target."""
from __future__ import annotations

import os

import pytest

from benchmarks.shakespeare import ratio, run_nanogpt, summary, table

TRAIN_PY = '''import sys
if sys.argv[1:] != ["config/train_shakespeare_char.py", "--max_iters=500"]:
    sys.exit(3)
for step, loss in ((0, 4.2823), (250, 2.0767), (500, 1.7194)):
    print(f"step {step}: train loss 1.0000, val loss {loss:.4f}")
    print(f"iter {step}: loss 1.0000, time 12.74ms, mfu 27.52%")
'''


def test_nanogpts_evaluations_are_read_as_its_train_py_prints_them(tmp_path):
    folder = tmp_path / "nanoGPT"
    data = folder / "data" / "shakespeare_char"
    data.mkdir(parents=True)
    (data / "prepare.py").write_text("open('train.bin', 'w').write('tokens')\n")
    (folder / "train.py").write_text(TRAIN_PY)
    curve = run_nanogpt(folder, 500, dict(os.environ))
    assert [(step, loss) for step, _, loss in curve] == [(0, 4.2823), (250, 2.0767), (500, 1.7194)]
    assert all(0 <= wall < 60 for _, wall, _ in curve)
    assert (data / "input.txt").stat().st_size > 1_000_000  # our corpus, not a download
    with pytest.raises(SystemExit, match="nanoGPT's train.py exited 3"):
        run_nanogpt(folder, 400, dict(os.environ))


def test_the_table_sets_both_curves_side_by_side_and_the_summary_says_when_each_reached_the_target():
    ours = [(250, 43.4, 2.0733), (1500, 66.0, 1.4719), (1750, 70.9, 1.4698), (2000, 75.3, 1.4708)]
    nanogpt = [(0, 31.6, 4.2823), (250, 54.9, 2.0767), (1750, 89.4, 1.4701)]
    rows = table({"gptlaunch": ours, "nanoGPT": nanogpt}).splitlines()
    assert rows[0] == "| step | gptlaunch: s, val loss | nanoGPT: s, val loss |"
    assert "| 0 | - | 31.6, 4.2823 |" in rows and "| 1,750 | 70.9, 1.4698 | 89.4, 1.4701 |" in rows
    assert summary("gptlaunch", ours, 1.47) == ("gptlaunch: best val loss 1.4698 at step 1750 (70.9 s); 1.47 or "
                                                "less: at step 1750 (70.9 s)")
    assert summary("nanoGPT", nanogpt, 1.47).endswith("1.47 or less: never")
    assert "or less" not in summary("cpu", ours, None)
    faster = [(1500, 40.2, 1.4719), (1750, 44.7, 1.4698)]
    assert ratio({"gptlaunch, warm cache": faster, "nanoGPT": nanogpt + [(2000, 93.0, 1.4690)]}, 1.47) == (
        "to 1.47: gptlaunch, warm cache 44.7 s, nanoGPT 93.0 s: 0.48x the time")  # its 1.4701 is not 1.47
    assert ratio({"gptlaunch": ours, "nanoGPT": nanogpt[:2]}, 1.47) is None  # one never reached it
