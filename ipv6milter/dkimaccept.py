"""Which DKIM signatures a verifier may accept, beyond "the crypto says yes".

dkimpy verifies the mathematics; it does not apply the rules RFC 6376 and
its updates put on a verifier, and it hands any key it finds to its RSA code
(a 16384-bit modulus with a 16384-bit exponent holds the GIL for seconds).
These functions are the rules, in one place, each citing its section.  They
run *before* dkimpy: the signature's tags before the key lookup, the key
record before any cryptography, so that a key outside the accepted range is
never handed to the crypto code at all (SPEC §1, "acceptable").

A rule that is broken gives a ``Refusal``: ``policy`` when the signature may
well be cryptographically sound but is not acceptable to us (RFC 8601
§2.7.1: "the signature ... was not accepted for a policy reason"), or
``permerror`` when the signature or key is unusable as RFC 6376 defines it
(a PERMFAIL).  ``reason`` is the fixed phrase written as the header comment,
for example ``dkim=policy (rsa-sha1 is not acceptable, RFC 8301)``.

The rules, in the order they are applied (the first that applies decides):

signature, before the key lookup
  ``a=rsa-sha1``                    policy    RFC 8301 §3.1: verifiers MUST NOT
                                              consider rsa-sha1 signatures valid
  ``h=`` over ``MAX_SIGNED_FIELDS``  permerror our CPU cap (SPEC §1)
  ``h=`` without ``From``           permerror RFC 6376 §6.1.1: PERMFAIL (From
                                              field not signed)
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

A revoked key (empty ``p=``) or a record dkimpy cannot read stays dkimpy's
and the caller's business (``permerror``).
"""

from __future__ import annotations

import base64
import binascii
import functools
import re
from dataclasses import dataclass

from dkim.crypto import UnparsableKeyError, parse_public_key
from dkim.util import InvalidTagValueList, parse_tag_value

# CPU caps (docs/admin-guide.md, "Limits").  Real signers name 10 to 40
# fields (oversigning included); dkimpy's own default signs fewer than 30.
MAX_SIGNED_FIELDS = 64
# Header fields of one message handed to DKIM verification; real mail has
# tens, a long mailing-list trail about a hundred.
MAX_HEADER_FIELDS = 1000

RSA_MIN_BITS = 1024
RSA_MAX_BITS = 8192
RSA_MAX_EXPONENT = 2**32
ED25519_KEY_BYTES = 32

_COLON = re.compile(rb"\s*:\s*")
_SPACE = re.compile(rb"\s+")

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


def signed_fields(tags: dict[bytes, bytes]) -> list[bytes]:
    """The field names of ``h=``, lower case, as dkimpy splits them."""
    return [x.lower() for x in _COLON.split(tags.get(b"h", b"").strip())]


def _flags(value: bytes) -> set[bytes]:
    return {f.strip().lower() for f in value.split(b":")}


def check_signature(tags: dict[bytes, bytes]) -> Refusal | None:
    """The rules that need only the signature's own tags (no DNS, no crypto)."""
    if tags.get(b"a", b"").strip().lower() == b"rsa-sha1":
        return _policy("rsa-sha1 is not acceptable, RFC 8301")
    names = signed_fields(tags)
    if len(names) > MAX_SIGNED_FIELDS:
        return _permerror(f"h= names more than {MAX_SIGNED_FIELDS} fields")
    if b"from" not in names:
        return _permerror("From is not signed, RFC 6376 6.1.1")
    return None


@dataclass(frozen=True)
class KeyFacts:
    """What the rules need of one key record, read once (``key_facts``)."""

    k: bytes
    services: frozenset[bytes] | None  # s=, or None when absent
    hashes: frozenset[bytes] | None  # h=, or None when absent
    flags: frozenset[bytes]  # t=
    # The size rule's verdict: a Refusal, None (acceptable), or _UNREADABLE
    # (p= cannot be decoded or parsed: dkimpy's permerror).
    size: Refusal | str | None


_UNREADABLE = "unreadable"
# Records up to this size are remembered (an 8192-bit RSA key is ~1.5 KB of
# record); a larger one is read again each time rather than kept.
CACHEABLE_RECORD = 4096


def _read_key(record: bytes) -> KeyFacts | None:
    """The facts of ``record``; None when it is unreadable or revoked (dkimpy's)."""
    try:
        key = parse_tag_value(record)
    except InvalidTagValueList:
        return None
    p = _SPACE.sub(b"", key.get(b"p", b""))
    if not p:
        return None  # revoked (RFC 6376 §3.6.1): dkimpy's permerror
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
        k,
        frozenset(_flags(key[b"s"])) if b"s" in key else None,
        frozenset(_flags(key[b"h"])) if b"h" in key else None,
        frozenset(_flags(key.get(b"t", b""))),
        size,
    )


_read_key_cached = functools.lru_cache(maxsize=1024)(_read_key)


def key_facts(record: bytes) -> KeyFacts | None:
    """``_read_key``, once per distinct record: a repeat signer's key record
    is not decoded and ASN.1-parsed again for every message."""
    if len(record) > CACHEABLE_RECORD:
        return _read_key(record)
    return _read_key_cached(record)


def check_key(tags: dict[bytes, bytes], record: bytes) -> Refusal | None:
    """The rules on the key record, applied before it reaches any crypto code.

    ``record`` is the TXT record as found.  A record that cannot be read at
    all is left to dkimpy (it says so as a KeyFormatError: permerror).
    """
    key = key_facts(record)
    if key is None:
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
    if key.size == _UNREADABLE:
        return None  # dkimpy's permerror
    if key.size is not None:
        return key.size  # type: ignore[return-value]
    if b"y" in key.flags:
        return _policy("testing mode")
    return None


def without_service_type(record: bytes) -> bytes:
    """``record`` without its ``s=`` tag, once ``check_key`` has accepted it."""
    try:
        key = parse_tag_value(record)
    except InvalidTagValueList:
        return record
    if b"s" not in key:
        return record
    return b"; ".join(k + b"=" + v for k, v in key.items() if k != b"s")
