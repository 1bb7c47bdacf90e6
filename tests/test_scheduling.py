"""How `make test` shares the tests among its xdist workers (tests/scheduling.py): Slurm tests beside the others
while both remain, then every worker on what is left."""
from __future__ import annotations

from scheduling import SlurmBesideCpuScheduling, longest_slurm_tests_first

SLURM = [f"tests/slurm/test_s.py::test_{i}" for i in range(4)]
OTHER = [f"tests/gpt/test_c{i}.py::test" for i in range(6)]  # one test per module: a unit each


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


def start(workers: int, collection: list[str] = SLURM + OTHER) -> tuple[SlurmBesideCpuScheduling, list[Worker]]:
    sched = SlurmBesideCpuScheduling(Config(workers))
    nodes = [Worker(f"gw{i}") for i in range(workers)]
    for node in nodes:
        sched.add_node(node)
        sched.add_node_collection(node, collection)
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


def test_a_module_goes_to_one_worker_and_the_next_unit_waits_for_its_last_test():
    """A module's tests (its module-scoped run built once) go together; the worker gets nothing more until it
    starts the module's last test, however quick the tests before it were."""
    module = [f"tests/gpt/parallel/test_m.py::test_{i}" for i in range(3)]
    sched, (a, b) = start(2, module + OTHER)
    assert a.sent == [0, 1, 2]
    sched.mark_test_complete(a, 0, duration=0.01)
    assert sched.node2pending[a] == [1, 2]  # xdist's own rule would send more after a quick test
    sched.mark_test_complete(a, 1, duration=0.01)
    assert len(sched.node2pending[a]) == 2 and sched.node2pending[a][0] == 2


def test_the_modules_that_read_the_strategy_runs_are_one_unit():
    """Each configuration of tests/gpt/parallel/strategy_runs.py trains once per worker: the modules that read them
    go to one worker, so that each trains once in the session."""
    shared = ["tests/gpt/parallel/test_equivalence.py::test_a[ddp]", "tests/gpt/parallel/test_layout.py::test_b[ddp]",
              "tests/gpt/parallel/test_tp_dropout.py::test_c"]
    sched, nodes = start(3, shared + OTHER)
    holders = [n for n in nodes if any(i < len(shared) for i in n.sent)]
    assert len(holders) == 1 and sorted(i for i in holders[0].sent if i < len(shared)) == [0, 1, 2]


class Item:
    def __init__(self, nodeid: str, slow: bool = False, timeout: float | None = None):
        self.nodeid, self.marks = nodeid, {"slow": slow, "timeout": timeout}

    def get_closest_marker(self, name: str):
        value = self.marks[name]
        return type("Mark", (), {"args": (value,) if name == "timeout" else ()})() if value else None


def test_slurm_tests_go_longest_first_then_the_units_with_the_most_training_each_together():
    items = [Item("tests/gpt/test_light.py::test_0"), Item("tests/slurm/test_s.py::test_short", timeout=60),
             Item("tests/gpt/parallel/test_heavy.py::test_0", slow=True), Item("tests/gpt/test_light.py::test_1"),
             Item("tests/gpt/parallel/test_heavy.py::test_1", slow=True), Item("tests/slurm/test_s.py::test_long",
                                                                          timeout=600)]
    longest_slurm_tests_first(items)
    assert [i.nodeid for i in items] == [
        "tests/slurm/test_s.py::test_long", "tests/slurm/test_s.py::test_short", "tests/gpt/parallel/test_heavy.py::test_0",
        "tests/gpt/parallel/test_heavy.py::test_1", "tests/gpt/test_light.py::test_0", "tests/gpt/test_light.py::test_1"]
