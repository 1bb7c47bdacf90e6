"""The one rule for the line of an error's message that a one-line report shows (gpt.errors.error_line)."""
from __future__ import annotations

import pytest

from gpt.errors import UserError, error_line, failure_line


@pytest.mark.parametrize("kwargs, expected", [
    ({}, "connection refused"),
    ({"prefer_error": True}, "sbatch: error: Batch job submission failed"),
    ({"from_end": True}, "see the log"),
    ({"from_end": True, "prefer_error": True}, "RuntimeError: shard 3 is corrupt"),
    ({"limit": 10}, "connection"),
])
def test_error_line_picks_one_line_of_a_message(kwargs, expected):
    message = ("\n  connection refused\nsbatch: error: Batch job submission failed\nRuntimeError: shard 3 is corrupt\n"
               "see the log\n")
    assert error_line(RuntimeError(message), **kwargs) == expected


def test_error_line_of_an_empty_message():
    assert error_line(UserError()) == "UserError"
    assert error_line(" \n") == ""


def test_failure_line_names_the_type_and_the_first_line_that_says_something():
    assert failure_line(RuntimeError("\nStage 0 failed\n  in forward")) == "RuntimeError: Stage 0 failed"
    assert failure_line(KeyError()) == "KeyError"
