"""Session fixtures shared by every test folder (helpers live in tests/helpers.py)."""
from __future__ import annotations

import pytest

from helpers import SHAKESPEARE


@pytest.fixture(scope="session")
def data_overrides(tmp_path_factory) -> list[str]:
    """Point runs at the shared corpus and a prepared copy private to this test session."""
    assert SHAKESPEARE.is_file(), f"the test corpus is missing: {SHAKESPEARE}"
    prepared = tmp_path_factory.mktemp("data") / "shakespeare_char"
    return [f"data.text_path={SHAKESPEARE}", f"data.dir={prepared}"]
