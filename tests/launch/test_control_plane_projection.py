"""benchmarks/control_plane.py's verdicts: each cost fitted against its size (log, linear, or a constant where it
falls) and projected to 4,096 nodes beside its budget; no cluster and no run needed."""
from __future__ import annotations

from benchmarks.control_plane import Measured, fit_growth, project


def measured(nodes: int, ops_per_node: float, rendezvous: float, calls_per_min: float = 0.0) -> Measured:
    return Measured("slurm", nodes, 2 * nodes, 10.0, ops_per_node * nodes, {}, {}, 0, {}, calls_per_min, 2.0,
                    rendezvous)


def verdicts(rows: list[Measured]) -> dict[str, tuple[str, bool]]:
    return {p["cost"]: (p["form"], p["holds"]) for p in project(rows)}


def test_flat_per_node_costs_and_a_logarithmic_rendezvous_hold():
    rows = [measured(n, 0.8 + 0.01 * (n == 2), 0.1 + 0.05 * i, 0.5) for i, n in enumerate((1, 2, 4, 8))]
    assert verdicts(rows) == {"fs_ops_per_node_s": ("constant", True), "slurm_calls_per_job_min": ("constant", True),
                              "rendezvous_s": ("log", True)}


def test_per_rank_files_and_a_linear_rendezvous_exceed_their_budgets():
    rows = [measured(n, 4.0 * n, 0.1 * n) for n in (1, 2, 4, 8)]  # every rank's file on every node: grows with n
    assert verdicts(rows)["fs_ops_per_node_s"] == ("linear", False)
    assert verdicts(rows)["rendezvous_s"] == ("linear", False)


def test_a_cost_that_falls_with_the_size_is_projected_as_its_mean():
    fit = fit_growth([1, 2, 4], [12.0, 10.0, 11.0])
    assert (fit.form, fit.at(4096)) == ("constant", 11.0)
