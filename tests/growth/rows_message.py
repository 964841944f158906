"""Growth rows: the message inputs (see harness.py)."""

from __future__ import annotations

from .harness import Row

ROWS: list[Row] = []
