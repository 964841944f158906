"""RSA signature verification for dkimpy through OpenSSL (pyca/cryptography).

dkimpy verifies RSASSA-PKCS1-v1_5 (RFC 8017 §8.2.2) in pure Python: one
``pow()`` over the modulus, holding the GIL throughout; an 8192-bit key with
a 32-bit exponent costs some 25 ms, a 2048-bit key 0.2 ms.  OpenSSL does the
same check in a fraction of that.  ``verify`` has dkimpy's signature
(``RSASSA_PKCS1_v1_5_verify(hash, signature, public_key)``: dkimpy's hash
object, the b= bytes, dkimpy's parsed key) and gives the same answer:

* the signature is the modulus' length and below the modulus, the hash is
  one OpenSSL knows, the key one OpenSSL accepts: OpenSSL decides;
* anything else (a b= with leading zero bytes or longer than the modulus,
  which dkimpy's arithmetic still accepts; a key OpenSSL refuses): dkimpy's
  own function decides, so the result never depends on which code ran.

Each key is turned into an OpenSSL key once (``_public_key`` is cached on
the modulus and exponent).  dkimcanon.install() puts ``verify`` in place of
dkimpy's function, with the other equivalent replacements;
tests/unit/test_dkimrsa.py holds the equivalence.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils
from dkim.crypto import RSASSA_PKCS1_v1_5_verify as dkimpy_verify

_HASHES: dict[str, Callable[[], hashes.HashAlgorithm]] = {
    "sha256": hashes.SHA256,
    "sha1": hashes.SHA1,
}
# dkimpy raises DigestTooLargeError below this; leave such keys to it.
_MIN_MODULUS_BYTES = 64


@functools.lru_cache(maxsize=1024)
def _public_key(modulus: int, exponent: int) -> rsa.RSAPublicKey | None:
    try:
        return rsa.RSAPublicNumbers(exponent, modulus).public_key()
    except (ValueError, UnsupportedAlgorithm):
        return None


def verify(hash_obj: Any, signature: bytes, public_key: dict[str, int]) -> bool:
    """dkimpy's RSASSA_PKCS1_v1_5_verify, with OpenSSL doing the arithmetic."""
    modulus, exponent = public_key["modulus"], public_key["publicExponent"]
    length = (modulus.bit_length() + 7) // 8
    algorithm = _HASHES.get(str(getattr(hash_obj, "name", "")).lower())
    key = _public_key(modulus, exponent) if algorithm is not None else None
    if (
        key is None
        or algorithm is None
        or length < _MIN_MODULUS_BYTES
        or len(signature) != length
        or int.from_bytes(signature, "big") >= modulus
    ):
        return bool(dkimpy_verify(hash_obj, signature, public_key))
    try:
        key.verify(bytes(signature), bytes(hash_obj.digest()), padding.PKCS1v15(),
                   utils.Prehashed(algorithm()))
    except InvalidSignature:
        return False
    return True
