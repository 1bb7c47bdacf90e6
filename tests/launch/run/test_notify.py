"""Word when an attempt ends (the `notify` section): told once by whichever process writes the attempt's line, to a
real HTTP server on loopback and a real shell command; a webhook that does not answer costs one line, never the run."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from gpt.config import schema
from gpt.run_folder import RunFolder
from helpers import compose, launch
from launch import launch_config
from launch.rank.job_env import ROUND_VAR, JobEnvironment
from launch.run.attempts import log_attempt, log_killed


@pytest.fixture
def webhook():
    """A webhook on loopback: the JSON bodies it received."""
    received: list[dict] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/hook", received
    server.shutdown()


def run_folder(tmp_path: Path, *overrides: str) -> Path:
    schema.save(launch_config.parse(compose(*overrides)), tmp_path / "config.yaml")
    return tmp_path


def ends(run_dir: Path, *records: dict) -> None:
    for k, record in enumerate(records):  # each line as the process that decided writes it (recover: claimed)
        log_attempt(run_dir, JobEnvironment({ROUND_VAR: str(k)}), {"first_step": 0, "last_step": 40 * (k + 1),
                                                                   **record}, claimed=True)


def test_the_end_of_a_run_is_told_once_with_what_a_person_reads(tmp_path, webhook):
    url, received = webhook
    run_dir = run_folder(tmp_path, f"notify.webhook={url}")
    ends(run_dir, {"ended": "finished"})
    (told,) = received
    assert (told["event"], told["run"], told["last_step"]) == ("finished", str(run_dir), 40)
    assert told["text"] == f"gptlaunch: {run_dir.name} finished at step 40 ({run_dir})"


def test_requeues_are_told_every_nth_and_a_failure_at_once(tmp_path, webhook):
    """notify.every=2: the 2nd and 4th requeue are told, not the 1st and 3rd; a failure always is."""
    url, received = webhook
    run_dir = run_folder(tmp_path, f"notify.webhook={url}", "notify.every=2")
    requeue = {"ended": "preempted by another job (Slurm)", "requeued": True, "note": "requeued job 7"}
    ends(run_dir, requeue, requeue, requeue, requeue, {"ended": "failed: ValueError: a bad batch"})
    assert [t["text"].removesuffix(f" ({run_dir})") for t in received] == [
        f"gptlaunch: {run_dir.name} requeued (2nd time) at step 80: preempted by another job (Slurm); requeued job 7",
        f"gptlaunch: {run_dir.name} requeued (4th time) at step 160: preempted by another job (Slurm); requeued job 7",
        f"gptlaunch: {run_dir.name} failed at step 200: ValueError: a bad batch"]


def test_a_killed_attempt_recorded_by_the_next_is_told_and_a_command_runs(tmp_path):
    """log_killed writes the line of an attempt killed outright: the same one place tells it. The command gets the
    text on its stdin and the event in its environment."""
    out = tmp_path / "told.txt"
    run_dir = run_folder(tmp_path, f"notify.command='cat > {out}; echo $GPTLAUNCH_EVENT >> {out}'",
                         "notify.on=[diverged]")
    mark = {"job_id": "7", "restart": 0, "round": 0, "started": 0.0, "first_step": 0}
    log_killed(run_dir, mark, 30, {"ended": "diverged: loss nan at step 31"})
    assert out.read_text() == (f"gptlaunch: {run_dir.name} diverged at step 30: loss nan at step 31 ({run_dir})"
                               "diverged\n")


def test_a_webhook_that_does_not_answer_costs_one_line_not_the_attempt(tmp_path, caplog):
    run_dir = run_folder(tmp_path, "notify.webhook=http://127.0.0.1:9/")  # the discard port: refused at once
    with caplog.at_level("WARNING", logger="launch.run.notify"):
        ends(run_dir, {"ended": "finished"})
    assert [a.ended for a in RunFolder(run_dir).attempts.read()] == ["finished"]
    (said,) = [r.getMessage() for r in caplog.records]
    assert said.startswith("notify.webhook: not told (") and said.endswith("); the run goes on"), said


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_run_that_finishes_tells_its_webhook(tmp_path, webhook, data_overrides):
    url, received = webhook
    launch("model=tiny", "train.max_steps=6", "train.eval_interval=0", *data_overrides, f"notify.webhook={url}",
           run_dir=tmp_path / "run")
    assert [(t["event"], t["last_step"]) for t in received] == [("finished", 6)], received
