from __future__ import annotations

import pytest

from ipv6milter.resolver import pyspf_bridge


@pytest.fixture(autouse=True)
def _restore_pyspf():
    """pyspf's module-level DNSLookup is ours while a test runs, theirs after."""
    yield
    pyspf_bridge.uninstall()
