"""The local Slurm cluster itself: nodes, multi-node jobs, torch rendezvous across nodes, accounting (sacct)."""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from submitit.slurm.slurm import SlurmInfoWatcher

from helpers import REPO
from launch.backends.slurm import commands

pytestmark = pytest.mark.slurm


def test_sinfo_shows_idle_nodes_with_distinct_names_and_addresses(slurm_cluster):
    deadline = time.monotonic() + 60  # jobs of other tests may still hold nodes
    while True:
        out = slurm_cluster.run("sinfo", "-h", "-N", "-o", "%N %n %o %T").stdout
        rows = [line.split() for line in out.splitlines() if line.strip()]
        idle = {r[0]: r for r in rows if r[3] == "idle"}
        if len(idle) >= slurm_cluster.nodes or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(idle) >= 4, f"want >= 4 idle nodes, sinfo says:\n{out}"
    hostnames = {r[1] for r in idle.values()}
    addresses = {r[2] for r in idle.values()}
    assert len(hostnames) == len(idle) and len(addresses) == len(idle), out
    assert all(ipaddress.ip_address(a) in slurm_cluster.subnet for a in addresses), out


def test_two_node_job_lands_on_two_hosts(slurm_cluster, tmp_path):
    out_file = tmp_path / "out.txt"
    job = slurm_cluster.sbatch(
        "#!/bin/bash\nsrun hostname -s\nsrun hostname -I\n",
        "--nodes=2", "--ntasks-per-node=1", "--time=5", f"--output={out_file}", f"--chdir={tmp_path}",
    )
    assert slurm_cluster.wait_state(job, timeout=60) == "COMPLETED", out_file.read_text()
    words = out_file.read_text().split()
    names = {w for w in words if re.fullmatch(slurm_cluster.node_re, w)}
    addrs = {w for w in words if re.fullmatch(r"\d+\.\d+\.\d+\.\d+", w)}
    assert len(names) == 2, words
    assert len(addrs) == 2 and all(ipaddress.ip_address(a) in slurm_cluster.subnet for a in addrs), words
    assert names == set(slurm_cluster.hostnames(slurm_cluster.job_info(job)["NodeList"]))


ALLREDUCE = """
import datetime, os, socket
import torch
import torch.distributed as dist

rank, world = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
dist.init_process_group(
    "gloo", init_method=f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
    rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60),
)
t = torch.tensor([float(rank + 1)])
dist.all_reduce(t)
print(f"rank={rank} host={socket.gethostname()} sum={t.item():g}", flush=True)
dist.destroy_process_group()
"""


def test_gloo_all_reduce_across_two_nodes(slurm_cluster, tmp_path):
    (tmp_path / "allreduce.py").write_text(ALLREDUCE)
    out_file = tmp_path / "out.txt"
    script = f"""#!/bin/bash
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
echo "master=$MASTER_ADDR:$MASTER_PORT"
srun {sys.executable} allreduce.py
"""
    job = slurm_cluster.sbatch(
        script, "--nodes=2", "--ntasks-per-node=1", "--time=5", f"--output={out_file}", f"--chdir={tmp_path}",
    )
    state = slurm_cluster.wait_state(job, timeout=180)
    out = out_file.read_text()
    assert state == "COMPLETED", out
    results = {r: (h, s) for r, h, s in re.findall(r"rank=(\d) host=(\S+) sum=(\S+)", out)}
    assert sorted(results) == ["0", "1"], out
    assert {s for _, s in results.values()} == {"3"}, out
    hosts = [h for h, _ in results.values()]
    assert len(set(hosts)) == 2, out
    assert re.search(r"master=(\S+):", out).group(1) == slurm_cluster.hostnames(
        slurm_cluster.job_info(job)["NodeList"])[0]


def test_sacct_is_slurms_own_and_speaks_submitit(slurm_cluster, tmp_path, monkeypatch):
    """slurmdbd keeps the books: Slurm's own sacct answers submitit's query (states, array tasks, exit codes)."""
    opts = ["--time=5", "--output=/dev/null", f"--chdir={tmp_path}"]
    done = slurm_cluster.sbatch("#!/bin/bash\ntrue\n", "--nodes=2", *opts)
    failed = slurm_cluster.sbatch("#!/bin/bash\nexit 3\n", *opts)
    cancelled = slurm_cluster.sbatch("#!/bin/bash\nsleep 300\n", *opts)
    array = slurm_cluster.sbatch("#!/bin/bash\ntrue\n", "--array=0-2", *opts)
    held = slurm_cluster.sbatch("#!/bin/bash\ntrue\n", "--array=0-3", "--hold", *opts)
    try:
        slurm_cluster.wait_state(cancelled, {"RUNNING"}, timeout=60)
        slurm_cluster.run("scancel", cancelled)
        assert slurm_cluster.wait_state(done, timeout=60) == "COMPLETED"
        assert slurm_cluster.wait_state(cancelled, timeout=60) == "CANCELLED"
        assert slurm_cluster.wait_state(failed, timeout=60) == "FAILED"
        for task in range(3):
            assert slurm_cluster.wait_state(f"{array}_{task}", timeout=60) == "COMPLETED"

        sacct = shutil.which("sacct", path=slurm_cluster.env["PATH"])
        assert sacct and not sacct.startswith(str(REPO)), sacct
        deadline = time.monotonic() + 60  # accounting hears of a job's end a moment after scontrol
        while (rows := slurm_cluster.run("sacct", "-n", "-X", "-P", "-o", "JobID,State,ExitCode", "-j",
                                         failed).stdout) != f"{failed}|FAILED|3:0\n" and time.monotonic() < deadline:
            time.sleep(0.5)
        assert rows == f"{failed}|FAILED|3:0\n"
        # submitit's exact invocation, and its own parser
        cmd = ["sacct", "-o", "JobID,State,NodeList", "--parsable2"]
        for jid in (done, cancelled, array, held):
            cmd += ["-j", jid]
        # slurmctld hands each job's end to slurmdbd a moment after squeue and scontrol show it
        deadline = time.monotonic() + 60
        while True:
            out = slurm_cluster.run(*cmd).stdout
            info = SlurmInfoWatcher().read_info(out)
            ended = [info.get(j, {}).get("State", "") for j in (done, cancelled, *(f"{array}_{t}" for t in range(3)))]
            if all(s and s not in ("PENDING", "RUNNING") for s in ended) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert out.splitlines()[0] == "JobID|State|NodeList"
        assert info[done]["State"] == "COMPLETED"
        assert set(slurm_cluster.hostnames(info[done]["NodeList"])) <= slurm_cluster.node_names()
        assert info[cancelled]["State"].startswith("CANCELLED")  # Slurm says by whom: "CANCELLED by 0"
        for task in range(3):
            assert info[f"{array}_{task}"]["State"] == "COMPLETED"
        for task in range(4):  # one pending row "ID_[0-3]" covers every task
            assert info[f"{held}_{task}"]["State"] == "PENDING"
            assert info[f"{held}_{task}"]["NodeList"] == "None assigned"

        # submitit end to end: its watcher runs `sacct` from PATH and sees the jobs end
        monkeypatch.setenv("PATH", slurm_cluster.env["PATH"])
        monkeypatch.setenv("SLURM_CONF", slurm_cluster.env["SLURM_CONF"])
        watcher = SlurmInfoWatcher(delay_s=0)
        for jid in (done, cancelled, f"{array}_1", f"{held}_2"):
            watcher.register_job(jid)
        assert watcher.get_state(done, mode="force") == "COMPLETED"
        assert watcher.is_done(cancelled, mode="cache") and watcher.get_state(cancelled, "cache").startswith("CANCELLED")
        assert watcher.is_done(f"{array}_1", mode="cache")
        assert not watcher.is_done(f"{held}_2", mode="cache")
    finally:
        subprocess.run(["scancel", cancelled, held], env=slurm_cluster.env, capture_output=True)


def test_sacct_ignores_unknown_jobs(slurm_cluster):
    out = slurm_cluster.run("sacct", "-o", "JobID,State,NodeList", "--parsable2", "-j", "999999").stdout
    assert out == "JobID|State|NodeList\n"
    assert SlurmInfoWatcher().read_info(out) == {}


def test_instances_share_no_name_address_port_or_folder():
    """Parallel test workers each run their own instance: nothing of one may be another's."""
    def describe(instance: int) -> dict[str, str]:
        out = subprocess.run(["bash", str(REPO / "slurm" / "local_cluster.sh"), "describe"], capture_output=True,
                             text=True, check=True, env={**os.environ, "GPTLAUNCH_CLUSTER_INSTANCE": str(instance)})
        return dict(line.split("=", 1) for line in out.stdout.splitlines())

    layouts = [describe(k) for k in (0, 1, 2, 99)]
    assert layouts[0]["NODE_PREFIX"] == "gl-n" and layouts[0]["SUBNET"] == "10.77.0.0/24"  # the default, as documented
    for key in ("DIR", "SLURM_CONF", "BRIDGE", "NODE_PREFIX", "VETH_PREFIX", "SUBNET", "CONTROLLER_ADDR",
                "SLURMCTLD_PORT"):
        assert len({layout[key] for layout in layouts}) == len(layouts), key
    # Linux interface names: at most 15 characters, node 200 of the last instance included
    assert all(len(layout["BRIDGE"]) <= 15 and len(layout["VETH_PREFIX"] + "200") <= 15 for layout in layouts)


def test_state_from_a_folder_others_can_write_is_not_sourced(tmp_path):
    """GPTLAUNCH_CLUSTER_DIR names the folder the script (as root) reads its state from: a cluster.env planted in
    a folder others may write is refused, never run."""
    folder = tmp_path / "cluster-77"
    folder.mkdir()
    planted = tmp_path / "planted"
    (folder / "cluster.env").write_text(f"touch {planted}; NODES=1\n")
    folder.chmod(0o777)
    env = {**os.environ, "GPTLAUNCH_CLUSTER_INSTANCE": "77", "GPTLAUNCH_CLUSTER_DIR": str(tmp_path / "cluster")}
    proc = subprocess.run(["bash", str(REPO / "slurm" / "local_cluster.sh"), "status"], env=env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0 and "not sourced" in proc.stderr, proc.stderr
    assert not planted.exists()



@pytest.mark.parametrize("command", [["preempt", "qos"], ["min-job-age", "2"]])
def test_reconfiguring_a_cluster_that_was_never_started_is_one_line(tmp_path, command):
    """preempt and min-job-age change a running cluster's slurmctld: without one, one line says to start it."""
    env = {**os.environ, "GPTLAUNCH_CLUSTER_INSTANCE": "78", "GPTLAUNCH_CLUSTER_DIR": str(tmp_path / "cluster")}
    proc = subprocess.run(["bash", str(REPO / "slurm" / "local_cluster.sh"), *command], env=env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0 and proc.stderr.count("\n") == 1, proc.stderr
    assert "no cluster here" in proc.stderr and "local_cluster.sh up" in proc.stderr, proc.stderr
    assert not list(tmp_path.iterdir())  # nothing made

def test_the_clusters_state_logs_and_database_are_roots_alone_and_its_configuration_every_users_to_read(slurm_cluster):
    folder = slurm_cluster.conf.parent
    private = [folder / "state", folder / "log", *(folder / "log").iterdir(), folder / "cluster.env"]
    if (folder / "slurmdbd.conf").exists():  # the database's password
        private += [folder / "db", folder / "slurmdbd.conf"]
    for path in private:
        assert path.stat().st_mode & 0o077 == 0, f"{path} is {oct(path.stat().st_mode)}"
    for path in [folder, slurm_cluster.conf, folder / "gres.conf", folder / "spool"]:  # as at a site
        others = 0o001 if path.is_dir() else 0o004  # enter a folder, read a file
        assert path.stat().st_mode & others and not path.stat().st_mode & 0o022, f"{path} is {oct(path.stat().st_mode)}"


def test_without_accounting_the_launcher_reads_scontrol_until_slurm_forgets(slurm_cluster, tmp_path, monkeypatch):
    """A site without slurmdbd (`local_cluster.sh up --no-accounting`), as its clients see it: sacct refuses, and the
    launcher's one poll takes a finished job's state and exit from scontrol (for MinJobAge), then GONE."""
    conf = tmp_path / "slurm.conf"
    conf.write_text(re.sub(r"(?m)^AccountingStorage\w*=.*$", "", slurm_cluster.conf.read_text())
                    + "AccountingStorageType=accounting_storage/none\n")
    failed = slurm_cluster.sbatch("#!/bin/bash\nexit 3\n", "--time=5", "--output=/dev/null", f"--chdir={tmp_path}")
    assert slurm_cluster.wait_state(failed, timeout=60) == "FAILED"
    monkeypatch.setenv("SLURM_CONF", str(conf))
    monkeypatch.setenv("PATH", slurm_cluster.env["PATH"])
    with pytest.raises(commands.SlurmUnavailable, match="accounting storage is disabled"):
        commands.run("sacct", "-n", "-X", "-j", failed)
    infos = commands.job_infos([failed, "999999"])
    assert (infos[failed].state, infos["999999"].state) == ("FAILED", commands.GONE)
    assert commands.scontrol_job(failed).get("ExitCode") == "3:0"


@pytest.mark.timeout(600)
def test_a_cluster_left_in_disorder_is_put_back_at_rest_before_the_next_test(slurm_cluster):
    """tests/slurm/at_rest.py, as the gate before each Slurm test runs it: a job left running, a node left down and a
    partition's setting left changed are each repaired, and a cluster at rest is left alone."""
    import at_rest

    baseline = at_rest.settings(slurm_cluster)
    first, second = sorted(slurm_cluster.node_names())[:2]
    job = slurm_cluster.sbatch("#!/bin/bash\nsleep 600\n", "-N1", f"--nodelist={first}", "--output=/dev/null")
    slurm_cluster.wait_state(job, {"RUNNING"})
    slurm_cluster.run("scontrol", "update", f"nodename={second}", "state=down", "reason=left down by a test")
    slurm_cluster.run("scontrol", "update", "PartitionName=low", "GraceTime=7")

    wrong = at_rest.restore(slurm_cluster, baseline)
    assert wrong[0] == f"job(s) {job} still held: cancelled", wrong
    assert wrong[1].startswith("nodes not idle (") and f"'{second}': 'down'" in wrong[1], wrong
    assert wrong[2:] == ["settings changed (partitions): the cluster was started again"], wrong
    assert at_rest.settings(slurm_cluster) == baseline
    assert at_rest.restore(slurm_cluster, baseline) == []
