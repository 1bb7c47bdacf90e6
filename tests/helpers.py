"""Shared test helpers, imported by name from any test (setup.cfg puts tests/ on the path): run `python -m launch`
as a user would, read what a run folder holds, and compose configs as the app does."""
from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
# Compiled test runs share one Inductor cache (train.compile_cache_dir) rather than each run folder's own: a block
# graph one test compiled (minutes of CPU on two ranks) is loaded by the next test that compiles the same graph.
# Inductor's keys hold torch's version and the graph, so a hit is never stale. A test of the per-run cache itself
# names its own (train.compile_cache_dir=null: the run folder's).
SITE_DIR = "GPTLAUNCH_SITE_DIR"  # hydra_plugins/gptlaunch_site: a folder on Hydra's search path
SHARED_COMPILE_CACHE = Path(tempfile.gettempdir()) / "gptlaunch-tests-inductor"


def with_shared_compile_cache(overrides) -> list[str]:
    compiles = any(o in ("train.compile=true", "train=gpu") for o in overrides)
    named = any(o.startswith("train.compile_cache_dir=") for o in overrides)
    return [*overrides, f"train.compile_cache_dir={SHARED_COMPILE_CACHE}"] if compiles and not named else list(overrides)


def spread(argnames: str, params, keep: int) -> list:
    """`params` of `parametrize(argnames, ...)` for `make test`; `keep` of them, evenly spread, for `make test-fast`
    (the others marked slow): a long table of cases that each cost a compose or a model build keeps a sample in the
    quick slice."""
    params, step, several = list(params), max(1, -(-len(params) // keep)), "," in argnames

    def slow(p):
        if isinstance(p, type(pytest.param(None))):  # already a pytest.param: its marks and id kept
            return pytest.param(*p.values, marks=[*p.marks, pytest.mark.slow], id=p.id)
        return pytest.param(*(p if several else (p,)), marks=pytest.mark.slow)
    return [p if i % step == 0 else slow(p) for i, p in enumerate(params)]


def wait_until(check, timeout: float = 120, what: str = "", poll_s: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(poll_s)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PlainValues:
    """A manager's shared dict that takes plain values only. torch.multiprocessing sends a tensor as a shared-memory
    file descriptor which the manager fetches from the sender afterwards, a race with the sender's next step (CI saw
    the manager's connection close mid-call): a rank puts `t.tolist()` there instead."""

    def __init__(self, proxy) -> None:
        self._proxy = proxy

    def __setitem__(self, key, value) -> None:
        if _holds_tensor(value):
            raise TypeError(f"out[{key!r}]: a tensor; put plain values (t.tolist(), t.item()) in the shared dict")
        self._proxy[key] = value

    def __getitem__(self, key):
        return self._proxy[key]

    def __contains__(self, key) -> bool:
        return key in self._proxy

    def get(self, key, default=None):
        return self._proxy.get(key, default)


def _holds_tensor(value) -> bool:
    import torch

    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, dict):
        return any(_holds_tensor(k) or _holds_tensor(v) for k, v in value.items())
    return isinstance(value, (list, tuple, set, frozenset)) and any(_holds_tensor(v) for v in value)


def spawn_ranks(rank_fn, world: int, given: dict | None = None) -> dict:
    """`rank_fn(rank, world, port, out)` in `world` processes of a real process group on loopback (`port` free for
    its store); what they put in the shared dict `out` (plain values, `PlainValues`), by key (`out` holds `given`
    when they start)."""
    import multiprocessing

    import torch.multiprocessing as mp

    # the manager in a fresh interpreter: forked from this torch-laden process, its garbage collector once ran a
    # torch object's C++ destructor it inherited and aborted the manager ("std::system_error"), failing the test
    with multiprocessing.get_context("spawn").Manager() as manager:
        out = manager.dict(given or {})
        mp.spawn(rank_fn, args=(world, free_port(), PlainValues(out)), nprocs=world, join=True)
        return dict(out)


def launch(*overrides: str, run_dir: Path, check: bool = True, timeout: float = 600,
           env: dict[str, str] | None = None, multirun: bool = False) -> subprocess.CompletedProcess:
    """Run `python -m launch [-m]` with Hydra overrides into `run_dir` (a sweep: into hydra.sweep.dir): in this test
    process (`launch_here`), or, with `env` (read as the ranks' modules load), as a process of its own (within
    `timeout`; in this process, the test's own timeout mark bounds it)."""
    where = f"hydra.sweep.dir={run_dir}" if multirun else f"hydra.run.dir={run_dir}"
    args = [*(["-m"] if multirun else []), where, "train.progress=false", *with_shared_compile_cache(overrides)]
    cmd = [sys.executable, "-m", "launch", *args]
    if env is None:
        proc = launch_here(args)
    else:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **env})
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def launch_here(args: list[str]) -> subprocess.CompletedProcess:
    """`python -m launch ARGS` as launch.__main__ runs it, in this process: its exit code, and what it and its ranks
    wrote to stdout and stderr. The ranks fork from this process's rank server (launch.rank.forked), started by its
    first launch: each later launch saves starting an interpreter and the server's imports (3-4 CPU-seconds, most
    of a test's small run). What this process had (argv, environment, streams, logging, Hydra's state, umask) is put
    back."""
    import logging

    from hydra.core.global_hydra import GlobalHydra

    from launch import app

    root, environ, argv, streams = logging.getLogger(), dict(os.environ), sys.argv, (sys.stdout, sys.stderr)
    handlers, level, fds, cwd = root.handlers[:], root.level, (os.dup(1), os.dup(2)), os.getcwd()
    umask = os.umask(0o022)  # the launcher sets its own (gpt.run_folder.keep_to_user)
    os.umask(umask)
    code: int | str | None = 0
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        for stream in streams:
            stream.flush()
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        sys.stdout, sys.stderr = open(1, "w", buffering=1, closefd=False), open(2, "w", buffering=1, closefd=False)
        sys.argv = ["launch", *args]
        os.chdir(REPO)
        GlobalHydra.instance().clear()
        try:
            app.main()
        except SystemExit as e:
            code = e.code
        except Exception:  # as the interpreter would end: the traceback on stderr, exit code 1 (pytest's own end passes)
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            GlobalHydra.instance().clear()
            for handler in set(root.handlers) - set(handlers):
                handler.close()
            root.handlers[:], root.level = handlers, level
            sys.argv, (sys.stdout, sys.stderr) = argv, streams
            os.chdir(cwd)
            os.umask(umask)
            os.environ.clear()
            os.environ.update(environ)
            for fd, saved in zip((1, 2), fds):
                os.dup2(saved, fd)
                os.close(saved)
        texts = [(f.seek(0), f.read().decode(errors="replace"))[1] for f in (out, err)]
    if isinstance(code, str):  # sys.exit("message"): printed, exit code 1
        texts[1] += code + "\n"
    returncode = code if isinstance(code, int) else 0 if code is None else 1
    return subprocess.CompletedProcess([sys.executable, "-m", "launch", *args], returncode, *texts)


def whole_lines(path: Path) -> list[str]:
    """The lines of a file another process may be appending to, up to its last newline: a record read while it is
    written (the page cache shows it a page at a time) is left for the next read."""
    text = path.read_text()
    return text[:text.rfind("\n") + 1].splitlines()


def read_metrics(run_dir: Path, rank: int = 0, kind: str = "train") -> list[dict]:
    lines = whole_lines(run_dir / "metrics" / f"rank{rank}.jsonl")
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def losses(run_dir: Path, rank: int = 0) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir, rank)]


def compose(*overrides: str):
    """The config `python -m launch OVERRIDES` would run, composed by Hydra (no run folder, nothing runs). Hydra
    composes the config groups' choices, then sets each `a.b=value` on the result (its ConfigLoaderImpl, the same
    function in that order): the first step is kept per choice of groups in this process, the second runs on a copy.
    A compose costs 120 ms of CPU, and the quick slice composed about 250 times, a quarter of its CPU."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.core.config_store import ConfigStore
    from hydra.core.override_parser.overrides_parser import OverridesParser

    values = OverridesParser.create().parse_overrides([o for o in overrides if _a_value(o)])
    if any(v.is_sweep_override() for v in values) or os.environ.get(SITE_DIR):  # a site folder a test wrote
        return _hydra_compose(overrides)
    strategies = repr(sorted(ConfigStore.instance().repo.get("strategy", {}).items()))  # a test may register one
    cfg = copy.deepcopy(_composed(tuple(o for o in overrides if not _a_value(o)), strategies))
    ConfigLoaderImpl._apply_overrides_to_config(values, cfg)
    return cfg


def _a_value(override: str) -> bool:
    """`section.key=value` or `top_level_value=...`: a value Hydra sets after composing (not a group's choice, a +,
    ++ or ~ override, a package's @, nor a key of Hydra's own node, which compose drops)."""
    key = override.partition("=")[0]
    if "." not in key:
        return key in _top_level_values()
    return key[0].isalpha() and "@" not in key and not key.startswith("hydra.")


@functools.cache
def _top_level_values() -> frozenset[str]:
    from omegaconf import DictConfig

    defaults = _composed(())
    return frozenset(k for k in defaults if not isinstance(defaults._get_node(k), DictConfig))


@functools.cache
def _composed(groups: tuple[str, ...], strategies: str = ""):
    return _hydra_compose(groups)


def _hydra_compose(overrides) -> object:
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))


def make_plan_of(run, run_dir: Path):
    """launch.planning.plan.make_plan with the backend cluster.name names, as the launcher chooses it outside a job."""
    from launch.backends import get_backend
    from launch.planning.plan import make_plan

    return make_plan(run, run_dir, get_backend(run.cluster.name))


def plan(run_dir: Path, *overrides: str) -> Path:
    """What `python -m launch OVERRIDES` plans into `run_dir` (its config.yaml, for a Trainer run in this process)."""
    from launch import launch_config
    from launch.planning.plan import absolute_paths

    make_plan_of(absolute_paths(launch_config.parse(compose(*overrides))), run_dir)
    return run_dir


@contextlib.contextmanager
def tmpfs(path: Path, size: int) -> Iterator[Path]:
    """A tmpfs of `size` bytes mounted at `path` (made here), as root; unmounted after, with any read-only view a
    test stacked over it."""
    path.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                             text=True)
    assert mounted.returncode == 0, f"this test mounts a small tmpfs as root: {mounted.stderr.strip()}"
    try:
        yield path
    finally:
        while os.path.ismount(path):
            subprocess.run(["umount", "-l", str(path)], check=True)


def read_only(mount: Path) -> None:
    """New opens under `mount` fail with EROFS: a read-only bind mount over it (a file a process keeps open for
    writing makes the file system itself refuse `remount,ro`: EBUSY)."""
    subprocess.run(["mount", "--bind", str(mount), str(mount)], check=True)
    subprocess.run(["mount", "-o", "remount,bind,ro", str(mount)], check=True)
