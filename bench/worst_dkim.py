"""CPU of the worst DKIM work one message can cause under the default configuration.

    python -m bench.worst_dkim [--body-mib N] [--rounds 3]

The message: ``MaxSignatures`` (5) signatures, each over an RSA key of the
largest accepted size (8192 bits) with the largest accepted public exponent
(2^32 - 1: odd, not over 2^32), each ``h=`` naming the most fields allowed
(dkimaccept.MAX_SIGNED_FIELDS: From plus distinct absent names, the case
that was quadratic), the header at dkimaccept.MAX_HEADER_FIELDS fields, and
a correct body hash, so that dkimpy's RSA operation runs for every one of
them (b= is a random value below the modulus: the signature fails, after
the full cost).  Then the same with keys over the limits, which must cost
nothing.  The key is built from a random odd modulus: no private key is
needed to make a verifier do its work.

Prints process CPU seconds per message (median of the rounds), as measured
through ``dkimcheck.check_dkim`` with a dict zone.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import random
import statistics
import time

from dkim.canonicalization import CanonicalizationPolicy

from ipv6milter import dkimaccept, dkimcanon
from ipv6milter.dkimcheck import check_dkim
from ipv6milter.resolver import Budget
from tests.unit.fakedns import FakeResolver


def _der_int(n: int) -> bytes:
    body = n.to_bytes((n.bit_length() + 8) // 8, "big")
    return b"\x02" + _der_len(len(body)) + body


def _der_len(n: int) -> bytes:
    if n < 128:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def _seq(*parts: bytes) -> bytes:
    body = b"".join(parts)
    return b"\x30" + _der_len(len(body)) + body


def key_record(bits: int, exponent: int, rng: random.Random) -> tuple[str, int]:
    """A k=rsa record (SubjectPublicKeyInfo) with a random odd modulus of ``bits``."""
    n = rng.getrandbits(bits) | (1 << (bits - 1)) | 1
    rsa_public = _seq(_der_int(n), _der_int(exponent))
    algorithm = _seq(b"\x06\x09\x2a\x86\x48\x86\xf7\x0d\x01\x01\x01", b"\x05\x00")
    bitstring = b"\x03" + _der_len(len(rsa_public) + 1) + b"\x00" + rsa_public
    spki = _seq(algorithm, bitstring)
    return "v=DKIM1; k=rsa; p=" + base64.b64encode(spki).decode(), n


def message(body_bytes: int, moduli: list[int], rng: random.Random) -> bytes:
    fields = [b"From: a@example.com\r\n", b"To: b@example.org\r\n", b"Subject: worst\r\n"]
    n_sigs = len(moduli)
    fields += [b"X-Filler-%d: x\r\n" % i
               for i in range(dkimaccept.MAX_HEADER_FIELDS - len(fields) - n_sigs)]
    line = b"a" * 70 + b"  \t b\r\n"
    body = line * max(1, body_bytes // len(line))
    canon = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
    bh = base64.b64encode(hashlib.sha256(canon.canonicalize_body(body)).digest())
    names = b":".join([b"from"] + [b"x-absent-%d" % i
                                   for i in range(dkimaccept.MAX_SIGNED_FIELDS - 1)])
    sigs = []
    for i, n in enumerate(moduli):
        b = base64.b64encode(rng.randrange(n // 2, n).to_bytes((n.bit_length() + 7) // 8, "big"))
        sigs.append(b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.com; "
                    b"s=s%d; h=%s; bh=%s; b=%s\r\n" % (i, names, bh, b))
    return b"".join(sigs + fields) + b"\r\n" + body


def measure(bits: int, exponent: int, body_bytes: int, rounds: int) -> tuple[float, list[str]]:
    rng = random.Random(bits ^ exponent)
    zone, moduli = {}, []
    for i in range(5):
        record, n = key_record(bits, exponent, rng)
        zone[(f"s{i}._domainkey.example.com", "TXT")] = record
        moduli.append(n)
    msg = message(body_bytes, moduli, rng)
    times, results = [], []
    for _ in range(rounds):
        r = FakeResolver(zone)
        start = time.process_time()
        res = check_dkim(r, msg, Budget(20), 5)
        times.append(time.process_time() - start)
        results = [f"{x.result} ({x.detail})" for x in res]
    return statistics.median(times), results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--body-mib", type=float, default=0.0)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    dkimcanon.install()  # as the milter runs
    body = int(args.body_mib * 1024 * 1024)
    for label, bits, exponent in (
        ("largest accepted: 8192 bits, e = 2^32 - 1", 8192, 2**32 - 1),
        ("over the limits: 16384 bits, e of 16384 bits", 16384, (1 << 16383) | 1),
    ):
        cpu, results = measure(bits, exponent, body, args.rounds)
        print(f"{label}; 5 signatures, h= {dkimaccept.MAX_SIGNED_FIELDS} names, "
              f"{dkimaccept.MAX_HEADER_FIELDS} header fields, body {args.body_mib} MiB: "
              f"{cpu * 1000:.1f} ms CPU per message")
        print("   ", results[0])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
