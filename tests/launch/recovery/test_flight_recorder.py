"""The hang report reads torch's flight recorder dumps: the ranks missing from the collective the others wait in.
torch keeps one recorder per kind of work event: gloo's, and in a CUDA build NCCL's; a rank's file holds both, as JSON.
The gloo dumps here are real ones, written by the project's own dump (launch.recovery.hang.recorder_dumps) from two
gloo ranks, one of which never enters the fourth all_reduce."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from helpers import REPO

from launch.recovery.flight_recorder import Stuck, read_dumps, stuck_collectives, stuck_in
from launch.recovery.hang import Hang, recorder_dumps
from launch.recovery.watchdog import flight_recorder_env

RANK = r"""
import json, os, sys, time
import torch, torch.distributed as dist
from launch.recovery.hang import recorder_dumps
rank, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
store = dist.TCPStore("127.0.0.1", port, 2, is_master=rank == 0)
dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
t = torch.ones(8)
for _ in range(3):
    dist.all_reduce(t)
if rank == 0:
    work = dist.all_reduce(t, async_op=True)  # rank 0 enters the fourth and waits in it
    time.sleep(0.5)
    open(f"{out}/rank0.json", "w").write(json.dumps(recorder_dumps()))
    store.set("dumped", "1")
    work.wait()
else:  # rank 1 is elsewhere (a host-side sync, a slow GPU) until rank 0 has dumped
    open(f"{out}/rank1.json", "w").write(json.dumps(recorder_dumps()))
    store.wait(["dumped"])
    dist.all_reduce(t)
os._exit(0)  # as the ranks do: gloo's teardown may abort ("terminate called without an active exception")
"""


@pytest.fixture(scope="module")
def gloo_dumps(tmp_path_factory) -> dict[int, dict]:
    out = tmp_path_factory.mktemp("fr")
    script = out / "rank.py"
    script.write_text(RANK)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(port), str(out)], env=env) for r in (0, 1)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    recorders = read_dumps({r: out / f"rank{r}.json" for r in (0, 1)})
    assert set(recorders) == {"gloo"}  # a CPU build of torch has no NCCL recorder
    return recorders["gloo"]


@pytest.mark.slow
def test_a_real_gloo_dump_names_the_rank_that_never_entered_the_collective(gloo_dumps):
    assert gloo_dumps[0]["version"] and set(gloo_dumps) == {0, 1}  # the schema torch writes
    (stuck,) = stuck_collectives(gloo_dumps, world=2)
    assert (stuck.group, stuck.desc, stuck.seq, stuck.op) == ("0", "default_pg", 4, "gloo:all_reduce"), stuck
    assert (stuck.waiting, stuck.missing, stuck.no_dump) == ((0,), (1,), ())
    assert stuck.describe() == "rank 1 never entered gloo:all_reduce #4 of group 0 (default_pg), rank 0 waits in it"


@pytest.mark.slow  # seconds of CPU: out of make test-fast's slice
def test_the_hang_report_prefers_the_dumps_to_heartbeats_that_blame_a_healthy_rank(gloo_dumps):
    """The host-side view on a GPU: rank 1's host thread enqueued its collectives and waits in a host sync, looking
    like the rank in the newest collective, while rank 0 looks like it never arrived. The dumps say otherwise."""
    now = time.time()
    beats = [{"rank": 0, "host": "n1", "time": now, "what": "step 12", "step": 12, "idle_s": 30.0},
             {"rank": 1, "host": "n2", "time": now, "what": "step 12", "step": 12, "idle_s": 30.0,
              "collective": "all_reduce", "seq": 40}]
    hang = Hang.from_heartbeats(beats, [0.0, 0.0], stale_s=10)
    assert hang.behind == [0]  # what the heartbeats alone say: the wrong rank
    hang = hang.with_flight_recorder(stuck_collectives(gloo_dumps, world=2))
    line = hang.summary()
    assert line.startswith("flight recorder: rank 1 on n2 never entered gloo:all_reduce #4 of group 0 "
                           "(default_pg), rank 0 on n1 waits in it; rank 1 on n2 was in all_reduce at step 12"), line
    assert "rank 0 on n1 never arrived" not in line
    record = hang.as_dict()
    assert record["waiting"] == [0] and record["flight_recorder"][0]["missing"] == [1], record


def dump(groups: dict[str, tuple[int, int, list[int]]], ids: dict[str, int]) -> dict:
    """A dump in torch's schema: per group name, (last enqueued, last completed, its ranks)."""
    entries = [{"pg_id": ids[name], "process_group": (name, "default_pg" if name == "0" else f"tp{name}"),
                "collective_seq_id": enq, "profiling_name": "nccl:all_gather", "is_p2p": False}
               for name, (enq, _, _) in groups.items()]
    return {"version": "2.10", "entries": entries,
            "pg_config": {name: {"name": name, "desc": "", "ranks": str(ranks)} for name, (_, _, ranks) in groups.items()},
            "pg_status": {str(ids[name]): {"last_enqueued_collective": enq, "last_started_collective": -1,
                                           "last_completed_collective": done}
                          for name, (enq, done, _) in groups.items()}}


def test_a_stuck_subgroup_is_found_by_name_whatever_id_each_rank_gave_it(tmp_path):
    """Tensor-parallel group "1" of ranks 0-1 is stuck (rank 1 never entered #7); the default group is not; rank 3
    left no dump. Each process numbers its groups itself: the name ties them together."""
    dumps = {0: dump({"0": (50, 50, [0, 1, 2, 3]), "1": (7, 6, [0, 1])}, {"0": 0, "1": 1}),
             1: dump({"0": (50, 50, [0, 1, 2, 3]), "1": (6, 6, [0, 1])}, {"0": 0, "1": 5}),
             2: dump({"0": (50, 50, [0, 1, 2, 3])}, {"0": 0})}
    for rank, d in dumps.items():
        (tmp_path / f"rank{rank}.json").write_text(json.dumps({"nccl": d}))
    (tmp_path / "rank3.json").write_bytes(b'{"nccl": {"pg_st')  # cut short
    read = read_dumps({r: tmp_path / f"rank{r}.json" for r in range(4)})["nccl"]
    assert set(read) == {0, 1, 2}
    assert stuck_collectives(read, world=4) == [Stuck("1", "tp1", 7, "nccl:all_gather", (0,), (1,), ())]


def nccl_dump(enqueued: int, started: int, completed: int, world: int, timing: bool = True) -> dict:
    """One rank's dump as torch writes it for NCCL (FlightRecorderDetail.hpp, version 2.10), default group only: its
    host enqueued collectives 1..`enqueued`, its GPU started 1..`started` and completed 1..`completed`. Without
    TORCH_NCCL_ENABLE_TIMING NCCL records no start event: no entry is "started", none has a start time, and
    last_started_collective stays -1."""
    t0 = 1_700_000_000_000_000_000

    def entry(seq: int) -> dict:
        began = timing and seq <= started
        state = "completed" if seq <= completed else "started" if began else "scheduled"
        return {"frames": [], "record_id": seq - 1, "pg_id": 0, "process_group": ("0", "default_pg"),
                "thread_name": "pt_main_thread", "thread_id": "140000000000000", "collective_seq_id": seq,
                "p2p_seq_id": 0, "op_id": seq, "profiling_name": "nccl:all_reduce", "time_created_ns": t0 + seq * 1000,
                "input_sizes": [[1024]], "input_dtypes": ["Float"], "output_sizes": [[1024]],
                "output_dtypes": ["Float"], "state": state,
                "time_discovered_started_ns": t0 + seq * 1000 + 10 if began else None,
                "time_discovered_completed_ns": t0 + seq * 1000 + 20 if seq <= completed else None,
                "retired": seq <= completed, "timeout_ms": 660000, "is_p2p": False}

    return {"version": "2.10", "comm_lib_version": "2.27.3",
            "pg_config": {"0": {"name": "0", "desc": "default_pg", "ranks": str(list(range(world)))}},
            "pg_status": {"0": {"last_enqueued_collective": enqueued,
                                "last_started_collective": started if timing else -1,
                                "last_completed_collective": completed}},
            "entries": [entry(seq) for seq in range(1, enqueued + 1)]}


def gpu_hang(timing: bool = True) -> dict[int, dict]:
    """Four GPU ranks, two per host: every host enqueued all_reduce #10 and went on to a host sync; the GPUs of
    ranks 0, 2 and 3 started it and wait in it, rank 1's GPU never started it (stuck in the kernel before)."""
    return {r: nccl_dump(10, 9 if r == 1 else 10, 9, world=4, timing=timing) for r in range(4)}


def test_on_gpus_the_rank_whose_device_never_started_the_collective_is_named(tmp_path):
    for rank, d in gpu_hang().items():
        (tmp_path / f"rank{rank}.json").write_text(json.dumps({"nccl": d, "gloo": idle_gloo(world=4)}))
    (stuck,) = stuck_in(read_dumps({r: tmp_path / f"rank{r}.json" for r in range(4)}), world=4)
    assert (stuck.seq, stuck.op, stuck.waiting, stuck.missing) == (10, "nccl:all_reduce", (0, 2, 3), (1,)), stuck
    assert stuck.stalled == (1,)  # its host enqueued it: the GPU is where it hangs
    assert stuck.describe() == ("rank 1 never started nccl:all_reduce #10 of group 0 (default_pg) on its GPU (its "
                                "host enqueued it), ranks 0,2,3 wait in it")


def test_the_stalled_gpus_host_is_left_out_of_the_restart_though_its_other_rank_waits():
    """Every heartbeat is alive (the hosts ran on): only the flight recorder says where the GPU hangs."""
    now = time.time()
    beats = [{"rank": r, "host": f"n{r // 2 + 1}", "time": now, "what": "step 12", "step": 12, "idle_s": 70.0,
              "collective": "all_reduce", "seq": 40} for r in range(4)]
    hang = Hang.from_heartbeats(beats, [0.0] * 4, stale_s=10).with_flight_recorder(
        stuck_collectives(gpu_hang(), world=4))
    assert hang.stalled == [1] and hang.hosts_to_exclude() == ["n1"]
    assert hang.summary().startswith("flight recorder: rank 1 on n1 never started nccl:all_reduce #10"), hang.summary()
    assert hang.as_dict()["flight_recorder"][0]["stalled"] == [1]


def test_a_gpu_that_waits_on_another_groups_collective_is_not_the_one_to_leave_out():
    """Rank 1's GPU never started the default group's #10 because it waits in tensor-parallel group "1"'s #7,
    which rank 3's GPU, stuck before it, never started either: rank 3's host goes, not rank 1's."""
    dumps = gpu_hang()
    dumps[3] = nccl_dump(10, 9, 9, world=4)
    for rank, (enq, started, done) in {1: (7, 7, 6), 3: (7, 6, 6)}.items():
        sub = nccl_dump(enq, started, done, world=4)
        for e in sub["entries"]:
            e.update(pg_id=1, process_group=("1", "tp1"))
        dumps[rank]["entries"] += sub["entries"]
        dumps[rank]["pg_status"]["1"] = sub["pg_status"]["0"]
        dumps[rank]["pg_config"]["1"] = {"name": "1", "desc": "tp1", "ranks": "[1, 3]"}
    beats = [{"rank": r, "host": f"n{r + 1}", "time": time.time(), "what": "step 12", "idle_s": 70.0}
             for r in range(4)]
    hang = Hang.from_heartbeats(beats, [0.0] * 4, stale_s=10).with_flight_recorder(
        stuck_collectives(dumps, world=4))
    assert [(s.group, s.waiting, s.stalled) for s in hang.stuck] == [("0", (0, 2), (1, 3)), ("1", (1,), (3,))]
    assert hang.stalled == [3] and hang.hosts_to_exclude() == ["n4"]


def test_without_nccl_timing_no_start_is_recorded_and_every_host_looks_the_same():
    """Why the GPU ranks run with TORCH_NCCL_ENABLE_TIMING=1: without it the dumps tell the ranks apart only by
    what their hosts enqueued, which is all the same."""
    (stuck,) = stuck_collectives(gpu_hang(timing=False), world=4)
    assert (stuck.waiting, stuck.missing) == ((0, 1, 2, 3), ())
    assert stuck.stalled == ()


def test_gpu_ranks_record_when_each_collective_started_unless_the_user_said_otherwise(tmp_path):
    assert flight_recorder_env(tmp_path, {})["TORCH_NCCL_ENABLE_TIMING"] == "1"
    for user in ({"TORCH_NCCL_ENABLE_TIMING": "0"}, {"NCCL_ENABLE_TIMING": "0"}):
        assert "TORCH_NCCL_ENABLE_TIMING" not in flight_recorder_env(tmp_path, user)


def idle_gloo(world: int) -> dict:
    """The gloo recorder of a GPU rank whose host collectives (flags, checkpoint agreement) all completed."""
    return {"version": "2.10", "pg_config": {"0": {"name": "0", "desc": "default_pg", "ranks": str(list(range(world)))}},
            "pg_status": {"0": {"last_enqueued_collective": "3", "last_started_collective": "-1",
                                "last_completed_collective": "3"}},
            "entries": [{"pg_id": 0, "process_group": ["0", "default_pg"], "collective_seq_id": 3,
                         "profiling_name": "gloo:all_reduce", "state": "completed", "is_p2p": False}]}


def test_a_gpu_ranks_dump_holds_nccls_recorder_beside_gloos(monkeypatch):
    """torch writes NCCL's entries only into NCCL's own recorder (`_dump_nccl_trace_json`): a dump of gloo's alone
    (`_dump_fr_trace`) names nobody when a GPU collective stalls."""
    from torch._C import _distributed_c10d as c10d

    dumped = json.dumps(gpu_hang()[1])
    calls = []
    monkeypatch.setattr(c10d, "_dump_nccl_trace_json", lambda **kw: calls.append(kw) or dumped, raising=False)
    recorders = recorder_dumps()
    assert set(recorders) == {"gloo", "nccl"} and recorders["nccl"]["pg_status"]["0"]["last_started_collective"] == 9
    assert calls == [{"includeCollectives": True, "onlyActive": False}]


def test_a_crafted_pickle_where_a_dump_belongs_is_never_unpickled(tmp_path):
    """The run folder may be shared: a file there must not run code in the rank that reads the dumps."""
    import pickle

    made = tmp_path / "ran"

    class Crafted:
        def __reduce__(self):
            return os.system, (f"touch {made}",)

    (tmp_path / "rank0.json").write_bytes(pickle.dumps(Crafted()))
    (tmp_path / "rank1.json").write_text(json.dumps({"nccl": ["not a dump"], "gloo": idle_gloo(2)}))
    assert read_dumps({0: tmp_path / "rank0.json", 1: tmp_path / "rank1.json"}) == {"gloo": {1: idle_gloo(2)}}
    assert not made.exists()
