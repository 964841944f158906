"""Growth rows: the message inputs (see harness.py).

Header fields the milter parses (DKIM-Signature, Authentication-Results; the
From field is rows_align's), body lines as canonicalization sees them, and
the DKIM tags, each in the shapes that make a backtracking regular
expression quadratic: runs of white space where a pattern hopes for a
separator, folded blank lines, nested parentheses, repeated separators.

The DKIM rows run the whole check (``check_dkim``: our parse, our rules,
dkimpy's steps) on a message whose one signature carries the grown input;
the steps that come after the key lookup get a real key, and where the body
hash must match to reach a step, the message is signed for real.
"""

from __future__ import annotations

import base64
import functools
import hashlib
from collections.abc import Callable

import dkim

from ipv6milter import authresults, dkimaccept, dkimcanon, dkimcheck, limits
from ipv6milter.resolver import Budget
from tests.dkimkeys import make_key
from tests.unit.fakedns import FakeResolver

from .harness import KIB, Row

OURS = "mx.example.org"
HEAD = (b"From: Sender <sender@example.com>\r\n"
        b"To: rcpt@example.org\r\n"
        b"Subject: growth\r\n")
BODY = b"Hello.\r\n"


@functools.cache
def _key() -> tuple[bytes, FakeResolver]:
    private, record = make_key(1024, tag="growth")
    return private, FakeResolver({("sel1._domainkey.example.com", "TXT"): record})


def _check(message: bytes) -> object:
    """The whole DKIM check, as the engine runs it (one signature)."""
    _, resolver = _key()
    resolver.asked.clear()
    return dkimcheck.check_dkim(resolver, message, Budget(20), 5)


def _signed(head: bytes = HEAD, body: bytes = BODY, **kwargs: object) -> bytes:
    private, _ = _key()
    return dkim.sign(head + b"\r\n" + body, b"sel1", b"example.com", private,
                     canonicalize=(b"relaxed", b"relaxed"), **kwargs)


def _bh(body: bytes) -> bytes:
    """The relaxed body hash of a body whose lines carry no white space."""
    return base64.b64encode(hashlib.sha256(body).digest())


# What the row builders add around the grown part of a signature (its other
# tags, or dkimpy's own signature), so that the whole value stays within
# ``n`` bytes: at the largest size the signature is at the bound, not past it.
_FIXED = 600


def _signature(n: int, make: Callable[[int], bytes]) -> bytes:
    """A message whose one DKIM-Signature value is at most ``n`` bytes long."""
    value = make(n - _FIXED)
    assert len(value) <= n, (len(value), n)
    return b"DKIM-Signature: " + value + b"\r\n" + HEAD + b"\r\n" + BODY


_TAGS = b"v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.com; s=sel1; "


_BLANKS = b"\r\n \r\n "  # folded blank lines


def _fill(n: int, unit: bytes) -> bytes:
    return unit * max(1, n // len(unit))


# -- body lines, relaxed canonicalization (RFC 6376 §3.4.4) ------------------------------


def _body_message(line: Callable[[int], bytes]) -> Callable[[int], bytes]:
    """A relaxed-signed message with the grown line as its body: the
    signature no longer matches (fail), the body is canonicalized first.
    The lines end in ``end `` (white space before CRLF), so that the
    trailing-white-space pass cannot skip the body as already canonical."""

    def build(n: int) -> bytes:
        return _signed() + HEAD + b"\r\n" + line(n) + b"\r\n"

    return build


# -- Authentication-Results ---------------------------------------------------------------


def _ours(value: str) -> object:
    found = authresults.authserv_id_of(value)
    assert found == OURS, found[:80]
    return found


def _foreign(value: str) -> object:
    found = authresults.authserv_id_of(value)
    assert found != OURS
    return found


ROWS: list[Row] = [
    # body lines as canonicalization sees them
    Row("body line (relaxed)", "spaces then a letter",
        _body_message(lambda n: b" " * n + b"a\r\nend "), _check),
    Row("body line (relaxed)", "tabs and spaces then a letter",
        _body_message(lambda n: _fill(n, b"\t ") + b"a\r\nend "), _check),
    Row("body line (relaxed)", "lines of trailing white space",
        _body_message(lambda n: _fill(n, b"a \t \r\n")), _check),
    Row("body line (relaxed)", "white-space runs between words",
        _body_message(lambda n: _fill(n, b"a \t  \t")), _check),
    # DKIM-Signature: the tags, before and after the key lookup
    Row("DKIM-Signature", "white-space run inside h= (no colon after it)",
        lambda n: _signature(n, lambda k: _TAGS + b"h=from:to" + b" " * k
                             + b"subject; bh=AAAA; b=AAAA"),
        _check, largest=limits.MAX_SIGNATURE_FIELD),
    Row("DKIM-Signature", "white-space runs around ':' in h=",
        lambda n: _signature(n, lambda k: _TAGS + b"h=from" + _fill(k, b" \t : \t x")
                             + b"; bh=AAAA; b=AAAA"),
        _check, largest=limits.MAX_SIGNATURE_FIELD),
    Row("DKIM-Signature", "white-space runs around '=' and ';'",
        lambda n: _signature(n, lambda k: _fill(k, b"x \t = \t y \t ; \t ") + _TAGS
                             + b"h=from; bh=AAAA; b=AAAA"),
        _check, largest=limits.MAX_SIGNATURE_FIELD),
    Row("DKIM-Signature", "white-space run in b= before a stray character",
        lambda n: _signature(n, lambda k: _TAGS + b"h=from; bh=AAAA; b=AAAA" + b" " * k
                             + b"!"),
        _check, largest=limits.MAX_SIGNATURE_FIELD),
    Row("DKIM-Signature", "'b' then a white-space run without '='",
        lambda n: _signature(n, lambda k: _TAGS + b"h=from; bh=" + _bh(BODY) + b"; b=AAAA; z=x b"
                             + _fill(k, _BLANKS) + b"x"),
        _check, largest=limits.MAX_SIGNATURE_FIELD),
    Row("DKIM-Signature", "folded blank lines after b=",
        lambda n: _signed().rstrip(b"\r\n") + _fill(n - _FIXED, _BLANKS) + b"\r\n"
        + HEAD + b"\r\n" + BODY,
        _check, largest=limits.MAX_SIGNATURE_FIELD),
    Row("DKIM-Signature", "past the bound: white space in b= before a stray character",
        lambda n: _signature(n + limits.MAX_SIGNATURE_FIELD + _FIXED,
                             lambda k: _TAGS + b"h=from; bh=AAAA; b=AAAA" + b" " * k + b"!"),
        _check),
    Row("DKIM-Signature", "repeated separators ';'",
        lambda n: _signature(n, lambda k: _TAGS + b"h=from; bh=AAAA; b=AAAA" + b";" * k),
        _check, largest=limits.MAX_SIGNATURE_FIELD),
    Row("DKIM-Signature", "long d= (IDNA)",
        lambda n: _signature(n, lambda k: b"v=1; a=rsa-sha256; s=sel1; h=from; bh=AAAA; b=AAAA;"
                             b" d=" + "\u00e9".encode() * (k // 2) + b".example"),
        _check, largest=limits.MAX_SIGNATURE_FIELD),
    # the steps themselves, past the bound (what they would cost without it)
    Row("DKIM-Signature b= removal (RE_BTAG)", "'b' then folded blank lines",
        lambda n: b"; b=AAAA; x= b" + _fill(n // 2, _BLANKS) + b"; b=" + _fill(n // 2, _BLANKS),
        lambda v: dkimcanon.RE_BTAG.sub(b"\\1", v)),
    Row("DKIM-Signature h= (signed_fields)", "white-space runs, no colon after them",
        lambda n: {b"h": b"from" + _fill(n, b" \t\r\n x")}, dkimaccept.signed_fields),
    Row("DKIM-Signature b= check", "white space before a stray character",
        lambda n: b"AAAA" + b" " * n + b"!", dkimaccept._b_is_base64),
    # the header section handed to DKIM
    Row("header field (signed)", "folded blank lines",
        lambda n: _signed() + HEAD.replace(b"Subject: growth",
                                           b"Subject: growth" + _BLANKS * (n // 5))
        + b"\r\n" + BODY,
        _check, largest=64 * KIB),
    Row("DKIM-Signature (reported only)", "white-space runs and separators",
        lambda n: [_fill(n, b"d \t= \t x ; \t b = ")],
        lambda sigs: dkimcheck.unverified(sigs, "message too large", 5)),
    # Authentication-Results: the authserv-id, found whatever comes before it
    Row("Authentication-Results", "nested comments before our id",
        lambda n: "(" * (n // 2) + ")" * (n // 2) + f" {OURS}; spf=pass", _ours),
    Row("Authentication-Results", "our id after a long comment",
        lambda n: "(" + "x " * (n // 2) + f") {OURS}; spf=pass", _ours),
    Row("Authentication-Results", "nested comments, one level a character",
        lambda n: "(a" * (n // 4) + "b)" * (n // 4) + f"\r\n\t{OURS}; none", _ours),
    Row("Authentication-Results", "unclosed comments",
        lambda n: "(" * n + f" {OURS}; none", _foreign),
    Row("Authentication-Results", "escaped characters in a comment and a quoted id",
        lambda n: "(" + "\\)" * (n // 4) + ') "' + "\\m\\x" * (n // 8) + '"; none', _foreign),
    Row("Authentication-Results", "folded blank lines before our id",
        lambda n: "\r\n \r\n " * (n // 5) + f"{OURS}; none", _ours),
]
