"""The DKIM rules: what a signature's tags and its key record may be, read once, decided here.

dkimpy verifies the mathematics; it does not apply the rules RFC 6376 and
its updates put on a verifier, and it hands any key it finds to its RSA code
(a 16384-bit modulus with a 16384-bit exponent holds the GIL for seconds).
These functions are the rules, in one place, each citing its section.  They
run *before* dkimpy: the signature's tags before the key lookup, the key
record before any cryptography, so that a key outside the accepted range is
never handed to the crypto code at all (SPEC §1, "acceptable").

The checker (dkimcheck) asks, this module answers, and never calls back:

``read_signature(value)``   the DKIM-Signature value -> ``Signature`` (its
                            tags as dkimpy is to be handed them, the h=
                            names, the key's DNS name) or ``Refusal``
``judge_key(sig, record)``  the key record (read once per distinct record)
                            -> ``Key`` (dkimpy's parsed key) or ``Refusal``

Tags are read as RFC 6376 §3.2 and §3.5 say, not stricter: an unknown query
method in ``q=`` is ignored (``q=foo/bar:dns/txt`` is ``dns/txt``); every
step over the value is linear in its length, which is bounded first
(``limits.MAX_SIGNATURE_FIELD``).

A rule that is broken gives a ``Refusal``: ``policy`` when the signature may
well be cryptographically sound but is not acceptable to us (RFC 8601
§2.7.1: "the signature ... was not accepted for a policy reason"), or
``permerror`` when the signature or key is unusable as RFC 6376 defines it
(a PERMFAIL).  ``reason`` is the fixed phrase written as the header comment,
for example ``dkim=policy (rsa-sha1 is not acceptable, RFC 8301)``.

The rules, in the order they are applied (the first that applies decides):

signature, before the key lookup
  value over ``MAX_SIGNATURE_FIELD`` permerror our CPU bound (SPEC §1)
  tags dkimpy refuses, or no        permerror RFC 6376 §6.1.1 (PERMFAIL,
  known method in ``q=``                      malformed signature)
  ``a=rsa-sha1``                    policy    RFC 8301 §3.1: verifiers MUST NOT
                                              consider rsa-sha1 signatures valid
  ``h=`` over ``MAX_SIGNED_FIELDS``  permerror our CPU cap (SPEC §1)
  ``h=`` without ``From``           permerror RFC 6376 §6.1.1: PERMFAIL (From
                                              field not signed)
  ``d=``/``s=`` not a DNS name      permerror SPEC §1: no data, no query sent
key record, before any cryptography
  ``k=`` not the key type of ``a=`` permerror RFC 6376 §6.1.2 step 7: PERMFAIL
                                              (inappropriate key algorithm)
  ``s=`` not ``*`` nor ``email``    permerror RFC 6376 §3.6.1 s=: the key is not
                                              for email
  ``h=`` not listing a='s hash      permerror RFC 6376 §3.6.1 h= and §6.1.2
                                              step 6: the verifier MUST ignore
                                              the signature and return PERMFAIL
                                              (inappropriate hash algorithm);
                                              it is not a choice of ours but
                                              the signer's key forbidding it
  ``t=s`` with ``i=`` in a subdomain permerror RFC 6376 §3.6.1 t=s: the i=
                                              domain MUST NOT be a subdomain of
                                              d=; a broken key constraint, like
                                              the one above
  RSA modulus outside 1024..8192    policy    RFC 8301 §3.2 (under 1024 MUST NOT
                                              be valid); over 8192 is our CPU
                                              cap (SPEC §1)
  RSA exponent over 2^32            policy    our CPU cap (SPEC §1); real keys
                                              use 65537
  ed25519 key not 32 bytes          policy    RFC 8463 §4.2: the key is the
                                              32-byte public key
  ``t=y``                           policy    RFC 6376 §3.6.1 t=y: "Verifiers
                                              MUST NOT treat messages from
                                              Signers in testing mode
                                              differently from unsigned email":
                                              it never passes
  a record dkimpy cannot read,      permerror RFC 6376 §6.1.2 (PERMFAIL, key
  or a revoked key (empty ``p=``)             unavailable or unusable)
"""

from __future__ import annotations

import base64
import binascii
import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import dkim
from dkim.canonicalization import CanonicalizationPolicy, InvalidCanonicalizationPolicyError
from dkim.crypto import UnparsableKeyError, parse_public_key
from dkim.util import InvalidTagValueList, parse_tag_value

from . import limits
from .config import a_labels

# The caps live in limits.py; these names are what the rest of the code and
# the tests know them by.
MAX_SIGNED_FIELDS = limits.MAX_SIGNED_FIELDS
MAX_HEADER_FIELDS = limits.MAX_HEADER_FIELDS
RSA_MIN_BITS = limits.RSA_MIN_BITS
RSA_MAX_BITS = limits.RSA_MAX_BITS
RSA_MAX_EXPONENT = limits.RSA_MAX_EXPONENT
ED25519_KEY_BYTES = 32

_SPACE = re.compile(rb"\s+")
# dkimpy's b= check, ``[\s0-9A-Za-z+/]+[\s=]*$``, backtracks quadratically
# over white space followed by a stray character; its first part alone,
# then a C-speed test of the rest, accepts exactly the same values.
_B64_HEAD = re.compile(rb"[\s0-9A-Za-z+/]+")
_B64_TAIL = b"= \t\n\r\x0b\x0c"  # [\s=]
_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
_DNS_TXT = b"dns/txt"

# a= -> (k=, hash name as the key's h= lists it)
_ALGORITHMS = {
    b"rsa-sha256": (b"rsa", b"sha256"),
    b"rsa-sha1": (b"rsa", b"sha1"),
    b"ed25519-sha256": (b"ed25519", b"sha256"),
}


@dataclass(frozen=True)
class Refusal:
    """A signature that must not pass, and why (the header comment)."""

    result: str  # "policy" or "permerror"
    reason: str


def _policy(reason: str) -> Refusal:
    return Refusal("policy", reason)


def _permerror(reason: str) -> Refusal:
    return Refusal("permerror", reason)


# -- the signature ---------------------------------------------------------------------


@dataclass(frozen=True)
class Signature:
    """One DKIM-Signature, read and found acceptable before any key lookup."""

    tags: Mapping[bytes, bytes]  # as dkimpy is to be handed them
    names: tuple[bytes, ...]  # h=, lower case, in order
    key_name: str  # s._domainkey.d in A-labels
    body_algorithm: bytes  # c='s body canonicalization, b"simple" or b"relaxed"


def signed_fields(tags: Mapping[bytes, bytes]) -> list[bytes]:
    """The field names of ``h=``, lower case, as dkimpy splits them.

    dkimpy splits on ``\\s*:\\s*``, which tries every start of a white-space
    run that no colon follows (quadratic); splitting on the colon and
    stripping each piece gives the same names.
    """
    return [x.strip().lower() for x in tags.get(b"h", b"").strip().split(b":")]


def _b_is_base64(value: bytes) -> bool:
    head = _B64_HEAD.match(value)
    return head is not None and not value[head.end():].translate(None, _B64_TAIL)


def _query_methods(value: bytes) -> list[bytes]:
    """q='s methods (RFC 6376 §3.5: a colon-separated list, FWS around each)."""
    return [m.strip().lower() for m in value.split(b":")]


def _key_name(tags: Mapping[bytes, bytes]) -> str | None:
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
    if len(name) > limits.DNS_NAME_CHARS or not all(
            _LABEL.fullmatch(label) for label in name.split(".")):
        return None
    return name


def _body_algorithm(tags: Mapping[bytes, bytes]) -> bytes:
    try:
        c = tags.get(b"c", b"simple/simple")
        return CanonicalizationPolicy.from_c_value(c).body_algorithm.name
    except (InvalidCanonicalizationPolicyError, ValueError, IndexError):
        return b"simple"  # dkimpy refuses the signature itself


def _unusable(why: str) -> Refusal:
    return _permerror(f"signature cannot be used: {why}")


def _tags(value: bytes) -> dict[bytes, bytes] | Refusal:
    """The tags as dkimpy is to be handed them, or why the signature is
    malformed (RFC 6376 §6.1.1 PERMFAIL, judged without a key)."""
    line_end = 2 if value.endswith(b"\r\n") else 0  # the field's own, not counted
    if len(value) - line_end > limits.MAX_SIGNATURE_FIELD:
        return _unusable(f"field over {limits.MAX_SIGNATURE_FIELD} bytes")
    try:
        tags = parse_tag_value(value)
    except (InvalidTagValueList, ValueError, IndexError, TypeError) as e:
        return _unusable(str(e))
    if b"b" in tags and not _b_is_base64(tags[b"b"]):
        return _unusable("b= value is not valid base64")
    if b"q" in tags:
        # RFC 6376 §3.5: "Unrecognized query mechanisms MUST be ignored";
        # dkimpy wants q= to be exactly dns/txt, so it is told that.
        if _DNS_TXT not in _query_methods(tags[b"q"]):
            return _unusable("no query method in q= is known, RFC 6376 3.5")
        tags[b"q"] = _DNS_TXT
    try:
        # dkimpy's own checks of the tags (missing, malformed, expired).
        dkim.validate_signature_fields(tags)
    except (dkim.DKIMException, ValueError, IndexError, TypeError) as e:
        return _unusable(str(e))
    return tags


def read_signature(value: bytes) -> Signature | Refusal:
    """The rules that need only the signature's own value (no DNS, no crypto)."""
    tags = _tags(value)
    if isinstance(tags, Refusal):
        return tags
    if tags.get(b"a", b"").strip().lower() == b"rsa-sha1":
        return _policy("rsa-sha1 is not acceptable, RFC 8301")
    names = signed_fields(tags)
    if len(names) > MAX_SIGNED_FIELDS:
        return _permerror(f"h= names more than {MAX_SIGNED_FIELDS} fields")
    if b"from" not in names:
        return _permerror("From is not signed, RFC 6376 6.1.1")
    name = _key_name(tags)
    if name is None:
        return _permerror("d= or s= is not a domain name")
    return Signature(tags, tuple(names), name, _body_algorithm(tags))


# -- the key record --------------------------------------------------------------------


@dataclass(frozen=True)
class Key:
    """A key record found acceptable: dkimpy's reading of it (``evaluate_pk``'s
    key, size, type and tlsrpt flag), handed to dkimpy instead of the record."""

    dkimpy: tuple[Any, ...]


@dataclass(frozen=True)
class KeyFacts:
    """What the rules need of one key record, read once (``key_facts``)."""

    readable: bool  # a tag list with a non-empty p= (else dkimpy's permerror)
    k: bytes
    services: frozenset[bytes] | None  # s=, or None when absent
    hashes: frozenset[bytes] | None  # h=, or None when absent
    flags: frozenset[bytes]  # t=
    # The size rule's verdict: a Refusal, None (acceptable), or _UNREADABLE
    # (p= cannot be decoded or parsed: dkimpy's permerror).
    size: Refusal | str | None
    record: bytes

    @functools.cached_property
    def dkimpy(self) -> Key | Refusal:
        """dkimpy's reading of the record, made only once the rules accept
        it (an ed25519 key becomes a PyNaCl key here: crypto code)."""
        # dkimpy reads s= as one word; "email:tlsrpt" (a list, RFC 6376
        # §3.6.1) would make it drop the key.  The rules judged s= already.
        record = _without_service_type(self.record)
        if not record:
            return _permerror("unusable key record: empty")
        try:
            return Key(tuple(dkim.evaluate_pk(b"", record)))
        except (dkim.DKIMException, ValueError, IndexError, TypeError, binascii.Error) as e:
            return _permerror(f"unusable key record: {e}")


_UNREADABLE = "unreadable"
# Records up to this size are remembered (an 8192-bit RSA key is ~1.5 KB of
# record); a larger one is read again each time rather than kept.
CACHEABLE_RECORD = 4096


def _flags(value: bytes) -> set[bytes]:
    return {f.strip().lower() for f in value.split(b":")}


def _read_key(record: bytes) -> KeyFacts:
    """The facts of ``record``, whatever it holds."""
    try:
        key = parse_tag_value(record)
    except InvalidTagValueList:
        key = {}
    p = _SPACE.sub(b"", key.get(b"p", b""))
    if not p:  # unreadable, or revoked (RFC 6376 §3.6.1)
        return KeyFacts(False, b"", None, None, frozenset(), _UNREADABLE, record)
    k = key.get(b"k", b"rsa").strip().lower()
    size: Refusal | str | None = None
    try:
        # Decoded as dkimpy and PyNaCl decode it (characters outside the
        # alphabet skipped): the size checked is the size they would use.
        der = base64.b64decode(p)
    except (binascii.Error, ValueError):
        der, size = b"", _UNREADABLE
    if size is None and k == b"rsa":
        try:
            pk = parse_public_key(der)
            modulus, exponent = int(pk["modulus"]), int(pk["publicExponent"])
        except (UnparsableKeyError, KeyError, IndexError, TypeError, ValueError):
            size = _UNREADABLE
        else:
            bits = modulus.bit_length()
            if not RSA_MIN_BITS <= bits <= RSA_MAX_BITS:
                size = _policy(f"RSA key of {bits} bits is not acceptable, "
                               f"{RSA_MIN_BITS} to {RSA_MAX_BITS} are")
            elif exponent > RSA_MAX_EXPONENT:
                size = _policy("RSA exponent over 2^32 is not acceptable")
    elif size is None and k == b"ed25519" and len(der) != ED25519_KEY_BYTES:
        size = _policy(f"ed25519 key of {len(der)} bytes is not acceptable, RFC 8463")
    return KeyFacts(
        True,
        k,
        frozenset(_flags(key[b"s"])) if b"s" in key else None,
        frozenset(_flags(key[b"h"])) if b"h" in key else None,
        frozenset(_flags(key.get(b"t", b""))),
        size,
        record,
    )


_read_key_cached = functools.lru_cache(maxsize=1024)(_read_key)


def key_facts(record: bytes) -> KeyFacts:
    """``_read_key``, once per distinct record: a repeat signer's key record
    is not decoded and ASN.1-parsed again for every message."""
    if len(record) > CACHEABLE_RECORD:
        return _read_key(record)
    return _read_key_cached(record)


def _key_rules(tags: Mapping[bytes, bytes], key: KeyFacts) -> Refusal | None:
    """The rules on the key record, in the order of the table above; None
    when none applies (dkimpy's reading of the record then decides)."""
    if not key.readable:
        return None
    kind, hash_name = _ALGORITHMS.get(tags.get(b"a", b"").strip().lower(), (b"", b""))
    if kind and key.k != kind:
        return _permerror("key type does not match a=, RFC 6376 6.1.2")
    if key.services is not None and not key.services & {b"*", b"email"}:
        return _permerror("key is not for email, RFC 6376 3.6.1")
    if key.hashes is not None and hash_name not in key.hashes:
        return _permerror("key h= does not allow this hash, RFC 6376 3.6.1")
    if b"s" in key.flags:
        d = tags.get(b"d", b"").strip().lower()
        i_domain = tags.get(b"i", b"").strip().lower().rpartition(b"@")[2]
        if b"i" in tags and i_domain != d:
            return _permerror("i= is a subdomain of d= and the key says t=s, RFC 6376 3.6.1")
    if isinstance(key.size, Refusal):
        return key.size
    if key.size is None and b"y" in key.flags:
        return _policy("testing mode")
    return None


def judge_key(signature: Signature, record: bytes) -> Key | Refusal:
    """The key record, judged before it reaches any crypto code.

    ``record`` is the TXT record as found.  A record the rules accept is
    read by dkimpy (once per distinct record); one dkimpy cannot read is a
    permerror.
    """
    key = key_facts(record)
    refusal = _key_rules(signature.tags, key)
    if refusal is not None:
        return refusal
    return key.dkimpy


def _without_service_type(record: bytes) -> bytes:
    """``record`` without its ``s=`` tag, once the rules have accepted it."""
    try:
        key = parse_tag_value(record)
    except InvalidTagValueList:
        return record
    if b"s" not in key:
        return record
    return b"; ".join(k + b"=" + v for k, v in key.items() if k != b"s")
