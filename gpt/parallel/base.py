"""The interface every parallel strategy implements. The trainer talks only to this; it never asks which
strategy is running."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from torch import nn

from gpt.checkpoint.safe_load import load_dcp
from gpt.checkpoint.threaded_writer import ThreadedWriter
from gpt.config.strategy import StrategyConfig
from gpt.collectives.process_group import DistEnv
from gpt.train.divergence import spread_nonfinite
from gpt.train.metrics import layer_grad_norms
from gpt.train.optim import build_adamw, step_unless
from gpt.train.step_timer import PhaseClock
from gpt.parallel.layout import ParallelDims
from gpt.parallel.traits import StrategyTraits, traits_of

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Optimizer state keyed by parameter name, one key per parameter and setting ("optim.state.layers.0...exp_avg",
# "optim.param_groups.layers.0...lr"): ranks that hold different parameters (ZeRO-1 partitions, pipeline stages)
# write disjoint keys, and every DCP strategy names its state the same way.
STATE_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def saved_key(key: str, copies: dict[str, str]) -> str:
    """A flattened optimizer key ("state.NAME.exp_avg", "param_groups.NAME.lr") as a checkpoint names it: a copy's
    NAME replaced by its original's (Strategy.tied_copies)."""
    section, rest = key.split(".", 1)
    for copy, original in copies.items():
        if rest.startswith(f"{copy}."):
            return f"{section}.{original}{rest[len(copy):]}"
    return key


@dataclass
class StepResult:
    loss: torch.Tensor  # this rank's mean loss over its micro-batches (detached, 0-dim)
    grad_norm: torch.Tensor  # global gradient norm before clipping
    layer_grad_norms: dict[str, float] | None = None  # per layer, when asked for
    clock: PhaseClock | None = None  # when forward+backward and the optimizer step ended
    # On the device, 0-dim bool: the update was left out, the global gradient norm not finite (gpt.train.divergence);
    # None where the strategy does not say (fp16: the GradScaler skips steps of its own)
    skipped: torch.Tensor | None = None


def nonfinite(grad_norm: torch.Tensor) -> torch.Tensor:
    """Whether to leave the update out, on the device (no host read): the global gradient norm, the same on every
    rank, is not finite (a non-finite loss on any rank makes it so: gpt.train.divergence)."""
    return ~torch.isfinite(grad_norm)


def on_meta(model: nn.Module) -> bool:
    """Whether `model` was built on the meta device (a dry run, gpt.train.dry_build): its tensors have their real
    shapes and no memory or values."""
    return any(p.is_meta for p in model.parameters())


def on_device(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` moved to the rank's device; one on the meta device stays there (it has no values to move), and the
    strategy wraps it as it wraps a real one."""
    return model if on_meta(model) else model.to(device)


def plain(value: torch.Tensor) -> torch.Tensor:
    """A value every rank holds whole (a loss), as a plain tensor: a replicated DTensor's full value."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def local_part(grad: torch.Tensor, replicas: int, outside: int = 1) -> tuple[torch.Tensor, int]:
    """A gradient's local tensor, and how many ranks hold the same values: a DTensor says so by its placements
    (Replicate dimensions copy, Shard dimensions split), times `outside` copies of its mesh (a norm's weight
    sharded over dp only is held alike by every tp rank); a plain tensor is held by each of `replicas`."""
    if not hasattr(grad, "to_local"):
        return grad, replicas
    copies = outside
    for size, placement in zip(grad.device_mesh.mesh.shape, grad.placements):
        copies *= size if placement.is_replicate() else 1
    return grad.to_local(), copies


@dataclass(frozen=True)
class Compile:
    """What torch.compile covers (train.compile_scope, resolved by the strategy's traits) and its mode."""

    scope: str = "blocks"  # "blocks" or "model"
    mode: str = "default"

    def apply(self, model: nn.Module) -> None:
        """Compile `model` in place, before any data-parallel wrapper shards or wraps it (torchtitan's pattern):
        parameter names, checkpoint keys and the hooks tensor parallelism and FSDP put on a block stay the model's
        (no `_orig_mod`). `blocks`: each transformer block, one shared graph (same code, parameters as inputs),
        the embeddings, head and loss eager. `model`: the whole GPT with its loss, so that Inductor fuses the head's
        cast and the cross-entropy (no fp32 copy of the logits); DDP's optimizer splits that graph at its buckets."""
        if self.scope == "model":
            model.compile(mode=self.mode)
            return
        for block in model.layers.values():
            block.compile(fullgraph=True, mode=self.mode)


def no_wait() -> None:
    """A strategy's update waits for nothing unless its builder says (StrategySettings.before_update)."""


@dataclass(frozen=True)
class StrategySettings:
    """What the run asks of a strategy beyond its layout, handed to it when it is built (gpt.train.build)."""

    attention_kernel: str = "math"  # the SDPA kernel the model's attention runs
    compile: Compile | None = None  # torch.compile in setup (train.compile)
    layer_keys: tuple[str, ...] = ()  # the full model's layers, for per-layer gradient norms
    # Called just before the optimizer changes any weight: the checkpointer waits there for a background save's
    # staging copy (which reads the weights) to finish.
    before_update: Callable[[], None] = no_wait
    reduce_dtype: str = "fp32"  # train.reduce_dtype: the dtype gradients are reduced in across data-parallel ranks
    fp8_all_gather: bool = False  # train.fp8_all_gather: FSDP gathers float8 weights (gpt.parallel.fsdp)


class Strategy:
    """Single process: the model as it is, optionally under autocast. Subclasses spread it over ranks."""

    # After each update the gradients are freed (set to None), or zeroed in place where they are views into a
    # buffer that outlives the step (DDP's buckets: gpt.parallel.ddp.replicate)
    zero_grads_in_place = False

    def __init__(self, cfg: StrategyConfig, env: DistEnv, device: torch.device, precision: str, dims: ParallelDims,
                 settings: StrategySettings = StrategySettings()):
        self.cfg, self.env, self.device, self.precision, self.dims = cfg, env, device, precision, dims
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        self.attention_kernel, self.compile = settings.attention_kernel, settings.compile
        self.reduce_dtype, self.fp8_all_gather = settings.reduce_dtype, settings.fp8_all_gather
        self.layer_keys = list(settings.layer_keys)
        # memory_held swaps it for the first step's measurement, and puts it back
        self.before_update: Callable[[], None] = settings.before_update

    # --- topology -------------------------------------------------------------------------------------
    @property
    def dp_rank(self) -> int:
        """This rank's index among the replicas that read different data."""
        return self.env.rank

    @property
    def dp_size(self) -> int:
        return self.dims.dp

    def describe(self) -> str:
        return "single process"

    @property
    def name(self) -> str:
        return self.cfg.name

    def traits(self) -> StrategyTraits:
        """What this strategy is (checkpoint format, parameters held, collectives): gpt.parallel.traits."""
        return traits_of(self.name)

    # --- building -------------------------------------------------------------------------------------
    def setup(self, model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float]) -> None:
        on_device(model, self.device)
        if self.compile:
            self.compile.apply(model)
        self.model = self.wrap(model)
        self.optimizer = build_adamw(self.model, lr, weight_decay, betas, self.device)

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    @property
    def unwrapped(self) -> nn.Module:
        """The GPT module itself, for evaluation, generation and checkpoint naming (inside DDP's wrapper)."""
        module = self.model
        while True:
            inner = getattr(module, "module", None)
            if not isinstance(inner, nn.Module):
                return module
            module = inner

    # --- one optimizer step ---------------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=DTYPES[self.precision])

    def sync_gradients(self, last_micro_step: bool) -> contextlib.AbstractContextManager:
        """Wraps each micro-step's backward; data-parallel strategies skip the all-reduce until the last."""
        return contextlib.nullcontext()

    def loss_context(self) -> contextlib.AbstractContextManager:
        """Wraps the forward that computes a loss and its backward (tensor parallel: a vocabulary-sharded loss)."""
        return contextlib.nullcontext()

    def train_step(self, micro_batches: Iterable[tuple[torch.Tensor, torch.Tensor]], n_micro: int,
                   lr: float, grad_clip: float, layer_norms: bool = False, loss_factor: float = 1.0) -> StepResult:
        """One optimizer step over `micro_batches`; `loss_factor` is test-only, this step's (debug.nan_at_step,
        spike_at_step: gpt.train.divergence.spread_nonfinite)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        clock = PhaseClock(self.device)
        total = torch.zeros((), device=self.device)
        for i, (x, y) in enumerate(micro_batches):
            with self.sync_gradients(i == n_micro - 1), self.loss_context():
                with self.autocast():
                    loss = self.model(x, y)[1]  # the logits not held through backward
                loss = spread_nonfinite(loss, loss_factor) / n_micro
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            total += plain(loss.detach())
        clock.mark("fwd_bwd")
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        layers = layer_grad_norms(self.local_gradients(), self.layer_keys, self.device) if layer_norms else None
        grad_norm = self.clip_gradients(grad_clip)
        self.before_update()
        skipped = None
        if self.scaler:  # under fp16 the GradScaler decides: it skips the step and lowers its scale, as AMP does
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            skipped = nonfinite(grad_norm)
            self.optimizer_step(skipped)
        self.optimizer.zero_grad(set_to_none=not self.zero_grads_in_place)
        clock.mark("optimizer")
        return StepResult(total, grad_norm, layers, clock, skipped)

    def optimizer_step(self, skipped: torch.Tensor) -> None:
        """The update, left out on the device where `skipped` is true (gpt.train.optim.step_unless)."""
        step_unless(self.optimizer, skipped)

    def clip_gradients(self, max_norm: float) -> torch.Tensor:
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if hasattr(norm, "full_tensor"):  # sharded gradients give a DTensor norm
            norm = norm.full_tensor()
        if max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return norm.detach()

    @torch.no_grad()
    def forward_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Loss of one evaluation batch on this rank."""
        with self.autocast(), self.loss_context():
            _, loss = self.model(x, y, with_aux=False)
        # a copy: under CUDA graphs (compile_mode=reduce-overhead) the next forward's replay overwrites its output
        return plain(loss.detach()).to(torch.float32, copy=True)

    # --- checkpoints ----------------------------------------------------------------------------------
    def state_parts(self) -> list[tuple[nn.Module, torch.optim.Optimizer]]:
        """(module, optimizer over its parameters) pairs whose state this rank saves; names are the GPT's."""
        return [(self.model, self.optimizer)]

    supports_async_save = True  # save_state(folder, async_group=..., stager=...) returns an AsyncSaveResponse
    syncs_own_files = True  # DCP's writer fsyncs every file it writes (sync_files): the commit need not again

    def save_state(self, folder: Path, async_group: Any = None, stager: Any = None, threads: int = 1) -> Any:
        """Write model and optimizer into `folder`, every rank its own part (DCP reshards on load), in `threads`
        files per rank written at once.

        With `async_group` (a gloo group of its own: on the default group async_save crashes or hangs while
        training goes on) the state is copied by `stager` in the background and written after; returns DCP's
        AsyncSaveResponse. Until its staging completes, call before_update() before changing any weight. Without
        it, a `stager` copies the state into its host buffers (pinned on CUDA) first, and the save writes from
        there: one fast device-to-host copy instead of the writer's pageable copies a few MB at a time."""
        model_sd, optim_sd = {}, {}
        for module, optimizer in self.state_parts():
            m, o = get_state_dict(module, optimizer, options=STATE_OPTIONS)
            copies = self.tied_copies(module)
            model_sd.update(m)
            optim_sd.update({k: v for k, v in o.items() if saved_key(k, copies) == k})  # a copy: its original saves it
        state = {"model": model_sd, "optim": optim_sd}
        # A synchronous save on a GPU without a stager copies device tensors ahead on the current stream of the
        # training thread. An asynchronous one writes the stager's copy, in host memory, from a thread of its own: a
        # CUDA call there would open a context on GPU 0 (a new thread's device) in every rank. A CPU run touches no
        # accelerator.
        copy_ahead = 10_000_000 if self.device.type == "cuda" and async_group is None and stager is None else 0
        writer = ThreadedWriter(folder, per_thread_copy_ahead=copy_ahead, thread_count=threads)
        if stager is not None and self.device.type == "cuda":  # the stager copies on its own stream
            torch.cuda.current_stream(self.device).synchronize()  # after the step's updates
        if async_group is not None:
            group = None if async_group == "local" else async_group
            return dcp.async_save(state, storage_writer=writer, process_group=group, async_stager=stager)
        if stager is not None:
            state = stager.stage(state).result()
        dcp.save(state, storage_writer=writer)
        return None

    def save_weights(self, folder: Path, dtype: torch.dtype, threads: int = 1) -> None:
        """The model alone into `folder`, its floating-point tensors in `dtype`, every rank its own part: the final
        checkpoint of a finished run under checkpoint.final_model_only, which export, evaluation and generation
        read (gpt.checkpoint.writer.load_model)."""
        weights = {}
        for module, _ in self.state_parts():
            weights.update(get_model_state_dict(module, options=STATE_OPTIONS))
        weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}
        dcp.save({"model": weights}, storage_writer=ThreadedWriter(folder, thread_count=threads))

    def load_state(self, folder: Path) -> None:
        parts = [get_state_dict(module, optimizer, options=STATE_OPTIONS) for module, optimizer in self.state_parts()]
        saved = [{k: saved_key(k, self.tied_copies(module)) for k in o}
                 for (module, _), (_, o) in zip(self.state_parts(), parts)]
        state = {"model": {k: v for m, _ in parts for k, v in m.items()},
                 "optim": {names[k]: v for (_, o), names in zip(parts, saved) for k, v in o.items()}}
        load_dcp(state, folder)  # its metadata and items read as data, not code
        for (module, optimizer), (m, o), names in zip(self.state_parts(), parts, saved):
            set_state_dict(module, optimizer, model_state_dict={k: state["model"][k] for k in m},
                           optim_state_dict={k: state["optim"][names[k]] for k in o}, options=STATE_OPTIONS)

    def tied_copies(self, module: nn.Module) -> dict[str, str]:
        """Parameters of `module` (a state part) that are copies of a parameter another rank holds, as {name here:
        the original's name}: a checkpoint holds the original's optimizer state alone, as a model whose two names
        are one parameter has it, and a copy loads its state from there (a pipeline's tied head)."""
        return {}

    # --- what other parts need ------------------------------------------------------------------------
    def mean_over_dp(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a per-rank value over the data-parallel replicas (the global loss)."""
        if self.dp_size == 1:
            return value
        value = value.detach().clone().float()
        dist.all_reduce(value, op=dist.ReduceOp.SUM, group=self.dp_group)
        return value / self.dp_size

    @property
    def dp_group(self) -> dist.ProcessGroup | None:
        return None  # the default group: every rank is a replica

    def local_gradients(self) -> Iterator[tuple[str, torch.Tensor, int]]:
        """(name, the part of its gradient this rank holds, how many ranks hold that same part), for per-layer
        norms: a DTensor's local shard, held once per replica of its mesh; a plain gradient, by every replica."""
        for name, p in self.unwrapped.named_parameters():
            if p.grad is not None:
                yield name, *local_part(p.grad, self.dp_size)

    # What this rank holds, tensor by tensor (gpt.parallel.memory_held counts each once): a strategy that keeps a
    # part outside the module's parameters, their .grad and the optimizer's state says where.
    def held_parameters(self) -> Iterator[torch.Tensor]:
        return (p for module, _ in self.state_parts() for p in module.parameters())

    def held_gradients(self) -> Iterator[torch.Tensor]:
        """The gradients the update reads, as they are just before it (after clipping)."""
        return (p.grad for p in self.held_parameters() if p.grad is not None)

    def gradient_buffer_bytes(self) -> int:
        """Bytes of gradient memory held beside the gradients' own tensors (DDP's reducer buckets)."""
        return 0

    def held_optimizer_state(self) -> Iterator[torch.Tensor]:
        return (v for _, opt in self.state_parts() for state in opt.state.values() for v in state.values()
                if isinstance(v, torch.Tensor))

    def parameter_bytes(self) -> int:
        """Bytes of parameters this rank holds (a sharded strategy holds about total / world size)."""
        total = 0
        for p in self.model.parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            total += local.numel() * local.element_size()
        return total

    def flops_share(self) -> float:
        """The fraction of the model's FLOPs per token that this rank computes: tensor parallelism splits every
        matmul (heads, MLP, head) over its tp ranks; 1.0 unless the model is split."""
        return 1.0 / self.dims.tp
