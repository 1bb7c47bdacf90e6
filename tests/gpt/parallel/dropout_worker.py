"""One rank of the tensor-parallel dropout test (started by torch.distributed.run on 4 ranks: dp_shard=2 x tp=2):
train a few steps with dropout on, each rank's dropout generator seeded as a GPU's is (on the CPU, the mirror of
per-rank CUDA seeds), then write what the ranks hold: each norm weight's local part and the state of the generator
dropout draws from. With train.device=cuda in the overrides it runs the same check on GPUs.

    python -m torch.distributed.run --nproc-per-node 4 dropout_worker.py OUT_JSON DATA_DIR OVERRIDES_JSON
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from launch import launch_config  # noqa: E402
from gpt.collectives.process_group import init_process_group, leave, pick_device  # noqa: E402
from gpt.train.trainer import Trainer  # noqa: E402
from launch.rank.environment import detect  # noqa: E402


def main() -> None:
    out, data_dir, overrides = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
    env = detect()
    launch_config.register()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = launch_config.parse(compose("config", overrides=[*overrides, f"data.dir={data_dir}"]))
    device = pick_device(cfg.train.device, env)
    init_process_group(env, device)
    trainer = Trainer(cfg, env, out.parent / "run")
    trainer.fit()
    norms = {name: (p.to_local() if hasattr(p, "to_local") else p).detach().tolist()
             for name, p in trainer.strategy.unwrapped.named_parameters() if "norm" in name or "ln_f" in name}
    state = torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()
    mine = {"norms": norms, "rng": hashlib.sha1(state.numpy().tobytes()).hexdigest()}
    every = [None] * env.world_size
    dist.all_gather_object(every, mine)
    if env.rank == 0:
        out.write_text(json.dumps(every))
    leave()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skips gloo's racy teardown


if __name__ == "__main__":
    main()
