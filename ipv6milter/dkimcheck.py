"""The DKIM checker: every signature of a message verified, keys fetched through our resolver.

``dkim.verify()`` looks at the first signature only and folds every error,
a DNS outage included, into False; so each signature is verified on its own
and the key lookup is watched to tell a missing or broken key (permerror)
from a bad signature (fail) and from a DNS outage (temperror).

One direction: for each signature this module asks dkimaccept (the rules)
whether its tags are acceptable (``read_signature``), looks the key up,
asks whether the key is (``judge_key``), and only then hands dkimpy the
parsed signature, the parsed key, the fields ``h=`` selects and the body
canonicalized once per canonicalization: dkimpy computes the hashes and
the cryptography, nothing else.  The header is parsed here, in one pass
(dkimpy's own parse is quadratic over folded lines and refuses a field
written ``Name : value``, RFC 5322 §4.5.8 obs-optional, which is that field).
"""

from __future__ import annotations

import binascii
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import dkim
from dkim.canonicalization import Simple

from . import dkimaccept, dkimcanon, limits
from .config import a_labels
from .dkimaccept import Key, Refusal, Signature
from .dkimcanon import field_name, signed_subset
from .model import DkimResult
from .resolver import Budget, Resolver, TempFail

log = logging.getLogger(__name__)


class _DebugOnly(logging.LoggerAdapter):
    """dkimpy logs hostile input at error level; to us it is debug detail."""

    def log(self, level: int, msg: Any, *args: Any, **kwargs: Any) -> None:
        super().log(logging.DEBUG, msg, *args, **kwargs)


_dkimpy_log = _DebugOnly(logging.getLogger("ipv6milter.dkimpy"), {})

# Every pattern here reads sender data and runs in linear time (none can try
# a run of characters from more than one start): _TOKEN's repetition is
# bounded (253); _HEAD_END, _BARE_LF, _FIELD_START and _FIELD_LINE look at a
# few characters per position; _SIGNATURE_FIELD and _SIGNATURE_VALUE start
# only at a line start, their [ \t]* run belongs to that line, and nothing
# follows _SIGNATURE_VALUE's repetition, so a failed extra iteration never
# backtracks into the earlier ones; _FIELD_NAME is matched once per field,
# its two classes meet only at the name's end.
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
# Where each header field starts: a line that is not a continuation.
_FIELD_LINE = re.compile(rb"(?m)^[^ \t]")
# RFC 5322 field-name (printable, no colon), then obs-optional's WSP.
_FIELD_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*")


# -- the message, split as dkimpy would, without its per-line copies ----------------


def head_end(message: bytes) -> tuple[int, int] | None:
    """Where ``_HEAD_END`` (``\\r?\\n\\r?\\n``) first matches: its start and end.

    The same span as ``_HEAD_END.search``, found by two ``bytes.find`` (C
    speed, memchr): re tries the optional CR at every byte of the header
    and costs tens of microseconds over a 4 KB message.  The leftmost match
    holds the first LF that an LF or a CRLF follows; it starts at the CR
    before that LF if there is one, and takes the CRLF after it if that is
    what follows.
    """
    lf_lf, lf_crlf = message.find(b"\n\n"), message.find(b"\n\r\n")
    at = lf_lf if lf_crlf < 0 or 0 <= lf_lf < lf_crlf else lf_crlf
    if at < 0:
        return None
    start = at - 1 if at > 0 and message[at - 1] == 0x0D else at
    return start, at + (2 if at == lf_lf else 3)


def split_message(message: bytes,
                  end: tuple[int, int] | bool | None = False) -> tuple[bytes, bytes]:
    """Header section and body, as dkimpy's ``rfc822_parse`` splits them.

    dkimpy splits the *whole* message into one object per line, then joins
    the body again: tens of times the size of a body of short lines.  Only
    the header section is handed to it; the body is given as it would have
    come out (line ends made CRLF).  ``end``: ``head_end(message)`` when
    the caller has it already.
    """
    if message.startswith((b"\r\n", b"\n")):  # no header at all
        head, body = b"", message[message.index(b"\n") + 1 :]
    else:
        if end is False:
            end = head_end(message)
        head, body = (message[: end[0]], message[end[1] :]) if end else (message, b"")
    if body.count(b"\n") != body.count(b"\r\n"):  # a bare LF (C speed; a regex was not)
        body = _BARE_LF.sub(b"\r\n", body)
    return head, body


def parse_header(head: bytes) -> list[tuple[bytes, bytes]]:
    """The header fields as dkimpy's ``rfc822_parse`` gives them, in one pass.

    ``(name, value)``: the name as written up to its colon, the value after
    the colon with every line end made CRLF and a CRLF at the end, folded
    lines kept.  The same list as dkimpy's, with two differences: a field
    written with white space before its colon (RFC 5322 §4.5.8
    obs-optional, which a receiver must accept) is a field, its name keeping
    that white space (simple canonicalization hashes it as written, relaxed
    drops it, RFC 6376 §3.4.2), where dkimpy refuses the whole header; and
    dkimpy's ``value += line`` per folded line (quadratic over many folded
    lines) is one slice here.  A line that is no field (no colon, a name
    with space or control characters, a continuation with no field above)
    makes the header unusable, as it does for dkimpy (MessageFormatError);
    an mbox ``From `` line is skipped, as dkimpy skips it.
    """
    if head.count(b"\n") != head.count(b"\r\n"):
        head = _BARE_LF.sub(b"\r\n", head)
    starts = [m.start() for m in _FIELD_LINE.finditer(head)]
    if head and (not starts or starts[0] != 0):
        raise dkim.MessageFormatError("a folded line with no header field above it")
    fields = []
    for start, end in zip(starts, [*starts[1:], len(head)][: len(starts)], strict=True):
        colon = head.find(b":", start, end)
        line_end = head.find(b"\n", start, end)
        name = head[start:colon]
        if colon < 0 or (0 <= line_end < colon) or not _FIELD_NAME.fullmatch(name):
            if head.startswith(b"From ", start):
                continue
            raise dkim.MessageFormatError("unexpected characters in the header")
        value = head[colon + 1 : end]
        fields.append((name, value if value.endswith(b"\r\n") else value + b"\r\n"))
    return fields


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


def canonical_equivalent(body: bytes, algorithm: bytes,
                         longer_than: int = limits.BODY_EMPTY_TAIL) -> bytes:
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
    if algorithm == b"relaxed":
        return dkimcanon.relaxed_body(trimmed)
    return Simple.canonicalize_body(trimmed)


def signature_tags(value: bytes) -> dict[bytes, bytes]:
    """A lenient tag=value split of a DKIM-Signature, for reporting only."""
    tags: dict[bytes, bytes] = {}
    for part in value.split(b";"):
        name, eq, v = part.partition(b"=")
        if eq:
            tags.setdefault(name.strip().lower(), _SPACE.sub(b"", v))
    return tags


def _reported_tags(tags: Mapping[bytes, bytes], value: bytes) -> Mapping[bytes, bytes]:
    """The tags ``describe`` reports, from dkimpy's parse of a signature that
    was read: its d=, s= and b= with the white space removed, as
    ``signature_tags`` gives them (no second split of the field).  A tag
    name written in capitals (lowered by ``signature_tags``, kept by
    dkimpy) sends the field back to ``signature_tags``."""
    if any(k != k.lower() for k in tags):
        return signature_tags(value)
    # bytes.split() splits on the bytes \s matches: space, \t, \n, \r, \f, \v.
    return {k: b"".join(tags[k].split()) for k in (b"d", b"s", b"b") if k in tags}


def describe(value: bytes, result: str, detail: str,
             tags: Mapping[bytes, bytes] | None = None) -> DkimResult:
    """The reported result of one signature; ``tags``, when given, as
    ``signature_tags(value)`` would give the d=, s= and b= of it."""
    if tags is None:
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


def _field_count(head: bytes) -> int:
    return len(_FIELD_START.findall(head))


def _over_field_limit(head: bytes) -> bool:
    """``_field_count(head) > MAX_HEADER_FIELDS``.  A field starts at a line
    start, and ``^`` matches at most once per LF plus once at the start: a
    header of no more lines than the limit is within it, counted by one
    ``bytes.count`` (the pattern tries every byte of the header)."""
    if head.count(b"\n") + 1 <= limits.MAX_HEADER_FIELDS:
        return False
    return _field_count(head) > limits.MAX_HEADER_FIELDS


def _signature_values(head: bytes, max_signatures: int) -> list[bytes]:
    """The topmost DKIM-Signature values, found leniently (for reporting)."""
    out = []
    for m in _SIGNATURE_VALUE.finditer(head):
        out.append(m.group(1))
        if len(out) >= max_signatures:
            break
    return out


def _fields_for(
    headers: Sequence[Sequence[bytes]], sig_index: int, names: list[bytes]
) -> tuple[list[Sequence[bytes]], int]:
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
    idx = sum(1 for i in keep if i < sig_index and field_name(headers[i][0]) == _SIGNATURE)
    return fields, idx


_SIGNATURE = b"dkim-signature"


def _no_lookup(_name: bytes, timeout: int = 5) -> None:
    """dkimpy's DNS function: never asked, dkimpy is handed the key."""
    return None


def _dkimpy_verify(d: dkim.DKIM, signature: Signature, key: Key,
                   field: tuple[bytes, bytes]) -> bool:
    """dkimpy's hashes and cryptography for one signature, nothing more.

    What ``DKIM.verify`` does after its own parse of the signature
    (``verify_headerprep``: quadratic over white space in b= and h=, and it
    would find no field named ``DKIM-Signature :``) and its key lookup: the
    signature is read by ``dkimaccept.read_signature``, the key by
    ``judge_key``, and dkimpy is handed both.
    """
    d.pk, d.keysize, d.ktag, d.seqtlsrpt = key.dkimpy
    return bool(d.verify_sig_process(dict(signature.tags), list(signature.names), field,
                                     _no_lookup))


def check_dkim(
    resolver: Resolver, message: bytes, budget: Budget, max_signatures: int
) -> tuple[DkimResult, ...]:
    """One result per signature tried, topmost first; () when there is none."""
    end = head_end(message)
    if not _SIGNATURE_FIELD.search(message, 0, end[0] if end else len(message)):
        # dkimpy copies the message several times over while parsing it;
        # an unsigned message (most of them) need not pay that in memory.
        return ()
    head, body = split_message(message, end)
    if _over_field_limit(head):
        reason = f"more than {limits.MAX_HEADER_FIELDS} header fields"
        return tuple(describe(v, "permerror", reason)
                     for v in _signature_values(head, max_signatures))
    try:
        headers = parse_header(head)
    except dkim.MessageFormatError as e:
        return tuple(describe(v, "permerror", f"message cannot be parsed: {e}")
                     for v in _signature_values(head, max_signatures))
    dkimcanon.install()  # dkimpy's quadratic steps replaced, before it sees anything
    d = dkim.DKIM(logger=_dkimpy_log)  # no message: it is handed the parts it uses
    sig_indexes = [i for i, (n, _) in enumerate(headers) if field_name(n) == _SIGNATURE]
    bodies: dict[bytes, bytes] = {}
    return tuple(_verify_one(resolver, budget, d, headers, sig_index, body, bodies)
                 for sig_index in sig_indexes[:max_signatures])


def _verify_one(
    resolver: Resolver,
    budget: Budget,
    d: dkim.DKIM,
    headers: list[tuple[bytes, bytes]],
    sig_index: int,
    body: bytes,
    bodies: dict[bytes, bytes],
) -> DkimResult:
    """One signature: the rules on its tags, the key lookup, the rules on
    the key, then dkimpy's hashes and cryptography."""
    value = headers[sig_index][1]
    signature = dkimaccept.read_signature(value)
    if isinstance(signature, Refusal):
        return describe(value, signature.result, signature.reason)
    reported = _reported_tags(signature.tags, value)
    try:
        record = resolver.dkim_dnsfunc(budget)(signature.key_name)
    except TempFail as e:
        return describe(value, "temperror", f"key lookup: {e}", reported)
    if record is None:
        return describe(value, "permerror", "no key record", reported)
    key = dkimaccept.judge_key(signature, record)
    if isinstance(key, Refusal):
        return describe(value, key.result, key.reason, reported)
    algorithm = signature.body_algorithm
    if algorithm not in bodies:
        bodies[algorithm] = canonical_body(body, algorithm)
    d.body = bodies[algorithm]
    d.headers, _ = _fields_for(headers, sig_index, list(signature.names))
    try:
        ok = _dkimpy_verify(d, signature, key, headers[sig_index])
    except dkim.ValidationError as e:
        # After the key: a body hash mismatch and its kin.
        return describe(value, "fail", str(e), reported)
    except (
        dkim.DKIMException,
        ValueError,
        IndexError,
        KeyError,
        TypeError,
        OverflowError,
        binascii.Error,
    ) as e:
        return describe(value, "permerror", f"signature cannot be used: {type(e).__name__}: {e}",
                        reported)
    if ok:
        return describe(value, "pass", "signature verified", reported)
    return describe(value, "fail", "signature did not verify", reported)


