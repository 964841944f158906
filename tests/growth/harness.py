"""How the growth tests measure: the CPU one parser call costs as its input
doubles (SPEC §1: "the CPU it costs grows at most linearly with its size").

A ``Row`` is one sender-controlled input in one shape that hurts regular
expressions (runs of white space, folded blank lines, nested parentheses,
repeated separators, long labels, many strings).  ``measure`` builds it at
each size from ``smallest`` to ``largest`` (doubling), runs the parser on it,
and keeps the least CPU of five samples (the machine is shared and noisy; the
least is the parser's own cost).  A quadratic step costs 4x per doubling, a
linear one 2x: the test allows 2.5x on average and 3x for the last doubling.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

KIB = 1024


@dataclass(frozen=True)
class Row:
    name: str  # the input, as the admin guide's Limits table names it
    shape: str  # what the input is made of
    build: Callable[[int], Any]  # an input of about n bytes
    run: Callable[[Any], object]  # the parser (or whole check) on that input
    largest: int = 64 * KIB  # 64 KiB, or the input's bound when smaller
    worst: float = 0.25  # seconds of CPU allowed at the largest size
    smallest: int = 1 * KIB

    @property
    def id(self) -> str:
        return f"{self.name}: {self.shape}"


# The least measurable time: a call faster than this is repeated until the
# repetitions together take it, so a doubling is never measured in noise.
_RESOLUTION = 0.01


def _cpu(row: Row, value: Any, repeat: int) -> float:
    start = time.thread_time()
    for _ in range(repeat):
        row.run(value)
    return (time.thread_time() - start) / repeat


def measure(row: Row, runs: int = 5) -> list[tuple[int, float]]:
    """``(size, seconds of CPU per call)`` from ``smallest`` to ``largest``."""
    sizes = []
    n = row.smallest
    while n < row.largest:
        sizes.append(n)
        n *= 2
    sizes.append(row.largest)
    table = []
    for size in sizes:
        value = row.build(size)
        # Each sample repeats the call until it takes ``_RESOLUTION`` of CPU,
        # so that no size is measured in the timer's and the scheduler's noise.
        once = max(_cpu(row, value, 1), 1e-7)
        reps = max(1, min(2000, int(_RESOLUTION / once) + 1))
        # The cyclic collector's full passes cost in proportion to everything
        # the test process holds, not to the input: collected before, paused
        # during, so that a doubling measures the parser and nothing else.
        gc.collect()
        gc.disable()
        try:
            table.append((size, min(_cpu(row, value, reps) for _ in range(runs))))
        finally:
            gc.enable()
    return table


def per_doubling(table: list[tuple[int, float]]) -> tuple[float, float]:
    """The average growth per doubling, and the last doubling's."""
    import math

    (n0, t0), (n1, t1) = table[0], table[-1]
    doublings = math.log2(n1 / n0)
    average = (max(t1, 1e-9) / max(t0, 1e-9)) ** (1 / doublings) if doublings else 1.0
    (na, ta), (nb, tb) = table[-2], table[-1]
    last = (max(tb, 1e-9) / max(ta, 1e-9)) ** (1 / math.log2(nb / na)) if nb > na else 1.0
    return average, last
