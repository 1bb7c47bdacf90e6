"""`python -m launch.dry_run [--rank R] OVERRIDES...`: a planned run built here, without a cluster, as rank R of its
planned world (any world size), on torch's fake process group (gpt.train.dry_build): the layout, and the bytes of
parameters, gradients and optimizer state the rank's real modules hold, beside the fit check's estimate
(launch.planning.memory_fit). Exit code 1, with one line, where the two disagree by more than the fit check's
headroom.

The config is composed and planned as `python -m launch` composes and plans it (the same config folder, site
profiles and checks; launch.planning.plan.plan_layout_of, then the fit check), but nothing is written, prepared,
submitted or run. Without --rank the ranks that hold the most are built (ranks_to_build) and both
directions count; a rank named with --rank may hold less than the estimate, which is of the rank that holds the
most, so there only holding more counts. Torch is imported only to build."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


from gpt.config.model import ModelConfig
from gpt.data import check_vocab, is_prepared
from gpt.errors import EXIT_FAILED, ConfigError
from gpt.model.flops import param_count
from gpt.parallel.layout import ParallelDims
from gpt.parallel.memory_estimate import GIB, MemoryParts, estimate
from gpt.parallel.traits import traits_of
from launch import hydra_errors, launch_config
from launch.app import CONFIGS
from launch.launch_config import LaunchConfig
from launch.backends import get_backend
from launch.planning.memory_fit import USABLE, fit
from launch.planning.plan import plan_layout_of, resolved

HEADROOM = 1 - USABLE  # the fit check's: a disagreement larger than this is more than it absorbs
COMPARED = ("params", "grads", "optimizer")  # what a build without a forward holds


@dataclass(frozen=True)
class PartCompared:
    part: str
    estimate: float
    built: list[int | None]  # one per built rank; None: not measured

    def error(self) -> float | None:
        """The estimate's relative error against the most any built rank held (+: the estimate is higher)."""
        held = [b for b in self.built if b is not None]
        if not held:
            return None
        most = max(held)
        return self.estimate / most - 1 if most else (0.0 if self.estimate == 0 else float("inf"))


@dataclass
class DryRun:
    """A planned run and what its built ranks held."""

    run: LaunchConfig
    dims: ParallelDims
    estimate: MemoryParts  # the fit check's, for the planned micro-batch
    grads_at_update: float  # the estimate's gradients as the update reads them (no accumulation between micro-steps)
    ranks: list[int]
    named: bool  # the ranks were named with --rank (they may hold less than the rank that holds the most)
    built: list[Any] = dataclasses.field(default_factory=list)  # gpt.train.dry_build.BuiltRank, one per rank

    def rows(self) -> list[PartCompared]:
        def part(name: str, estimated: float, measured: bool = True) -> PartCompared:
            return PartCompared(name, estimated, [getattr(b, name) if measured else None for b in self.built])

        est = self.estimate
        out = [part("params", est.params), part("grads", self.grads_at_update), part("optimizer", est.optimizer)]
        if self.built[0].allocated is not None:  # a GPU: the allocator's bytes in use hold every state at once
            out.append(part("allocated", sum(getattr(est, p) for p in COMPARED)))
        return [*out, part("activations", est.activations, measured=False), part("peak", est.peak)]

    def disagreement(self) -> str | None:
        """The one line that fails the dry run: a part estimated off by more than the headroom; None when they
        agree. A rank named with --rank counts only where it holds more than the estimate."""
        for row in self.rows():
            error = row.error()
            if row.part == "peak" or error is None or abs(error) <= HEADROOM or (self.named and error > 0):
                continue
            most = max(b for b in row.built if b is not None)
            rank = self.ranks[row.built.index(most)]
            return (f"the fit check's estimate and the build disagree by more than its {HEADROOM:.0%} headroom: "
                    f"{row.part} {size(row.estimate)} estimated, {size(most)} held by rank {rank} of "
                    f"{self.dims.world_size} ({error:+.1%})")
        return None


def size(nbytes: float) -> str:
    return f"{nbytes / GIB:.2f} GiB" if nbytes >= GIB else f"{nbytes / 2**20:.2f} MiB"


def compose(overrides: Sequence[str]) -> LaunchConfig:
    """The config `python -m launch OVERRIDES` runs: the same config folder and search path (site profiles), parsed
    once into its typed tree."""
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        run = launch_config.parse(hydra_compose("config", overrides=list(overrides)))
    return resolved(run, None, list(overrides))


def model_of(run: LaunchConfig) -> ModelConfig:
    """The model with its vocabulary: the model section's, or the prepared data's tokenizer's (a dry run prepares
    nothing)."""
    if run.model.vocab_size:
        return run.model
    data = run.data
    if not is_prepared(data):
        raise ConfigError("model.vocab_size", None, f"a vocabulary size for a dry run: the data in {data.dir} is not "
                          "prepared, and a dry run prepares nothing (or prepare it: python -m gpt.data.prepare)")
    return dataclasses.replace(run.model, vocab_size=check_vocab(None, data.dir))


def plan(overrides: Sequence[str], ranks: Sequence[int] | None = None) -> tuple[DryRun, ModelConfig, str]:
    """The run planned as `python -m launch` plans it (the fit check refuses what it refuses), with nothing written:
    the dry run before its ranks are built, its model, and the device the run plans for."""
    run = compose(overrides)
    backend = get_backend(run.cluster.name)
    device, train, dims = plan_layout_of(run, backend)
    model = model_of(run)
    train = fit(run.strategy, model, train, dims, device)
    if why := traits_of(run.strategy.name).no_dry_run:
        raise ConfigError("strategy", run.strategy.name, f"a strategy the dry run builds: {why}")
    bad = [r for r in ranks or () if not 0 <= r < dims.world_size]
    if bad:
        raise ConfigError("--rank", bad[0], f"a rank of the planned world, 0 to {dims.world_size - 1}")
    micro, _ = train.micro_batches(dims.dp)
    parts = estimate(model, train, run.strategy, dims, micro)
    at_update = estimate(model, train, run.strategy, dims, micro, at_update=True).grads
    return DryRun(dataclasses.replace(run, train=train), dims, parts, at_update, list(ranks or ranks_to_build(dims)),
                  named=bool(ranks)), model, device.kind


def ranks_to_build(dims: ParallelDims) -> list[int]:
    """The ranks that hold the most: the first of the first pipeline stage (the embeddings, the extra layer of an
    uneven split) and of the last (the head, a tied embedding's second copy); a stage between holds layers only, no
    more than the first. The ranks of one stage hold alike, the first the most (FSDP's padded shards, ZeRO-1's
    largest parameter)."""
    return sorted({0, (dims.pp - 1) * (dims.world_size // dims.pp)})


def build_device(model: ModelConfig, parts: MemoryParts) -> Any:
    """This machine's first GPU where the whole model (a rank builds it before its strategy shards it) and the rank's
    states fit USABLE of its free memory; else the CPU, where the model is built on the meta device."""
    import torch

    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(0)
        if max(4.0 * param_count(model)["total"], parts.params + parts.grads + parts.optimizer) <= USABLE * free:
            return torch.device("cuda", 0)
    return torch.device("cpu")


def build(planned: DryRun, model: ModelConfig, device: str) -> DryRun:
    """Each planned rank built on the fake process group (gpt.train.dry_build), on this machine's GPU or the meta
    device."""
    from gpt.collectives.process_group import DistEnv
    from gpt.train.dry_build import build_rank

    where = build_device(model, planned.estimate)
    run, per_node = planned.run, planned.run.cluster.tasks_per_node
    if where.type != device:  # a kernel the planned device runs may not exist here; it changes nothing a rank holds
        run = dataclasses.replace(run, train=dataclasses.replace(run.train, attention="auto"))
    for rank in planned.ranks:
        env = DistEnv(rank=rank, world_size=planned.dims.world_size, local_rank=rank % per_node,
                      local_world_size=per_node, node_rank=rank // per_node, num_nodes=run.nodes)
        planned.built.append(build_rank(run, model, env, where))
    return planned


def dry_run(overrides: Sequence[str], ranks: Sequence[int] | None = None) -> DryRun:
    """`python -m launch.dry_run`'s work, without its printing: planned, then built."""
    return build(*plan(overrides, ranks))


def report(done: DryRun) -> list[str]:
    """The layout and, part by part, the estimate beside what each built rank held."""
    run, dims, first = done.run, done.dims, done.built[0]
    micro, steps = run.train.micro_batches(dims.dp)
    where = "on the meta device" if first.device == "meta" else f"at real size on {first.device}"
    lines = [f"dry run of {run.name}: rank{'s' if len(done.ranks) > 1 else ''} "
             f"{', '.join(map(str, done.ranks))} of {dims.world_size} ({run.nodes} node(s) x "
             f"{run.cluster.tasks_per_node}) on torch's fake process group, the model {where}",
             f"layout: {dims.axes()}; {first.layout}",
             f"batch: micro-batches of {micro} sequence(s), {steps} per step; train.precision={run.train.precision}",
             "", f"{'part':<12}{'estimate':>13}" + "".join(f"{f'rank {r}':>13}" for r in done.ranks) + "   error"]
    for row in done.rows():
        error = row.error()
        shown = "" if error is None or row.part == "peak" else f"{error:+.1%}"
        cells = "".join(f"{size(b) if b is not None else '-':>13}" for b in row.built)
        lines.append(f"{row.part:<12}{size(row.estimate):>13}{cells}   {shown}".rstrip())
    lines.append("")
    on_meta = first.device == "meta"
    lines.append("activations and the peak are the estimate's alone: a dry run runs no forward" if on_meta else
                 "activations are the estimate's alone (a dry run runs no forward); the allocator's peak is that of "
                 "the build and one optimizer step")
    line = done.disagreement()
    lines.append(f"error: {line}" if line else f"the estimate agrees with the build within the fit check's "
                 f"{HEADROOM:.0%} headroom")
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m launch.dry_run", description="Build a planned run as rank R of "
                                     "its planned world on torch's fake process group, here, and print what it holds "
                                     "beside the fit check's estimate.")
    parser.add_argument("--rank", type=int, action="append", help="a rank to build (repeatable); default: the "
                        "ranks that hold the most")
    parser.add_argument("overrides", nargs="*", help="the overrides `python -m launch` takes")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the fit check's line (train.micro_batch_size)
    with hydra_errors.composing(args.overrides):  # Hydra's errors and ours: one line, exit code 2
        planned = plan(args.overrides, args.rank)
    done = build(*planned)
    lines = report(done)
    print("\n".join(lines[:-1]))
    print(lines[-1], file=sys.stderr if done.disagreement() else sys.stdout)
    sys.exit(EXIT_FAILED if done.disagreement() else 0)


if __name__ == "__main__":
    main()
