"""DKIM (RFC 6376) with dkimpy, every signature, keys fetched through our resolver.

``dkim.verify()`` looks at the first signature only and folds every error,
a DNS outage included, into False; so each signature is verified on its own
with ``DKIM.verify(idx=i, dnsfunc=...)`` and the key lookup is watched to
tell a missing or broken key (permerror) from a bad signature (fail) and
from a DNS outage (temperror).
"""

from __future__ import annotations

import binascii
import logging
import re
from collections.abc import Iterable
from typing import Any

import dkim
from dkim.canonicalization import CanonicalizationPolicy, InvalidCanonicalizationPolicyError
from dkim.util import InvalidTagValueList, parse_tag_value

from .model import DkimResult
from .resolver import Budget, Resolver, TempFail

log = logging.getLogger(__name__)


class _DebugOnly(logging.LoggerAdapter):
    """dkimpy logs hostile input at error level; to us it is debug detail."""

    def log(self, level: int, msg: Any, *args: Any, **kwargs: Any) -> None:
        super().log(logging.DEBUG, msg, *args, **kwargs)


_dkimpy_log = _DebugOnly(logging.getLogger("ipv6milter.dkimpy"), {})

_TOKEN = re.compile(rb"^[A-Za-z0-9._-]{1,253}$")
_HEAD_END = re.compile(rb"\r?\n\r?\n")
# Lenient on purpose (any case, space before the colon): a false match only
# costs the full parse.
_SIGNATURE_FIELD = re.compile(rb"(?im)^dkim-signature[ \t]*:")
_BARE_LF = re.compile(rb"(?<!\r)\n")
# A body tail of empty (or, relaxed, blank) lines longer than this is cut
# down before dkimpy sees it: its canonicalization strips them one at a time.
_LONG_TAIL = 4096


# -- the message, split as dkimpy would, without its per-line copies ----------------


def split_message(message: bytes) -> tuple[bytes, bytes]:
    """Header section and body, as dkimpy's ``rfc822_parse`` splits them.

    dkimpy splits the *whole* message into one object per line, then joins
    the body again: tens of times the size of a body of short lines.  Only
    the header section is handed to it; the body is given as it would have
    come out (line ends made CRLF).
    """
    if message.startswith((b"\r\n", b"\n")):  # no header at all
        head, body = b"", message[message.index(b"\n") + 1 :]
    else:
        end = _HEAD_END.search(message)
        head, body = (message[: end.start()], message[end.end() :]) if end else (message, b"")
    if _BARE_LF.search(body):
        body = _BARE_LF.sub(b"\r\n", body)
    return head, body


def _suffix_start(data: bytes, chars: bytes) -> int:
    """Where the run of ``chars`` that ends ``data`` begins (C-speed scan)."""
    end = len(data)
    while end > 0:
        start = max(0, end - 65536)
        kept = len(data[start:end].rstrip(chars))
        if kept:
            return start + kept
        end = start
    return 0


def _empty_tail(body: bytes, blank: bool) -> int:
    """Where the trailing run of empty lines (``blank``: lines of only spaces
    and tabs too) begins; ``len(body)`` when the body does not end so."""
    start = _suffix_start(body, b" \t\r\n" if blank else b"\r\n")
    seg = body[start:]
    if not seg.endswith(b"\r\n"):
        return len(body)
    marked = seg.replace(b"\r\n", b"\0\0")
    lone = max(marked.rfind(b"\r"), marked.rfind(b"\n"))  # a CR or LF not in a CRLF
    if not blank:
        return start + lone + 1
    if lone < 0 and start == 0:
        return 0
    # The line holding the lone CR/LF, or the text before the run, is not blank.
    return start + marked.index(b"\0", max(lone, 0)) + 2


def canonical_equivalent(body: bytes, algorithm: bytes, longer_than: int = _LONG_TAIL) -> bytes:
    """``body`` with a long tail of empty lines cut to one line.

    Both canonicalizations (RFC 6376 §3.4.3, §3.4.4) ignore every empty line
    at the end of the body ("relaxed" after making blank lines empty), so the
    body hash is unchanged; but dkimpy strips them in a Python loop, one line
    at a time, which a body of millions of empty lines turns into minutes.
    """
    start = _empty_tail(body, blank=algorithm == b"relaxed")
    if len(body) - start <= longer_than:
        return body
    return body[:start] + b"\r\n"


def _body_algorithm(value: bytes) -> bytes:
    try:
        c = parse_tag_value(value).get(b"c", b"simple/simple")
        return CanonicalizationPolicy.from_c_value(c).body_algorithm.name
    except (InvalidTagValueList, InvalidCanonicalizationPolicyError, ValueError, IndexError):
        return b"simple"  # dkimpy will refuse the signature itself


def signature_tags(value: bytes) -> dict[bytes, bytes]:
    """A lenient tag=value split of a DKIM-Signature, for reporting only."""
    tags: dict[bytes, bytes] = {}
    for part in value.split(b";"):
        name, eq, v = part.partition(b"=")
        if eq:
            tags.setdefault(name.strip().lower(), re.sub(rb"\s+", b"", v))
    return tags


def describe(value: bytes, result: str, detail: str) -> DkimResult:
    tags = signature_tags(value)

    def clean(v: bytes) -> str:
        return v.decode("ascii").lower() if _TOKEN.match(v) else ""

    b = tags.get(b"b", b"")[:8]
    b_text = b.decode("ascii") if re.fullmatch(rb"[A-Za-z0-9+/=]*", b) else ""
    return DkimResult(
        result, clean(tags.get(b"d", b"")), clean(tags.get(b"s", b"")), b_text, detail
    )


def unverified(
    signatures: Iterable[bytes], detail: str, max_signatures: int
) -> tuple[DkimResult, ...]:
    """Signatures reported but not verified (a message over MaxMessageSize)."""
    return tuple(describe(v, "neutral", detail) for v in list(signatures)[:max_signatures])


class _KeyWatch:
    """A dnsfunc that remembers what the key lookup found."""

    def __init__(self, resolver: Resolver, budget: Budget):
        self._lookup = resolver.dkim_dnsfunc(budget)
        self.problem: str | None = None
        self.asked = False

    def __call__(self, name: bytes, timeout: float = 5) -> bytes | None:
        self.problem = None
        self.asked = True
        txt = self._lookup(name, timeout)
        if txt is None:
            self.problem = "no key record"
            return None
        try:
            dkim.evaluate_pk(name, txt)
        except (dkim.DKIMException, ValueError, IndexError, TypeError, binascii.Error) as e:
            self.problem = f"unusable key record: {e}"
        return txt


def check_dkim(
    resolver: Resolver, message: bytes, budget: Budget, max_signatures: int
) -> tuple[DkimResult, ...]:
    """One result per signature tried, topmost first; () when there is none."""
    end = _HEAD_END.search(message)
    if not _SIGNATURE_FIELD.search(message, 0, end.start() if end else len(message)):
        # dkimpy copies the message several times over while parsing it;
        # an unsigned message (most of them) need not pay that in memory.
        return ()
    head, body = split_message(message)
    try:
        d = dkim.DKIM(head + b"\r\n\r\n", logger=_dkimpy_log)
    except (dkim.DKIMException, ValueError, IndexError, TypeError) as e:
        found = re.findall(rb"(?im)^dkim-signature:", head)
        return tuple(
            DkimResult("permerror", detail=f"message cannot be parsed: {e}")
            for _ in found[:max_signatures]
        )
    sigs = [v for n, v in d.headers if n.lower() == b"dkim-signature"]
    bodies: dict[bytes, bytes] = {}
    results = []
    for idx, value in enumerate(sigs[:max_signatures]):
        algorithm = _body_algorithm(value)
        if algorithm not in bodies:
            bodies[algorithm] = canonical_equivalent(body, algorithm)
        d.body = bodies[algorithm]  # what DKIM(message) would have parsed
        watch = _KeyWatch(resolver, budget)
        try:
            ok = d.verify(idx=idx, dnsfunc=watch)
        except TempFail as e:
            results.append(describe(value, "temperror", f"key lookup: {e}"))
            continue
        except dkim.ValidationError as e:
            # Raised before the key lookup, it is the signature's own tags that
            # are missing or malformed: RFC 6376 §6.1.1 PERMFAIL, not a mismatch.
            results.append(describe(value, "fail" if watch.asked else "permerror", str(e)))
            continue
        except (
            dkim.DKIMException,
            ValueError,
            IndexError,
            KeyError,
            TypeError,
            OverflowError,
            binascii.Error,
        ) as e:
            results.append(describe(value, "permerror", f"{type(e).__name__}: {e}"))
            continue
        if ok:
            results.append(describe(value, "pass", "signature verified"))
        elif watch.problem:
            results.append(describe(value, "permerror", watch.problem))
        else:
            results.append(describe(value, "fail", "signature did not verify"))
    return tuple(results)
