"""A faster, byte-for-byte equivalent whitespace compression for dkimpy.

dkimpy's relaxed canonicalization (RFC 6376 §3.4.2, §3.4.4) runs
``re.sub(b"[\\t ]+", b" ", ...)``, which rewrites every single space of the
body with a space: one replacement object per word.  On a 100 KB body that
is most of the DKIM time and fragments the heap.  A run of whitespace that is
already one space needs no rewriting; this pattern only matches the runs
that change, so the output is the same and the work is proportional to them.

``install()`` puts it in place of dkimpy's function, once per process
(dkimpy looks the name up at each call).  tests/unit/test_dkimcanon.py holds
the equivalence to dkimpy's own function on generated input.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable

import dkim.canonicalization

# A tab followed by any whitespace, or a space followed by at least one more.
_RUN_TO_REWRITE = re.compile(rb"\t[\t ]*| [\t ]+")


def compress_whitespace(content: bytes) -> bytes:
    return _RUN_TO_REWRITE.sub(b" ", content)


_lock = threading.Lock()
original: Callable[[bytes], bytes] | None = None


def install() -> None:
    global original
    with _lock:
        if dkim.canonicalization.compress_whitespace is not compress_whitespace:
            original = dkim.canonicalization.compress_whitespace
            dkim.canonicalization.compress_whitespace = compress_whitespace


def uninstall() -> None:
    global original
    with _lock:
        if original is not None:
            dkim.canonicalization.compress_whitespace = original
            original = None
