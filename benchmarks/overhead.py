"""gptlaunch's training step against a bare PyTorch loop on the same model and batches.

Both run in this one process, interleaved step by step (so machine noise hits both alike), and the
figure is the ratio of median step times. Target: gptlaunch keeps at least 97% of the bare loop's tokens/s.

    python benchmarks/overhead.py [--steps 300] [--threads 1] [OVERRIDES...]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import compose_config, save_results  # noqa: E402
from launch import launch_config  # noqa: E402
from gpt.collectives.process_group import DistEnv  # noqa: E402
from gpt.model.transformer import GPT  # noqa: E402
from gpt.train.optim import build_adamw  # noqa: E402
from gpt.train.schedule import lr_at  # noqa: E402
from gpt.train.trainer import Trainer  # noqa: E402
from launch.backends import get_backend  # noqa: E402
from launch.planning.plan import make_plan  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 gives the steadiest timings)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run_dir = Path(tempfile.mkdtemp(prefix="gptlaunch-overhead-"))
    total = args.warmup + args.steps
    cfg = compose_config([f"train.max_steps={total}", "train.progress=false", *args.overrides])
    make_plan(cfg, run_dir, get_backend(cfg.cluster.name))
    cfg = launch_config.load(run_dir / "config.yaml")
    trainer = Trainer(cfg, DistEnv(), run_dir)
    t = trainer.train

    torch.manual_seed(cfg.seed)
    model = GPT(trainer.model_cfg).to(trainer.device)
    optimizer = build_adamw(model, t.lr, t.weight_decay, tuple(t.betas), trainer.device)

    def bare_step(step: int) -> None:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, t)
        x, y = trainer.data.batches.get(step, 0)
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    bare, ours = [], []
    trainer.reporter.new_window()
    for step in range(total):
        # Alternate who goes first, so neither always runs on a warmer cache.
        pair = [("bare", lambda step=step: bare_step(step)), ("ours", trainer.train_step)]
        for name, fn in pair if step % 2 else reversed(pair):
            (bare if name == "bare" else ours).append(timed(fn))
    bare, ours = bare[args.warmup:], ours[args.warmup:]
    ratio = statistics.median(bare) / statistics.median(ours)
    tokens = t.global_batch_size * trainer.model_cfg.block_size
    results = {
        "model": trainer.model_cfg.name, "steps": args.steps, "tokens_per_step": tokens,
        "bare_median_ms": 1e3 * statistics.median(bare), "gptlaunch_median_ms": 1e3 * statistics.median(ours),
        "bare_tokens_per_s": tokens / statistics.median(bare),
        "gptlaunch_tokens_per_s": tokens / statistics.median(ours),
        "throughput_kept": ratio,
    }
    path = save_results("overhead", results)
    print(f"model {results['model']}, {tokens} tokens/step, {args.steps} steps, {args.threads} thread(s)")
    print(f"bare PyTorch loop : {results['bare_median_ms']:.2f} ms/step median, "
          f"{results['bare_tokens_per_s']:,.0f} tokens/s")
    print(f"gptlaunch trainer : {results['gptlaunch_median_ms']:.2f} ms/step median, "
          f"{results['gptlaunch_tokens_per_s']:,.0f} tokens/s")
    print(f"throughput kept   : {100 * ratio:.1f}% (target >= 97%)   [{path}]")


if __name__ == "__main__":
    main()
