"""GPU-only behaviour checked without a GPU (torch.cuda faked where needed; tests/gpt/test_cuda_contract.py walks the
GPU paths through the strict stand-in): per-layer
gradient norms under torch.compile and at the cost of one all_reduce, CUDA RNG per rank and per device, and a
training step that never waits for the device except on log steps."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from cuda_standin import StrictCuda
from helpers import REPO, SHAKESPEARE, make_plan_of
from gpt.collectives import process_group as distributed
from gpt.train import rng
from gpt.config.model import ModelConfig
from gpt.collectives.process_group import DistEnv
from gpt.train.metrics import layer_grad_norms, layer_key, layer_keys
from gpt.model.transformer import GPT
from gpt.parallel.base import Compile, Strategy
from gpt.parallel.layout import ParallelDims
from gpt.collectives.flag_sum import BackgroundSum
from gpt.train import step_flags
from gpt.train.trainer import Trainer
from gpt.config import schema
from launch import launch_config

TINY = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64)


def test_layer_names_survive_torch_compile():
    model = GPT(TINY)
    Compile().apply(model)  # each block, in place; nothing compiles until it is called
    strategy = Strategy({}, DistEnv(), torch.device("cpu"), "fp32", ParallelDims())
    strategy.model = model
    assert strategy.unwrapped is model
    names = [n for n, _ in strategy.model.named_parameters()]
    assert layer_keys(names) == ["wte", "wpe", "layers.0", "layers.1", "ln_f"]
    assert layer_key("module.layers.1.mlp.fc.weight") == "layers.1"


def test_per_layer_norms_cost_one_all_reduce(monkeypatch):
    """Two ranks: a replicated gradient (each rank holds it: counted once) and a sharded one (halves on each rank)."""
    calls = []

    def all_reduce(t, op=None, group=None):  # the other rank holds the same values
        calls.append(t.numel())
        t.mul_(2)

    monkeypatch.setattr(distributed, "is_multi", lambda group=None: True)
    monkeypatch.setattr(distributed.dist, "all_reduce", all_reduce)
    monkeypatch.setattr(distributed.dist, "group", type("G", (), {"WORLD": type("W", (), {"_device_types": [
        torch.device("cpu")]})()}))
    replicated, half = torch.full((4,), 3.0), torch.full((2,), 1.0)
    norms = layer_grad_norms([("layers.0.attn.q_proj.weight", replicated, 2), ("layers.1.mlp.fc.weight", half, 1),
                              ("_orig_mod.wte.weight", half, 1)], ["wte", "layers.0", "layers.1"], torch.device("cpu"))
    assert calls == [3]  # one all_reduce of one value per layer
    assert norms == {"grad_norm/wte": pytest.approx(2.0), "grad_norm/layers.0": pytest.approx(6.0),
                     "grad_norm/layers.1": pytest.approx(2.0)}


def test_cuda_rng_is_this_ranks_own_device(monkeypatch):
    gpu = torch.device("cuda", 1)
    cuda = StrictCuda(devices=2).install(monkeypatch)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("saves every visible GPU's state"))
    cuda.set_device(gpu)
    cuda.rng_states[1][0] = 7
    state = rng.capture(gpu)
    assert state["cuda"][0] == 7 and cuda.contexts == {1}
    cuda.rng_states[1][0] = 0
    rng.restore(state, gpu)
    assert cuda.rng_states[1][0] == 7
    five = torch.zeros(16, dtype=torch.uint8)
    five[0] = 5
    old = {**state, "cuda": [torch.zeros(16, dtype=torch.uint8), five]}
    rng.restore(old, gpu)  # written by an older version: every GPU's state, ours at our index
    assert cuda.rng_states[1][0] == 5
    rng.restore({**state, "cuda": old["cuda"][:1]}, gpu)  # written with more GPUs visible than this resume sees
    assert cuda.rng_states[1][0] == 5 and cuda.rng_states[0].sum() == 0 and cuda.contexts == {1}
    seeded = []
    for rank in range(4):  # tp=2: ranks 0-1 and 2-3 are tensor-parallel groups, two data-parallel replicas
        rng.seed_device(1337, rng.stream_index(rank, 2), gpu)
        seeded.append(cuda.get_rng_state(gpu))
    assert torch.equal(seeded[0], seeded[1]) and torch.equal(seeded[2], seeded[3])  # masks shared in a tp group
    assert not torch.equal(seeded[0], seeded[2])  # not between replicas


class SyncCounter:
    """Counts host reads of tensors (item, tolist, bool, float, int) and device waits made from our code (gpt/,
    launch/) outside gpt/collectives/, whose reads are of host tensors by construction (see test_collectives)."""

    ours = (str(REPO / "gpt"), str(REPO / "launch"))

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        reads = [(torch.Tensor, name) for name in ("item", "tolist", "__bool__", "__float__", "__int__")]
        for owner, name in (*reads, (torch.cuda, "synchronize"), (torch.cuda.Event, "synchronize")):
            monkeypatch.setattr(owner, name, self.wrap(getattr(owner, name), name))

    def wrap(self, original, name):
        def counted(*args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(self.ours) and str(Path("gpt", "collectives")) not in caller:
                self.calls.append(f"{name} from {caller}:{sys._getframe(1).f_lineno}")
            return original(*args, **kwargs)
        return counted


# train=gpu's step as well: bf16 autocast, an attention kernel named around SDPA (compile off: slow here)
@pytest.mark.parametrize("preset", [[], ["train=gpu", "train.compile=false", "train.attention=math"]])
@pytest.mark.slow
def test_no_host_sync_on_steps_that_do_not_log(preset, tmp_path, monkeypatch):
    """The step's flags travel as host values (a gloo all_reduce under "cpu:gloo,cuda:nccl"), so a step that
    does not log never reads the loss, the gradient norm or a timer back from the device."""
    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=[*preset, "model=tiny", "train.max_steps=8", "train.log_interval=4",
                                           "train.eval_interval=0", "train.progress=false",
                                           f"data.text_path={SHAKESPEARE}", f"data.dir={tmp_path / 'data'}"])
    make_plan_of(launch_config.parse(cfg), tmp_path / "run")
    trainer = Trainer(schema.load(tmp_path / "run" / "config.yaml"), DistEnv(), tmp_path / "run")
    cast = []  # as if other ranks took part: the flags handed to the summing thread, as host floats
    monkeypatch.setattr(step_flags, "sum_in_background",
                        lambda values, group=None: cast.append(list(values)) or BackgroundSum(torch.tensor(values)))
    counter = SyncCounter(monkeypatch)
    per_step = []
    for _ in range(3):  # steps 0-2 do not log
        before = len(counter.calls)
        assert trainer.train_step() is None
        per_step.append(counter.calls[before:])
    assert per_step == [[], [], []]
    assert len(cast) == 3 and all(isinstance(v, float) for v in cast[0])  # host values, once a step
    assert trainer.train_step() is not None  # step 3 logs: it reads the loss, and may
    assert counter.calls  # (the counter does see reads)
    trainer.metrics.close()


def test_fp32_on_a_gpu_uses_tf32():
    from gpt.train.build import use_tf32

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        use_tf32(torch.device("cpu"), "fp32")
        use_tf32(torch.device("cuda", 0), "bf16")
        assert not torch.backends.cuda.matmul.allow_tf32
        use_tf32(torch.device("cuda", 0), "fp32")
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_moe_reads_the_device_once_per_layer(monkeypatch):
    """One host read of the expert counts per MoE layer, however many experts (it used to be one per expert)."""
    from gpt.model.transformer import MoE
    from torch.overrides import TorchFunctionMode

    class Reads(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.names: list[str] = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", "")
            if name in ("item", "tolist", "nonzero", "bincount", "unique") or (name == "where" and len(args) == 1):
                self.names.append(name)
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    moe = MoE(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=32, n_expert=6, moe_top_k=2))
    x = torch.randn(3, 8, 16)
    with Reads() as reads:
        out = moe(x)
    assert reads.names == ["tolist"]
    # the same as routing expert by expert
    flat = x.reshape(-1, 16)
    probs = torch.softmax(moe.router(flat), dim=-1)
    w, chosen = probs.topk(2, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    expected = sum(w[:, j, None] * torch.stack([moe.experts[int(e)](flat[i]) for i, e in enumerate(chosen[:, j])])
                   for j in range(2))
    torch.testing.assert_close(out.reshape(-1, 16), expected)


def test_the_model_is_built_on_its_device_not_on_the_cpu_first():
    """A rank builds its model where it trains (the meta device stands in for a GPU here): no CPU copy first."""
    from gpt.train.build import build_model

    model = build_model(TINY, torch.device("meta"), seed=0)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    cpu_a, cpu_b = build_model(TINY, torch.device("cpu"), 0), build_model(TINY, torch.device("cpu"), 0)
    assert all(torch.equal(a, b) for a, b in zip(cpu_a.parameters(), cpu_b.parameters()))  # the same on every rank


def test_async_checkpoints_stage_into_pinned_memory_on_cuda_and_plain_memory_on_cpu(monkeypatch):
    from gpt.checkpoint import staging

    cuda = StrictCuda(devices=2).install(monkeypatch)
    on_gpu = staging.make_stager(torch.device("cuda", 1), None).inner
    on_cpu = staging.make_stager(torch.device("cpu"), None).inner
    assert on_gpu.copier.pin_memory and on_gpu.stream.device == 1 and on_gpu.stream in cuda.streams
    assert not on_cpu.copier.pin_memory and on_cpu.stream is None  # a CPU run makes no stream, pins nothing
    assert not on_gpu.copier.share_memory  # the writer is a thread of this process
    on_gpu.close(), on_cpu.close()
