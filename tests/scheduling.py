"""How `make test` shares the tests among its pytest-xdist workers (tests/conftest.py installs it under -n N).

A test that uses the local Slurm cluster lives under tests/slurm/ (where the `slurm_cluster` fixture is) and
spends most of its time waiting on the scheduler; most other tests keep both CPUs busy. So while both kinds
remain, at most N - 1 workers run Slurm tests and the rest run the others, and the waiting overlaps computing;
when one kind runs out, every worker takes the other. Each worker has a cluster instance of its own
(tests/slurm/conftest.py), so two Slurm tests never share a controller.

Slurm tests go longest first (`longest_slurm_tests_first`: their timeout mark says how long they may take), so
that the last ones to run are short and the workers finish together. Each worker holds at most one test beyond the one it runs (xdist's
--maxschedchunk=1): a worker that is busy for minutes never holds back tests that another could start.
"""
from __future__ import annotations

from xdist.scheduler import LoadScheduling

SLURM_TESTS = "tests/slurm/"
# Modules whose tests read one expensive module-scoped run: a worker that takes one of their tests takes them all,
# so that the run happens once (xdist would share them out, and each worker would run it again).
ONE_RUN_MODULES = ("tests/slurm/test_control_plane_budget.py",)


def longest_slurm_tests_first(items: list) -> None:
    """Order the Slurm tests by their timeout mark, longest first (every worker collects this same order).
    Their module fixtures are session-scoped, so the new order sets up nothing twice."""
    def key(item) -> float:
        mark = item.get_closest_marker("timeout")
        return -float(mark.args[0]) if mark and mark.args else 0.0

    slurm = sorted((i for i in items if i.nodeid.startswith(SLURM_TESTS)), key=key)
    items[:] = slurm + [i for i in items if not i.nodeid.startswith(SLURM_TESTS)]


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
        """The test at `index`, with the pending tests that share its module's run (ONE_RUN_MODULES)."""
        module = self.collection[index].split("::")[0]
        if module not in ONE_RUN_MODULES:
            return [index]
        return [index, *(i for i in self.pending if i != index and self.collection[i].split("::")[0] == module)]

    def _send_tests(self, node, num: int) -> None:
        for _ in range(num):
            if not self.pending:
                return
            indices = self.together(self.pick(node))
            for index in indices:
                self.pending.remove(index)
            self.node2pending[node].extend(indices)
            node.send_runtest_some(indices)
