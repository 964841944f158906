"""Fixtures shared by every layer of the tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ipv6milter.resolver import pyspf_bridge


@pytest.fixture(autouse=True)
def _restore_pyspf() -> Iterator[None]:
    """pyspf's module-level DNSLookup is ours while a test runs, theirs after."""
    yield
    pyspf_bridge.uninstall()
