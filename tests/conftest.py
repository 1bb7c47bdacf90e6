"""Session fixtures shared by every test folder (helpers live in tests/helpers.py), and how parallel workers
share the tests (tests/scheduling.py)."""
from __future__ import annotations

import os

# Before torch loads: the in-process trainers' idle OpenMP threads sleep, as every rank's do (launch.rank.threads).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402

from launch import launch_config
from helpers import SHAKESPEARE  # noqa: E402

launch_config.register()  # configs/config.yaml composes onto it, in every test that composes
TRAINING_WATCH = pytest.StashKey()


def pytest_configure(config):
    from progress_log import install

    install(config)  # .ci/run's record of failures as they happen


@pytest.fixture(autouse=True)
def no_process_left(request):
    """What a test started ends with it (tests/leftovers.py)."""
    import warnings

    from leftovers import descendants, end_new

    before = descendants()
    yield
    if ended := end_new(before):
        warnings.warn(f"{request.node.nodeid} left {len(ended)} process(es) running, now ended: {ended[:3]}",
                      stacklevel=1)


@pytest.fixture(scope="session")
def data_overrides(tmp_path_factory) -> list[str]:
    """Point runs at the shared corpus and a prepared copy private to this test session."""
    assert SHAKESPEARE.is_file(), f"the test corpus is missing: {SHAKESPEARE}"
    prepared = tmp_path_factory.mktemp("data") / "shakespeare_char"
    return [f"data.text_path={SHAKESPEARE}", f"data.dir={prepared}"]


@pytest.fixture
def prepared_data(data_overrides) -> list[str]:
    """data_overrides, with the corpus already prepared there (whichever test asks first): for a test whose run
    must not print the preparation's progress."""
    from launch import launch_config
    from gpt.data import ensure_prepared
    from helpers import compose

    ensure_prepared(launch_config.parse(compose(*data_overrides)).data)
    return data_overrides


@pytest.fixture
def strict_cuda(monkeypatch):
    """The GPU path on this machine: torch.cuda is tests/cuda_standin.py's StrictCuda (one GPU), and the step's
    clock times tensors that live on the CPU with its events."""
    from cuda_standin import StrictCuda
    from gpt.train import step_timer

    monkeypatch.setattr(step_timer, "stamp_for", lambda device: step_timer.EventStamp)
    return StrictCuda().install(monkeypatch)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`-n N` (make test): Slurm tests beside the others, instead of xdist's plain `load`."""
    if config.getvalue("dist") != "load":
        return None  # the user asked for another distribution
    from scheduling import SlurmBesideCpuScheduling

    return SlurmBesideCpuScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    if os.environ.get("PYTEST_XDIST_WORKER"):  # the order that SlurmBesideCpuScheduling takes them in
        from scheduling import longest_slurm_tests_first

        longest_slurm_tests_first(items)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    """Watch the `python -m launch` runs of a test not marked slow (tests/slow_marks.py), fixtures included."""
    from slow_marks import EXEMPT_MARKS, TrainingWatch

    if not any(item.get_closest_marker(m) for m in EXEMPT_MARKS):
        item.stash[TRAINING_WATCH] = watch = TrainingWatch()
        watch.install()
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    result = yield
    watch = item.stash.get(TRAINING_WATCH, None)
    if watch is not None:
        watch.uninstall()
        if problem := watch.problem(item.nodeid):
            pytest.fail(problem, pytrace=False)
    return result
