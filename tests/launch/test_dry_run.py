"""`python -m launch.dry_run`: a planned run built as rank r of its planned world on torch's fake process group, what
its modules hold beside the fit check's estimate. Every strategy of llama_1b at 64 and 1,024 ranks, built on the meta
device, agrees with the estimate within the fit check's headroom; the command fails in one line where they do not."""
from __future__ import annotations

import pytest

from gpt.errors import EXIT_FAILED, EXIT_USER
from launch import dry_run
from launch.dry_run import HEADROOM

# A planned GPU job of llama_1b, 8 ranks per node, one sequence per data-parallel rank (no gradient accumulation)
LLAMA = ["model=llama_1b", "cluster=slurm", "cluster.tasks_per_node=8", "cluster.gpus_per_node=8",
         "cluster.gpu_memory_gb=80", "train.precision=bf16"]
PIPELINE = ["strategy=pipeline", "parallel.pp=4", "strategy.microbatches=4"]
# name: (overrides, the data-parallel ranks of a world of W, as a share of W)
STRATEGIES = {
    "ddp": (["strategy=ddp"], 1),
    "zero1": (["strategy=zero1"], 1),
    "fsdp": (["strategy=fsdp"], 1),
    "hsdp": (["strategy=fsdp", "parallel.dp_shard=8", "parallel.dp_replicate=-1"], 1),
    "tp with sequence parallel": (["strategy=fsdp", "parallel.tp=8", "parallel.sequence_parallel=true"], 1 / 8),
    "pipeline 1f1b": ([*PIPELINE, "strategy.schedule=1f1b"], 1 / 4),
    "pipeline interleaved": ([*PIPELINE, "strategy.schedule=interleaved", "strategy.dp=fsdp"], 1 / 4),
    "pp x dp x tp": ([*PIPELINE, "parallel.tp=8", "strategy.dp=fsdp"], 1 / 32),
}
# A small planned CPU run, built in a second
TINY = ["model=tiny", "model.vocab_size=256", "cluster.tasks_per_node=8", "train.device=cpu",
        "train.global_batch_size=8"]


def llama(name: str, world: int) -> list[str]:
    overrides, dp_share = STRATEGIES[name]
    # a pipeline's replica takes its micro-batches from one sequence each
    batch = int(world * dp_share) * (4 if name.startswith("p") else 1)
    return [*LLAMA, f"nodes={world // 8}", f"train.global_batch_size={batch}", *overrides]


@pytest.mark.slow
@pytest.mark.parametrize("world", [64, 1024])
@pytest.mark.parametrize("name", list(STRATEGIES))
def test_every_strategy_is_built_at_64_and_1024_ranks_as_the_fit_check_estimates(name, world):
    """Each rank that holds the most (a pipeline's first and last stage) is built as the ranks build it, and holds
    the parameters, gradients and optimizer state the fit check estimated, within its headroom."""
    done = dry_run.dry_run(llama(name, world))
    assert done.dims.world_size == world and done.built[0].device in ("meta", "cuda:0")
    assert done.ranks == ([0, world * 3 // 4] if name.startswith("p") else [0])
    rows = {row.part: row for row in done.rows()}
    assert all(abs(rows[part].error()) <= HEADROOM for part in dry_run.COMPARED), dry_run.report(done)
    assert done.disagreement() is None
    assert all(b.params > 0 and b.grads > 0 and b.optimizer > 0 for b in done.built)


@pytest.mark.slow
def test_fsdp_rank_0_holds_a_padded_chunk_of_every_tensor_at_4096_ranks_as_estimated():
    """FSDP2 splits each tensor's rows in chunks of ceil(rows / ranks), and rank 0 holds a whole one of each: at 4,096
    ranks 1.56 MiB of llama_1b's parameters, where an even share is 0.97 MiB (-38%: the estimate counted that)."""
    done = dry_run.dry_run(llama("fsdp", 4096))
    rows = {row.part: row for row in done.rows()}
    assert all(abs(rows[part].error()) < 0.001 for part in dry_run.COMPARED), dry_run.report(done)


@pytest.mark.slow
def test_the_command_prints_the_layout_and_agrees(capsys):
    with pytest.raises(SystemExit) as ended:
        dry_run.main([*TINY, "strategy=fsdp", "parallel.tp=2"])
    out = capsys.readouterr().out
    assert ended.value.code == 0
    assert "rank 0 of 8 (1 node(s) x 8) on torch's fake process group, the model on the meta device" in out
    assert "layout: dp_shard=4 x tp=2; FSDP2 (fully_shard)" in out
    assert "agrees with the build within the fit check's 10% headroom" in out.splitlines()[-1]


@pytest.mark.parametrize("layout", [["strategy=ddp"], ["strategy=zero1"],
                                    ["strategy=pipeline", "parallel.pp=2", "strategy.dp=ddp", "strategy.microbatches=2"]])
@pytest.mark.slow
def test_ddp_holds_its_gradients_once_and_the_estimate_says_so(layout):
    """DDP (ZeRO-1's too, and a pipeline's inside its stages) all-reduces the gradients in its reducer's buckets,
    each .grad a view into its bucket (gradient_as_bucket_view): a rank holds them once, as the estimate counts
    them. Without the view the buckets were held beside the .grad tensors: twice what the estimate says."""
    done = dry_run.dry_run([*TINY, *layout])
    assert done.built and all(built.grads == built.params for built in done.built)
    assert done.disagreement() is None


@pytest.mark.slow
def test_a_disagreement_fails_in_one_line(capsys, monkeypatch):
    """An estimate whose optimizer state is half of what ZeRO-1's rank 0 holds (the even split the fit check
    estimated before the dry run found the whole-parameter partition) fails the command in one line, exit code 1."""
    real = dry_run.estimate

    def halved(*args, **kwargs):
        parts = real(*args, **kwargs)
        return type(parts)(parts.params, parts.grads, parts.optimizer / 2, parts.activations, parts.peak)

    monkeypatch.setattr(dry_run, "estimate", halved)
    with pytest.raises(SystemExit) as ended:
        dry_run.main([*TINY, "strategy=zero1"])
    err = capsys.readouterr().err.strip()
    assert ended.value.code == EXIT_FAILED and "\n" not in err
    assert err.startswith("error: the fit check's estimate and the build disagree by more than its 10% headroom: "
                          "optimizer ") and "held by rank 0 of 8 (-50.0%)" in err


@pytest.mark.slow
def test_a_named_rank_that_holds_less_than_the_most_is_no_disagreement(capsys):
    """A middle pipeline stage holds layers only: less than the estimate, which is of the rank that holds the most
    (the first stage's, with the embeddings), and that is no failure."""
    with pytest.raises(SystemExit) as ended:
        dry_run.main([*TINY, "model.n_layer=4", "strategy=pipeline", "parallel.pp=4", "--rank", "2"])
    out = capsys.readouterr().out
    assert ended.value.code == 0 and "rank 2 of 8" in out
    params = next(line for line in out.splitlines() if line.startswith("params"))
    assert params.split()[-1].startswith("+")  # the estimate is higher


@pytest.mark.parametrize("args,line", [
    (["strategy=deepspeed", "strategy.stage=2"], "strategy='deepspeed' is not valid: a strategy the dry run builds: "
                                                "DeepSpeed's ZeRO optimizers copy every parameter's values"),
    (["strategy=ddp", "--rank", "8"], "--rank=8 is not valid: a rank of the planned world, 0 to 7"),
    (["strategy=ddp", "model.n_layre=2"], "model.n_layre"),
])
def test_what_cannot_be_built_is_refused_in_one_line(args, line, capsys):
    with pytest.raises(SystemExit) as ended:
        dry_run.main([*TINY, *args])
    err = capsys.readouterr().err.strip()
    assert ended.value.code == EXIT_USER and "\n" not in err and line in err
