"""How `make test` shares the tests among its pytest-xdist workers (tests/conftest.py installs it under -n N).

A test that uses the local Slurm cluster lives under tests/slurm/ (where the `slurm_cluster` fixture is) and
spends most of its time waiting on the scheduler; most other tests keep both CPUs busy. So while both kinds
remain, at most N - 1 workers run Slurm tests and the rest run the others, and the waiting overlaps computing;
when one kind runs out, every worker takes the other. Each worker has a cluster instance of its own
(tests/slurm/conftest.py), so two Slurm tests never share a controller.

Slurm tests go longest first (`longest_slurm_tests_first`: their timeout mark says how long they may take), so
that the last ones to run are short and the workers finish together. A worker takes the tests of one unit at once
(`unit_of`: the other tests go by module, so that a module's expensive fixture is built on one worker only), and
its next unit only as it starts the last test of the one it holds: a worker that is busy for minutes never holds
back tests that another could start.
"""
from __future__ import annotations

from xdist.scheduler import LoadScheduling

SLURM_TESTS = "tests/slurm/"
# Slurm modules whose tests read one expensive module-scoped run: a worker that takes one of their tests takes them
# all, so that the run happens once (xdist would share them out, and each worker would run it again).
ONE_RUN_MODULES = ("tests/slurm/test_control_plane_budget.py", "tests/slurm/test_large_sweep.py")
# Modules that read the same session-cached training runs (tests/gpt/parallel/strategy_runs.py: each configuration
# trains once per worker): one unit, so that each configuration trains once in the whole session.
STRATEGY_RUNS = ("tests/gpt/parallel/test_equivalence.py", "tests/gpt/parallel/test_layout.py",
                 "tests/gpt/parallel/test_tp_dropout.py", "tests/gpt/parallel/test_hf_export_layouts.py",
                 "tests/gpt/parallel/test_memory_held.py")


def unit_of(nodeid: str) -> str:
    """What one worker takes at once. A Slurm test alone (or its module, in ONE_RUN_MODULES); any other test with
    its whole module, so that module-scoped fixtures (a training run, a prepared corpus) are built once."""
    module = nodeid.split("::")[0]
    if module.startswith(SLURM_TESTS):
        return module if module in ONE_RUN_MODULES else nodeid
    return "strategy_runs" if module in STRATEGY_RUNS else module


def longest_slurm_tests_first(items: list) -> None:
    """Order the Slurm tests by their timeout mark, longest first (every worker collects this same order).
    Their module fixtures are session-scoped, so the new order sets up nothing twice. Then the other units, those
    with the most `slow` tests (the ones that train) first, each unit's tests together in their own order."""
    def key(item) -> float:
        mark = item.get_closest_marker("timeout")
        return -float(mark.args[0]) if mark and mark.args else 0.0

    slurm = sorted((i for i in items if i.nodeid.startswith(SLURM_TESTS)), key=key)
    other = [i for i in items if not i.nodeid.startswith(SLURM_TESTS)]
    slow: dict[str, int] = {}
    for i in other:
        slow[unit_of(i.nodeid)] = slow.get(unit_of(i.nodeid), 0) + bool(i.get_closest_marker("slow"))
    units = sorted(slow, key=lambda u: -slow[u])
    items[:] = slurm + sorted(other, key=lambda i: units.index(unit_of(i.nodeid)))


class SlurmBesideCpuScheduling(LoadScheduling):
    """xdist's `load` scheduling, with the choice of the next test made by kind (see the module's docstring)."""

    def __init__(self, config, log=None):
        super().__init__(config, log)
        self.maxschedchunk = 1
        self.slurm_workers = max(1, self.numnodes - 1)

    def is_slurm(self, index: int) -> bool:
        return self.collection[index].startswith(SLURM_TESTS)

    def runs_slurm(self, node) -> bool:
        return any(self.is_slurm(i) for i in self.node2pending[node])

    def pick(self, node) -> int:
        slurm = [i for i in self.pending if self.is_slurm(i)]
        other = [i for i in self.pending if not self.is_slurm(i)]
        slurm_nodes = sum(self.runs_slurm(n) for n in self.node2pending)
        if slurm and (not other or self.runs_slurm(node) or slurm_nodes < self.slurm_workers):
            return slurm[0]
        return other[0]

    def together(self, index: int) -> list[int]:
        """The test at `index`, with the pending tests of its unit (`unit_of`)."""
        unit = unit_of(self.collection[index])
        return [index, *(i for i in self.pending if i != index and unit_of(self.collection[i]) == unit)]

    def check_schedule(self, node, duration: float = 0) -> None:
        """A worker gets its next unit while it runs the last test of the one it holds (xdist runs a test once it
        knows the next), and no sooner: a unit can take minutes, and another worker may be free first."""
        if node.shutting_down:
            return
        if not self.pending:
            node.shutdown()
        elif len(self.node2pending[node]) < 2:
            self._send_tests(node, 2)

    def _send_tests(self, node, num: int) -> None:
        """Up to `num` units, until the worker holds two tests: one to run, one beyond it."""
        for _ in range(num):
            if not self.pending or len(self.node2pending[node]) >= 2:
                return
            indices = self.together(self.pick(node))
            for index in indices:
                self.pending.remove(index)
            self.node2pending[node].extend(indices)
            node.send_runtest_some(indices)
