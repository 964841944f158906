"""dkimpy's steps over sender data, replaced by equivalents that run in linear time.

dkimpy was not written against an adversary.  Each step below reads what a
sender wrote (the body, a header field, the DKIM-Signature), and one
``re`` call holds the GIL for its whole run: a pattern that backtracks
quadratically stops every thread of the worker.  Each replacement gives
dkimpy's answer on every input (tests/unit/test_dkimcanon.py holds the
equivalence, tests/growth/rows_message.py the growth):

``compress_whitespace`` (relaxed canonicalization, RFC 6376 §3.4.2, §3.4.4)
    dkimpy's ``re.sub(b"[\\t ]+", b" ", ...)`` rewrites every single space
    with a space: one replacement object per word.  Only the runs that
    change are matched here.

``strip_trailing_whitespace`` (relaxed body, RFC 6376 §3.4.4)
    dkimpy's ``[\\t ]+\\r\\n`` starts a match at every space of a run and
    scans to the run's end each time: a line of n spaces ending in a letter
    costs n²/2 steps (200 KB: a minute).  A match here may only start where
    a run starts, so each run is scanned once.

``RE_BTAG`` (the b= value removed before hashing the signature, RFC 6376 §3.7)
    dkimpy's pattern nests optional folding white space
    (``(?:(?:\\s*\\r?\\n)?\\s+)?``) inside a repetition: over folded blank
    lines after ``b=``, or after any ``b`` that no ``=`` follows, it tries
    every split of the white space.  That FWS matches exactly the strings
    ``\\s*`` matches, so the same pattern written with ``\\s*`` removes the
    same bytes, with one way to match each.

``select_headers`` (the fields ``h=`` selects, RFC 6376 §5.4.2)
    dkimpy rescans the whole header for every mention of an absent name
    (names times fields), and compares a field's name as written: a field
    written ``Subject : x`` (RFC 5322 §4.5.8 obs-optional, white space
    before the colon) would never be selected.  ``signed_subset`` makes the
    same choice in one pass, by the name without that white space.

``unfold_header_value`` (relaxed header canonicalization, RFC 6376 §3.4.2)
    dkimpy's ``re.sub(b"\\r?\\n", b"", ...)`` goes through ``re``'s module
    cache and a pattern match for every field; removing every CRLF, then
    every LF left, removes the same bytes (each LF, and the CR right before
    it) at C speed.

``hash_headers`` (the header hash, RFC 6376 §3.7)
    Not a quadratic step, a slow one: dkimpy feeds the hasher three times
    per signed field through a Python wrapper (``HashThrough.update``);
    here the same bytes, in the same order, in one ``update``.

``RSASSA_PKCS1_v1_5_verify``
    dkimrsa's verification through OpenSSL (same answers, a fraction of the
    CPU).

``install()`` puts them in place of dkimpy's names, once per process
(dkimpy looks each name up at every call); ``dkimcheck.check_dkim`` makes
sure it has been done before it hands dkimpy anything.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable, Sequence

import dkim
import dkim.canonicalization

from . import dkimrsa

# A tab followed by any whitespace, or a space followed by at least one more.
_RUN_TO_REWRITE = re.compile(rb"\t[\t ]*| [\t ]+")
# Only from the first character of a run: a run not followed by CRLF is
# scanned once, not once for each of its characters.
_TRAILING = re.compile(rb"(?<![\t ])[\t ]+\r\n")
# dkimpy's RE_BTAG with each FWS written as \s* (the same strings).
RE_BTAG = re.compile(rb"([;\s]b\s*=)(?:\s*[a-zA-Z0-9+/=])*(?:\r?\n\Z)?")
# RFC 5322 WSP: what may stand between a field name and its colon.
_WSP = b" \t"


def compress_whitespace(content: bytes) -> bytes:
    if b"\t" not in content and b"  " not in content:
        return content  # every run is one space already
    return _RUN_TO_REWRITE.sub(b" ", content)


def strip_trailing_whitespace(content: bytes) -> bytes:
    if b" \r\n" not in content and b"\t\r\n" not in content:
        return content  # no whitespace right before a line end
    return _TRAILING.sub(b"\r\n", content)


# Whole lines, about this many bytes at a time, for each pass over a body.
_CHUNK = 1 << 20


def relaxed_body(body: bytes) -> bytes:
    """dkimpy's ``Relaxed.canonicalize_body``, a chunk of whole lines at a time.

    Both white-space passes are local to a line, so they may run on pieces
    cut after a CRLF; one ``re`` call then holds the GIL for a megabyte of
    body, not for all of a 64 MiB one (about a second), and the worker's
    other threads run between the pieces.
    """
    if len(body) <= _CHUNK:
        pieces = [compress_whitespace(strip_trailing_whitespace(body))]
    else:
        pieces, pos = [], 0
        while pos < len(body):
            cut = body.find(b"\r\n", pos + _CHUNK)
            end = len(body) if cut < 0 else cut + 2
            pieces.append(compress_whitespace(strip_trailing_whitespace(body[pos:end])))
            pos = end
    canon = dkim.canonicalization
    return canon.correct_empty_body(canon.strip_trailing_lines(b"".join(pieces)))


def _unfold_line_ends(content: bytes) -> bytes:
    return content.replace(b"\r\n", b"").replace(b"\n", b"")


def _unfold_crlf(content: bytes) -> bytes:
    return content.replace(b"\r\n", b"")


# dkimpy 1.1 removes "\r?\n", 1.0.5 (Debian 12's python3-dkim) only "\r\n":
# the replacement does what the installed dkimpy does.
unfold_header_value = (_unfold_line_ends
                       if dkim.canonicalization.unfold_header_value(b"\n") == b"" else _unfold_crlf)


def hash_headers(hasher: object, canonicalize_headers: object, headers: Sequence[Sequence[bytes]],
                 include_headers: Iterable[bytes], sigheader: Sequence[bytes],
                 sig: object) -> list[Sequence[bytes]]:
    """dkimpy's ``hash_headers``: the selected fields, then the signature field
    with its b= value removed and no final CRLF, each as ``name:value``,
    hashed in one update (a hash of the concatenation is the hash of the
    pieces fed in turn)."""
    sign_headers = dkim.select_headers(headers, include_headers)
    cheaders = canonicalize_headers.canonicalize_headers(  # type: ignore[attr-defined]
        [(sigheader[0], dkim.RE_BTAG.sub(b"\\1", sigheader[1]))])
    hasher.update(b"".join(  # type: ignore[attr-defined]
        [*(x + b":" + y for x, y in sign_headers),
         *(x + b":" + y.rstrip() for x, y in cheaders)]))
    return sign_headers


def field_name(name: bytes) -> bytes:
    """A field's name as ``h=`` and the rules compare it: lower case, without
    the white space RFC 5322 §4.5.8 (obs-optional) allows before the colon."""
    return name.rstrip(_WSP).lower()


def signed_subset(headers: Sequence[Sequence[bytes]], names: Iterable[bytes]) -> list[int]:
    """Indexes of the fields that ``h=`` ``names`` select, in linear time.

    dkimpy's choice (RFC 6376 §5.4.2: each mention of a name takes the next
    instance from the bottom up; a name with no instance left selects
    nothing), with names compared as ``field_name`` gives them.
    """
    positions: dict[bytes, list[int]] = {}
    for i, field in enumerate(headers):
        positions.setdefault(field_name(field[0]), []).append(i)
    picked = []
    for name in names:
        stack = positions.get(name)
        if stack:
            picked.append(stack.pop())
    return picked


def select_headers(headers: Sequence[Sequence[bytes]], include_headers: Iterable[bytes]
                   ) -> list[Sequence[bytes]]:
    """dkimpy's ``select_headers``, through ``signed_subset``."""
    return [headers[i] for i in signed_subset(headers, include_headers)]


# (module, name, replacement): dkimpy reads each of these names at call time.
_REPLACEMENTS: tuple[tuple[object, str, object], ...] = (
    (dkim.canonicalization, "compress_whitespace", compress_whitespace),
    (dkim.canonicalization, "strip_trailing_whitespace", strip_trailing_whitespace),
    (dkim.canonicalization, "unfold_header_value", unfold_header_value),
    (dkim, "hash_headers", hash_headers),
    (dkim, "RE_BTAG", RE_BTAG),
    (dkim, "select_headers", select_headers),
    (dkim, "RSASSA_PKCS1_v1_5_verify", dkimrsa.verify),
)
# dkimpy's own objects, as this module found them.
_DKIMPY = {name: getattr(module, name) for module, name, _ in _REPLACEMENTS}
_lock = threading.Lock()


def installed() -> bool:
    return all(getattr(module, name) is ours for module, name, ours in _REPLACEMENTS)


def install() -> None:
    """Put the replacements in place of dkimpy's objects; a name that holds
    something else (a test's trap) is left alone.  Cheap once done."""
    if installed():
        return
    with _lock:
        for module, name, ours in _REPLACEMENTS:
            if getattr(module, name) is _DKIMPY[name]:
                setattr(module, name, ours)


def uninstall() -> None:
    """dkimpy's own objects back (for the tests that compare with them)."""
    with _lock:
        for module, name, ours in _REPLACEMENTS:
            if getattr(module, name) is ours:
                setattr(module, name, _DKIMPY[name])
