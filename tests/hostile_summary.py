"""A pytest plugin: one summary line for the hostile-input suites, `hostile: N passed, N failed`.

Registered with `pytest_plugins = ["hostile_summary"]` from tests/test_hostile_sessions.py; it counts the
reports of every test whose node id contains `test_hostile` (the sessions suite and the tools suite alike).
"""

from __future__ import annotations

import pytest

COUNTS = {"passed": 0, "failed": 0}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Count each hostile test once: its call (or a failed setup or teardown)."""
    if "test_hostile" not in report.nodeid:
        return
    if report.when == "call" and report.passed:
        COUNTS["passed"] += 1
    elif report.failed:
        COUNTS["failed"] += 1


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """Print the hostile suites' line at the end of the run."""
    if COUNTS["passed"] or COUNTS["failed"]:
        terminalreporter.write_line(f"hostile: {COUNTS['passed']} passed, {COUNTS['failed']} failed")
