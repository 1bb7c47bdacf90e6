"""The step timer: the parts of a step from one timing source, and the GPU path's figures judged as stragglers.

A real CUDA event cannot exist on this machine, so the GPU path runs on tests/cuda_standin.py (the `strict_cuda`
fixture): its events refuse to be read before they completed, as CUDA's do, and its device works only when the test
enqueues work. All the rest (the strategy's phase marks, the backward hook, the window's reading, the detector) is
the code a GPU runs."""
from __future__ import annotations

import time

import pytest
import torch

from cuda_standin import HostReads
from gpt.config.model import ModelConfig
from gpt.config.sections import StragglerConfig
from gpt.collectives.process_group import DistEnv
from gpt.model.transformer import GPT
from gpt.parallel.base import Strategy
from gpt.parallel.layout import ParallelDims
from gpt.resilience.stragglers import StragglerDetector, busy_time, figures_dict, figures_vector
from gpt.train.step_timer import StepTimer, watch_compute_end


def gpu_shaped(compute: list[float], step_s: float) -> list[dict]:
    """Equal step times, no host wait: what every rank's records look like when the waiting is on the device."""
    return [{"step_time_s": step_s, "comm_s": 0.0, "compute_s": c, "host": f"n{r}"} for r, c in enumerate(compute)]


def test_a_gpu_shaped_straggler_is_detected_on_device_compute():
    det = StragglerDetector(4, StragglerConfig(threshold_pct=20, windows=2))
    summaries = [det.observe(10 * (w + 1), gpu_shaped([0.5, 0.5, 0.8, 0.51], step_s=0.8)) for w in range(2)]
    assert [s.stragglers for s in summaries] == [[], [2]]
    event = summaries[-1].events[0]
    assert (event.rank, event.busy_s, event.median_s) == (2, 0.8, pytest.approx(0.5))  # the median of the other ranks
    assert figures_dict(figures_vector(gpu_shaped([0.5], 0.8)[0]))["compute_s"] == 0.5  # gathered between ranks


def test_records_without_compute_keep_judging_step_minus_comm():
    assert busy_time({"step_time_s": 1.0, "comm_s": 0.3}) == pytest.approx(0.7)
    assert busy_time({"step_time_s": 1.0, "comm_s": None}) == 1.0


def tiny_strategy(cuda, compute_s: float, wait_s: float) -> Strategy:
    """A one-process strategy whose simulated device computes for `compute_s` per step and then waits `wait_s` for
    the gradient reduction (what a fast rank's device does when a peer is slow)."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=32))

    def compute(*_):
        cuda.run(compute_s)

    def reduce_gradients(_):
        cuda.run(wait_s)

    model.register_forward_pre_hook(compute)
    model.wte.weight.register_post_accumulate_grad_hook(reduce_gradients)  # after the embedding's backward
    strategy = Strategy(None, DistEnv(), torch.device("cpu"), "fp32", ParallelDims())
    strategy.setup(model, 1e-3, 0.0, (0.9, 0.95))
    return strategy


def run_window(cuda, strategy: Strategy, steps: int, step_s: float) -> dict[str, float]:
    timer = StepTimer(torch.device("cpu"))
    watch_compute_end(strategy.unwrapped, lambda: timer)
    x = torch.randint(0, 32, (2, 8))
    waits = cuda.host_waits
    for _ in range(steps):
        timer.step_done(strategy.train_step([(x, x)], 1, 1e-3, 1.0).clock)
    assert cuda.host_waits == waits  # nothing read before the log step
    return timer.read(window_s=steps * step_s)


def test_reading_a_clock_waits_for_the_device_as_cuda_requires(strict_cuda):
    from gpt.train.step_timer import PhaseClock

    clock = PhaseClock(torch.device("cpu"))
    strict_cuda.run(0.25)
    clock.mark("matmul")
    start, end = clock.marks[0][1].event, clock.marks[1][1].event
    with pytest.raises(RuntimeError, match="must be completed"):
        start.elapsed_time(end)  # what CUDA says when the host reads before the device got there
    assert clock.seconds() == {"matmul_s": pytest.approx(0.25)}


def test_the_gpu_path_records_device_compute_that_finds_the_straggler(strict_cuda):
    # Rank 2's device computes 0.3 s longer; the others' devices wait for it in the gradient reduction, so every
    # rank's step takes 0.8 s and no host waits.
    shapes = [(0.5, 0.3), (0.5, 0.3), (0.8, 0.0), (0.5, 0.3)]
    figures = []
    for r, (compute_s, wait_s) in enumerate(shapes):
        f = run_window(strict_cuda, tiny_strategy(strict_cuda, compute_s, wait_s), steps=3, step_s=0.8)
        assert f["step_time_s"] == pytest.approx(0.8) and f["comm_s"] == pytest.approx(wait_s)
        assert f["compute_s"] == pytest.approx(compute_s) and f["fwd_bwd_s"] == pytest.approx(compute_s + wait_s)
        figures.append({**f, "host": f"n{r}"})
    det = StragglerDetector(4, StragglerConfig(threshold_pct=20, windows=1))
    assert det.observe(3, figures).stragglers == [2]


def test_a_cpu_window_keeps_todays_figures():
    timer = StepTimer(torch.device("cpu"))
    for _ in range(4):
        timer.sync_wait(0.1)  # the host's wait in the flags all-reduce
        timer.step_done(None)
    f = timer.read(window_s=2.0)
    assert (f["step_time_s"], f["comm_s"], f["compute_s"]) == pytest.approx((0.5, 0.1, 0.4))


def test_the_loaders_own_cost_is_in_the_breakdown_beside_the_wait_for_it():
    timer = StepTimer(torch.device("cpu"))
    for read_s in (0.2, 0.4):  # read on the prefetch thread while the previous step computed
        timer.data_done(time.perf_counter(), read_s)
        timer.step_done(None)
    f = timer.read(window_s=2.0)
    assert f["data_read_s"] == pytest.approx(0.3) and f["data_time_s"] < 0.01


@pytest.mark.slow
def test_the_trainer_reads_the_gpu_path_only_on_log_steps(strict_cuda, tmp_path_factory, monkeypatch):
    from hydra import compose, initialize_config_dir

    from helpers import REPO, SHAKESPEARE, make_plan_of, read_metrics
    from gpt.config import schema
    from launch import launch_config
    from gpt.train.trainer import Trainer

    run_dir = tmp_path_factory.mktemp("run")
    overrides = ["model=tiny", "train.device=cpu", "train.max_steps=6", "train.log_interval=3", "train.eval_interval=0",
                 "train.progress=false", f"data.text_path={SHAKESPEARE}",
                 f"data.dir={tmp_path_factory.getbasetemp() / 'trainer-data'}"]
    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        make_plan_of(launch_config.parse(compose("config", overrides=overrides)), run_dir)
    trainer = Trainer(schema.load(run_dir / "config.yaml"), DistEnv(), run_dir)
    record, spans, step, reads = trainer.reporter.record, [], trainer.train_step, {}

    def recording(*args):  # the host waits for the device in a log step (before, after)
        before = strict_cuda.host_waits
        values = record(*args)
        spans.append((before, strict_cuda.host_waits))
        return values

    def reading():  # every implicit read of a device tensor (.item(), bool(t), ...) in each step
        with HostReads(strict_cuda) as mode:
            values = step()
        reads[trainer.step - 1] = mode.sites
        return values

    monkeypatch.setattr(trainer.reporter, "record", recording)
    monkeypatch.setattr(trainer, "train_step", reading)
    trainer.fit()
    assert [s for s in reads if reads[s]] == [2, 5], reads  # only log steps wait for the device or read it
    (before_1, after_1), (before_2, after_2) = spans
    assert after_1 > before_1 and after_2 > before_2  # the record waits for the window's events
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [3, 6]  # the steps done as each window closed
    for r in records:  # the figures the straggler check gathered: compute_s among them, from the events
        assert r["compute_s"] == pytest.approx(r["step_time_s"] - r["comm_s"]) and "fwd_bwd_s" in r
