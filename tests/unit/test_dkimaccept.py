"""DKIM exactness: RFC 8463's example, the acceptability rules, the CPU caps, odd names.

Every rule is tested with a signature that dkimpy alone verifies (the crypto
is sound) and that must still not pass; where a key must never reach the
crypto code, dkimpy's RSA and ed25519 verification are replaced by a trap.
These run in the venv and, through tests/packaging, on Debian's python3-dkim.
"""

from __future__ import annotations

import base64
import hashlib
import random
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import authres
import dkim
import dkim.crypto
import nacl.signing
import pytest
from dkim.canonicalization import CanonicalizationPolicy, Relaxed, Simple

from ipv6milter import authresults, dkimaccept, dkimcheck, engine, limits, selftest
from ipv6milter.dkimcheck import check_dkim, signed_subset
from ipv6milter.resolver import Budget

from .fakedns import FakeResolver

MESSAGE = (
    b"From: Sender <sender@example.com>\r\n"
    b"To: rcpt@example.org\r\n"
    b"Subject: a test\r\n"
    b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
    b"Message-ID: <1@example.com>\r\n"
    b"\r\n"
    b"Hello,\r\n"
    b"a body.\r\n"
)
KEY_NAME = "sel1._domainkey.example.com"


@dataclass(frozen=True)
class RsaKey:
    pem: bytes
    p: str  # base64 SubjectPublicKeyInfo

    def record(self, extra: str = "") -> str:
        return f"v=DKIM1; k=rsa; {extra}p={self.p}"


def _rsa(directory: Path, name: str, *opts: str) -> RsaKey:
    pem = directory / f"{name}.pem"
    args = ["openssl", "genpkey", "-algorithm", "RSA", "-out", str(pem)]
    for o in opts:
        args += ["-pkeyopt", o]
    subprocess.run(args, check=True, capture_output=True)
    der = subprocess.run(["openssl", "pkey", "-in", str(pem), "-pubout", "-outform", "DER"],
                         check=True, capture_output=True).stdout
    return RsaKey(pem.read_bytes(), base64.b64encode(der).decode("ascii"))


@pytest.fixture(scope="module")
def keydir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("accept-keys")


@pytest.fixture(scope="module")
def rsa(keydir: Path) -> RsaKey:
    return _rsa(keydir, "rsa2048", "rsa_keygen_bits:2048")


@dataclass(frozen=True)
class EdKey:
    seed_b64: bytes
    public: bytes

    def record(self, extra: str = "", public: bytes | None = None) -> str:
        p = base64.b64encode(self.public if public is None else public).decode("ascii")
        return f"v=DKIM1; k=ed25519; {extra}p={p}"


@pytest.fixture(scope="module")
def ed() -> EdKey:
    key = nacl.signing.SigningKey(bytes(range(32)))
    return EdKey(base64.b64encode(bytes(key)), bytes(key.verify_key))


def sign(message: bytes, pem: bytes, *, domain: bytes = b"example.com",
         selector: bytes = b"sel1", **kwargs: Any) -> bytes:
    return dkim.sign(message, selector, domain, pem, **kwargs) + message


def zone(record: str, name: str = KEY_NAME) -> dict:
    return {(name, "TXT"): record}


def dkimpy_verifies(message: bytes, record: str, minkey: int = 1024) -> bool:
    """dkimpy on its own, given the same key: is the cryptography sound?"""
    d = dkim.DKIM(message, minkey=minkey)
    return bool(d.verify(dnsfunc=lambda name, timeout=5: record.encode("ascii")))


def judge(message: bytes, zone_: dict, max_signatures: int = 5) -> tuple[list[Any], FakeResolver]:
    r = FakeResolver(zone_)
    return list(check_dkim(r, message, Budget(20), max_signatures)), r


def header_of(results: list[Any]) -> str:
    return authresults.build("mx.example.org", None, None, None, results)


class CryptoTrap:
    """dkimpy's RSA verification and PyNaCl's key, replaced by a trap once armed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.monkeypatch = monkeypatch
        self.calls: list[str] = []

    def arm(self) -> None:
        calls = self.calls

        def rsa_trap(*args: Any, **kwargs: Any) -> bool:
            calls.append("rsa")
            raise AssertionError("an RSA key was handed to the crypto code")

        class EdTrap:
            def __init__(self, *args: Any, **kwargs: Any):
                calls.append("ed25519")
                raise AssertionError("an ed25519 key was handed to the crypto code")

        self.monkeypatch.setattr(dkim, "RSASSA_PKCS1_v1_5_verify", rsa_trap)
        self.monkeypatch.setattr(nacl.signing, "VerifyKey", EdTrap)


@pytest.fixture()
def no_crypto(monkeypatch: pytest.MonkeyPatch) -> CryptoTrap:
    return CryptoTrap(monkeypatch)


# -- RFC 8463 Appendix A ------------------------------------------------------------------

RFC8463_RSA_SIGNATURE = (
    b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed;\r\n"
    b" d=football.example.com; i=@football.example.com;\r\n"
    b" q=dns/txt; s=test; t=1528637909; h=from : to : subject :\r\n"
    b" date : message-id : from : subject : date;\r\n"
    b" bh=2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=;\r\n"
    b" b=F45dVWDfMbQDGHJFlXUNB2HKfbCeLRyhDXgFpEL8GwpsRe0IeIixNTe3\r\n"
    b" DhCVlUrSjV4BwcVcOF6+FF3Zo9Rpo1tFOeS9mPYQTnGdaSGsgeefOsk2Jz\r\n"
    b" dA+L10TeYt9BgDfQNZtKdN1WO//KgIqXP7OdEFE4LjFYNcUxZQ4FADY+8=\r\n"
)
RFC8463_RSA_KEY = (
    "v=DKIM1; k=rsa; p=MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQDkHlOQoBTzWR"
    "iGs5V6NpP3idY6Wk08a5qhdR6wy5bdOKb2jLQiY/J16JYi0Qvx/byYzCNb3W91y3FutAC"
    "DfzwQ/BC/e/8uBsCR+yz1Lxj+PL6lHvqMKrM3rG4hstT5QjvHO9PzoxZyVYLzBfO2EeC3"
    "Ip3G+2kryOTIKT+l/K4w3QIDAQAB"
)
RFC8463_MESSAGE = (
    selftest.RFC8463_ED25519_SIGNATURE + RFC8463_RSA_SIGNATURE + selftest.RFC8463_UNSIGNED
)
RFC8463_ZONE = {
    ("brisbane._domainkey.football.example.com", "TXT"): selftest.RFC8463_KEY.decode(),
    ("test._domainkey.football.example.com", "TXT"): RFC8463_RSA_KEY,
}


def test_rfc8463_example_both_signatures_pass():
    results, r = judge(RFC8463_MESSAGE, RFC8463_ZONE)
    assert [(x.result, x.domain, x.selector) for x in results] == [
        ("pass", "football.example.com", "brisbane"),
        ("pass", "football.example.com", "test"),
    ], results
    assert r.asked == [("brisbane._domainkey.football.example.com", "TXT"),
                       ("test._domainkey.football.example.com", "TXT")]


def test_rfc8463_example_altered_fails():
    altered = RFC8463_MESSAGE.replace(b"hungry yet?", b"hungry now?")
    results, _ = judge(altered, RFC8463_ZONE)
    assert [x.result for x in results] == ["fail", "fail"]


def test_self_test_says_ed25519_is_available():
    ok, line = selftest.check_ed25519()
    assert ok, line
    assert line == "ed25519 verification: available (RFC 8463's example verifies)"


def test_self_test_says_so_when_pynacl_is_missing(monkeypatch: pytest.MonkeyPatch):
    # What dkimpy does without PyNaCl: the name nacl is not bound in its module.
    monkeypatch.delattr(dkim, "nacl")
    ok, line = selftest.check_ed25519()
    assert not ok
    assert "NaClNotFoundError" in line and "python3-nacl" in line


def test_ed25519_signature_passes(ed: EdKey):
    signed = sign(MESSAGE, ed.seed_b64, signature_algorithm=b"ed25519-sha256")
    (res,), _ = judge(signed, zone(ed.record()))
    assert res.result == "pass"


# -- one test per acceptability rule --------------------------------------------------------


def test_rsa_sha1_is_policy_without_a_lookup(rsa: RsaKey):
    signed = sign(MESSAGE, rsa.pem, signature_algorithm=b"rsa-sha1")
    assert dkimpy_verifies(signed, rsa.record())
    results, r = judge(signed, zone(rsa.record()))
    assert [(x.result, x.detail) for x in results] == [
        ("policy", "rsa-sha1 is not acceptable, RFC 8301")]
    assert r.asked == []
    assert "dkim=policy (rsa-sha1 is not acceptable, RFC 8301) header.d=example.com" \
        in header_of(results)


def _sign_without_from(message: bytes, pem: bytes) -> bytes:
    """A sound rsa-sha256 signature whose h= lacks From (dkimpy's sign() refuses to)."""
    d = dkim.DKIM(message)
    d.signature_algorithm = b"rsa-sha256"
    d.hasher = hashlib.sha256
    canon = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
    bh = base64.b64encode(hashlib.sha256(canon.canonicalize_body(d.body)).digest())
    include = (b"to", b"subject", b"date")
    fields = [(b"v", b"1"), (b"a", b"rsa-sha256"), (b"c", b"relaxed/relaxed"),
              (b"d", b"example.com"), (b"s", b"sel1"), (b"h", b" : ".join(include)),
              (b"bh", bh), (b"b", b"0" * 60)]
    pk = dkim.crypto.parse_pem_private_key(pem)
    return b"DKIM-Signature:" + d.gen_header(fields, include, canon, b"DKIM-Signature", pk) \
        + message


def test_h_without_from_is_permerror(rsa: RsaKey):
    signed = _sign_without_from(MESSAGE, rsa.pem)
    assert b"from" not in signed.split(b"bh=")[0].split(b"h=")[1].lower()
    assert dkimpy_verifies(signed, rsa.record())
    results, r = judge(signed, zone(rsa.record()))
    assert [(x.result, x.detail) for x in results] == [
        ("permerror", "From is not signed, RFC 6376 6.1.1")]
    assert r.asked == []


def test_key_h_without_the_signatures_hash_is_permerror(rsa: RsaKey):
    signed = sign(MESSAGE, rsa.pem)
    record = rsa.record("h=sha1; ")
    assert dkimpy_verifies(signed, record)
    (res,), _ = judge(signed, zone(record))
    assert (res.result, res.detail) == (
        "permerror", "key h= does not allow this hash, RFC 6376 3.6.1")
    # The same key listing sha256 (among others) is fine.
    (res,), _ = judge(signed, zone(rsa.record("h=sha1:sha256; ")))
    assert res.result == "pass"


def test_key_t_s_with_an_i_in_a_subdomain_is_permerror(rsa: RsaKey):
    signed = sign(MESSAGE, rsa.pem, identity=b"@mail.example.com")
    record = rsa.record("t=s; ")
    assert dkimpy_verifies(signed, record)
    (res,), _ = judge(signed, zone(record))
    assert res.result == "permerror"
    assert res.detail.startswith("i= is a subdomain of d= and the key says t=s")
    # i= of d= itself, or no t=s: the signature passes.
    (res,), _ = judge(sign(MESSAGE, rsa.pem, identity=b"user@example.com"), zone(record))
    assert res.result == "pass"
    (res,), _ = judge(signed, zone(rsa.record()))
    assert res.result == "pass"


def test_key_in_testing_mode_is_policy(rsa: RsaKey):
    signed = sign(MESSAGE, rsa.pem)
    record = rsa.record("t=y; ")
    assert dkimpy_verifies(signed, record)
    results, _ = judge(signed, zone(record))
    assert [(x.result, x.detail) for x in results] == [("policy", "testing mode")]
    assert "dkim=policy (testing mode) header.d=example.com" in header_of(results)
    (res,), _ = judge(signed, zone(rsa.record("t=s:y; ")))
    assert res.result == "policy"


def test_rsa_key_under_1024_bits_is_policy(keydir: Path, no_crypto: CryptoTrap):
    small = _rsa(keydir, "rsa512", "rsa_keygen_bits:512")
    signed = sign(MESSAGE, small.pem)
    no_crypto.arm()
    results, _ = judge(signed, zone(small.record()))
    assert [(x.result, x.detail) for x in results] == [
        ("policy", "RSA key of 512 bits is not acceptable, 1024 to 8192 are")]
    assert no_crypto.calls == []


def test_rsa_key_under_1024_bits_verifies_in_dkimpy(keydir: Path):
    small = _rsa(keydir, "rsa512", "rsa_keygen_bits:512")
    assert dkimpy_verifies(sign(MESSAGE, small.pem), small.record(), minkey=512)


@pytest.fixture(scope="module")
def huge(keydir: Path) -> tuple[RsaKey, bytes]:
    """An 8200-bit key (five primes, quick to make) and a message it signs."""
    key = _rsa(keydir, "rsa8200", "rsa_keygen_bits:8200", "rsa_keygen_primes:5")
    # dkimpy signs with the CRT of two primes; a five-prime key needs d itself.
    original = dkim.crypto.rsa_decrypt
    dkim.crypto.rsa_decrypt = lambda m, pk, n: dkim.crypto.int2str(
        pow(dkim.crypto.str2int(m), pk["privateExponent"], pk["modulus"]), n)
    try:
        signed = sign(MESSAGE, key.pem)
    finally:
        dkim.crypto.rsa_decrypt = original
    return key, signed


def test_rsa_key_over_8192_bits_is_policy_and_never_reaches_the_crypto(
        huge: tuple[RsaKey, bytes], no_crypto: CryptoTrap):
    key, signed = huge
    no_crypto.arm()
    results, _ = judge(signed, zone(key.record()))
    assert [(x.result, x.detail) for x in results] == [
        ("policy", "RSA key of 8200 bits is not acceptable, 1024 to 8192 are")]
    assert no_crypto.calls == []


def test_rsa_key_over_8192_bits_with_junk_in_p_is_still_policy(
        huge: tuple[RsaKey, bytes], no_crypto: CryptoTrap):
    # dkimpy's base64 decoding skips characters outside the alphabet: so must the check.
    key, signed = huge
    junk = "!".join(key.p[i : i + 40] for i in range(0, len(key.p), 40))
    no_crypto.arm()
    (res,), _ = judge(signed, zone(f"v=DKIM1; k=rsa; p={junk}"))
    assert res.result == "policy"
    assert no_crypto.calls == []


def test_rsa_key_over_8192_bits_verifies_in_dkimpy(huge: tuple[RsaKey, bytes]):
    key, signed = huge
    assert dkimpy_verifies(signed, key.record())


def test_rsa_exponent_over_2_32_is_policy_and_never_reaches_the_crypto(
        keydir: Path, no_crypto: CryptoTrap):
    key = _rsa(keydir, "rsa-bige", "rsa_keygen_bits:1024", f"rsa_keygen_pubexp:{2**32 + 15}")
    signed = sign(MESSAGE, key.pem)
    no_crypto.arm()
    results, _ = judge(signed, zone(key.record()))
    assert [(x.result, x.detail) for x in results] == [
        ("policy", "RSA exponent over 2^32 is not acceptable")]
    assert no_crypto.calls == []
    assert "dkim=policy (RSA exponent over 2^32 is not acceptable)" in header_of(results)


def test_rsa_exponent_over_2_32_verifies_in_dkimpy(keydir: Path):
    key = _rsa(keydir, "rsa-bige", "rsa_keygen_bits:1024", f"rsa_keygen_pubexp:{2**32 + 15}")
    assert dkimpy_verifies(sign(MESSAGE, key.pem), key.record())


@pytest.mark.parametrize("length", [31, 33, 64])
def test_ed25519_key_not_32_bytes_is_policy_and_never_reaches_the_crypto(
        ed: EdKey, no_crypto: CryptoTrap, length: int):
    signed = sign(MESSAGE, ed.seed_b64, signature_algorithm=b"ed25519-sha256")
    public = (ed.public * 2)[:length]
    no_crypto.arm()
    results, _ = judge(signed, zone(ed.record(public=public)))
    assert [(x.result, x.detail) for x in results] == [
        ("policy", f"ed25519 key of {length} bytes is not acceptable, RFC 8463")]
    assert no_crypto.calls == []


def test_key_type_not_the_signatures_is_permerror(rsa: RsaKey, ed: EdKey, no_crypto: CryptoTrap):
    signed_ed = sign(MESSAGE, ed.seed_b64, signature_algorithm=b"ed25519-sha256")
    signed_rsa = sign(MESSAGE, rsa.pem)
    no_crypto.arm()
    (res,), _ = judge(signed_ed, zone(rsa.record()))
    assert (res.result, res.detail) == ("permerror", "key type does not match a=, RFC 6376 6.1.2")
    (res,), _ = judge(signed_rsa, zone(ed.record()))
    assert res.result == "permerror"
    assert no_crypto.calls == []


def test_key_for_another_service_is_permerror(rsa: RsaKey):
    signed = sign(MESSAGE, rsa.pem)
    (res,), _ = judge(signed, zone(rsa.record("s=tlsrpt; ")))
    assert (res.result, res.detail) == ("permerror", "key is not for email, RFC 6376 3.6.1")
    (res,), _ = judge(signed, zone(rsa.record("s=email:tlsrpt; ")))
    assert res.result == "pass"


def test_an_acceptable_signature_passes_beside_an_unacceptable_one(rsa: RsaKey):
    once = sign(MESSAGE, rsa.pem)
    twice = sign(once, rsa.pem, selector=b"old", signature_algorithm=b"rsa-sha1")
    z = {**zone(rsa.record()), **zone(rsa.record(), "old._domainkey.example.com")}
    results, _ = judge(twice, z)
    assert [x.result for x in results] == ["policy", "pass"]


def test_policy_header_round_trips_with_a_slash_in_b(rsa: RsaKey):
    res = dkimcheck.describe(b"v=1; a=rsa-sha1; d=example.com; s=sel1; h=from; b=ab/cdefgh",
                             "policy", "rsa-sha1 is not acceptable, RFC 8301")
    value = header_of([res])
    assert value.endswith(
        'dkim=policy (rsa-sha1 is not acceptable, RFC 8301) header.d=example.com '
        'header.s=sel1 header.b="ab/cdefg"')
    parsed = authresults.parse(value).results[0]
    assert parsed.result == "policy"
    assert [(p.type, p.name, p.value) for p in parsed.properties] == [
        ("header", "d", "example.com"), ("header", "s", "sel1"), ("header", "b", "ab/cdefg")]


def test_only_our_phrase_reaches_the_comment():
    res = dkimcheck.describe(b"d=example.com; s=sel1", "permerror",
                             "unusable key record: (evil) ; dkim=pass")
    value = header_of([res])
    assert "dkim=permerror (unusable key record) header.d=example.com" in value
    assert "evil" not in value
    res = dkimcheck.describe(b"d=example.com; s=sel1", "permerror", "bad (nested) phrase")
    assert "(" not in header_of([res]).split("permerror", 1)[1]
    authres.AuthenticationResultsHeader.parse_value(authresults.unfold(header_of([res])))


# -- the CPU caps ------------------------------------------------------------------------


def _names(n: int) -> list[bytes]:
    return [b"from"] + [f"x-absent-{i}".encode() for i in range(n - 1)]


def test_h_with_the_most_names_allowed_passes(rsa: RsaKey):
    signed = sign(MESSAGE, rsa.pem, include_headers=_names(dkimaccept.MAX_SIGNED_FIELDS))
    (res,), _ = judge(signed, zone(rsa.record()))
    assert res.result == "pass"


def test_h_over_the_cap_is_permerror_without_dkimpy(rsa: RsaKey, no_crypto: CryptoTrap):
    signed = sign(MESSAGE, rsa.pem, include_headers=_names(dkimaccept.MAX_SIGNED_FIELDS + 1))
    no_crypto.arm()
    results, r = judge(signed, zone(rsa.record()))
    assert [(x.result, x.detail) for x in results] == [
        ("permerror", f"h= names more than {dkimaccept.MAX_SIGNED_FIELDS} fields")]
    assert r.asked == [] and no_crypto.calls == []


def _with_fields(message: bytes, n: int) -> bytes:
    return b"".join(b"X-Filler: %d\r\n" % i for i in range(n)) + message


def test_header_fields_at_the_cap_pass(rsa: RsaKey):
    message = _with_fields(MESSAGE, dkimaccept.MAX_HEADER_FIELDS - 6)  # 5 + the signature
    signed = sign(message, rsa.pem)
    assert signed.split(b"\r\n\r\n")[0].count(b"\r\n") + 1 > dkimaccept.MAX_HEADER_FIELDS
    (res,), _ = judge(signed, zone(rsa.record()))
    assert res.result == "pass"


def test_header_fields_over_the_cap_are_permerror_without_dkimpy(
        rsa: RsaKey, monkeypatch: pytest.MonkeyPatch):
    signed = sign(sign(_with_fields(MESSAGE, dkimaccept.MAX_HEADER_FIELDS), rsa.pem), rsa.pem,
                  selector=b"sel2")
    monkeypatch.setattr(dkim, "DKIM", None)  # never parsed, never verified
    results, r = judge(signed, zone(rsa.record()))
    reason = f"more than {dkimaccept.MAX_HEADER_FIELDS} header fields"
    assert [(x.result, x.selector, x.detail) for x in results] == [
        ("permerror", "sel2", reason), ("permerror", "sel1", reason)]
    assert r.asked == []


def test_dkimpy_is_handed_only_the_signed_fields(rsa: RsaKey, monkeypatch: pytest.MonkeyPatch):
    """The quadratic h= cost: dkimpy rescans every field for every absent name.
    It now sees the fields h= selects and the signature: at most len(h=) + 2."""
    names = _names(dkimaccept.MAX_SIGNED_FIELDS)
    message = _with_fields(MESSAGE, 900)
    signed = message
    for i in range(5):
        signed = sign(signed, rsa.pem, selector=b"s%d" % i, include_headers=names)
    seen: list[int] = []
    original = dkim.DKIM.verify_sig_process

    def spy(self: dkim.DKIM, *args: Any) -> Any:
        seen.append(len(self.headers))
        return original(self, *args)

    monkeypatch.setattr(dkim.DKIM, "verify_sig_process", spy)
    z = {(f"s{i}._domainkey.example.com", "TXT"): rsa.record() for i in range(5)}
    results, _ = judge(signed, z)
    assert [x.result for x in results] == ["pass"] * 5
    assert len(seen) == 5 and max(seen) <= 3, seen  # From (twice at most) and the signature


def test_worst_allowed_header_is_cheap(rsa: RsaKey):
    """5 signatures x 64 distinct absent names x 1000 fields: well under a second."""
    names = _names(dkimaccept.MAX_SIGNED_FIELDS)
    signed = _with_fields(MESSAGE, dkimaccept.MAX_HEADER_FIELDS - 10)
    for i in range(5):
        signed = sign(signed, rsa.pem, selector=b"s%d" % i, include_headers=names)
    z = {(f"s{i}._domainkey.example.com", "TXT"): rsa.record() for i in range(5)}
    start = time.process_time()
    results, _ = judge(signed, z)
    cpu = time.process_time() - start
    assert [x.result for x in results] == ["pass"] * 5
    assert cpu < 1.0, cpu


@pytest.mark.parametrize("seed", range(30))
def test_signed_subset_is_dkimpys_choice(seed: int):
    rng = random.Random(seed)
    pool = [b"from", b"to", b"subject", b"date", b"dkim-signature", b"x"]
    headers = [[rng.choice(pool).upper() if rng.random() < 0.3 else rng.choice(pool), b"v%d" % i]
               for i in range(rng.randrange(0, 30))]
    names = [rng.choice([*pool, b"absent"]) for _ in range(rng.randrange(0, 20))]
    expected = dkim.select_headers(headers, names)
    assert [headers[i] for i in signed_subset(headers, names)] == expected


def test_fields_for_selects_as_dkimpy_does_over_the_whole_header():
    headers = [[b"DKIM-Signature", b"a"], [b"From", b"1"], [b"DKIM-Signature", b"b"],
               [b"From", b"2"], [b"To", b"3"], [b"DKIM-Signature", b"c"]]
    for sig_index in (0, 2, 5):
        for names in ([b"from"], [b"from", b"dkim-signature", b"to"],
                      [b"dkim-signature", b"dkim-signature", b"from", b"absent"]):
            fields, idx = dkimcheck._fields_for(headers, sig_index, names)
            sigs = [f for f in fields if f[0].lower() == b"dkim-signature"]
            assert sigs[idx] is headers[sig_index]
            full = [*names, b"from"]
            assert dkim.select_headers(fields, full) == dkim.select_headers(headers, full)


# -- names that cannot exist, names that must be converted, odd field names ------------------


@pytest.mark.parametrize(
    "d",
    [b"\xff\xfe.example", b"caf\xe9.example", "\u0300abc.example".encode(),
     "☃.example".encode(), b"a" * 64 + b".example", (b"abcdefghij." * 25) + b"example"],
)
def test_a_d_that_cannot_exist_is_permerror_without_a_query(d: bytes):
    sig = b"DKIM-Signature: v=1; a=rsa-sha256; d=" + d + b"; s=sel1; h=from; bh=AAAA; b=AAAA\r\n"
    results, r = judge(sig + MESSAGE, {})
    assert [(x.result, x.detail) for x in results] == [
        ("permerror", "d= or s= is not a domain name")]
    assert r.asked == []


def test_a_u_label_d_is_looked_up_as_an_a_label(rsa: RsaKey):
    signed = sign(MESSAGE, rsa.pem, domain="bücher.de".encode())
    results, r = judge(signed, zone(rsa.record(), "sel1._domainkey.xn--bcher-kva.de"))
    assert [x.result for x in results] == ["pass"]
    assert r.asked == [("sel1._domainkey.xn--bcher-kva.de", "TXT")]


@pytest.mark.parametrize("name", [b"DKIM-Signature :", b"DKIM-Signature\t:", b"dkim-signature  :"])
def test_space_before_the_colon_is_still_a_signature(rsa: RsaKey, name: bytes):
    """RFC 5322 §4.5.8 obs-optional: the field is a DKIM-Signature, and relaxed
    header canonicalization (dkimpy's default, relaxed/simple) drops the
    white space (RFC 6376 §3.4.2): the signature verifies."""
    signed = sign(MESSAGE, rsa.pem)
    odd = signed.replace(b"DKIM-Signature:", name, 1)
    results, _ = judge(odd, zone(rsa.record()))
    assert [(x.result, x.domain, x.selector) for x in results] == [
        ("pass", "example.com", "sel1")]
    assert "dkim=none" not in header_of(results)


# -- the body, canonicalized once for every signature ---------------------------------------

_PIECES = [b" ", b"\t", b"a", b"\r\n", b"\r", b"\n", b"  ", b" \r\n", b"\t\r\n", b"x y"]


@pytest.mark.parametrize("seed", range(200))
def test_canonical_body_gives_dkimpys_body_hash(seed: int):
    """Handing dkimpy the canonical body: its own pass changes nothing more."""
    rng = random.Random(seed)
    body = b"".join(rng.choice(_PIECES) for _ in range(rng.randrange(0, 60)))
    _, body = dkimcheck.split_message(b"From: a\r\n\r\n" + body)
    for algorithm, canon in ((b"simple", Simple), (b"relaxed", Relaxed)):
        assert canon.canonicalize_body(dkimcheck.canonical_body(body, algorithm)) == \
            canon.canonicalize_body(body), (algorithm, body)


# -- tags read as RFC 6376 §3.2/§3.5 say, field names as RFC 5322 §4.5.8 ----------------------


class _Signer(dkim.DKIM):
    """dkimpy's signer writing what another signer may write: a ``q=`` list,
    or the signature's field name with white space before its colon (hashed
    so, as simple canonicalization hashes it)."""

    def __init__(self, message: bytes, q: bytes | None = None, name: bytes = b"DKIM-Signature"):
        super().__init__(message)
        self._q, self._name = q, name

    def gen_header(self, fields: Any, include_headers: Any, canon_policy: Any,
                   header_name: bytes, pk: Any, standardize: bool = False) -> bytes:
        if self._q is not None:
            fields = [(k, self._q if k == b"q" else v) for k, v in fields]
        return super().gen_header(fields, include_headers, canon_policy, self._name, pk,
                                  standardize)


def _odd_sign(message: bytes, pem: bytes, canon: tuple[bytes, bytes], **kwargs: Any) -> bytes:
    name = kwargs.get("name", b"DKIM-Signature")
    sig = _Signer(message, **kwargs).sign(b"sel1", b"example.com", pem, canonicalize=canon)
    return sig.replace(b"DKIM-Signature:", name + b":", 1) + message


@pytest.mark.parametrize("q", [b"foo/bar:dns/txt", b"foo/bar : dns/txt", b"dns/txt:x-other"])
@pytest.mark.parametrize("canon", [(b"relaxed", b"relaxed"), (b"simple", b"simple")])
def test_an_unknown_query_method_is_ignored(rsa: RsaKey, q: bytes, canon: tuple[bytes, bytes]):
    """RFC 6376 §3.5: "Unrecognized query mechanisms MUST be ignored"."""
    signed = _odd_sign(MESSAGE, rsa.pem, canon, q=q)
    assert b"q=" + q in signed
    results, r = judge(signed, zone(rsa.record()))
    assert [(x.result, x.detail) for x in results] == [("pass", "signature verified")]
    assert r.asked == [(KEY_NAME, "TXT")]


def test_no_known_query_method_is_permerror_without_a_query(rsa: RsaKey):
    signed = _odd_sign(MESSAGE, rsa.pem, (b"relaxed", b"relaxed"), q=b"foo/bar:dns/txtx")
    results, r = judge(signed, zone(rsa.record()))
    assert [(x.result, x.detail) for x in results] == [
        ("permerror", "signature cannot be used: no query method in q= is known, RFC 6376 3.5")]
    assert r.asked == []


@pytest.mark.parametrize("name", [b"DKIM-Signature ", b"DKIM-Signature\t \t"])
def test_a_signature_named_with_white_space_verifies_with_simple(rsa: RsaKey, name: bytes):
    """Simple canonicalization hashes the field as written, name and white
    space included (RFC 6376 §3.4.1); the field is still the signature."""
    signed = _odd_sign(MESSAGE, rsa.pem, (b"simple", b"simple"), name=name)
    assert signed.startswith(name + b": v=1;")
    results, _ = judge(signed, zone(rsa.record()))
    assert [(x.result, x.domain, x.selector) for x in results] == [
        ("pass", "example.com", "sel1")]
    # Rewritten without the white space, simple notices (it was signed so).
    results, _ = judge(signed.replace(name + b":", b"DKIM-Signature:", 1), zone(rsa.record()))
    assert [x.result for x in results] == ["fail"]


@pytest.mark.parametrize("written", [b"Subject :", b"Subject\t:", b"subject \t :"])
def test_relaxed_drops_white_space_before_any_colon(rsa: RsaKey, written: bytes):
    """RFC 6376 §3.4.2: relaxed header canonicalization deletes the white
    space before the colon; a signed field written so still verifies, and
    dkimpy (which refuses such a message) is not the one that parses it."""
    signed = sign(MESSAGE, rsa.pem, canonicalize=(b"relaxed", b"relaxed"))
    odd = signed.replace(b"Subject:", written, 1)
    with pytest.raises(dkim.MessageFormatError):
        dkim.DKIM(odd)
    results, _ = judge(odd, zone(rsa.record()))
    assert [x.result for x in results] == ["pass"]
    simple = sign(MESSAGE, rsa.pem, canonicalize=(b"simple", b"simple"))
    results, _ = judge(simple.replace(b"Subject:", written, 1), zone(rsa.record()))
    assert [x.result for x in results] == ["fail"]


def test_the_engine_takes_a_signature_named_with_white_space_for_one(rsa: RsaKey):
    """ipv6milter-check and Sendmail hand the name as written: the message is
    signed (never dkim=none), and a forged Authentication-Results written so
    is ours to delete."""
    signed = sign(MESSAGE, rsa.pem).replace(b"DKIM-Signature:", b"DKIM-Signature :", 1)
    forged = b"Authentication-Results : mx.example.org; dkim=pass\r\n"
    fields, body = engine.split_fields(forged + signed)
    msg = engine.Message(1 << 20, 5, "mx.example.org")
    for name, value in fields:
        msg.header(name, value)
    msg.body(body)
    assert msg.signed and len(msg.signatures()) == 1
    assert msg.forged_indexes() == [1]
    results, _ = judge(msg.message(), zone(rsa.record()))
    assert [x.result for x in results] == ["pass"]


# -- the DKIM-Signature bound -----------------------------------------------------------------


def _padded(signed: bytes, size: int) -> bytes:
    """``signed`` with its signature's value padded to ``size`` bytes by
    folded white space after the last tag (nothing relaxed hashes)."""
    head, sep, rest = signed.partition(b"\r\nFrom:")
    value_len = len(head) - len(b"DKIM-Signature:")
    pad = size - value_len
    unit = b"\r\n \t"
    padding = unit * (pad // len(unit)) + b" " * (pad % len(unit))
    return head + padding + sep + rest


def test_a_signature_at_the_bound_is_verified(rsa: RsaKey):
    signed = _padded(sign(MESSAGE, rsa.pem, canonicalize=(b"relaxed", b"relaxed")),
                     limits.MAX_SIGNATURE_FIELD)
    values = [v for n, v in dkimcheck.parse_header(signed.split(b"\r\n\r\n")[0])
              if n == b"DKIM-Signature"]
    assert [len(v) for v in values] == [limits.MAX_SIGNATURE_FIELD + 2]  # and its CRLF
    (res,), _ = judge(signed, zone(rsa.record()))
    assert res.result == "pass"


def test_a_signature_past_the_bound_is_permerror_without_a_query(rsa: RsaKey):
    signed = _padded(sign(MESSAGE, rsa.pem, canonicalize=(b"relaxed", b"relaxed")),
                     limits.MAX_SIGNATURE_FIELD + 1)
    results, r = judge(signed, zone(rsa.record()))
    assert [(x.result, x.domain, x.selector, x.detail) for x in results] == [
        ("permerror", "example.com", "sel1",
         f"signature cannot be used: field over {limits.MAX_SIGNATURE_FIELD} bytes")]
    assert r.asked == []
    assert "dkim=permerror (signature cannot be used)" in header_of(results)
