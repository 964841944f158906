"""Conformance suites from outside the project; their tables go to the pytest summary."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ipv6milter.resolver import pyspf_bridge

REPORT: list[str] = []


def report(title: str, lines: list[str]) -> None:
    REPORT.append("\n".join([f"== {title}", *lines, ""]))


@pytest.fixture(autouse=True)
def _restore_pyspf() -> Iterator[None]:
    """pyspf's module-level DNSLookup is ours while a test runs, theirs after."""
    yield
    pyspf_bridge.uninstall()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if REPORT:
        terminalreporter.section("conformance report")
        for block in REPORT:
            terminalreporter.write_line(block)
