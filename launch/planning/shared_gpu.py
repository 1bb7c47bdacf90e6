"""The GPUs the ranks of a node take, checked at planning: one each (a local run's on this machine's), or, in the
debugging mode debug.share_gpu, several ranks to one GPU over gloo's CUDA collectives, NCCL never started, so that a
machine with one GPU runs two ranks of ddp, fsdp or tp (and async checkpoints) on real CUDA tensors; refused in one
line where it cannot run, and never taken unless asked for. Then the memory each rank has for the fit check."""
from __future__ import annotations

from gpt.errors import ConfigError
from launch.launch_config import LaunchConfig
from launch.local_gpus import local_gpus

# What needs NCCL or a collective gloo lacks on CUDA tensors: DeepSpeed starts NCCL itself, and a pipeline passes
# activations by send/recv, which gloo does on host tensors only.
NEEDS_NCCL = {"deepspeed": "DeepSpeed starts NCCL itself, which refuses two ranks on one GPU",
              "pipeline": "a pipeline's stages pass activations by send/recv, which gloo has for host tensors only"}


def rank_memory(run: LaunchConfig, device: str, world_size: int, memory: float | None) -> float | None:
    """The GiB each rank has of `memory`, the device's, once its ranks are known to get GPUs they may take."""
    check_shared_gpu(run, device)
    check_local_gpus(run, device, world_size)
    return memory_per_rank(run, device, memory)


def check_local_gpus(run: LaunchConfig, device: str, world_size: int) -> None:
    """Local ranks share this machine's GPUs one each: two ranks on one GPU make NCCL fail ("Duplicate GPU"); several
    to a GPU only with debug.share_gpu (gloo, no NCCL)."""
    if run.cluster.name != "local" or device != "cuda":
        return
    gpus = len(local_gpus())
    if gpus == 0:
        raise ConfigError("train.device", "cuda", "cpu or auto: this machine has no CUDA GPU for the local ranks")
    if world_size > gpus and not run.debug.share_gpu:
        raise ConfigError("cluster.tasks_per_node", run.cluster.tasks_per_node,
                          f"at most {gpus} rank(s) in all (nodes x tasks_per_node is {world_size}): this machine "
                          f"has {gpus} GPU(s) and each rank needs its own; or train.device=cpu (or "
                          "debug.share_gpu=true, a debugging mode over gloo)")


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
