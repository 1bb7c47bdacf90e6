"""Pipeline parallelism (torch.distributed.pipelining) x data parallelism inside each stage.

Topology: a DeviceMesh ("pp", "dp") of pp x (world / pp) ranks. Rank r sits at pp = r // dp, dp = r % dp: the
replicas of one stage are neighbouring ranks, the stages of one replica are dp ranks apart. Every rank of a
replica reads that replica's data (the first stage uses the inputs, the last the targets).

Stages: the model's layers are split into pp x stages_per_rank contiguous runs (earlier stages take the extra
layer when they do not divide evenly); the first stage also holds the embeddings, the last the final norm and
head. A stage is the GPT class with the other parts deleted, so parameter names stay the model's names and
checkpoints are interchangeable with every other strategy. With `interleaved`, rank p holds stages p, p + pp, ...

Micro-batches: the trainer hands over the step's micro-batches for this replica; they are concatenated and split
again into `strategy.microbatches` pipeline micro-batches (which must divide the per-replica batch). The loss is
the mean over them, so a step is the same as one process on the whole global batch.

Tied embeddings: the first stage's wte and the last stage's lm_head are two copies of one weight; their gradients
are summed across the two stages before the step, so both copies stay equal (as Megatron-LM does). A checkpoint
holds wte's optimizer state alone, as every other strategy's does; the last stage's copy loads its state from there.

Data parallelism inside stages: `fsdp` (FSDP2 on the dp sub-mesh) works with every schedule. `ddp` works with
1f1b only: under gpipe and interleaved DDP's reducer fails in torch 2.13 ("rebuilt parameter indices size is not
same as original model parameters size"), and DDP(static_graph=True) there trains to wrong losses, so those
combinations are refused before anything runs.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import warnings
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B
from torch.nn.parallel import DistributedDataParallel

from gpt.collectives.process_group import subgroups
from gpt.model.flops import flops_per_token
from gpt.train.divergence import spread_nonfinite
from gpt.train.metrics import layer_grad_norms
from gpt.model.transformer import GPT
from gpt.train.optim import build_adamw, step_unless
from gpt.train.step_timer import PhaseClock
from gpt.parallel.base import DTYPES, StepResult, Strategy, StrategySettings, local_part, nonfinite, on_device
from gpt.parallel.ddp import bucket_bytes, replicate
from gpt.parallel.fsdp import shard
from gpt.parallel.layout import split_layers
from gpt.parallel.mesh import build_mesh, describe_mesh
from gpt.parallel.tensor import apply_tensor_parallel

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved": ScheduleInterleaved1F1B}


class StageGPT(GPT):
    """A pipeline stage: GPT with parts deleted; forward returns only the output (hidden states or logits).

    `sent_dtype`: under autocast the residual stream is fp32 (fp32 weights and embeddings; each block adds its bf16
    output to it), so the hidden states a stage sends, and the gradients sent back for them, would travel in fp32.
    Set, a stage sends its hidden states in that dtype, and the next one computes on them in fp32 again: half the
    bytes on every pipeline hop and in every micro-batch's held stage input and output, for one bf16 rounding of the
    residual stream per stage boundary (as Megatron-LM's bf16 pipeline sends it). Under FSDP's bf16 parameters the
    stream is bf16 already."""

    sent_dtype: torch.dtype | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if self.wte is None and self.sent_dtype is not None:
            x = x.float()
        out = GPT.forward(self, x)[0]
        return out.to(self.sent_dtype) if self.lm_head is None and self.sent_dtype is not None else out


def make_stage(model: GPT, stage: int, n_stages: int, runs: list[range]) -> StageGPT:
    """Cut `model` (in place) down to stage `stage` of n_stages."""
    keep = {str(i) for i in runs[stage]}
    for key in list(model.layers.keys()):
        if key not in keep:
            del model.layers[key]
    if stage != 0:
        model.wte, model.wpe = None, None
    if stage != n_stages - 1:
        model.ln_f, model.lm_head = None, None
    # A tied lm_head keeps the weight wte had: the last stage's own copy, kept equal to the first stage's.
    model.__class__ = StageGPT
    return model


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The model's own loss (GPT.forward), for the last stage."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1)


class Pipeline(Strategy):
    def __init__(self, cfg, env, device, precision, dims, settings=StrategySettings()):
        super().__init__(cfg, env, device, precision, dims, settings)
        self.pp = dims.pp
        self.schedule_name = cfg.schedule
        self.microbatches = cfg.pipeline_microbatches(dims.pp)
        self.per_rank = cfg.stages_per_rank if self.schedule_name == "interleaved" else 1
        self.n_stages = self.pp * self.per_rank
        self.dp_kind = cfg.dp
        self.tp = dims.tp
        self.mesh: DeviceMesh | None = None
        self.stages: dict[int, nn.Module] = {}  # stage index -> the stage module as trained (maybe DDP-wrapped)
        self.optimizers: list[torch.optim.Optimizer] = []
        self.tie_group: dist.ProcessGroup | None = None
        self.model_cfg = None
        self.runs: list[range] = []
        self.loss_factor = 1.0  # this step's (train_step's argument), for the schedule's loss

    # --- topology -------------------------------------------------------------------------------------
    @property
    def pp_rank(self) -> int:
        return self.mesh.get_local_rank("pp")

    @property
    def dp_rank(self) -> int:
        return self.mesh.get_local_rank("dp")

    @property
    def dp_group(self) -> dist.ProcessGroup | None:
        return self.mesh.get_group("dp")

    @property
    def pp_group(self) -> dist.ProcessGroup:
        return self.mesh.get_group("pp")

    def describe(self) -> str:
        layers = ", ".join(f"stage {s}: layer{'s' if len(r) > 1 else ''} {r.start}"
                           f"{f'-{r.stop - 1}' if len(r) > 1 else ''}" for s, r in enumerate(self.runs))
        dp = f"{self.dp_kind.upper()} inside stages" if self.dp_size > 1 else "no data parallelism"
        return (f"pipeline {self.schedule_name}, mesh {describe_mesh(self.mesh)} ({self.n_stages} stages, "
                f"{self.microbatches} micro-batches, {dp}; {layers})")

    # --- building -------------------------------------------------------------------------------------
    def local_stage_ids(self) -> list[int]:
        return [self.pp_rank + i * self.pp for i in range(self.per_rank)]

    def setup(self, model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float]) -> None:
        self.model_cfg = model.cfg
        self.mesh = build_mesh(self.device, pp=self.pp, dp=self.dp_size, **({"tp": self.tp} if self.tp > 1 else {}))
        self.runs = split_layers(model.cfg.n_layer, self.n_stages)
        ids = self.local_stage_ids()
        schedule_stages = []
        for i, sid in enumerate(ids):
            part = model if i == len(ids) - 1 else copy.deepcopy(model)
            part = on_device(make_stage(part, sid, self.n_stages, self.runs), self.device)
            if self.precision != "fp32" and self.dp_kind != "fsdp":  # autocast: see StageGPT
                part.sent_dtype = DTYPES[self.precision]
            if self.tp > 1:  # the last stage gathers its logits: the schedule's loss takes whole ones
                apply_tensor_parallel(part, self.mesh["tp"], sequence_parallel=False, sharded_loss=False)
                # Those logits are DTensor.to_local()'s view, which FSDP2 warns of (an in-place op on it would skip
                # its hook); the schedule only sends them or hands them to the loss, which changes nothing in place.
                warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPStageGPT\) returned a view",
                                        category=UserWarning)
            wrapped = self._data_parallel(part)
            self.stages[sid] = wrapped
            self.optimizers.append(build_adamw(self._unwrap(wrapped), lr, weight_decay, betas, self.device))
            schedule_stages.append(PipelineStage(wrapped, sid, self.n_stages, self.device, group=self.pp_group))
        self.model = nn.ModuleList(self.stages[s] for s in ids)
        self.optimizer = self.optimizers[0]
        if self.schedule_name == "interleaved":
            self.schedule = ScheduleInterleaved1F1B(schedule_stages, self.microbatches, loss_fn=self._loss)
        else:
            self.schedule = SCHEDULES[self.schedule_name](schedule_stages[0], self.microbatches, loss_fn=self._loss)
        self._tie_embeddings()

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The schedule's loss; a non-finite one spreads to the gradients (gpt.train.divergence)."""
        return spread_nonfinite(loss_fn(logits, targets), self.loss_factor)

    def _data_parallel(self, stage: nn.Module) -> nn.Module:
        if self.dp_kind == "fsdp":
            return shard(stage, self.mesh["dp"], self.precision, self.cfg, self.reduce_dtype)
        if self.dp_size == 1:
            return stage
        return replicate(stage, self.device, self.cfg.bucket_cap_mb, self.dp_group, self.reduce_dtype)

    @staticmethod
    def _unwrap(module: nn.Module) -> nn.Module:
        return module.module if isinstance(module, DistributedDataParallel) else module

    def _tie_embeddings(self) -> None:
        """A group per replica (and tp rank) joining its first and last stage ranks, to sum the tied weight's
        gradients (under tp both copies are split over the vocabulary alike, so the shards pair up). Made in one
        step for all of them, not one world-wide step per group (process_group.subgroups)."""
        if not self.model_cfg.tie_embeddings:
            return
        last_owner = (self.n_stages - 1) % self.pp
        coordinates = self.mesh.mesh.reshape(self.pp, -1)  # stage x (dp, tp)
        pairs = [sorted({int(coordinates[0, c]), int(coordinates[last_owner, c])}) for c in range(coordinates.size(1))]
        self.tie_group = subgroups(pairs, "tie_embeddings")

    def tied_copies(self, module: nn.Module) -> dict[str, str]:
        """The last stage's lm_head is the first stage's wte in a tied model: checkpoints hold wte's optimizer state
        alone, as every other strategy writes and reads them."""
        last = self.stages.get(self.n_stages - 1)
        return {"lm_head.weight": "wte.weight"} if self.tie_group is not None and module is self._unwrap(last) else {}

    def _tied_parameters(self) -> list[nn.Parameter]:
        """This rank's copies of the tied embedding weight: wte on the first stage, lm_head on the last."""
        if self.tie_group is None:
            return []
        params = []
        if 0 in self.stages:
            params.append(self._unwrap(self.stages[0]).wte.weight)
        if self.n_stages - 1 in self.stages:
            params.append(self._unwrap(self.stages[self.n_stages - 1]).lm_head.weight)
        return params

    # --- one optimizer step ---------------------------------------------------------------------------
    def _parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for sid in sorted(self.stages):
            yield from self._unwrap(self.stages[sid]).named_parameters()

    def train_step(self, micro_batches: Iterable[tuple[torch.Tensor, torch.Tensor]], n_micro: int,
                   lr: float, grad_clip: float, layer_norms: bool = False, loss_factor: float = 1.0) -> StepResult:
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr
        self.loss_factor = loss_factor  # the schedule calls _loss itself, inside its step
        clock = PhaseClock(self.device)
        xs, ys = zip(*micro_batches)
        x, y = torch.cat(xs), torch.cat(ys)
        first, last = 0 in self.stages, self.n_stages - 1 in self.stages
        losses: list[torch.Tensor] = []
        args = (x,) if first else ()
        kwargs = {"target": y, "losses": losses} if last else {}
        with self.autocast(), no_forward_sync(self.stages.values()):
            self.schedule.step(*args, **kwargs)
        loss = torch.stack([x.detach().float() for x in losses]).mean() if last else torch.zeros((), device=self.device)
        dist.all_reduce(loss, group=self.pp_group)  # only the last stage has it
        for p in self._tied_parameters():  # gradients scaled and averaged over dp by now
            if hasattr(p.grad, "placements") and p.grad.placements != p.placements:
                # a tensor-parallel embedding's gradient may come back replicated: shard it as its weight is, so
                # the two copies' shards pair up
                p.grad = p.grad.redistribute(p.device_mesh, p.placements)
            grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
            dist.all_reduce(grad, group=self.tie_group)
        clock.mark("fwd_bwd")
        layers = layer_grad_norms(self.local_gradients(), self.layer_keys, self.device) if layer_norms else None
        grad_norm = self.clip_gradients(grad_clip)
        skipped = nonfinite(grad_norm)  # a non-finite loss made it so (no GradScaler here)
        self.before_update()
        for sid, optimizer in zip(sorted(self.stages), self.optimizers):
            step_unless(optimizer, skipped)
            # a DDP stage's gradients are views into its buckets (gpt.parallel.ddp.replicate): zeroed, not freed
            optimizer.zero_grad(set_to_none=not isinstance(self.stages[sid], DistributedDataParallel))
        clock.mark("optimizer")
        return StepResult(loss, grad_norm, layers, clock, skipped)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dp_kind == "fsdp":
            return contextlib.nullcontext()  # FSDP's MixedPrecisionPolicy casts instead
        return super().autocast()

    def clip_gradients(self, max_norm: float) -> torch.Tensor:
        """The norm over every stage's gradients (the tied weight counted once), from each rank's local parts
        (each counted once over the ranks that hold it), then clip with it."""
        tied_copy = self._tied_parameters()[-1:] if self.n_stages - 1 in self.stages else []
        counted = [p.grad for _, p in self._parameters() if p.grad is not None and not any(p is t for t in tied_copy)]
        if self.tp == 1:  # one mesh: torch's norm over this stage, then the stages' squares added
            norm = torch.nn.utils.get_total_norm(counted) if counted else torch.zeros((), device=self.device)
            square = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).detach().float() ** 2
            dist.all_reduce(square, group=self.pp_group)
        else:  # DTensors on the tp and on the dp x tp mesh do not mix in get_total_norm
            square = torch.zeros((), device=self.device)
            for grad in counted:
                local, copies = self._local_part(grad)
                square += local.float().pow(2).sum() / copies
            dist.all_reduce(square)
        total = square.sqrt()
        if max_norm > 0:
            params = [p for _, p in self._parameters() if p.grad is not None]
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=False)  # one mesh per call
        return total

    def _local_part(self, grad: torch.Tensor) -> tuple[torch.Tensor, int]:
        """A stage's parameter is held by its dp x tp ranks: plain ones by each, DTensors by their mesh's."""
        held_by = self.dp_size * self.tp
        outside = held_by // grad.device_mesh.size() if hasattr(grad, "device_mesh") else 1
        return local_part(grad, held_by, outside)

    def local_gradients(self) -> Iterator[tuple[str, torch.Tensor, int]]:
        for name, p in self._parameters():
            if p.grad is not None:
                yield name, *self._local_part(p.grad)

    @torch.no_grad()
    def forward_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Evaluation without the schedule: the whole batch goes through the stages in turn."""
        hidden = None
        loss = torch.zeros((), device=self.device)
        shape = (x.size(0), x.size(1), self.model_cfg.n_embd)
        sent = DTYPES[self.precision]  # the hidden states travel in the compute dtype, as in training
        with self.autocast():
            for sid in range(self.n_stages):
                owner, prev_owner = sid % self.pp, (sid - 1) % self.pp
                if owner != self.pp_rank:
                    continue
                if sid == 0:
                    hidden = x
                elif prev_owner != self.pp_rank:
                    hidden = torch.empty(shape, dtype=sent, device=self.device)
                    dist.recv(hidden, group=self.pp_group, group_src=prev_owner)
                out = self._unwrap(self.stages[sid])(hidden)
                if sid == self.n_stages - 1:
                    loss = loss_fn(out, y).detach().float()
                elif (sid + 1) % self.pp != self.pp_rank:
                    dist.send(out.to(sent).contiguous(), group=self.pp_group, group_dst=(sid + 1) % self.pp)
                else:
                    hidden = out
        dist.all_reduce(loss, group=self.pp_group)
        return loss

    # --- what other parts need ------------------------------------------------------------------------
    def state_parts(self):
        return [(self._unwrap(self.stages[sid]), opt) for sid, opt in zip(sorted(self.stages), self.optimizers)]

    def gradient_buffer_bytes(self) -> int:
        return sum(bucket_bytes(s) for s in self.stages.values() if isinstance(s, DistributedDataParallel))

    def parameter_bytes(self) -> int:
        total = 0
        for _, p in self._parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            total += local.numel() * local.element_size()
        return total

    def flops_share(self) -> float:
        """Training FLOPs per token of this rank's layers (and head, on the last stage) over the whole model's, split
        over the stage's tp ranks."""
        cfg = self.model_cfg
        n_local = sum(len(self.runs[s]) for s in self.stages)
        local = flops_per_token(dataclasses.replace(cfg, n_layer=n_local), cfg.block_size)
        if self.n_stages - 1 not in self.stages:
            local -= 6.0 * cfg.n_embd * cfg.vocab_size  # the head's matmul runs on the last stage only
        return local / flops_per_token(cfg, cfg.block_size) / self.tp


def no_forward_sync(stages: Iterable[nn.Module]) -> contextlib.ExitStack:
    """Every DDP stage's no_sync, around the schedule's step. The schedule runs each micro-batch's forward under
    no_sync and arms the reducer itself for the last backward only (PipelineStage.backward_maybe_with_nosync),
    but on the first step its shape inference runs one forward through the DDP module outside no_sync: DDP arms
    the reducer for a backward that never comes, so the first micro-batch's backward is reduced and recorded
    for DDP's bucket rebuild. When no forward follows it before the last backward (the first stage under 1F1B
    with microbatches == pp), the last backward records every parameter again, and the rebuild at the next
    step's forward fails on twice the parameters."""
    stack = contextlib.ExitStack()
    for stage in stages:
        if isinstance(stage, DistributedDataParallel):
            stack.enter_context(stage.no_sync())
    return stack
