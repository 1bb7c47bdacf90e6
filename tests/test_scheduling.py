"""How `make test` shares the tests among its xdist workers (tests/scheduling.py): Slurm tests beside the others
while both remain, then every worker on what is left."""
from __future__ import annotations

from scheduling import SlurmBesideCpuScheduling

SLURM = [f"tests/slurm/test_s.py::test_{i}" for i in range(4)]
OTHER = [f"tests/gpt/test_c.py::test_{i}" for i in range(6)]


class Config:
    """What the scheduler reads of pytest's config: the workers (--tx, as -n N sets it) and --maxschedchunk."""

    def __init__(self, workers: int):
        self.workers = workers

    def getvalue(self, name: str) -> list[str]:
        assert name == "tx"
        return [f"{self.workers}*popen"]

    def getoption(self, name: str) -> None:
        assert name == "maxschedchunk"


class Worker:
    """What the scheduler uses of xdist's WorkerController."""

    shutting_down = False

    def __init__(self, name: str):
        self.gateway = type("Gateway", (), {"id": name})()
        self.sent: list[int] = []

    def send_runtest_some(self, indices: list[int]) -> None:
        self.sent.extend(indices)

    def shutdown(self) -> None:
        self.shutting_down = True


def start(workers: int) -> tuple[SlurmBesideCpuScheduling, list[Worker]]:
    sched = SlurmBesideCpuScheduling(Config(workers))
    nodes = [Worker(f"gw{i}") for i in range(workers)]
    for node in nodes:
        sched.add_node(node)
        sched.add_node_collection(node, SLURM + OTHER)
    sched.schedule()
    return sched, nodes


def kinds(sched, node) -> str:
    return "".join("s" if sched.is_slurm(i) else "c" for i in sched.node2pending[node])


def finish(sched, node) -> None:
    sched.mark_test_complete(node, sched.node2pending[node][0], duration=30.0)


def test_one_worker_runs_slurm_tests_beside_the_others_until_they_run_out():
    sched, (a, b) = start(2)
    assert (kinds(sched, a), kinds(sched, b)) == ("ss", "cc")  # each holds one test beyond the one it runs
    for _ in range(4):
        finish(sched, b)
    assert (kinds(sched, a), kinds(sched, b)) == ("ss", "cc")
    finish(sched, a)
    assert kinds(sched, a) == "ss"  # the Slurm worker keeps the Slurm tests
    finish(sched, b), finish(sched, b)
    assert kinds(sched, b) == "s"  # no other test is left: the second worker takes a Slurm test too
    assert not sched.pending and sorted(a.sent + b.sent) == list(range(len(SLURM + OTHER)))


def test_with_three_workers_two_run_slurm_tests():
    sched, nodes = start(3)
    assert [kinds(sched, n) for n in nodes] == ["ss", "ss", "cc"]


def test_the_tests_of_a_module_with_one_shared_run_go_to_one_worker():
    budget = [f"tests/slurm/test_control_plane_budget.py::test_{i}" for i in range(3)]
    sched = SlurmBesideCpuScheduling(Config(2))
    nodes = [Worker(f"gw{i}") for i in range(2)]
    for node in nodes:
        sched.add_node(node)
        sched.add_node_collection(node, budget + SLURM)  # no other test: both workers take Slurm tests
    sched.schedule()
    holders = [n for n in nodes if any(i < len(budget) for i in n.sent)]
    assert len(holders) == 1 and sorted(i for i in holders[0].sent if i < len(budget)) == [0, 1, 2]
