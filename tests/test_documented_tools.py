"""Every `python -m gpt.*`, `launch.*` or `benchmarks.*` command shown in README.md and docs/ parses: its module
exists and takes the flags and arguments shown (the module runs as `python -m` runs it, until its argument parser
has read them: nothing is computed). `python -m launch ...` commands themselves are composed and planned by
tests/launch/test_documented_commands.py."""
from __future__ import annotations

import argparse
import re
import runpy
import shlex
import sys

import pytest

from helpers import REPO

SOURCES = ["README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))]
FENCED = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`([^`]+)`")
COMMAND = re.compile(r"python -m ((?:gpt|launch|benchmarks)\.[\w.]+)((?:[^\n\\|;&>#)]|\\\n)*)")
STARTED_BY_THE_LAUNCHER = {"launch.rank.worker", "launch.backends.slurm.task"}  # internal: shown, not typed
SYNOPSIS = re.compile(r"\[-|\.\.\.|NAME\b")  # a usage line (`[--step N]`, `FILE ...`), not a command to copy


class Parsed(Exception):
    """Raised once the module's parser has read the command line."""


def code(text: str) -> list[str]:
    """The fenced blocks of a page, and its inline code spans (a span wrapped over two lines joined)."""
    return FENCED.findall(text) + [span.replace("\n", " ") for span in INLINE.findall(FENCED.sub("", text))]


def documented() -> list[tuple[str, str, list[str]]]:
    found = []
    for source in SOURCES:
        for m in (m for block in code((REPO / source).read_text()) for m in COMMAND.finditer(block)):
            words = re.sub(r"\\\n\s*", " ", m.group(2))
            named_only = not words.strip()  # `python -m gpt.export` named in a sentence
            if not named_only and m.group(1) not in STARTED_BY_THE_LAUNCHER and not SYNOPSIS.search(words):
                found.append((source, m.group(1), shlex.split(words)))
    return found


CASES = documented()


def test_the_docs_show_the_commands_users_type():
    modules = {module for _, module, _ in CASES}
    assert {"gpt.evaluate", "gpt.export", "gpt.generate", "launch.status", "launch.report"} <= modules, modules


@pytest.mark.parametrize("source, module, words", CASES, ids=[f"{s}:{m} {' '.join(w)}"[:90] for s, m, w in CASES])
def test_a_documented_command_parses(source, module, words, monkeypatch, capsys):
    def parse(self, args=None, namespace=None):
        parsed = original(self, args, namespace)
        raise Parsed(parsed)

    original = argparse.ArgumentParser.parse_known_args
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", parse)
    monkeypatch.setattr(sys, "argv", [module, *words])
    monkeypatch.delitem(sys.modules, module, raising=False)  # run as `python -m` runs it: not imported before
    with pytest.raises((Parsed, SystemExit)) as stop:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    assert stop.type is Parsed or stop.value.code == 0, f"{source}: python -m {module} {' '.join(words)}: {capsys.readouterr().err[-600:]}"
