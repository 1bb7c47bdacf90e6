"""The report's Nodes table reads GPU health records (per-GPU TFLOP/s, nccl-tests busbw within and across nodes)
as well as CPU ones."""
from __future__ import annotations

from types import SimpleNamespace

from launch.recovery.health_verdict import BusBandwidth, GpuHealth, GpuVerdict, NodeHealth, NodeVerdict
from gpt.run_folder import RunFolder
from launch.report.markdown import node_health


def table_row(run_dir, verdict) -> str:
    verdict.write(RunFolder(run_dir).health_record(1))
    text = node_health(SimpleNamespace(points=[SimpleNamespace(name="pt", path=run_dir)]))
    return text.splitlines()[-1]


def test_a_gpu_record_shows_the_median_gpu_and_both_bus_figures(tmp_path):
    gpus = [GpuHealth(r, r // 2, f"n{r // 2}", r % 2, t, None) for r, t in enumerate([700.0, 710.0, 350.0, 352.0])]
    verdict = GpuVerdict(gpus, 0.8, BusBandwidth(128 << 20, {0: 360.0, 1: 355.5}, 45.25), "bfloat16 8192x8192", 2.0)
    assert table_row(tmp_path, verdict) == "| pt | n0 705.0 (1.34), n1 351.0 (0.67) | 526.0 | 355.5 / 45.2 | n1 | - |"


def test_a_cpu_record_reads_as_before(tmp_path):
    verdict = NodeVerdict([NodeHealth(0, "a", [0], 50.0, None), NodeHealth(1, "b", [1], 20.0, None)], 0.8, 0.79)
    assert table_row(tmp_path, verdict) == "| pt | a 50.0 (1.43), b 20.0 (0.57) | 35.0 | 0.79 | b | - |"


def test_the_excluded_column_names_every_host_a_requeue_left_out(tmp_path):
    """A straggler's requeue without two hosts, a hang's without one more (the job's whole list), a spare in place
    of a lost node: all are in the column, each once, whether or not the point's last attempt ran health checks. A
    health check's host the scheduler would not leave out is not."""
    attempts = RunFolder(tmp_path).attempts
    attempts.append("7", 0, {"ended": "preempted:SIGUSR2", "requeued": True, "straggler": {"host": "gl6-n4"},
                             "note": "requeued job 7 (restart 1 of at most 10), without gl6-n2,gl6-n4 (ExcNodeList)"})
    attempts.append("7", 1, {"ended": "hang", "requeued": True,
                             "note": "requeued job 7 (restart 2 of at most 10), without gl6-n2,gl6-n3,gl6-n4 "
                                     "(ExcNodeList)"})
    attempts.append("7", 2, {"ended": "excluded gl6-n5", "requeued": True,
                             "note": "requeued job 7 (restart 3 of at most 10), but Slurm refused ExcNodeList=x"})
    attempts.append("7", 3, {"ended": "node failure: gl6-n1", "in_job_restart": 1, "replaced": {"gl6-n1": "gl6-n9"},
                             "note": "restart 1 in the job, gl6-n9 replaces gl6-n1"})
    without_checks = node_health(SimpleNamespace(points=[SimpleNamespace(name="pt", path=tmp_path)]))
    assert without_checks.splitlines()[-1] == "| pt | - | - | - | - | gl6-n2, gl6-n4, gl6-n3, gl6-n1 |", without_checks
    verdict = NodeVerdict([NodeHealth(0, "a", [0], 50.0, None), NodeHealth(1, "b", [1], 20.0, None)], 0.8, 0.79)
    assert table_row(tmp_path, verdict).endswith("| b | gl6-n2, gl6-n4, gl6-n3, gl6-n1 |")
