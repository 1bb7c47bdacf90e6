"""A 256-point sweep's report builds in seconds and stays readable: its tables show the first and last rows with
a line for the rest (the CSV files keep every point), and its plots keep a bounded number of panels and labels."""
from __future__ import annotations

import time

import pytest
from matplotlib.image import imread
from test_report import csv_rows, write_point

from launch.report import write_report
from launch.report.markdown import SHOWN_ROWS
from launch.report.outputs import DPI, MAX_PANELS

POINTS = 256


def write_sweep(root) -> None:
    """nodes=1,2,4,8 x 64 learning rates: a scaling report and a comparison at once."""
    for i in range(POINTS):
        nodes, lr = (1, 2, 4, 8)[i % 4], round(1e-4 * (1 + i // 4), 6)
        final = 2.0 + i / 1000
        write_point(root / f"nodes={nodes},train.lr={lr}", nodes, 1, 12, [0.1 * (1 + nodes / 20)] * 4, lr=lr,
                    losses=[3.0, 2.6, 2.3, final], val=((10, 2.5), (30, final)))


@pytest.mark.slow
def test_the_report_of_256_points_builds_in_seconds_and_stays_bounded(tmp_path):
    write_sweep(tmp_path)
    start = time.process_time()  # CPU time: what the report costs, whatever else the machine runs
    out = write_report(tmp_path)
    took = time.process_time() - start
    assert took < 15, f"the report of {POINTS} points took {took:.1f} s of CPU"  # about 5 s (36 s before)
    md = (out / "scaling.md").read_text()
    assert len(md) < 21_000 and md.count("\n") < 200, (len(md), md.count("\n"))  # labels name the nodes too
    assert md.count(f"| ... {POINTS - 2 * SHOWN_ROWS} more point(s) between these rows") == 3  # compare, measured, error
    assert "every point is in `comparison.csv`" in md and "every point is in `scaling.csv`" in md
    assert "| 1 | nodes=1, train.lr=0.0001 |" in md and f"| {POINTS} | nodes=8, train.lr=0.0064 |" in md  # best, worst
    assert len(csv_rows(out / "comparison.csv")) == len(csv_rows(out / "scaling.csv")) == POINTS
    width = imread(out / "step_time_per_rank.png").shape[1]
    assert width <= 3.2 * MAX_PANELS * DPI, width  # one panel per node count, not one per point
    assert (out / "loss_curves.png").stat().st_size < 200_000
