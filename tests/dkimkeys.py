"""RSA keys for DKIM tests, made with openssl (Debian's openssl package)."""

from __future__ import annotations

import base64
import functools
import subprocess


@functools.cache
def make_key(bits: int = 1024, tag: str = "") -> tuple[bytes, str]:
    """A private key in PEM and its DKIM key record text ``v=DKIM1; k=rsa; p=...``.

    ``tag`` only tells cached keys apart when a test needs two different ones.
    """
    private = subprocess.run(
        ["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", f"rsa_keygen_bits:{bits}"],
        check=True, capture_output=True,
    ).stdout
    public_der = subprocess.run(
        ["openssl", "pkey", "-pubout", "-outform", "DER"],
        input=private, check=True, capture_output=True,
    ).stdout
    return private, "v=DKIM1; k=rsa; p=" + base64.b64encode(public_der).decode()
