"""Faster, byte-for-byte equivalent whitespace passes for dkimpy.

dkimpy's relaxed canonicalization (RFC 6376 §3.4.2, §3.4.4) runs
``re.sub(b"[\\t ]+", b" ", ...)``, which rewrites every single space of the
body with a space: one replacement object per word.  On a 100 KB body that
is most of the DKIM time and fragments the heap.  A run of whitespace that is
already one space needs no rewriting; ``compress_whitespace`` only matches
the runs that change, so the output is the same and the work is proportional
to them.

Its ``strip_trailing_whitespace`` (``re.sub(b"[\\t ]+\\r\\n", b"\\r\\n", ...)``)
starts a match attempt at every space of the body.  It can only change
anything where a space or a tab comes right before a CRLF; both functions
first ask, at C speed, whether the body holds anything they would change,
and return it untouched when it does not (a body already canonical, as
dkimcheck hands it over, costs almost nothing).

``install()`` puts them in place of dkimpy's functions, once per process
(dkimpy looks the names up at each call), and with them dkimrsa's RSA
verification through OpenSSL.  tests/unit/test_dkimcanon.py and
tests/unit/test_dkimrsa.py hold the equivalence to dkimpy's own functions.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable

import dkim
import dkim.canonicalization

from . import dkimrsa

# A tab followed by any whitespace, or a space followed by at least one more.
_RUN_TO_REWRITE = re.compile(rb"\t[\t ]*| [\t ]+")
_TRAILING = re.compile(rb"[\t ]+\r\n")


def compress_whitespace(content: bytes) -> bytes:
    if b"\t" not in content and b"  " not in content:
        return content  # every run is one space already
    return _RUN_TO_REWRITE.sub(b" ", content)


def strip_trailing_whitespace(content: bytes) -> bytes:
    if b" \r\n" not in content and b"\t\r\n" not in content:
        return content  # no whitespace right before a line end
    return _TRAILING.sub(b"\r\n", content)


# (module, name, replacement): dkimpy reads each of these names at call time.
_REPLACEMENTS: tuple[tuple[object, str, Callable[..., object]], ...] = (
    (dkim.canonicalization, "compress_whitespace", compress_whitespace),
    (dkim.canonicalization, "strip_trailing_whitespace", strip_trailing_whitespace),
    (dkim, "RSASSA_PKCS1_v1_5_verify", dkimrsa.verify),
)
_lock = threading.Lock()
original: Callable[[bytes], bytes] | None = None  # dkimpy's compress_whitespace
originals: dict[str, Callable[..., object]] = {}


def install() -> None:
    global original
    with _lock:
        for module, name, ours in _REPLACEMENTS:
            current = getattr(module, name)
            if current is not ours:
                originals[name] = current
                setattr(module, name, ours)
        original = originals.get("compress_whitespace")  # type: ignore[assignment]


def uninstall() -> None:
    global original
    with _lock:
        for module, name, _ in _REPLACEMENTS:
            if name in originals:
                setattr(module, name, originals[name])
        originals.clear()
        original = None
