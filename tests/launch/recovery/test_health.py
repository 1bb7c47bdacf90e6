"""Node health. On CPU: a node below health.min_fraction of the median node, or failing storage, is flagged. On
GPUs (mirrored on CPU): each GPU judged against its node's median and the job's, nccl-tests' bus bandwidth within
and across nodes, and the measuring code itself walked with the wall-time clock and gloo."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gpt.config.sections import HealthConfig
from gpt.collectives.process_group import DistEnv
from gpt.errors import ConfigError
from launch.recovery import health
from launch.recovery.health import CPU_SLOW_DRAG, gpu_dtype, gpu_matmul_tflops, matmul_gflops, measure_gpus, storage_problem
from launch.recovery.health_verdict import (BusBandwidth, GpuHealth, GpuVerdict, NodeHealth, NodeVerdict,
                                           bus_bandwidth_gbps, bus_figures, bus_groups, matmul_iterations)


def test_a_slow_node_and_a_node_that_cannot_write_are_flagged():
    nodes = [NodeHealth(0, "a", [0], 50.0, None), NodeHealth(1, "b", [1], 20.0, None),
             NodeHealth(2, "c", [2], 48.0, None), NodeHealth(3, "d", [3], 52.0, "OSError: read-only")]
    verdict = NodeVerdict(nodes, 0.8, bus_bandwidth_gbps(4, 1 << 20, 2.0))
    assert verdict.median == 49.0
    assert verdict.flagged_hosts == ["b", "d"]
    assert verdict.problems()[0] == "node 1 (b, rank 1): 20.0 GFLOP/s, 0.41 of the median 49.0"
    assert verdict.summary() == "health: 4 node(s), matmul 20.0-52.0 GFLOP/s (median 49.0); all-reduce bus bandwidth 0.79 GB/s"


def test_storage_check_reads_back_what_it_wrote(tmp_path):
    assert storage_problem(tmp_path, "h-rank0") is None
    assert not list((tmp_path / "health").iterdir())  # it cleans up
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro" / "health").write_text("a file where a folder should be")
    assert storage_problem(tmp_path / "ro", "h-rank0").startswith(("FileExistsError", "NotADirectoryError"))


def test_the_injected_slow_node_measures_slower():
    """The best of three turns, as the health check keeps it: the injection's drag (CPU_SLOW_DRAG, a sixth of its
    turn's speed) stays far below the fast node's. The turns alternate, so that a machine loaded by other tests
    slows both alike (three fast turns first, then one slow one at a quiet moment, measured the slow one faster)."""
    fast, slow = 0.0, 0.0
    for _ in range(3):
        fast = max(fast, matmul_gflops(64, torch.device("cpu"), torch.float32, seconds=0.05))
        slow = max(slow, matmul_gflops(64, torch.device("cpu"), torch.float32, drag=CPU_SLOW_DRAG, seconds=0.05))
    assert slow < 0.6 * fast, (slow, fast)


# --- GPUs: the judgement, on figures ---------------------------------------------------------------------------

def gpus(*nodes: list[float]) -> list[GpuHealth]:
    """TFLOP/s per GPU, one list per node; ranks numbered in order, GPU index = position in its node."""
    placed = [(node, i, t) for node, figures in enumerate(nodes) for i, t in enumerate(figures)]
    return [GpuHealth(rank, node, f"n{node}", i, t, None) for rank, (node, i, t) in enumerate(placed)]


def verdict(figures: list[GpuHealth], min_fraction: float = 0.8, bus: BusBandwidth | None = None) -> GpuVerdict:
    return GpuVerdict(figures, min_fraction, bus, "bfloat16 8192x8192", 2.5)


def test_one_gpu_at_half_speed_in_an_8_gpu_node_is_flagged():
    v = verdict(gpus([700.0] * 8, [700.0] * 7 + [350.0]))
    assert v.slow_gpus() == [v.gpus[15]] and v.flagged_hosts == ["n1"]
    assert v.problems() == ["GPU 7 of node 1 (n1, rank 15): 350.0 TFLOP/s, 0.50 of its node's median 700.0, "
                            "0.50 of the job's median 700.0"]
    # Summed per node (the CPU verdict), the same GPU moves its node by 6%, far inside min_fraction.
    summed = NodeVerdict([NodeHealth(0, "n0", [], 5600.0, None), NodeHealth(1, "n1", [], 5250.0, None)], 0.8, None)
    assert summed.flagged_hosts == []


def test_a_node_whose_gpus_are_all_slow_is_judged_on_the_jobs_median():
    even = [700.0] * 8
    v = verdict(gpus(even, even, [665.0] * 8))  # every GPU of node 2 is 5% slow
    assert v.shares(v.gpus[16]) == (1.0, 0.95)  # its own median hides it; the job's does not
    assert v.flagged_hosts == []  # 5% is within health.min_fraction=0.8
    assert verdict(v.gpus, min_fraction=0.97).flagged_hosts == ["n2"]
    slow = verdict(gpus(even, even, [420.0] * 8))  # a whole node at 60%
    assert slow.flagged_hosts == ["n2"] and len(slow.problems()) == 8
    assert slow.as_dict()["nodes"][2] == {"node": 2, "host": "n2", "ranks": list(range(16, 24)),
                                          "median_tflops": 420.0, "fraction": 0.6, "intra_busbw_gbps": None,
                                          "storage": None}


def test_one_gpu_per_node_has_no_intra_node_bus_and_is_judged_all_the_same():
    """2 nodes x 1 GPU: no node has two ranks to measure its bus with, so there is no intra-node figure at all."""
    v = verdict(gpus([700.0], [350.0]), bus=BusBandwidth(128 << 20, {}, 45.0))
    assert v.flagged_hosts == ["n1"] and v.problems() == [
        "GPU 0 of node 1 (n1, rank 1): 350.0 TFLOP/s, 1.00 of its node's median 350.0, 0.67 of the job's median 525.0"]
    assert verdict(gpus([700.0], [700.0]), bus=BusBandwidth(128 << 20, {}, 45.0)).problems() == []


def test_gpu_storage_and_a_slow_intra_node_bus_flag_their_node():
    figures = gpus([700.0] * 2, [700.0] * 2, [700.0] * 2)
    figures[1] = GpuHealth(1, 0, "n0", 1, 700.0, "OSError: read-only")
    bus = BusBandwidth(128 << 20, {0: 360.0, 1: 120.0, 2: 355.0}, 45.0)
    v = verdict(figures, bus=bus)
    assert v.flagged_hosts == ["n0", "n1"]
    assert v.problems() == ["node 0 (n0, rank 1): storage: OSError: read-only",
                            "node 1 (n1): intra-node busbw 120.0 GB/s, 0.34 of the median node's 355.0"]
    assert v.summary() == ("health: 6 GPU(s) on 3 node(s), bfloat16 8192x8192 matmul 700.0-700.0 TFLOP/s per GPU "
                           "(job median 700.0); all-reduce of 128 MiB, nccl-tests busbw: intra-node 120.0-360.0 GB/s "
                           "inter-node 45.0 GB/s; checks took 2.5 s")
    record = json.loads(json.dumps(v.as_dict()))
    assert record["gpus"][1]["of_node"] == 1.0 and record["bus"]["inter_gbps"] == 45.0
    assert record["flagged"] == ["n0", "n1"]


# nccl-tests' all_reduce_perf rows for 128 MiB (out-of-place), as published in users' reports: n ranks, time (us),
# algbw and busbw (GB/s). busbw/algbw = 2(n-1)/n gives n.
NCCL_TESTS_ROWS = [(2, 1833.5, 73.20, 73.20), (4, 1119.32, 119.91, 179.87), (8, 386.9, 346.95, 607.15),
                   (8, 592.8, 226.39, 396.19), (16, 1615.8, 83.07, 155.75)]


@pytest.mark.parametrize("n, us, algbw, busbw", NCCL_TESTS_ROWS)
def test_bus_bandwidth_is_nccl_tests_busbw(n, us, algbw, busbw):
    ours = bus_bandwidth_gbps(n, 134217728, us / 1e3)
    printed = pytest.approx  # nccl-tests prints the time to 4-5 digits and the bandwidths to 0.01
    assert ours == printed(busbw, rel=2e-4, abs=0.01)
    assert ours * n / (2 * (n - 1)) == printed(algbw, rel=2e-4, abs=0.01)  # algbw: bytes over time
    assert bus_bandwidth_gbps(1, 134217728, us / 1e3) is None  # one rank moves nothing


def test_bus_groups_are_each_node_and_the_whole_job():
    assert bus_groups([0, 0, 0, 0, 1, 1, 1, 1]) == ([[0, 1, 2, 3], [4, 5, 6, 7]], list(range(8)))
    assert bus_groups([0, 0]) == ([[0, 1]], None)  # one node: nothing crosses nodes
    assert bus_groups([0, 1, 2]) == ([[0], [1], [2]], [0, 1, 2])  # one rank per node: nothing within


def test_a_groups_bus_time_is_its_slowest_members():
    times = [{"intra": 1.0, "inter": 2.0}, {"intra": 1.0, "inter": 2.0}, {"intra": 1.0, "inter": 2.0},
             {"intra": 4.0, "inter": 8.0}]
    bus = bus_figures([0, 0, 1, 1], 128 << 20, times)
    assert bus.intra_gbps == {0: pytest.approx(134.22, abs=0.01), 1: pytest.approx(33.55, abs=0.01)}
    assert bus.inter_gbps == pytest.approx(25.17, abs=0.01)  # 4 ranks: algbw 16.78 GB/s x 1.5
    assert bus_figures([0, 1], 1 << 20, [{"inter": 1.0}, {"inter": 1.0}]).intra_gbps == {}  # one rank per node


def test_matmul_chunks_fill_their_time():
    assert matmul_iterations(0.0015, 0.02) == 13  # an H100's 8192^3 bf16 (~730 TFLOP/s) in a 20 ms chunk
    assert matmul_iterations(0.5, 0.02) == 3  # a GPU too slow for the chunk: still more than one launch
    assert HealthConfig().gpu_matmul_size >= 8192 and HealthConfig().bus_mib >= 128


@pytest.mark.parametrize("key, value, valid", [("gpu_matmul_size", 4096, ">= 8192"), ("bus_mib", 1, ">= 128"),
                                               ("gpu_seconds", 0, "> 0")])
def test_gpu_sizes_below_what_saturates_are_refused(key, value, valid):
    with pytest.raises(ConfigError, match=f"health.{key}={value} is not valid: .*{valid}"):
        HealthConfig(**{key: value}).validate()


# --- GPUs: the measuring code, walked on CPU (wall-time clock, gloo) -----------------------------------------

def test_gpu_matmul_walks_on_cpu_in_bf16():
    cpu = torch.device("cpu")
    assert gpu_dtype(cpu) == torch.bfloat16
    assert gpu_matmul_tflops(cpu, 128, 0.05, 2) > 0


def test_the_slow_node_drag_makes_the_device_do_three_times_the_work(monkeypatch):
    """With a device whose time is its work (this machine's wall time is shared with other tests), drag=3 is a third
    of the speed, whatever count the sizing chose."""
    monkeypatch.setattr(health, "timed_matmuls", lambda a, b, out, count: count * 1e-3)
    fast = gpu_matmul_tflops(torch.device("cpu"), 64, 0.01, 2)
    assert fast == pytest.approx(2 * 64**3 / 1e-3 / 1e12)
    assert gpu_matmul_tflops(torch.device("cpu"), 64, 0.01, 2, drag=3.0) == pytest.approx(fast / 3)


WORLD, NODES = 4, [0, 0, 1, 1]
SMALL = HealthConfig(gpu_matmul_size=64, gpu_seconds=0.05, rounds=1, bus_mib=1)


def _worker(rank: int, store: str, run_dir: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    env = DistEnv(rank=rank, world_size=WORLD, local_rank=rank % 2, local_world_size=2, node_rank=NODES[rank],
                  num_nodes=2, hostname=f"n{NODES[rank]}")
    v = measure_gpus(SMALL, env, torch.device("cpu"), Path(run_dir))
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"record": v.as_dict(), "summary": v.summary()}, f)
    dist.destroy_process_group()


@pytest.mark.slow
def test_measure_gpus_over_gloo_gathers_every_gpu_and_measures_both_buses(tmp_path):
    """The code path, not the figures: four ranks measured at once share this machine's cores (which is why the CPU
    check takes turns), so who is slower here is noise; the judgement is tested on figures above."""
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path), str(tmp_path / "out.json")), nprocs=WORLD,
             join=True)
    out = json.loads((tmp_path / "out.json").read_text())
    record = out["record"]
    assert [g["rank"] for g in record["gpus"]] == [0, 1, 2, 3] and [g["node"] for g in record["gpus"]] == NODES
    assert all(g["tflops"] > 0 and g["device"] is None and g["storage"] is None for g in record["gpus"])
    assert sorted(record["bus"]["intra_gbps"]) == ["0", "1"] and record["bus"]["inter_gbps"] > 0
    assert record["bus"]["nbytes"] == 1 << 20
    assert "nccl-tests busbw: intra-node" in out["summary"] and "inter-node" in out["summary"]


def _turns_worker(rank: int, store: str, run_dir: str, out: str, figures: list[list[float]]) -> None:
    """One rank per node; `figures[node]` are the figures its turns give, in order: fixed, so that the rounds' logic
    is what is tested."""
    from launch.recovery import health

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=len(figures))
    turns = []

    def turn(*args, **kwargs) -> float:
        turns.append(figures[rank][len(turns)])
        return turns[-1]

    health.matmul_gflops = turn
    nodes = health.measure_nodes(HealthConfig(rounds=3), rank, len(figures), f"n{rank}", rank, torch.device("cpu"),
                                 "fp32", Path(run_dir))
    json.dump({"turns": len(turns), "gflops": [n.gflops for n in nodes]}, open(f"{out}.{rank}", "w"))
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("figures, turns, best, flagged", [
    # node 2 is slowed by load from elsewhere on its first turn only, node 3 is slow on every turn
    ([[100.0] * 3, [100.0] * 3, [50.0, 100.0, 100.0], [10.0] * 3], [1, 1, 2, 3], [100.0, 100.0, 100.0, 10.0],
     ["n3"]),
    # a load spike on node 0's one turn brings it near the slow node 2: against the median of that round nobody
    # would take another turn and node 2 would pass (what a CI run once saw); against the fastest both go again
    ([[20.0, 100.0, 100.0], [100.0] * 3, [16.0] * 3], [2, 1, 3], [100.0, 100.0, 16.0], ["n2"]),
], ids=["spike-and-slow", "spike-hides-slow"])
def test_only_a_node_below_the_bar_takes_another_turn(tmp_path, figures, turns, best, flagged):
    """A healthy job pays one turn per node; a node below min_fraction of the fastest is measured again, up to
    health.rounds, keeping its best: a load spike passes, a slow node stays slow."""
    mp.spawn(_turns_worker, args=(str(tmp_path / "store"), str(tmp_path), str(tmp_path / "out"), figures),
             nprocs=len(figures), join=True)
    outs = [json.loads((tmp_path / f"out.{r}").read_text()) for r in range(len(figures))]
    assert [o["turns"] for o in outs] == turns
    assert all(o["gflops"] == best for o in outs)
    nodes = [NodeHealth(n, f"n{n}", [n], g, None) for n, g in enumerate(best)]
    assert NodeVerdict(nodes, 0.8, None).flagged_hosts == flagged
