"""GPU runs planned and placed without a GPU: planning reads the requested resources, never this host's hardware;
local ranks get a GPU each or are refused; a Slurm task that sees only its own GPU drives device 0, and DeepSpeed
is told so through LOCAL_RANK."""
from __future__ import annotations

import pytest
import torch

from cuda_standin import GpuNode, StrictCuda, slurm_closest_tasks
from hydra import compose, initialize_config_dir

from launch import launch_config
from helpers import REPO, SHAKESPEARE, make_plan_of
from gpt.train import trainer
from gpt.collectives.process_group import DistEnv, pick_device, process_group_backend
from gpt.errors import ConfigError, UserError
from launch.rank.environment import detect, export_for_libraries
from launch.rank.gpu_plan import GpuPlan, shared_gpus, vet_gpus
from launch.backends import get_backend
from launch.planning.plan import plan_layout_of, planned_device

TINY = ["model=tiny", f"data.text_path={SHAKESPEARE}"]


@pytest.fixture
def plan(tmp_path_factory):
    data = tmp_path_factory.getbasetemp() / "planning-data"

    def make(*overrides: str):
        with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
            run = launch_config.parse(compose("config", overrides=[*TINY, f"data.dir={data}", *overrides]))
        return run, make_plan_of(run, tmp_path_factory.mktemp("run"))

    return make


def test_a_gpu_job_is_planned_from_the_requested_gpus_on_a_cpu_login_node(plan):
    assert not torch.cuda.is_available()  # this machine: the login node of the test
    cfg, _ = plan("cluster=slurm", "cluster.gpus_per_node=1", "strategy=fsdp", "strategy.cpu_offload=true")
    assert planned_device(cfg, get_backend(cfg.cluster.name)) == "cuda"
    cfg, p = plan("cluster=slurm", "nodes=2", "cluster.gpus_per_node=8", "cluster.tasks_per_node=8", "strategy=fsdp",
                  "strategy.cpu_offload=true", "train.global_batch_size=16")
    assert p.world_size == 16


def test_cpu_offload_is_still_refused_for_a_cpu_job(plan):
    with pytest.raises(ConfigError, match="strategy.cpu_offload"):
        plan("cluster=slurm", "cluster.gpus_per_node=0", "strategy=fsdp", "strategy.cpu_offload=true")


def _fake_gpus(monkeypatch, count: int) -> None:
    StrictCuda(devices=count).install(monkeypatch)  # tests/cuda_standin.py


def test_more_local_ranks_than_gpus_is_refused(plan, monkeypatch):
    _fake_gpus(monkeypatch, 1)
    with pytest.raises(ConfigError, match=r"cluster.tasks_per_node.*at most 1 rank\(s\).*is 2"):
        plan("strategy=ddp", "nodes=2")
    cfg, p = plan("strategy=ddp", "nodes=1")  # one rank, one GPU
    assert planned_device(cfg, get_backend(cfg.cluster.name)) == "cuda" and p.world_size == 1
    plan("strategy=ddp", "nodes=2", "train.device=cpu")  # on the CPU, as many as wanted
    _fake_gpus(monkeypatch, 0)
    with pytest.raises(ConfigError, match="train.device='cuda' is not valid: cpu or auto: this machine has no CUDA"):
        plan("train.device=cuda")


def test_a_rank_never_shares_a_gpu(monkeypatch):
    _fake_gpus(monkeypatch, 2)
    assert pick_device("cuda", DistEnv(rank=1, world_size=2, local_rank=1)) == torch.device("cuda", 1)
    with pytest.raises(UserError, match="should drive GPU 2 but sees 2 GPU"):
        pick_device("cuda", DistEnv(rank=2, world_size=3, local_rank=2))


@pytest.mark.slow  # seconds of CPU: out of make test-fast's slice
def test_two_ranks_share_one_gpu_only_when_asked_and_never_over_nccl(plan, monkeypatch):
    """debug.share_gpu: two local ranks on one GPU, both on cuda:0 over gloo; refused without it, on the CPU, and
    with the strategies that need NCCL."""
    _fake_gpus(monkeypatch, 1)
    with pytest.raises(ConfigError, match=r"at most 1 rank\(s\).*or debug.share_gpu=true"):
        plan("strategy=ddp", "nodes=2")
    run, p = plan("strategy=ddp", "nodes=1", "cluster.tasks_per_node=2", "debug.share_gpu=true",
                  "cluster.gpu_memory_gb=80")
    assert p.world_size == 2 and plan_layout_of(run, get_backend("local"))[0].memory_gib == 40  # half the GPU each
    plan("strategy=fsdp", "parallel.tp=2", "nodes=1", "cluster.tasks_per_node=2", "debug.share_gpu=true")
    for strategy, why in (("strategy=deepspeed", "DeepSpeed starts NCCL"), ("strategy=pipeline", "send/recv")):
        with pytest.raises(ConfigError, match=f"debug.share_gpu=True is not valid: false with {strategy}: .*{why}"):
            plan(strategy, "nodes=1", "cluster.tasks_per_node=2", "debug.share_gpu=true")
    with pytest.raises(ConfigError, match="debug.share_gpu=True is not valid: false on cpu"):
        plan("strategy=ddp", "nodes=2", "train.device=cpu", "debug.share_gpu=true")
    shared = [DistEnv(rank=r, world_size=2, local_rank=r) for r in (0, 1)]
    assert [pick_device("cuda", env, share=True) for env in shared] == [torch.device("cuda", 0)] * 2
    with pytest.raises(UserError, match="should drive GPU 1 but sees 1 GPU.*debug.share_gpu"):
        pick_device("cuda", shared[1])
    # the trainer takes rank 1's device as the worker did (it once picked again without the mode: on a GPU, rank 1
    # stopped there); stopped right after, at the model's config
    class Picked(Exception):
        pass

    def stop(*_):
        raise Picked(torch.cuda.current_device())
    monkeypatch.setattr(trainer, "model_config", stop)
    with pytest.raises(Picked, match="^0$"):
        trainer.Trainer(run, shared[1], p.run_dir)


def test_the_rendezvous_lets_ranks_share_a_gpu_only_in_the_debugging_mode():
    plans = [GpuPlan.of(DistEnv(rank=r, world_size=2, local_rank=r), {}, index=0) for r in (0, 1)]
    assert [p.gpu for p in plans] == ["0", "0"]  # the GPU each really took, not its local rank
    assert "GPU 0 on" in vet_gpus(torch.device("cuda", 0), plans) and "debug.share_gpu" in vet_gpus(
        torch.device("cuda", 0), plans)
    assert vet_gpus(torch.device("cuda", 0), plans, share=True) is None
    assert process_group_backend(torch.device("cuda", 0), share=True) == "gloo"
    assert process_group_backend(torch.device("cuda", 0)) == "cpu:gloo,cuda:nccl"


SLURM = {"SLURM_PROCID": "11", "SLURM_NTASKS": "16", "SLURM_STEP_ID": "0", "SLURM_LOCALID": "3",
         "SLURM_NODEID": "1", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_ID": "42", "MASTER_ADDR": "node1"}


@pytest.mark.parametrize("visible, device", [(None, 3), ("0,1,2,3,4,5,6,7", 3), ("5", 0)])
def test_slurm_tasks_drive_the_gpu_they_see(visible, device, monkeypatch):
    environ = {**SLURM, **({"CUDA_VISIBLE_DEVICES": visible} if visible else {})}
    env = detect(environ)
    assert (env.local_rank, env.device_index) == (3, device)
    _fake_gpus(monkeypatch, 1 if visible == "5" else 8)
    assert pick_device("cuda", env) == torch.device("cuda", device)
    exported: dict[str, str] = {"NCCL_SOCKET_IFNAME": "ib0"}
    export_for_libraries(env, exported)
    assert exported["LOCAL_RANK"] == str(device)  # DeepSpeed's set_device(LOCAL_RANK)
    assert exported["GLOO_SOCKET_IFNAME"] == "ib0"


def test_detect_exports_local_rank_under_slurm_only_for_the_real_environment(monkeypatch):
    import os

    real = {**SLURM, "CUDA_VISIBLE_DEVICES": "2"}
    monkeypatch.setattr(os, "environ", real)  # detect() reads and writes os.environ: a stand-in for it
    detect({**SLURM})
    assert "LOCAL_RANK" not in real
    detect()
    assert real["LOCAL_RANK"] == "0"


def test_gpu_bind_closest_shows_a_task_its_sockets_gpus_and_it_drives_its_own(monkeypatch):
    # 8 GPUs, 8 tasks, --gpu-bind=closest --distribution=block:block: local ranks 4-7 see the second socket's GPUs
    env = detect({**SLURM, "SLURM_LOCALID": "5", "CUDA_VISIBLE_DEVICES": "4,5,6,7", "SLURM_GPU_BIND": "closest",
                  "SLURM_GPUS_ON_NODE": "8", "SLURM_DISTRIBUTION": "block:block"})
    assert (env.local_rank, env.device_index) == (5, 1)
    _fake_gpus(monkeypatch, 4)
    assert pick_device("cuda", env) == torch.device("cuda", 1)  # today: "should drive GPU 5 but sees 4 GPU(s)"
    plan = GpuPlan.of(env, {"CUDA_VISIBLE_DEVICES": "4,5,6,7", "SLURM_GPU_BIND": "closest"})
    assert (plan.index, plan.gpu, plan.gpu_bind) == (1, "5", "closest")
    exported: dict[str, str] = {}
    export_for_libraries(env, exported)
    assert exported["LOCAL_RANK"] == "1"


def _plans(visible: str, locals_: list[int]) -> list[GpuPlan]:
    return [GpuPlan.of(detect({**SLURM, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r), "CUDA_VISIBLE_DEVICES": visible}),
                       {"CUDA_VISIBLE_DEVICES": visible}) for r in locals_]


def test_the_ranks_of_a_node_each_drive_a_gpu_of_their_own():
    node = _plans("0,1,2,3", [0, 1, 2, 3]) + _plans("4,5,6,7", [4, 5, 6, 7])  # --gpu-bind=closest, 2 sockets
    assert [p.gpu for p in node] == [str(g) for g in range(8)] and shared_gpus(node) is None
    crowded = _plans("0,1", [0, 1, 2])  # three tasks on a node with two GPUs
    assert shared_gpus(crowded) == ("more than one rank per GPU: GPU 0 on node1 by ranks 0, 2 (rank 0 sees "
                                    "CUDA_VISIBLE_DEVICES=0,1); run one task per GPU: sbatch --ntasks-per-node equal "
                                    "to --gpus-per-node, or --gpus-per-task=1 (or debug.share_gpu=true to debug on shared "
                                    "GPUs over gloo)").replace("node1", crowded[0].host)


@pytest.mark.parametrize("distribution", [None, "block:block", "cyclic:cyclic"])
@pytest.mark.parametrize("named", ["by index", "by uuid"])
def test_gpu_bind_closest_gives_each_rank_of_a_node_a_gpu_of_its_own(distribution, named, monkeypatch):
    """8 tasks on a node of 2 sockets x 4 GPUs under --gpu-bind=closest, each shown its socket's GPUs as Slurm shows
    them: by default the tasks go to the sockets in turn (local ranks 0, 2, 4, 6 see "0,1,2,3"), where
    local_rank % 4 put ranks 0 and 4 on GPU 0 (NCCL: "Duplicate GPU detected"); every rank drives a GPU of its own
    through CUDA's renumbering, its entries indices or UUIDs."""
    uuids = StrictCuda(devices=8).uuids if named == "by uuid" else None
    node = GpuNode()
    for task in slurm_closest_tasks(gpus=8, sockets=2, distribution=distribution, uuids=uuids):
        env = detect({**SLURM, "SLURM_PROCID": task["SLURM_LOCALID"], **task})
        cuda = StrictCuda(devices=8, visible=task["CUDA_VISIBLE_DEVICES"]).install(monkeypatch)
        device = pick_device("cuda", env)
        node.claim(env.rank, cuda.physical(device.index))
        assert str(cuda.physical(device.index)) in task["SLURM_STEP_GPUS"].split(",")  # a GPU of its socket
    assert sorted(node.owners) == list(range(8))


def test_a_mig_slice_is_the_one_device_of_its_process(monkeypatch):
    """CUDA enumerates one MIG slice per process, whatever CUDA_VISIBLE_DEVICES lists: a task shown two drives the
    first, device 0 (not index 1, which CUDA does not have), and two such tasks share it, which the rendezvous
    check then names."""
    cuda = StrictCuda(devices=2, mig=True)
    shown = ",".join(cuda.uuids)
    plans = []
    for local in (0, 1):
        environ = {**SLURM, "SLURM_PROCID": str(local), "SLURM_LOCALID": str(local), "CUDA_VISIBLE_DEVICES": shown,
                   "SLURM_GPUS_ON_NODE": "2"}
        env = detect(environ)
        StrictCuda(devices=2, mig=True, visible=shown).install(monkeypatch)
        assert pick_device("cuda", env) == torch.device("cuda", 0)
        plans.append(GpuPlan.of(env, environ))
    assert [p.gpu for p in plans] == [cuda.uuids[0]] * 2 and "more than one rank per GPU" in shared_gpus(plans)


def test_runinfo_names_the_gpu_this_rank_drives(monkeypatch):
    from gpt.train.runinfo import environment

    cuda = StrictCuda(devices=2, name="NVIDIA H100 80GB HBM3").install(monkeypatch)
    record = environment(DistEnv(rank=1, world_size=2, local_rank=1), torch.device("cuda", 1))
    assert (record["gpu"], record["device"]) == ("NVIDIA H100 80GB HBM3", "cuda:1") and cuda.contexts == {1}

    def no_cuda(device=None):
        raise AssertionError("a CPU run asked CUDA for a device name")

    monkeypatch.setattr(torch.cuda, "get_device_name", no_cuda)
    assert environment(DistEnv(), torch.device("cpu"))["gpu"] is None


def test_a_cpu_run_of_a_gpu_job_only_warns_of_two_ranks_on_one_gpu(caplog):
    from launch.rank.gpu_plan import vet_gpus

    crowded = _plans("0,1", [0, 1, 2])
    with caplog.at_level("INFO"):
        assert vet_gpus(torch.device("cpu"), crowded) is None
    assert "rank 0 -> GPU 0, rank 1 -> GPU 1, rank 2 -> GPU 0" in caplog.text
    assert "more than one rank per GPU" in caplog.text and "(this run trains on cpu)" in caplog.text


def _join_as_ranks(monkeypatch, tmp_path, visible: str, ranks: int) -> tuple[list, list]:
    """`ranks` ranks of one Slurm node seeing CUDA_VISIBLE_DEVICES=`visible` (two GPUs), each a thread that joins as
    the worker does, over a real TCP store. NCCL's start (dist.init_process_group) is where a shared GPU fails or
    hangs: it records the GPU each rank would hand it, and ends that rank. Returns (those GPUs, each rank's end)."""
    import threading

    import torch.distributed as dist

    from gpt.config.sections import RendezvousConfig, WatchdogConfig
    from launch.recovery.watchdog import flight_recorder_env
    from launch.rank import worker
    from helpers import free_port

    for key in flight_recorder_env(tmp_path, {}):  # join() sets them for NCCL: undone after the test
        monkeypatch.setenv(key, "")
    started: list = []

    def nccl(**kwargs):
        started.append(kwargs["device_id"])
        raise ConnectionAbortedError("NCCL started")

    monkeypatch.setattr(dist, "init_process_group", nccl)
    _fake_gpus(monkeypatch, 2)
    port, ended = free_port(), [None] * ranks

    def rank(r: int) -> None:
        environ = {**SLURM, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r), "SLURM_NTASKS": str(ranks),
                   "SLURM_JOB_NUM_NODES": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                   "CUDA_VISIBLE_DEVICES": visible}
        env = detect(environ)
        try:
            device = pick_device("cuda", env)
            worker.join(tmp_path, env, device, RendezvousConfig(timeout_s=20), WatchdogConfig(),
                        GpuPlan.of(env, environ))
        except BaseException as e:  # noqa: BLE001  the test reads each rank's end
            ended[r] = e

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(ranks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return started, ended


@pytest.mark.timeout(120)
def test_two_ranks_on_one_gpu_are_refused_before_nccl_starts(monkeypatch, tmp_path):
    started, ended = _join_as_ranks(monkeypatch, tmp_path, "0,1", 3)  # ranks 0 and 2 on GPU 0
    assert started == []  # no rank reached NCCL
    for e in ended:
        assert isinstance(e, UserError) and str(e).startswith("more than one rank per GPU: GPU 0 on ")
        assert " by ranks 0, 2 " in str(e) and "\n" not in str(e)
    started, ended = _join_as_ranks(monkeypatch, tmp_path, "0,1", 2)  # a GPU each: NCCL starts on both
    assert sorted(map(str, started)) == ["cuda:0", "cuda:1"]
    assert all(isinstance(e, ConnectionAbortedError) for e in ended)


def test_a_task_slurm_gave_no_gpu_sees_none():
    from launch.rank.environment import visible_gpus

    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "NoDevFiles"}) == []  # Slurm's word for none, not a GPU's name
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "4,5"}) == ["4", "5"] and visible_gpus({}) is None
