"""Straggler detection: the pure rule on synthetic windows, and for real over gloo with a delay injected on one rank."""
from __future__ import annotations

import json
import math
import statistics
import time

import pytest
import torch

from cuda_standin import StrictCuda
import torch.distributed as dist
import torch.multiprocessing as mp

from gpt.collectives.flag_sum import sum_in_background
from gpt.resilience.faults import Faults
from gpt.config.parse import section
from gpt.config.sections import DebugConfig, StragglerConfig
from gpt.errors import ConfigError
from gpt.resilience.stragglers import (FIGURES, StragglerDetector, StragglerMonitor, busy_time, figures_dict,
                                       figures_vector, median_without)


def window(times, comm=None, hosts=None):
    return [{"step_time_s": t, "comm_s": None if comm is None else comm[i], "host": hosts[i] if hosts else f"n{i}"}
            for i, t in enumerate(times)]


def test_chronic_lag_becomes_a_straggler_after_m_windows():
    det = StragglerDetector(4, StragglerConfig(threshold_pct=20, windows=3, top_k=2))
    summaries = [det.observe(10 * (w + 1), window([1.0, 1.0, 1.5, 1.02])) for w in range(4)]
    assert [s.stragglers for s in summaries] == [[], [], [2], [2]]
    assert [len(s.events) for s in summaries] == [0, 0, 1, 0]
    event = summaries[2].events[0]
    assert (event.rank, event.host, event.kind, event.step, event.windows) == (2, "n2", "straggler", 30, 3)
    assert "rank 2 on n2" in event.message() and "50% slower than the median of the other ranks" in event.message()
    s = summaries[-1]
    assert (s.step_time_min_s, s.step_time_median_s, s.step_time_max_s) == (1.0, 1.01, 1.5)
    assert [r.rank for r in s.top] == [2, 3]
    m = s.metrics()
    assert m["stragglers/count"] == 1 and m["stragglers/step_time_max_s"] == 1.5
    assert m["rank_step_time_s/rank2"] == 1.5 and m["stragglers/top1_rank"] == 2


def test_a_rank_is_judged_against_the_other_ranks_not_itself():
    # 2 ranks: the median of both would be halfway to the straggler (246 ms), and its 4.1x lag would read as 61%
    det = StragglerDetector(2, StragglerConfig(threshold_pct=20, windows=1))
    event = det.observe(10, window([0.0972, 0.3953])).events[0]
    assert (event.rank, event.median_s, round(event.lag_pct)) == (1, 0.0972, 307)
    assert "307% slower than the median of the other ranks (395.3 ms vs 97.2 ms" in event.message()
    xs = [0.1, 0.2, 0.2, 0.5, 0.9]
    assert [median_without(xs, i) for i in range(5)] == [statistics.median(xs[:i] + xs[i + 1:]) for i in range(5)]
    assert [median_without(xs[:4], i) for i in range(4)] == [statistics.median(xs[:i] + xs[i + 1:4]) for i in range(4)]
    assert math.isnan(median_without([0.1], 0))


def test_one_off_lag_is_not_a_straggler_and_recovery_is_reported():
    det = StragglerDetector(3, StragglerConfig(threshold_pct=20, windows=3))
    seq = [[1, 1, 1], [1, 3, 1], [1, 1, 1], [1, 1.3, 1], [1, 1, 1], [1, 1, 1]]  # one spike, one small blip
    out = [det.observe(i, window(t)) for i, t in enumerate(seq)]
    assert all(s.stragglers == [] for s in out) and not any(s.events for s in out)
    assert out[1].lagging == [1] and out[3].lagging == [1]
    assert out[2].top[0].rank == 1 and out[2].top[0].ema_lag_pct > 0  # the moving average remembers the spike
    for i in range(3):
        det.observe(10 + i, window([2, 1, 1]))
    back = det.observe(20, window([1, 1, 1]))
    assert back.stragglers == [] and [(e.rank, e.kind) for e in back.events] == [(0, "recovered")]


def test_busy_time_discounts_waiting_in_collectives():
    # Synchronous training: equal step times; the slow rank waits least.
    figs = window([1.0, 1.0, 1.0], comm=[0.5, 0.02, 0.5])
    assert busy_time(figs[1]) == pytest.approx(0.98) and busy_time({"step_time_s": 2.0}) == 2.0
    det = StragglerDetector(3, StragglerConfig(windows=2))
    det.observe(1, figs)
    assert det.observe(2, figs).stragglers == [1]
    # Without comm figures the same window shows no one.
    assert StragglerDetector(3, StragglerConfig(windows=1)).observe(1, window([1.0, 1.0, 1.0])).lagging == []


def test_threshold_min_excess_and_missing_figures():
    det = StragglerDetector(3, StragglerConfig(threshold_pct=50, windows=1, min_excess_s=0.01))
    assert det.observe(1, window([1.0, 1.0, 1.4])).lagging == []          # 40% < 50%
    assert det.observe(2, window([0.001, 0.001, 0.004])).lagging == []    # 300% but only 3 ms
    s = det.observe(3, window([1.0, float("nan"), 4.0]))  # median of the finite: 2.5
    assert s.lagging == [2] and s.step_time_max_s == 4.0
    with pytest.raises(ValueError):
        det.observe(4, window([1.0, 1.0]))
    with pytest.raises(ConfigError, match="stragglers.windows=0 is not valid"):
        section(StragglerConfig, "stragglers", {"windows": 0})
    cfg = section(StragglerConfig, "stragglers", {"threshold_pct": 35, "windows": 5, "top_k": 1})
    assert (cfg.threshold_pct, cfg.windows, cfg.top_k) == (35, 5, 1)


def test_many_ranks_log_only_the_top_k_per_rank_tags():
    det = StragglerDetector(100, StragglerConfig(top_k=3, per_rank_tags_max=64))
    m = det.observe(1, window([1.0] * 99 + [2.0])).metrics()
    assert sum(k.startswith("rank_step_time_s/") for k in m) == 3 and "rank_step_time_s/rank99" in m


def test_figures_round_trip_through_the_gathered_vector():
    v = figures_vector({"step_time_s": 0.5, "comm_s": None, "host": "x", "tokens_per_s_rank": 10})
    assert len(v) == len(FIGURES) and math.isnan(v[FIGURES.index("comm_s")])
    d = figures_dict(v)
    assert d["step_time_s"] == 0.5 and d["comm_s"] is None and d["tokens_per_s_rank"] == 10


def test_single_process_monitor_needs_no_process_group():
    mon = StragglerMonitor(1, host="solo")
    s = mon.update(5, {"step_time_s": 0.1})
    assert s.stragglers == [] and s.metrics()["rank_step_time_s/rank0"] == 0.1 and mon.hosts == ["solo"]


# --- for real: 3 gloo processes, a simulated training step per iteration, delay on one rank -------------
WORLD, WINDOWS, STEPS = 3, 4, 4
# the delay and the least excess that counts, well above what 3 processes sharing 2 busy cores lose to the scheduler
DELAY_S, MIN_EXCESS_S = 0.15, 0.03


def _scenario(rank: int, delay_rank) -> list[dict]:
    config = StragglerConfig(threshold_pct=20, windows=3, top_k=2, min_excess_s=MIN_EXCESS_S)
    mon = StragglerMonitor(WORLD, config=config, host=f"host{rank}")
    grad = torch.ones(1000)
    a = torch.randn(64, 64) / 8
    results = []
    for w in range(WINDOWS):
        step_s = comm_s = 0.0
        for _ in range(STEPS):
            start = time.perf_counter()
            for _ in range(5):
                a = torch.tanh(a @ a)  # the rank's own work
            Faults(DebugConfig(delay_rank=delay_rank, delay_s=DELAY_S), rank).slow_device()
            t0 = time.perf_counter()
            sum_in_background([0.0]).wait()  # waiting for the others counts as communication, not as this rank's own time
            dist.all_reduce(grad)  # the "gradient" collective
            comm_s += time.perf_counter() - t0
            step_s += time.perf_counter() - start
        summary = mon.update((w + 1) * STEPS, {"step_time_s": step_s / STEPS, "comm_s": comm_s / STEPS})
        if rank == 0:
            StragglerMonitor.log_events(summary)
            results.append({"stragglers": summary.stragglers, "events": [[e.rank, e.host] for e in summary.events],
                            "top": summary.top[0].rank, "metrics": summary.metrics()})
    return results


def _worker(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    results = {"no_delay": _scenario(rank, None), "delay_on_rank2": _scenario(rank, 2)}
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def gloo_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gloo")
    mp.spawn(_worker, args=(str(tmp / "store"), str(tmp / "out.json")), nprocs=WORLD, join=True)
    return json.loads((tmp / "out.json").read_text())


@pytest.mark.slow
def test_without_a_delay_no_rank_is_a_straggler_over_gloo(gloo_runs):
    results = gloo_runs["no_delay"]
    assert len(results) == WINDOWS
    assert all(r["stragglers"] == [] and r["events"] == [] for r in results), results


@pytest.mark.slow
def test_injected_delay_makes_that_rank_and_its_host_a_straggler_over_gloo(gloo_runs):
    results = gloo_runs["delay_on_rank2"]
    assert [r["stragglers"] for r in results] == [[], [], [2], [2]], results
    assert results[2]["events"] == [[2, "host2"]]
    assert all(r["top"] == 2 for r in results)
    m = results[-1]["metrics"]
    assert m["stragglers/count"] == 1
    # Synchronous steps: every rank's wall-clock step time includes the delay; only its busy time tells.
    assert m["rank_busy_s/rank2"] > 0.8 * DELAY_S > m["rank_busy_s/rank0"]
    assert m["stragglers/step_time_min_s"] > 0.8 * DELAY_S


def test_an_injected_straggler_lags_on_the_device_of_a_gpu_rank(monkeypatch):
    # No GPU here: the strict stand-in's device spins, and the host must not sleep (its device does the lagging).
    cuda = StrictCuda(clock_khz=1_500_000).install(monkeypatch)
    monkeypatch.setattr(time, "sleep", lambda s: pytest.fail("the host slept"))
    faults = Faults(DebugConfig(delay_rank=1, delay_s=0.2), 1, device=torch.device("cuda", 0))
    assert faults.slow_device() == 0.2 and faults.slow_device(0.5) == 0.1
    assert cuda.current_stream().tail == pytest.approx(0.3) and cuda.host_waits == 0
