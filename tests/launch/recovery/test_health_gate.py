"""The health gate: a GPU run is judged per GPU (its record holds every GPU and the bus figures), and a node named
for one sick GPU is excluded as a slow CPU node is; a CPU run keeps the per-node check."""
from __future__ import annotations

import json

import torch

from gpt.config.sections import DebugConfig, HealthConfig
from gpt.collectives.process_group import DistEnv
from launch.recovery.health_verdict import BusBandwidth, GpuHealth, GpuVerdict
from gpt.run_folder import RunFolder
from launch.recovery import health_gate
from launch.rank.job_env import JobEnvironment


class Requeues(JobEnvironment):
    excluded: list[str] | None = None

    def requeue_excluding(self, hosts: list[str], max_restarts: int) -> tuple[bool, str]:
        self.excluded = hosts
        return True, f"requeued without {', '.join(hosts)}"


def gate(run_dir, device: torch.device, job: JobEnvironment, action: str = "exclude") -> bool:
    return health_gate.check_health(run_dir, DistEnv(), job, 1, device, None, health=HealthConfig(action=action, rounds=1),
                                    debug=DebugConfig(), precision="fp32", restarts=3)


def test_a_gpu_run_is_judged_per_gpu_and_a_node_with_a_sick_gpu_is_excluded(tmp_path, monkeypatch):
    figures = [GpuHealth(r, r // 4, f"n{r // 4}", r % 4, 700.0, None) for r in range(8)]
    figures[6] = GpuHealth(6, 1, "n1", 2, 300.0, None)
    seen = []

    def measure_gpus(cfg, env, device, run_dir, slow):
        seen.append(device)
        return GpuVerdict(figures, cfg.min_fraction, BusBandwidth(128 << 20, {0: 360.0, 1: 361.0}, 45.0),
                          "bfloat16 8192x8192", 2.0)

    monkeypatch.setattr(health_gate, "measure_gpus", measure_gpus)
    job = Requeues()
    assert gate(tmp_path, torch.device("cuda", 0), job) is True
    assert seen == [torch.device("cuda", 0)] and job.excluded == ["n1"]
    record = json.loads(RunFolder(tmp_path).health_record(1).read_text())
    assert len(record["gpus"]) == 8 and record["flagged"] == ["n1"] and record["bus"]["inter_gbps"] == 45.0
    (line,) = RunFolder(tmp_path).attempts.read()
    assert line.ended == "excluded n1" and line.extra["health"]["gpus"][6]["of_node"] == 0.429


def test_a_cpu_run_keeps_the_per_node_check(tmp_path, monkeypatch):
    def measure_gpus(*args):
        raise AssertionError("a CPU run took the GPU path")

    monkeypatch.setattr(health_gate, "measure_gpus", measure_gpus)
    assert gate(tmp_path, torch.device("cpu"), JobEnvironment(), action="warn") is False
    record = json.loads(RunFolder(tmp_path).health_record(1).read_text())
    assert "gpus" not in record and record["nodes"][0]["gflops"] > 0 and record["flagged"] == []


def test_an_in_job_restart_measures_only_the_nodes_new_to_the_attempt(tmp_path, monkeypatch):
    """Round 0 measures every node and keeps the figures; a later round (an in-job restart) reuses them for the
    nodes that ran before and measures only a new one (a spare), judged against them."""
    timed = []
    monkeypatch.setattr("launch.recovery.health.matmul_gflops", lambda *a, **k: timed.append(1) or 40.0)
    round0 = JobEnvironment({"GPTLAUNCH_ROUND": "0"})
    assert gate(tmp_path, torch.device("cpu"), round0, action="warn") is False
    assert len(timed) == 1  # one node, one round
    figures = json.loads(next((tmp_path / "rounds").glob("*/health.json")).read_text())
    assert list(figures.values()) == [40.0]

    timed.clear()
    assert gate(tmp_path, torch.device("cpu"), JobEnvironment({"GPTLAUNCH_ROUND": "1"}), action="warn") is False
    assert timed == []  # the same node: its figure from round 0, no turn taken
    record = json.loads(RunFolder(tmp_path).health_record(1).read_text())
    assert record["nodes"][0]["gflops"] == 40.0 and record["flagged"] == []
