"""DKIM (RFC 6376) with dkimpy, every signature, keys fetched through our resolver.

``dkim.verify()`` looks at the first signature only and folds every error,
a DNS outage included, into False; so each signature is verified on its own
with ``DKIM.verify(idx=i, dnsfunc=...)`` and the key lookup is watched to
tell a missing or broken key (permerror) from a bad signature (fail) and
from a DNS outage (temperror).
"""

from __future__ import annotations

import binascii
import functools
import logging
import re
from collections.abc import Iterable, Sequence
from typing import Any

import dkim
from dkim.canonicalization import (
    CanonicalizationPolicy,
    InvalidCanonicalizationPolicyError,
    Relaxed,
    Simple,
)
from dkim.util import InvalidTagValueList, parse_tag_value

from . import dkimaccept
from .config import a_labels
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
_FIELD_START = re.compile(rb"(?m)^[^ \t\r\n]")
_SIGNATURE_VALUE = re.compile(rb"(?im)^dkim-signature[ \t]*:(.*(?:\r?\n[ \t].*)*)")
_SPACE = re.compile(rb"\s+")
_BASE64 = re.compile(rb"[A-Za-z0-9+/=]*")
_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
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
    if body.count(b"\n") != body.count(b"\r\n"):  # a bare LF (C speed; a regex was not)
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


def canonical_body(body: bytes, algorithm: bytes) -> bytes:
    """The body as ``algorithm`` canonicalizes it, for every signature that uses it.

    dkimpy canonicalizes the body again for each signature: five signatures
    over a large body cost five passes.  Both canonicalizations are
    idempotent on a body that ends with CRLF (simple only drops trailing
    empty lines; relaxed leaves no whitespace run, no whitespace before a
    line end and no trailing empty line to change), so handing dkimpy the
    canonical body gives the same body hash for a fraction of the work.
    A body without a final CRLF (relaxed would put one after trailing
    whitespace, which a second pass removes) is handed over as it is.
    """
    trimmed = canonical_equivalent(body, algorithm)
    if not trimmed.endswith(b"\r\n"):
        return trimmed
    canon = Relaxed if algorithm == b"relaxed" else Simple
    return canon.canonicalize_body(trimmed)


def _body_algorithm(tags: dict[bytes, bytes]) -> bytes:
    """c='s body canonicalization, from the tags ``_verify_one`` parsed already."""
    try:
        c = tags.get(b"c", b"simple/simple")
        return CanonicalizationPolicy.from_c_value(c).body_algorithm.name
    except (InvalidTagValueList, InvalidCanonicalizationPolicyError, ValueError, IndexError):
        return b"simple"  # dkimpy will refuse the signature itself


def signature_tags(value: bytes) -> dict[bytes, bytes]:
    """A lenient tag=value split of a DKIM-Signature, for reporting only."""
    tags: dict[bytes, bytes] = {}
    for part in value.split(b";"):
        name, eq, v = part.partition(b"=")
        if eq:
            tags.setdefault(name.strip().lower(), _SPACE.sub(b"", v))
    return tags


def describe(value: bytes, result: str, detail: str) -> DkimResult:
    tags = signature_tags(value)

    def clean(v: bytes) -> str:
        return v.decode("ascii").lower() if _TOKEN.match(v) else ""

    def domain(v: bytes) -> str:
        # RFC 8616 §4: a U-label d= is the domain of its A-label (From-aligned
        # mode compares A-labels; header.d then shows the A-label).
        if _TOKEN.match(v) or len(v) > 253:
            return clean(v)
        try:
            d = a_labels(v.decode("utf-8")).encode("ascii")
        except UnicodeError:
            return ""
        return clean(d)

    b = tags.get(b"b", b"")[:8]
    b_text = b.decode("ascii") if _BASE64.fullmatch(b) else ""
    return DkimResult(
        result, domain(tags.get(b"d", b"")), clean(tags.get(b"s", b"")), b_text, detail
    )


def unverified(
    signatures: Iterable[bytes], detail: str, max_signatures: int, result: str = "neutral"
) -> tuple[DkimResult, ...]:
    """Signatures reported but not verified: ``neutral`` for a message over
    MaxMessageSize, ``permerror`` for one with too many header fields."""
    return tuple(describe(v, result, detail) for v in list(signatures)[:max_signatures])


def _key_name(tags: dict[bytes, bytes]) -> str | None:
    """The key's DNS name ``s._domainkey.d`` in A-label form, or None.

    RFC 8616 §4 lets ``d=`` (and ``s=``) carry U-labels: they are looked up
    as A-labels.  A name that is not UTF-8, not valid IDNA, or too long for
    the DNS cannot exist; the signature naming it is a permerror, and no
    query is sent.
    """
    try:
        text = (tags[b"s"] + b"._domainkey." + tags[b"d"]).decode("utf-8")
        name = a_labels(text)
    except (KeyError, UnicodeError):
        return None
    if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in name.split(".")):
        return None
    return name


def _field_count(head: bytes) -> int:
    return len(_FIELD_START.findall(head))


def _signature_values(head: bytes, max_signatures: int) -> list[bytes]:
    """The topmost DKIM-Signature values, found leniently (for reporting)."""
    out = []
    for m in _SIGNATURE_VALUE.finditer(head):
        out.append(m.group(1))
        if len(out) >= max_signatures:
            break
    return out


def signed_subset(headers: Sequence[Sequence[bytes]], names: Iterable[bytes]) -> list[int]:
    """Indexes of the fields that ``h=`` ``names`` select, in linear time.

    The same choice as dkimpy's ``select_headers`` (RFC 6376 §5.4.2: each
    mention of a name takes the next instance from the bottom up; a name with
    no instance left selects nothing), which rescans the whole header for
    every mention of an absent name: many distinct absent names times many
    fields was quadratic.
    """
    positions: dict[bytes, list[int]] = {}
    for i, field in enumerate(headers):
        positions.setdefault(field[0].lower(), []).append(i)
    picked = []
    for name in names:
        stack = positions.get(name)
        if stack:
            picked.append(stack.pop())
    return picked


def _fields_for(
    headers: list[list[bytes]], sig_index: int, names: list[bytes]
) -> tuple[list[list[bytes]], int]:
    """The header fields dkimpy needs for one signature, and its index among them.

    Only the fields ``h=`` selects, and the signature field itself, in their
    order: dkimpy's selection over this list is the same as over the whole
    header (each name's selected instances are its bottom-most ones, and the
    signature field, when not among them, lies above them), while its per-mention
    scan and its canonicalization of every field now cost only what is signed.
    """
    if b"from" in names:
        names = [*names, b"from"]  # dkimpy hashes one more From than h= names (bug#644046)
    keep = sorted({*signed_subset(headers, names), sig_index})
    fields = [headers[i] for i in keep]
    idx = sum(1 for i in keep if i < sig_index and headers[i][0].lower() == b"dkim-signature")
    return fields, idx


def _prepare_key(name: str, record: bytes) -> tuple[bytes, str | None, tuple[Any, ...] | None]:
    """The record as dkimpy is given it, why dkimpy could not use it (or
    None), and dkimpy's reading of it (``evaluate_pk``'s key, size, type and
    tlsrpt flag), which ``_dkimpy_verify`` hands to dkimpy instead of letting
    it read the record again."""
    # dkimpy reads s= as one word; "email:tlsrpt" (a list, RFC 6376 §3.6.1)
    # would make it drop the key.  check_key has judged s= already.
    dkimpy_record = dkimaccept.without_service_type(record)
    try:
        pk = dkim.evaluate_pk(name.encode("ascii"), dkimpy_record)
    except (dkim.DKIMException, ValueError, IndexError, TypeError, binascii.Error) as e:
        return dkimpy_record, f"unusable key record: {e}", None
    return dkimpy_record, None, tuple(pk)


_prepare_key_cached = functools.lru_cache(maxsize=1024)(_prepare_key)


def prepared_key(name: str, record: bytes) -> tuple[bytes, str | None, tuple[Any, ...] | None]:
    """``_prepare_key`` once per key name and record (bounded LRU): a repeat
    signer's key costs no base64 decoding and no ASN.1 parse.  The name is
    part of the cache key because dkimpy's messages may quote it."""
    if len(record) > dkimaccept.CACHEABLE_RECORD:
        return _prepare_key(name, record)
    return _prepare_key_cached(name, record)


def _dkimpy_verify(d: dkim.DKIM, idx: int, pk: tuple[Any, ...], record: bytes) -> bool:
    """``d.verify(idx=idx)`` with the key ``evaluate_pk`` gave for ``record``.

    What ``DKIM.verify`` does (``verify_headerprep``, then ``verify_sig``:
    the key lookup and ``evaluate_pk``, then ``verify_sig_process``), minus
    the lookup and the parse, which ``prepared_key`` did once for this record
    (and which succeeded, or the signature would not have got here).
    """
    prep = d.verify_headerprep(idx)
    if not prep:
        return False
    sig, include_headers, sigheaders = prep
    d.pk, d.keysize, d.ktag, d.seqtlsrpt = pk
    return bool(d.verify_sig_process(sig, include_headers, sigheaders[idx],
                                     lambda _name, timeout=5: record))


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
    if _field_count(head) > dkimaccept.MAX_HEADER_FIELDS:
        reason = f"more than {dkimaccept.MAX_HEADER_FIELDS} header fields"
        return tuple(describe(v, "permerror", reason)
                     for v in _signature_values(head, max_signatures))
    try:
        d = dkim.DKIM(head + b"\r\n\r\n", logger=_dkimpy_log)
    except (dkim.DKIMException, ValueError, IndexError, TypeError) as e:
        # "DKIM-Signature : ..." (obsolete syntax, RFC 5322 §4.5.3) is one of
        # these: dkimpy refuses the whole header, the signature still counts.
        return tuple(describe(v, "permerror", f"message cannot be parsed: {e}")
                     for v in _signature_values(head, max_signatures))
    headers = d.headers
    sig_indexes = [i for i, (n, _) in enumerate(headers) if n.lower() == b"dkim-signature"]
    bodies: dict[bytes, bytes] = {}
    results = []
    for sig_index in sig_indexes[:max_signatures]:
        results.append(_verify_one(resolver, budget, d, headers, sig_index, body, bodies))
    return tuple(results)


def _verify_one(
    resolver: Resolver,
    budget: Budget,
    d: dkim.DKIM,
    headers: list[list[bytes]],
    sig_index: int,
    body: bytes,
    bodies: dict[bytes, bytes],
) -> DkimResult:
    """One signature: our rules, the key lookup, then dkimpy's cryptography."""
    value = headers[sig_index][1]
    try:
        tags = parse_tag_value(value)
        # dkimpy's own checks of the tags (missing, malformed, expired):
        # RFC 6376 §6.1.1 PERMFAIL, judged without a key.
        dkim.validate_signature_fields(tags)
    except (InvalidTagValueList, dkim.DKIMException, ValueError, IndexError, TypeError) as e:
        return describe(value, "permerror", f"signature cannot be used: {e}")
    refusal = dkimaccept.check_signature(tags)
    if refusal is not None:
        return describe(value, refusal.result, refusal.reason)
    name = _key_name(tags)
    if name is None:
        return describe(value, "permerror", "d= or s= is not a domain name")
    try:
        record = resolver.dkim_dnsfunc(budget)(name)
    except TempFail as e:
        return describe(value, "temperror", f"key lookup: {e}")
    if record is None:
        return describe(value, "permerror", "no key record")
    refusal = dkimaccept.check_key(tags, record)
    if refusal is not None:
        return describe(value, refusal.result, refusal.reason)
    dkimpy_record, problem, pk = prepared_key(name, record)
    if problem is not None or pk is None:
        return describe(value, "permerror", problem or "unusable key record")
    algorithm = _body_algorithm(tags)
    if algorithm not in bodies:
        bodies[algorithm] = canonical_body(body, algorithm)
    d.body = bodies[algorithm]
    d.headers, idx = _fields_for(headers, sig_index, dkimaccept.signed_fields(tags))
    try:
        ok = _dkimpy_verify(d, idx, pk, dkimpy_record)
    except dkim.ValidationError as e:
        # After the key: a body hash mismatch and its kin.
        return describe(value, "fail", str(e))
    except (
        dkim.DKIMException,
        ValueError,
        IndexError,
        KeyError,
        TypeError,
        OverflowError,
        binascii.Error,
    ) as e:
        return describe(value, "permerror", f"signature cannot be used: {type(e).__name__}: {e}")
    if ok:
        return describe(value, "pass", "signature verified")
    return describe(value, "fail", "signature did not verify")
