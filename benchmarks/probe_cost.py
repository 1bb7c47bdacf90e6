"""What the compute probe (gpt.train.compute_probe) costs: its time once per log window, as a share of the window.

A run whose ranks wait for each other inside forward/backward (FSDP, tensor parallel, pipeline, ZeRO-3) times the
probe after each log window's figures; here one process trains the model
for log windows of `train.log_interval` steps and times the probe the reporter would build for it (sized to its
micro-batch), alternately, and reports the median share.

    python -m benchmarks.probe_cost [--windows 20] [--threads 1] [OVERRIDES...]     # model=tiny by default
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import compose_config, save_results  # noqa: E402
from launch import launch_config  # noqa: E402
from gpt.collectives.process_group import DistEnv  # noqa: E402
from gpt.train.compute_probe import ComputeProbe  # noqa: E402
from gpt.train.trainer import Trainer  # noqa: E402
from launch.backends import get_backend  # noqa: E402
from launch.planning.plan import make_plan  # noqa: E402


def wall(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 gives the steadiest timings)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run_dir = Path(tempfile.mkdtemp(prefix="gptlaunch-probe-"))
    cfg = compose_config(["model=tiny", "train.max_steps=100000", "train.progress=false", "train.eval_interval=0",
                          "train.device=cpu", *args.overrides])
    make_plan(cfg, run_dir, get_backend(cfg.cluster.name))
    trainer = Trainer(launch_config.load(run_dir / "config.yaml"), DistEnv(), run_dir)
    t, reporter = trainer.train, trainer.reporter
    probe = ComputeProbe(trainer.model_cfg, trainer.data.micro_batch * trainer.model_cfg.block_size, trainer.device,
                         t.precision, reporter.rank_step_flops())
    reporter.new_window()
    trainer.reporter.record = lambda *a: None  # the window's own record is not what is measured

    def window() -> None:
        for _ in range(t.log_interval):
            trainer.train_step()

    window()  # warm-up
    windows, probes = [], []
    for _ in range(args.windows):
        windows.append(wall(window))
        probes.append(wall(probe.seconds))
    share = statistics.median(p / w for p, w in zip(probes, windows))
    results = {"model": trainer.model_cfg.name, "log_interval": t.log_interval, "windows": args.windows,
               "window_median_ms": 1e3 * statistics.median(windows), "probe_median_ms": 1e3 * statistics.median(probes),
               "probe_share": share}
    path = save_results("probe_cost", results)
    print(f"model {results['model']}, windows of {t.log_interval} steps, {args.threads} thread(s)")
    print(f"window : {results['window_median_ms']:.1f} ms median")
    print(f"probe  : {results['probe_median_ms']:.2f} ms median, {100 * share:.2f}% of a window   [{path}]")


if __name__ == "__main__":
    main()
