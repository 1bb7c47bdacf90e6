"""The CUDA contract, enforced on the CPU: tests/cuda_standin.py behaves as CUDA documents (first tests), and every
code path that runs only on a GPU is walked through it (the rest): the health check, the step timer, a slow
device, memory figures, device selection and the asynchronous checkpoint's writer thread.

What the stand-in cannot show (kernels, NCCL, how much really overlaps) is measured by benchmarks/gpu_smoke.py on
a GPU (docs/benchmarks.md)."""
from __future__ import annotations

import json
import pickle
import random
import threading
import time

import pytest
import torch

from cuda_standin import GraphReplays, HostReads, StrictCuda
from gpt.config.sections import HealthConfig
from gpt.collectives.process_group import DistEnv, pick_device
from launch.recovery import health
from gpt.train.metrics import memory_stats


# --- the stand-in is as strict as CUDA -------------------------------------------------------------------------
def test_an_event_is_read_only_after_it_completed(monkeypatch):
    cuda = StrictCuda().install(monkeypatch)
    start, end, untimed = cuda.Event(enable_timing=True), cuda.Event(enable_timing=True), cuda.Event()
    with pytest.raises(RuntimeError, match="must be recorded"):
        start.elapsed_time(end)
    start.record()
    cuda.run(0.5)
    end.record()
    untimed.record()
    assert not end.query()  # the device may still be working: nothing completes by itself
    with pytest.raises(RuntimeError, match="must be completed"):
        start.elapsed_time(end)
    with pytest.raises(RuntimeError, match="enable_timing=True"):
        start.elapsed_time(untimed)
    end.synchronize()
    assert start.query() and end.query() and start.elapsed_time(end) == pytest.approx(500.0)


@pytest.mark.parametrize("how", ["event", "stream", "device"])
def test_each_synchronisation_completes_what_it_waits_for(monkeypatch, how):
    cuda = StrictCuda().install(monkeypatch)
    start, end = cuda.Event(enable_timing=True), cuda.Event(enable_timing=True)
    start.record()
    cuda.run(0.1)
    end.record()
    cuda.run(0.1)  # later work on the stream: waiting for the event does not complete it
    {"event": end.synchronize, "stream": cuda.current_stream().synchronize, "device": cuda.synchronize}[how]()
    assert start.elapsed_time(end) == pytest.approx(100.0)
    assert cuda.current_stream().query() == (how != "event")


def test_another_streams_work_is_visible_only_after_a_wait(monkeypatch):
    cuda = StrictCuda().install(monkeypatch)
    main, side = cuda.current_stream(), cuda.Stream()
    cuda.run(0.2)  # the optimizer writes the weights on the main stream
    written = main.tail
    assert not cuda.visible(main, written, side)
    side.wait_stream(main)
    assert cuda.visible(main, written, side)
    other = cuda.Stream()
    main.synchronize()  # the host waited: whatever is enqueued next, anywhere, sees it
    assert cuda.visible(main, written, other)


def test_a_thread_starts_on_device_0_and_only_existing_devices_answer(monkeypatch):
    cuda = StrictCuda(devices=2).install(monkeypatch)
    cuda.set_device(1)
    seen = []
    thread = threading.Thread(target=lambda: seen.append(cuda.current_device()))
    thread.start()
    thread.join()
    assert cuda.current_device() == 1 and seen == [0]
    for call in (lambda: cuda.set_device(2), lambda: cuda.memory_allocated("cuda:2"), lambda: cuda.synchronize(5),
                 lambda: cuda.get_rng_state("cuda:2")):
        with pytest.raises(RuntimeError, match="invalid device ordinal"):
            call()
    cuda.manual_seed(1337)  # the current device's generator, no other
    assert cuda.get_rng_state(1).any() and not cuda.get_rng_state(0).any()


def test_a_stream_context_moves_the_thread_to_its_device_and_back_opening_a_context_there(monkeypatch):
    """torch.cuda.stream sets the stream's device on entering and the device it found on leaving (CUDA 12 opens a
    context on a device set): a thread that never chose its device ends on GPU 0, which exclusive-process GPUs of
    other ranks refuse."""
    cuda = StrictCuda(devices=2).install(monkeypatch)
    cuda.set_device(1)
    side, seen = cuda.Stream(), []

    def thread() -> None:
        with cuda.stream(side):
            seen.append(cuda.current_device())
        seen.append(cuda.current_device())

    worker = threading.Thread(target=thread)
    worker.start()
    worker.join()
    assert seen == [1, 0] and cuda.contexts == {0, 1}
    exclusive = StrictCuda(devices=2, rank_gpu=1).install(monkeypatch)
    with pytest.raises(RuntimeError, match="busy or unavailable"):
        exclusive.set_device(0)


def test_a_non_blocking_copy_into_pinned_memory_is_garbage_until_the_host_syncs_its_stream(monkeypatch):
    cuda = StrictCuda().install(monkeypatch)
    host, event = torch.zeros(3).pin_memory(), cuda.Event()
    assert cuda.contexts == {0}  # pinning opens a context on the current device
    host.copy_(torch.arange(3.0), non_blocking=True)
    assert host.isnan().all()  # not there yet
    event.record()
    event.synchronize()
    assert host.tolist() == [0.0, 1.0, 2.0]
    pageable = torch.zeros(3)
    pageable.copy_(torch.ones(3), non_blocking=True)  # from pageable memory CUDA copies synchronously
    assert pageable.tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("visible, shown", [("4,5,6,7", [4, 5, 6, 7]), ("1abc,3", [1, 3]), ("2,-1,3", [2]),
                                            ("1,1", []), ("GPU-00000006,GPU-00000002", [6, 2]), ("GPU-0,1", [])])
def test_cuda_visible_devices_renumbers_what_it_names_from_0(visible, shown):
    cuda = StrictCuda(devices=8, visible=visible)
    assert cuda.device_count() == len(shown) and [cuda.physical(i) for i in range(len(shown))] == shown


def test_a_process_enumerates_one_mig_slice():
    uuids = StrictCuda(devices=2, mig=True).uuids
    assert StrictCuda(devices=2, mig=True, visible=",".join(uuids)).device_count() == 1


# --- the GPU paths through it ----------------------------------------------------------------------------------
@pytest.fixture
def matmuls_take_a_millisecond(strict_cuda, monkeypatch):
    matmul = torch.matmul

    def on_device(*args, **kwargs):
        strict_cuda.run(1e-3)
        return matmul(*args, **kwargs)

    monkeypatch.setattr(torch, "matmul", on_device)
    return strict_cuda


def test_the_gpu_health_check_reads_its_events_once_they_completed(matmuls_take_a_millisecond, tmp_path):
    """Every GPU run measured its GPU with events read before they completed: CUDA refused, the run died."""
    cfg = HealthConfig(gpu_matmul_size=16, gpu_seconds=0.05, rounds=2)
    verdict = health.measure_gpus(cfg, DistEnv(), torch.device("cpu"), tmp_path)
    (gpu,) = verdict.gpus
    assert gpu.tflops == pytest.approx(2 * 16**3 / 1e-3 / 1e12)  # the device's time, not the host's
    assert gpu.storage is None and verdict.bus is None


def test_the_bus_bandwidth_is_timed_on_the_device(strict_cuda, monkeypatch):
    monkeypatch.setattr(health, "all_reduce_in_place", lambda tensor, group=None: strict_cuda.run(4e-3))
    assert health.timed_all_reduce(None, torch.device("cpu"), 1 << 10) == pytest.approx(4.0)  # ms per all-reduce


def test_a_slow_device_computes_longer_while_its_host_runs_on(strict_cuda, tmp_path):
    from gpt.config.sections import DebugConfig
    from gpt.resilience.faults import Faults

    faults = Faults(DebugConfig(straggler_rank=0, straggler_s=0.25), 0, 0, torch.device("cuda", 0), tmp_path)
    assert faults._lag(0.25) == 0.25
    assert strict_cuda.current_stream().tail == pytest.approx(0.25) and strict_cuda.host_waits == 0


def test_memory_figures_are_the_ranks_own_device_and_the_windows_peak(monkeypatch):
    cuda = StrictCuda(devices=2).install(monkeypatch)
    cuda.memory.update(allocated=1 << 30, peak=3 << 30, reserved=4 << 30)
    stats = memory_stats(torch.device("cuda", 1))
    assert (stats["mem/allocated_gib"], stats["mem/peak_gib"], stats["mem/reserved_gib"]) == (1.0, 3.0, 4.0)
    assert cuda.memory["peak"] == 1 << 30  # the next window's peak starts from here
    assert cuda.contexts == {1}
    with pytest.raises(RuntimeError, match="invalid device ordinal"):
        memory_stats(torch.device("cuda", 2))


def test_the_allocator_history_takes_only_cudas_settings_and_a_snapshot_holds_it_only_while_recorded(monkeypatch,
                                                                                                       tmp_path):
    cuda = StrictCuda().install(monkeypatch)
    with pytest.raises(ValueError, match="invalid memory history setting"):
        torch.cuda.memory._record_memory_history(enabled="everything")
    torch.cuda.memory._dump_snapshot(str(tmp_path / "before.pickle"))
    torch.cuda.memory._record_memory_history(max_entries=10)
    cuda.history.append({"action": "alloc", "size": 512})
    torch.cuda.memory._dump_snapshot(str(tmp_path / "while.pickle"))
    traces = [pickle.loads((tmp_path / f"{n}.pickle").read_bytes())["device_traces"][0] for n in ("before", "while")]
    assert traces == [[], [{"action": "alloc", "size": 512}]]
    cuda.count = 0  # no device: CUDA refuses
    with pytest.raises(RuntimeError, match="invalid device ordinal"):
        torch.cuda.memory._record_memory_history()


def test_out_of_memory_writes_the_snapshot_the_attempts_line_names(strict_cuda, tmp_path):
    """profile.memory_snapshot=true on a GPU: the allocator's history kept from the start, and its snapshot written
    when the step runs out of memory, its path in the rank's record (launch.recovery.out_of_memory says it)."""
    from gpt.config.profile import ProfileConfig
    from gpt.train.out_of_memory import RanOutOfMemory
    from gpt.train.profiler import step_profiler

    assert step_profiler(ProfileConfig(), DistEnv(), 1, tmp_path, torch.device("cuda", 0)) is None  # off: nothing
    profiler = step_profiler(ProfileConfig(memory_snapshot=True), DistEnv(), 2, tmp_path, torch.device("cuda", 0))
    assert strict_cuda.history == []  # recording
    strict_cuda.history.append({"action": "alloc", "size": 1 << 30})
    with pytest.raises(RanOutOfMemory) as refused, profiler.around_step(7):
        raise RanOutOfMemory(0, "n1", 7, 8, 2, 16, "none", "CUDA out of memory. Tried to allocate 20.00 GiB")
    path = tmp_path / "profiles" / "attempt-2" / "rank0-memory-oom.pickle"
    assert refused.value.record["snapshot"] == str(path)
    assert pickle.loads(path.read_bytes())["device_traces"][0] == [{"action": "alloc", "size": 1 << 30}]


def test_the_allocator_refuses_past_its_capacity_as_cuda_does(strict_cuda):
    from gpt.parallel.memory_held import SavedForBackward

    """An allocation past the capacity raises torch.OutOfMemoryError and leaves the allocator as it was; what autograd
    saves for the backward is held in it until the backward frees it, in proportion to the batch."""
    strict_cuda.capacity = 1000
    strict_cuda.allocate(600)
    with pytest.raises(torch.OutOfMemoryError, match=r"CUDA out of memory\. Tried to allocate .* MiB\. GPU 0 has a "
                                                     r"total capacity of"):
        strict_cuda.allocate(600)
    assert torch.cuda.memory_allocated() == 600 and torch.cuda.max_memory_allocated() == 600
    strict_cuda.release(600)
    strict_cuda.capacity = 32 << 10  # a few rows of 64 floats, not 128
    layer = torch.nn.Linear(64, 64, bias=False)
    with strict_cuda.holding_saved_tensors():
        loss = torch.tanh(layer(torch.ones(1, 64))).sum()  # saves its input and tanh's output
        assert torch.cuda.memory_allocated() == 2 * 64 * 4
        loss.backward()
        del loss
        assert torch.cuda.memory_allocated() == 0
        with pytest.raises(torch.OutOfMemoryError):
            torch.tanh(layer(torch.ones(128, 64))).sum()
        assert torch.cuda.memory_allocated() == 0  # what the refused forward saved is given back with it
        with SavedForBackward([], []) as measured:  # the trainer's own hooks, inside: composed with the allocator's
            loss = torch.tanh(layer(torch.ones(1, 64))).sum()
        assert measured.bytes == 2 * 64 * 4 == torch.cuda.memory_allocated()
        del loss
    assert torch.autograd.graph.saved_tensors_hooks is not type(measured.hooks)  # torch's own again


@pytest.mark.slow
def test_a_snapshot_asked_for_while_the_run_trains_is_written_after_the_step_once_per_request(strict_cuda, tmp_path,
                                                                                              monkeypatch):
    """python -m launch.memory_snapshot: each rank keeping the history writes a snapshot after the step it is in, named
    by it; a request older than the attempt, or already answered, writes none; a request waits for the ranks. The
    ranks look for requests every LOOK_S (a second here: a stall of the machine between two steps stays under it),
    not every step."""
    from gpt.config.profile import ProfileConfig
    from gpt.train import profiler as profiler_module
    from gpt.train.profiler import step_profiler
    from launch.memory_snapshot import ask, wait_for, written_since

    monkeypatch.setattr(profiler_module, "LOOK_S", 1.0)

    ask(tmp_path)  # made before this attempt started: not this attempt's
    profiler = step_profiler(ProfileConfig(memory_snapshot=True), DistEnv(), 2, tmp_path, torch.device("cuda", 0))
    time.sleep(1.1)
    with profiler.around_step(5):
        strict_cuda.history.append({"action": "alloc", "size": 4096})
    assert written_since(tmp_path, 0) == []
    asked = [ask(tmp_path), ask(tmp_path)]  # two in one clock tick: the second is a new request too
    with profiler.around_step(6):  # within LOOK_S of its last look: not looked for
        pass
    assert written_since(tmp_path, 0) == []

    def next_step() -> None:  # the rank, while the command waits
        time.sleep(1.1)
        with profiler.around_step(7):
            pass

    threading.Thread(target=next_step).start()
    path = tmp_path / "profiles" / "attempt-2" / "rank0-memory-step7.pickle"
    assert wait_for(tmp_path, asked[0], 10) == [path]
    assert pickle.loads(path.read_bytes())["device_traces"][0] == [{"action": "alloc", "size": 4096}]
    time.sleep(1.1)
    with profiler.around_step(8):
        pass
    assert written_since(tmp_path, 0) == [path]  # answered once


def test_a_rank_drives_the_gpu_of_its_local_rank_and_no_other(monkeypatch):
    from gpt.errors import UserError

    cuda = StrictCuda(devices=2).install(monkeypatch)
    assert pick_device("auto", DistEnv(rank=3, local_rank=1, world_size=4)) == torch.device("cuda", 1)
    assert cuda.current_device() == 1
    with pytest.raises(UserError, match="should drive GPU 2 but sees 2 GPU"):
        pick_device("cuda", DistEnv(rank=2, local_rank=2, world_size=4))


def test_an_async_save_touches_no_gpu_but_the_ranks_own(monkeypatch, tmp_path):
    """The save's writer thread starts on device 0: a CUDA call there opens a context on GPU 0 in every rank (about
    0.5 GB each; a failure where GPUs are exclusive). The staged copy is in host memory: it needs none."""
    from gpt.checkpoint.staging import BackgroundStager
    from gpt.config.model import ModelConfig
    from gpt.model.transformer import GPT
    from gpt.parallel.base import Strategy
    from gpt.parallel.layout import ParallelDims

    cuda = StrictCuda(devices=2).install(monkeypatch)
    cuda.set_device(1)
    strategy = Strategy(None, DistEnv(), torch.device("cpu"), "fp32", ParallelDims())
    strategy.setup(GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=32)), 1e-3, 0.0,
                   (0.9, 0.95))
    strategy.device = torch.device("cuda", 1)  # the tensors stay on the CPU; every CUDA call goes to the stand-in
    cuda.run(0.1)  # the step's optimizer update, still on the device
    stager = BackgroundStager(torch.device("cpu"))  # a stager of the CPU's: its copy is in host memory
    response = strategy.save_state(tmp_path / "step_1", async_group="local", stager=stager)
    assert cuda.current_stream().query()  # the update completed before the stager copied the weights
    response.upload_completion.result()
    stager.close()
    assert (tmp_path / "step_1" / ".metadata").is_file()
    assert cuda.contexts == {1}


def test_an_implicit_read_of_a_device_tensor_is_a_host_wait_and_of_a_host_tensor_none(monkeypatch):
    cuda = StrictCuda().install(monkeypatch)
    with HostReads(cuda) as reads:
        flags = torch.tensor([1.0, 0.0])  # made from Python values: the host's
        assert (flags + 1).tolist() == [2.0, 1.0] and cuda.host_waits == 0
        on_device = torch.zeros(3, device=torch.device("cpu"))  # the run's device
        for read in (lambda t: t.sum().item(), lambda t: bool(t.any()), lambda t: float(t[0]), lambda t: f"{t[1]}",
                     lambda t: t.tolist()):
            read(on_device)
        moved = on_device.cpu()  # a copy to the host: a wait, then the host's
        moved.tolist()
    assert cuda.host_waits == 6 and [s.split(" ")[0] for s in reads.sites] == \
        ["item", "__bool__", "__float__", "__format__", "tolist", "cpu"]


def test_a_graph_replay_overwrites_the_outputs_of_the_one_before_and_its_capture_reads_nothing(monkeypatch):
    cuda = StrictCuda().install(monkeypatch)
    doubled = GraphReplays(cuda, lambda x: x * 2)
    first = doubled(torch.ones(2))
    assert doubled(torch.full((2,), 3.0)) is first and first.tolist() == [6.0, 6.0]
    with pytest.raises(RuntimeError, match="not permitted when stream is capturing"):
        GraphReplays(cuda, lambda x: x.sum().item())(torch.ones(2))
    with pytest.raises(RuntimeError, match="not permitted when stream is capturing"):
        GraphReplays(cuda, lambda x: torch.cuda.synchronize())(torch.ones(2))


def test_multiple_choice_scores_under_cuda_graphs_are_the_eager_ones(strict_cuda, tmp_path):
    """train.compile_mode=reduce-overhead with eval.tasks: the endings' losses are stacked after their forwards, and
    each replay overwrote the loss before: every ending scored as the last one."""
    from gpt.config.model import ModelConfig
    from gpt.data.tokenizer import CharTokenizer
    from gpt.eval.multiple_choice import TaskScorer
    from gpt.model.transformer import GPT
    from gpt.parallel.base import Strategy
    from gpt.parallel.layout import ParallelDims

    rng, letters = random.Random(3), "abcdefgh"
    tokenizer = CharTokenizer(sorted(set(letters + " ")))
    lines = [{"ctx": "".join(rng.choices(letters, k=12)), "label": rng.randrange(4),
              "endings": ["".join(rng.choices(letters, k=rng.randint(1, 6))) for _ in range(4)]} for _ in range(12)]
    (tmp_path / "mix.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    scorer = TaskScorer([str(tmp_path / "mix.jsonl")], 0, tokenizer, 32)
    torch.manual_seed(0)
    strategy = Strategy(None, DistEnv(), torch.device("cpu"), "fp32", ParallelDims())
    strategy.setup(GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=tokenizer.vocab_size)),
                   1e-3, 0.0, (0.9, 0.95))
    strategy.model.eval()
    score = lambda: scorer.score(strategy.forward_loss, 0, 1, None, lambda: False, torch.device("cpu"))  # noqa: E731
    eager = score()
    strategy.model = GraphReplays(strict_cuda, strategy.model)
    assert score() == eager
