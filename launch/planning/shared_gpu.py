"""debug.share_gpu, checked at planning: the ranks of a node share its GPUs over gloo's CUDA collectives, NCCL never
started. A debugging mode, so that a machine with one GPU runs two ranks of ddp, fsdp or tp (and async checkpoints)
on real CUDA tensors; refused in one line where it cannot run, and never taken unless asked for."""
from __future__ import annotations

from gpt.errors import ConfigError
from launch.launch_config import LaunchConfig
from launch.local_gpus import local_gpus

# What needs NCCL or a collective gloo lacks on CUDA tensors: DeepSpeed starts NCCL itself, and a pipeline passes
# activations by send/recv, which gloo does on host tensors only.
NEEDS_NCCL = {"deepspeed": "DeepSpeed starts NCCL itself, which refuses two ranks on one GPU",
              "pipeline": "a pipeline's stages pass activations by send/recv, which gloo has for host tensors only"}


def check_shared_gpu(run: LaunchConfig, device: str) -> None:
    """One line where debug.share_gpu=true cannot run: not on GPUs, or a strategy that needs NCCL."""
    if not run.debug.share_gpu:
        return
    if device != "cuda":
        raise ConfigError("debug.share_gpu", True, f"false on {device}: ranks share GPUs only on a GPU run "
                          "(train.device=cuda)")
    why = NEEDS_NCCL.get(run.strategy.name)
    if why:
        raise ConfigError("debug.share_gpu", True, f"false with strategy={run.strategy.name}: {why}; ddp, zero1, "
                          "fsdp and tensor parallelism run on shared GPUs")



def memory_per_rank(run: LaunchConfig, device: str, memory: float | None) -> float | None:
    """The GiB each rank has for the fit check: a shared GPU's split between the ranks of a node that take it in turn
    (debug.share_gpu); otherwise the device's."""
    if not run.debug.share_gpu or device != "cuda" or not memory:
        return memory
    gpus = run.cluster.gpus_per_node or len(local_gpus()) or 1
    return memory / -(-run.cluster.tasks_per_node // gpus)
