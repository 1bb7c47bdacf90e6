"""tests/progress_log.py: a suite cut off before its summary still says what failed and what was running."""
from __future__ import annotations

pytest_plugins = ["pytester"]


def test_failures_and_running_tests_are_written_as_they_happen(pytester, monkeypatch, tmp_path):
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)  # this test's own pytest is the controlling process
    monkeypatch.setenv("GPTLAUNCH_TEST_PROGRESS", str(tmp_path / "progress"))
    pytester.makeconftest("from progress_log import install\n\ndef pytest_configure(config):\n    install(config)\n")
    pytester.makepyfile(test_some="""
        from pathlib import Path
        import os

        def test_passes():
            pass

        def test_fails():
            assert 1 == 2, "one is not two"

        def test_sees_itself_running():
            running = (Path(os.environ["GPTLAUNCH_TEST_PROGRESS"]) / "running").read_text()
            assert "test_some.py::test_sees_itself_running" in running and "test_fails" not in running
    """)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, failed=1)
    folder = tmp_path / "progress"
    failed = (folder / "failed").read_text().splitlines()
    assert len(failed) == 1 and failed[0].startswith("test_some.py::test_fails (call, "), failed
    assert "one is not two" in failed[0], failed
    assert (folder / "running").read_text() == "" and (folder / "done").read_text() == "3\n"


def test_without_the_variable_nothing_is_registered(pytester, monkeypatch):
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    monkeypatch.delenv("GPTLAUNCH_TEST_PROGRESS", raising=False)
    pytester.makeconftest("from progress_log import install\n\ndef pytest_configure(config):\n    install(config)\n"
                          "    assert not config.pluginmanager.has_plugin('gptlaunch-progress-log')\n")
    pytester.makepyfile(test_one="def test_one():\n    pass\n")
    pytester.runpytest_inprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)
