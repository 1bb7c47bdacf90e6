"""`gptlaunch VERB ...` is the `python -m` command it stands for: installed as a console script, and each verb runs
its module with the rest of the command line."""
from __future__ import annotations

import configparser
import subprocess
import sys

from helpers import REPO
from launch.cli import VERBS


def gptlaunch(*args: str, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_the_command_is_installed_with_the_package():
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    assert config["options.entry_points"]["console_scripts"].strip() == "gptlaunch = launch.cli:main"


def test_a_verb_is_its_module_with_the_rest_of_the_line(tmp_path):
    """`gptlaunch list DIR` is `python -m launch.list DIR`: the same output and exit code."""
    (tmp_path / "runs").mkdir()
    verb = gptlaunch("list", str(tmp_path / "runs"))
    module = subprocess.run([sys.executable, "-m", "launch.list", str(tmp_path / "runs")], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert (verb.returncode, verb.stdout, verb.stderr) == (module.returncode, module.stdout, module.stderr)


def test_an_unknown_verb_is_one_line_and_no_verb_is_the_usage():
    wrong = gptlaunch("train")
    assert (wrong.returncode, wrong.stderr.strip()) == (2, f"error: gptlaunch 'train' is not a verb: one of "
                                                           f"{', '.join(VERBS)}")
    none = gptlaunch()
    assert none.returncode == 2 and "\n  sweep            python -m launch -m ...\n" in none.stdout, none.stdout
