"""RSA verification through OpenSSL gives exactly dkimpy's answers."""

from __future__ import annotations

import hashlib
import random
from typing import Any

import dkim
import dkim.crypto
import pytest

from ipv6milter import dkimcanon, dkimrsa
from ipv6milter.dkimcheck import check_dkim
from ipv6milter.resolver import Budget
from tests.dkimkeys import make_key

from .fakedns import FakeResolver


def _keys(bits: int, tag: str = "") -> tuple[dict[str, Any], dict[str, int]]:
    private = dkim.crypto.parse_pem_private_key(make_key(bits, tag)[0])
    return private, {"modulus": private["modulus"], "publicExponent": private["publicExponent"]}


def _hash(data: bytes, name: str = "sha256") -> dkim.HashThrough:
    h = dkim.HashThrough(hashlib.new(name))
    h.update(data)
    return h


def _both(h_data: bytes, name: str, signature: bytes, public: dict[str, int]) -> tuple[bool, bool]:
    ours = dkimrsa.verify(_hash(h_data, name), signature, public)
    theirs = dkim.crypto.RSASSA_PKCS1_v1_5_verify(_hash(h_data, name), signature, public)
    return ours, theirs


@pytest.mark.parametrize("bits", [1024, 2048])
@pytest.mark.parametrize("name", ["sha256", "sha1"])
def test_same_answers_as_dkimpy(bits: int, name: str):
    private, public = _keys(bits)
    rng = random.Random(bits)
    n = public["modulus"]
    length = (n.bit_length() + 7) // 8
    for i in range(20):
        data = rng.randbytes(rng.randrange(0, 200))
        good = dkim.crypto.RSASSA_PKCS1_v1_5_sign(_hash(data, name), private)
        s = int.from_bytes(good, "big")
        variants = {
            "valid": good,
            "bit flipped": bytes([good[0] ^ (1 << (i % 8))]) + good[1:],
            "last byte": good[:-1] + bytes([good[-1] ^ 1]),
            "leading zero byte": b"\0" + good,  # dkimpy still accepts it
            "plus the modulus": (s + n).to_bytes(length + 1, "big"),
            "zero": bytes(length),
            "modulus itself": n.to_bytes(length, "big"),
            "short": good[1:],
            "empty": b"",
        }
        for label, sig in variants.items():
            ours, theirs = _both(data, name, sig, public)
            assert ours == theirs, (label, bits, name)
        assert _both(data + b"x", name, good, public) == (False, False)
        assert _both(data, name, good, public) == (True, True)


def test_openssl_decides_a_well_formed_signature(monkeypatch: pytest.MonkeyPatch):
    private, public = _keys(2048)
    good = dkim.crypto.RSASSA_PKCS1_v1_5_sign(_hash(b"data"), private)

    def trap(*args: Any) -> bool:
        raise AssertionError("fell back to dkimpy's arithmetic")

    monkeypatch.setattr(dkimrsa, "dkimpy_verify", trap)
    assert dkimrsa.verify(_hash(b"data"), good, public) is True
    assert dkimrsa.verify(_hash(b"other"), good, public) is False


@pytest.mark.parametrize("exponent", [1, 2, 65536])
def test_a_key_openssl_refuses_is_left_to_dkimpy(exponent: int):
    _, public = _keys(1024)
    odd = {"modulus": public["modulus"], "publicExponent": exponent}
    sig = bytes(range(1, 129))
    assert dkimrsa.verify(_hash(b"x"), sig, odd) == \
        dkim.crypto.RSASSA_PKCS1_v1_5_verify(_hash(b"x"), sig, odd)


MESSAGE = (b"From: a@example.com\r\nTo: b@example.org\r\nSubject: s\r\n\r\n"
           b"Hello  \t world.\r\n\r\n")


def test_check_dkim_gives_the_same_results_with_the_adapter_installed(
        monkeypatch: pytest.MonkeyPatch):
    private, record = make_key(2048)
    z = {("sel1._domainkey.example.com", "TXT"): record}
    messages = []
    for canon in ((b"simple", b"simple"), (b"relaxed", b"relaxed"), (b"relaxed", b"simple")):
        for alg in (b"rsa-sha256", b"rsa-sha1"):
            signed = dkim.sign(MESSAGE, b"sel1", b"example.com", private, canonicalize=canon,
                               signature_algorithm=alg) + MESSAGE
            messages += [signed, signed.replace(b"world", b"w0rld"),
                         signed.replace(b"Subject: s", b"Subject: t")]

    def results() -> list[list[tuple[str, str]]]:
        return [[(r.result, r.detail) for r in check_dkim(FakeResolver(z), m, Budget(20), 5)]
                for m in messages]

    # check_dkim installs the replacements itself; "plain" is dkimpy's own.
    dkimcanon.uninstall()
    with monkeypatch.context() as m:
        m.setattr(dkimcanon, "install", lambda: None)
        plain = results()
        assert dkim.RSASSA_PKCS1_v1_5_verify is dkim.crypto.RSASSA_PKCS1_v1_5_verify
    try:
        dkimcanon.install()
        assert dkim.RSASSA_PKCS1_v1_5_verify is dkimrsa.verify
        adapted = results()
    finally:
        dkimcanon.uninstall()
    assert dkim.RSASSA_PKCS1_v1_5_verify is dkim.crypto.RSASSA_PKCS1_v1_5_verify
    assert adapted == plain
    assert {r[0][0] for r in plain} == {"pass", "fail", "policy"}
