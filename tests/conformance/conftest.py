"""Conformance suites from outside the project; their tables go to the pytest summary."""

from __future__ import annotations

import pytest

REPORT: list[str] = []


def report(title: str, lines: list[str]) -> None:
    REPORT.append("\n".join([f"== {title}", *lines, ""]))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if REPORT:
        terminalreporter.section("conformance report")
        for block in REPORT:
            terminalreporter.write_line(block)
