"""No import cycle in launch/ or gpt/, counting every import (a lazy import inside a function hides a cycle
from Python, not from a reader); and the launcher's modules import no torch (a login node plans without it)."""
from __future__ import annotations

import ast
import os
import re
import subprocess
import typing
import sys
from pathlib import Path

import pytest

from helpers import REPO


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for pkg in ("launch", "gpt") for p in (REPO / pkg).rglob("*.py")}
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            targets |= {n for n in names if n in modules and n != name}
        # a package's __init__ is imported with any of its modules, but does not import them back
        edges[name] = {t for t in targets if not name.startswith(t + ".")}
    return edges


def test_no_module_imports_itself_back():
    edges, cycles = graph(), []

    def visit(node: str, path: list[str], seen: set[str]) -> None:
        for nxt in edges[node]:
            if nxt == path[0]:
                cycles.append(" -> ".join([*path, nxt]))
            elif nxt not in seen:
                seen.add(nxt)
                visit(nxt, [*path, nxt], seen)

    for start in edges:
        visit(start, [start], {start})
    assert not cycles, "\n".join(sorted(set(cycles))[:10])
    assert "launch.report.build" in edges and "launch.backends.slurm.submit" in edges


# What runs on a login node: the app, our Hydra launcher, the report, the Slurm backend, the dry run (torch only once it
# builds). None may import torch at import. Nor may the local backend: its ranks' server imports torch once, and a
# launcher that did so too would pay it again.
LAUNCHER_ENTRIES = ["launch.app", "launch.hydra_launcher", "hydra_plugins.gptlaunch_launcher.gptlaunch_launcher",
                    "hydra_plugins.gptlaunch_optuna.gptlaunch_optuna", "launch.optuna_sweep",
                    "launch.planning.plan", "launch.backends.slurm.backend", "launch.backends.srun", "launch.report",
                    "gpt.config.schema", "launch.backends.local", "launch.dry_run"]


def test_the_launcher_imports_no_torch():
    """Each in turn in one interpreter (torch, once imported, stays: the first module that brings it is named)."""
    code = ("import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
            "    if 'torch' in sys.modules:\n        sys.exit(f'{m} imports torch')")
    proc = subprocess.run([sys.executable, "-c", code, *LAUNCHER_ENTRIES], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.slow
def test_gpt_never_imports_launch():
    """gpt/ is what runs in a rank and knows no scheduler: it may not reach into launch/, not even lazily."""
    offenders = sorted(f"{m} -> {t}" for m, targets in graph().items() if m.startswith("gpt")
                       for t in targets if t == "launch" or t.startswith("launch."))
    assert not offenders, offenders
    assert any(t.startswith("gpt.") for t in graph()["launch.rank.worker"])  # the scan sees cross-package imports


# What code outside launch/backends/ may name there: the interface, the neutral job states, and the cluster section
# (the union of the backends' keys, each backend reading its own).
BACKEND_INTERFACE = {"launch.backends", "launch.backends.job_state", "launch.backends.cluster_config"}


def test_the_runs_own_config_holds_no_schedulers_section():
    """gpt/ knows no scheduler, its config neither: what a job asks the scheduler for (`cluster`) and what a sweep
    may cost (`budget`) are the launcher's tree (launch.launch_config), which is the run's with those sections and
    the node count (srun's may be `auto`, the allocation's)."""
    import dataclasses

    from gpt.config.schema import RunConfig
    from launch.backends.cluster_config import ClusterConfig
    from launch.launch_config import LaunchConfig

    own = {f.name for f in dataclasses.fields(RunConfig)}
    assert not own & {"cluster", "budget"}, own
    assert {f.name for f in dataclasses.fields(LaunchConfig)} == own | {"cluster", "budget", "nodes"}
    scheduler_keys = {"partition", "sbatch", "srun_args", "gres", "qos", "account"}
    assert scheduler_keys <= {f.name for f in dataclasses.fields(ClusterConfig)}
    nested = [tp for tp in typing.get_type_hints(RunConfig).values() if dataclasses.is_dataclass(tp)]
    leaks = [(tp.__name__, f.name) for tp in nested for f in dataclasses.fields(tp) if f.name in scheduler_keys]
    assert not leaks, leaks


def test_nothing_outside_the_backends_imports_scheduler_code():
    """The scheduler boundary: outside launch/backends/, no module reaches a backend's own code (Slurm's, or any
    other's), not by an import, a lazy one, or a "module:class" string handed to importlib."""
    named = re.compile(r"launch\.backends\.[\w.]+:\w+")
    own = {module_name(p) for p in (REPO / "launch" / "backends").rglob("*.py")} - BACKEND_INTERFACE
    offenders = []
    for pkg in ("launch", "gpt", "hydra_plugins", "benchmarks"):
        for path in (REPO / pkg).rglob("*.py"):
            if path.is_relative_to(REPO / "launch" / "backends"):
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                elif isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.Constant) and isinstance(node.value, str) and named.fullmatch(node.value):
                    names = [node.value.split(":")[0]]  # importlib's "module:class"
                else:
                    continue
                offenders += [f"{path.relative_to(REPO)}: {n}" for n in names
                              if any(n == m or n.startswith(m + ".") for m in own)]
    assert not offenders, offenders
    assert "launch.backends.slurm.commands" in own and "launch.backends.slurm" in own


@pytest.mark.slow
def test_every_name_imported_from_the_project_exists():
    """An import inside a function runs only on its path (a stock launcher's task, a rare failure): a name moved or
    renamed elsewhere must not wait for that path to fail."""
    import importlib

    missing = []
    for path in [p for pkg in ("launch", "gpt") for p in (REPO / pkg).rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.module and node.level == 0
                    and node.module.split(".")[0] in ("launch", "gpt")):
                continue
            module = importlib.import_module(node.module)
            for alias in node.names:
                if not hasattr(module, alias.name) and importlib.util.find_spec(f"{node.module}.{alias.name}") is None:
                    missing.append(f"{path.relative_to(REPO)}:{node.lineno} {node.module}.{alias.name}")
    assert not missing, missing


def test_a_module_run_as_a_command_defines_everything_before_it_runs():
    """`python -m MODULE` runs its `if __name__ == "__main__":` block where it stands: a function defined below it
    does not exist yet when main() needs it (a NameError on a path the tests may never take)."""
    late = []
    for path in [p for pkg in ("launch", "gpt", "benchmarks") for p in (REPO / pkg).rglob("*.py")]:
        body = ast.parse(path.read_text()).body
        for i, node in enumerate(body):
            if isinstance(node, ast.If) and getattr(getattr(node.test, "left", None), "id", None) == "__name__":
                if i != len(body) - 1:
                    late.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not late, f"code after the main block: {late}"


PLAN_WITHOUT_GPUS = """
import dataclasses, sys
from hydra import compose, initialize_config_dir
from gpt.config import schema
from launch import launch_config
from gpt.errors import ConfigError
from launch.backends import get_backend
from launch.planning.plan import planned_device
from launch.planning.shared_gpu import check_local_gpus
launch_config.register()
with initialize_config_dir(sys.argv[1], version_base="1.3"):
    run = launch_config.parse(compose("config", overrides=["model=tiny"]))
device = planned_device(run, get_backend(run.cluster.name))
try:
    check_local_gpus(dataclasses.replace(run, train=dataclasses.replace(run.train, device="cuda")), "cuda", 1)
except ConfigError as e:
    device += " | " + str(e)
print(device, "| torch imported:", "torch" in sys.modules)
"""


def test_planning_on_a_machine_without_gpus_imports_no_torch():
    """train.device=auto (and =cuda's refusal) on a machine with no GPU to see is told without torch: the local
    launcher's ranks' server imports it once, and a launcher that did too would pay it again on every launch."""
    proc = subprocess.run([sys.executable, "-c", PLAN_WITHOUT_GPUS, str(REPO / "configs")], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.stdout.split(" | ") == ["cpu", "train.device='cuda' is not valid: cpu or auto: this machine has no "
                                        "CUDA GPU for the local ranks", "torch imported: False\n"], proc.stderr
