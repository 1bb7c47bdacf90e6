"""Asynchronous checkpoint staging: each rank copies only the tensors it writes, one stager serves every save of a run (on CUDA, each after its step),
and a run on the CPU makes no CUDA call on a machine that has GPUs (the mirror: CUDA reported available, every call that would open a context raising)."""
from __future__ import annotations

import json
from concurrent.futures import Future

import pytest
import torch
import torch.cuda._pin_memory_utils as pin_memory_utils
from cuda_standin import StrictCuda
from torch.distributed.checkpoint._state_dict_stager import StateDictStager
from torch.distributed.checkpoint.staging import AsyncStager

from gpt.checkpoint.staging import assign_writers
from gpt.checkpoint.store import SAVE_RATE
from gpt.checkpoint.writer import Checkpointer
from gpt.collectives.process_group import DistEnv
from gpt.parallel.base import Strategy
from gpt.parallel.layout import ParallelDims

CONTEXT_OPENERS = {torch: ["Stream"], torch.accelerator: ["synchronize"], pin_memory_utils: ["pin_memory"],
                   torch.cuda: ["Stream", "Event", "current_stream", "stream", "synchronize", "set_device",
                                "current_device", "init", "_lazy_init"]}


@pytest.fixture
def gpu_host(monkeypatch):
    """CUDA looks available, and any call that would open a CUDA context raises."""
    def opener(name: str):
        def opened(*args, **kwargs):
            raise AssertionError(f"{name}: a CUDA call on a CPU run")
        return opened

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    for module, names in CONTEXT_OPENERS.items():
        for name in names:
            monkeypatch.setattr(module, name, opener(name))


def cpu_strategy() -> Strategy:
    torch.manual_seed(0)
    strategy = Strategy(None, DistEnv(), torch.device("cpu"), "fp32", ParallelDims())
    strategy.setup(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2)), 1e-3, 0.1, (0.9, 0.95))
    strategy.model(torch.randn(4, 8)).sum().backward()
    strategy.optimizer.step()
    return strategy


def assert_restores(checkpointer: Checkpointer, path, strategy: Strategy) -> None:
    """Loading `path` brings back the model's weights as they are now."""
    saved = {k: v.clone() for k, v in strategy.model.state_dict().items()}
    for p in strategy.model.parameters():
        p.data.zero_()
    checkpointer.load(path, strategy)
    for key, value in strategy.model.state_dict().items():
        assert torch.equal(value, saved[key]), key


@pytest.mark.parametrize("background", [True, False])
def test_a_cpu_run_saves_without_cuda_on_a_gpu_host(gpu_host, tmp_path, background):
    strategy = cpu_strategy()
    checkpointer = Checkpointer(tmp_path, async_group="local", async_save=background)
    path = checkpointer.save(1, strategy, {})
    checkpointer.close()
    assert_restores(checkpointer, path, strategy)


def test_a_gpu_runs_stager_copies_each_save_after_its_step_into_buffers_it_keeps(tmp_path, monkeypatch):
    """On CUDA (the stand-in; the tensors stay on the CPU) every save is staged on the stager's own stream once the
    step that made the state is done, into pinned buffers pinned once and reused; its copier is closed at the run's
    end alone (torch 2.11's DefaultStager closed it after each save: the second save failed on a GPU)."""
    cuda = StrictCuda().install(monkeypatch)
    pinned, closed = [], []
    monkeypatch.setattr(pin_memory_utils, "pin_memory", lambda ptr, size: pinned.append(ptr))
    monkeypatch.setattr(pin_memory_utils, "unpin_memory", lambda ptr: None)
    monkeypatch.setattr(StateDictStager, "close", lambda self: closed.append(self))
    strategy = cpu_strategy()
    strategy.device = torch.device("cuda", 0)
    checkpointer = Checkpointer(tmp_path, async_group="local", async_save=True)
    pins = None  # after the first save
    for step in (1, 2):
        cuda.run(0.1)  # the step's optimizer update, still on the device
        update_ends = cuda.current_stream().tail
        path = checkpointer.save(step, strategy, {})
        checkpointer.wait_staged()
        stream = checkpointer.stager.inner.stream
        assert stream is not cuda.current_stream() and stream.seen[id(cuda.current_stream())] >= update_ends
        pins = pins or len(pinned)
        assert pinned and len(pinned) == pins and not closed
        checkpointer.wait()
        assert_restores(checkpointer, path, strategy)
        strategy.model(torch.randn(4, 8)).sum().backward()
        strategy.optimizer.step()
    checkpointer.close()
    assert len(closed) == 1


def test_a_gpu_runs_stager_touches_no_gpu_but_the_ranks_own(tmp_path, monkeypatch):
    """The staging thread starts on device 0, as every new thread does. Unless it chooses the rank's GPU before any
    CUDA call, each rank opens a context on GPU 0 (about 0.5 GB each; refused where GPUs are in exclusive-process
    mode, as the stand-in's rank_gpu is): torch.cuda.stream's exit alone sets the thread's device back to 0."""
    cuda = StrictCuda(devices=2, rank_gpu=1).install(monkeypatch)
    cuda.set_device(1)
    strategy = cpu_strategy()
    strategy.device = torch.device("cuda", 1)  # the tensors stay on the CPU; every CUDA call goes to the stand-in
    checkpointer = Checkpointer(tmp_path, async_group="local", async_save=True)
    for step in (1, 2):
        cuda.run(0.1)  # the step's optimizer update, still on the device
        path = checkpointer.save(step, strategy, {})
        checkpointer.wait()
        assert cuda.pinned  # the staging buffers, pinned from the thread on the rank's GPU
        assert_restores(checkpointer, path, strategy)
    checkpointer.close()
    assert cuda.contexts == {1}


def test_replicated_tensors_are_spread_over_their_holders_and_the_rest_stay_with_theirs():
    replicated = {("model", f"w{i}"): 100 for i in range(4)}
    rank0 = {**replicated, ("optim", "m0"): 50}
    rank1 = {**replicated, ("optim", "m1"): 50}  # zero1: each rank's own partition of the moments
    writer = assign_writers([rank0, rank1])
    assert writer[("optim", "m0")] == 0 and writer[("optim", "m1")] == 1
    assert sorted(writer[k] for k in replicated) == [0, 0, 1, 1]


def test_a_gpu_runs_synchronous_save_stages_through_the_asynchronous_saves_pinned_buffers(tmp_path, monkeypatch):
    """A preemption's, time limit's or final save (synchronous) copies the state into the same pinned buffers as the
    run's background saves, once the step is done, and writes from there with several threads."""
    cuda = StrictCuda().install(monkeypatch)
    pinned = []
    monkeypatch.setattr(pin_memory_utils, "pin_memory", lambda ptr, size: pinned.append(ptr))
    monkeypatch.setattr(pin_memory_utils, "unpin_memory", lambda ptr: None)
    strategy = cpu_strategy()
    strategy.device = torch.device("cuda", 0)
    checkpointer = Checkpointer(tmp_path, async_group="local", async_save=True, threads=2, staging=True)
    checkpointer.save(1, strategy, {})  # a background save pins the buffers
    checkpointer.wait()
    pins = len(pinned)
    cuda.run(0.1)
    path = checkpointer.save(2, strategy, {}, allow_async=False)
    assert checkpointer.pending is None and pins and len(pinned) == pins  # the same buffers, staged and written
    assert len(list(path.glob("*.distcp"))) == 2
    assert json.loads((path / "meta.json").read_text())[SAVE_RATE] > 0  # what planning's save-time check reads
    assert_restores(checkpointer, path, strategy)
    checkpointer.close()


class Handed(AsyncStager):
    """An inner stager that hands the state on as it is: what the share stager passed it."""

    def stage(self, state_dict):
        done = Future()
        done.set_result(state_dict)
        return done


def _shares_over_saves(rank: int, world: int, port: int, out) -> None:
    """Four saves on each rank: the same tensors twice, then rank 1 alone gains one (an optimizer's first moments
    on one rank), then the same again. What each save gathered and what each rank staged."""
    from datetime import timedelta

    import torch.distributed as dist

    from gpt.checkpoint import staging

    store = dist.TCPStore("127.0.0.1", port, world, rank == 0, timeout=timedelta(seconds=30))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    gathered = []
    gather = staging.gather_objects
    staging.gather_objects = lambda obj, group=None: gathered.append(len(obj)) or gather(obj, group)
    stager = staging.ShareStager(Handed(), None)
    model = {"w": torch.ones(4), "b": torch.ones(2)}  # replicated: 16 and 8 bytes
    saves = [{"model": model}, {"model": model}, {"model": model, "optim": {"m": torch.ones(1)} if rank else {}},
             {"model": model, "optim": {"m": torch.ones(1)} if rank else {}}]
    seen = []
    for state in saves:
        staged = stager.stage(state).result()
        seen.append([len(gathered), *sorted(name for values in staged.values() for name in values)])
        gathered.clear()
    out[rank] = seen
    dist.destroy_process_group()


@pytest.mark.slow  # two processes that import torch
def test_the_ranks_agree_on_writers_once_and_again_only_when_a_ranks_tensors_change():
    """The writers of replicated tensors are agreed in one gather at the first save and kept: the second save
    gathers nothing. When one rank's tensors change, every rank gathers again (a rank that did not would leave
    the others waiting), and the next save gathers nothing again."""
    from helpers import spawn_ranks

    shares = spawn_ranks(_shares_over_saves, 2)
    assert shares[0] == [[1, "b"], [0, "b"], [1, "b"], [0, "b"]]
    assert shares[1] == [[1, "w"], [0, "w"], [1, "m", "w"], [0, "m", "w"]]
