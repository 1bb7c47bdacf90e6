"""data.prepare_on=job on the local Slurm cluster: a sweep's data is prepared once, in a job of two nodes that the
training jobs depend on; a preparation that fails ends the launch with one line, and no training job is left."""
from __future__ import annotations

import json
import re
import subprocess
import time

import pytest

from slurm_helpers import SLURM, TINY, output, run_launch

pytestmark = pytest.mark.slurm

WORDS = "the quick brown fox jumps over a lazy dog while seven wise owls sing softly".split()


def write_jsonl_corpus(folder, files: int = 4, docs: int = 60):
    folder.mkdir()
    for f in range(files):
        lines = [json.dumps({"text": " ".join(WORDS[(f + d + i) % len(WORDS)] for i in range(40))})
                 for d in range(docs)]
        (folder / f"part{f}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def queued(env, name: str) -> list[str]:
    return subprocess.run(["squeue", "-h", "-n", name, "-o", "%i %j"], env=env, capture_output=True,
                          text=True).stdout.split()


@pytest.mark.timeout(240)
def test_a_sweep_prepares_once_in_a_job_and_a_failed_preparation_leaves_no_job(slurm_cluster, tmp_path):
    corpus = write_jsonl_corpus(tmp_path / "corpus")
    data = [f"data.text_path={corpus}", "data.format=jsonl", f"data.dir={tmp_path / 'prepared'}",
            "data.prepare_on=job", "data.prepare_nodes=2", "data.workers=1"]
    start = time.monotonic()
    proc = run_launch(slurm_cluster.env, "-m", "nodes=1,2", *SLURM, *TINY, *data, "name=prepjob",
                      f"hydra.sweep.dir={tmp_path / 'sweep'}")
    took = time.monotonic() - start
    assert proc.returncode == 0, output(proc)
    [prep] = re.findall(r"submitted data preparation job (\d+): 2 node", proc.stdout)
    assert re.search(r"^data preparation of prepared +2 ", proc.stdout, re.M), output(proc)  # in the budget
    meta = json.loads((tmp_path / "prepared" / "meta.json").read_text())
    assert meta["source"]["files"] == 4 and meta["splits"]["train"]["tokens"] > 0
    training = re.findall(r"submitted job (\d+) for nodes=(\d)", proc.stdout)
    assert sorted(n for _, n in training) == ["1", "2"], output(proc)
    # each point's job started only after the preparation had succeeded
    scripts = [p.read_text() for p in (tmp_path / "sweep" / "slurm").glob("*_submission.sh")]
    assert sum(f"--dependency=afterok:{prep}" in s for s in scripts) == 2, scripts
    assert len(re.findall(r"COMPLETED on", proc.stdout)) == 2, output(proc)

    # a corrupt input: the preparation job fails, and so does the launch, in one line; nothing is left queued (into
    # a folder of its own: the prepared one is never prepared again from other inputs)
    (corpus / "part2.jsonl").write_text('{"text": "fine"}\nnot json at all\n')
    bad = [*data[:2], f"data.dir={tmp_path / 'prepared-bad'}", *data[3:]]
    failed = run_launch(slurm_cluster.env, "-m", "nodes=1,2", *SLURM, *TINY, *bad, "name=prepjob-bad",
                        f"hydra.sweep.dir={tmp_path / 'bad'}")
    assert failed.returncode != 0, output(failed)
    [line] = [x for x in failed.stderr.splitlines() if "data preparation job" in x]
    assert re.search(r"the data preparation job \d+ ended FAILED: .*part2.jsonl:2 is not a JSON object.*would never "
                     r"start \(DependencyNeverSatisfied\) and are cancelled\. Its log: \S+_log\.err", line), line
    assert "Traceback" not in failed.stderr
    assert queued(slurm_cluster.env, "prepjob-bad") == []
    print(f"prepared once and trained 2 points in {took:.0f} s")


@pytest.mark.timeout(200)
def test_a_preparation_job_takes_no_spares_and_a_failed_task_ends_it(slurm_cluster, tmp_path):
    """The training jobs' cluster.spare_nodes are not the preparation job's: with them it would run under --no-kill
    and --kill-on-bad-exit=0, and its other tasks would wait for the failed task's part to the time limit."""
    corpus = write_jsonl_corpus(tmp_path / "corpus")
    (corpus / "part2.jsonl").write_text('{"text": "fine"}\nnot json at all\n')
    data = [f"data.text_path={corpus}", "data.format=jsonl", f"data.dir={tmp_path / 'prepared'}",
            "data.prepare_on=job", "data.prepare_nodes=2", "data.workers=1"]
    failed = run_launch(slurm_cluster.env, *SLURM, *TINY, *data, "cluster.spare_nodes=1", "name=prepjob-spares",
                        f"hydra.run.dir={tmp_path / 'run'}", timeout=150)
    assert failed.returncode != 0, output(failed)
    assert re.search(r"submitted data preparation job \d+: 2 node\(s\) x", failed.stdout), output(failed)
    assert re.search(r"the data preparation job \d+ ended FAILED: .*part2.jsonl:2 is not a JSON object",
                     failed.stderr), output(failed)
    assert queued(slurm_cluster.env, "prepjob-spares") == []
