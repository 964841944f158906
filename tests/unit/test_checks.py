"""The checks against a dict zone: iprev, SPF (pyspf), DKIM (dkimpy), the DNS layer."""

from __future__ import annotations

import base64
import gc
import ipaddress
import re
import subprocess
import sys
import threading
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dkim
import dns.exception
import dns.message
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import dns.reversename
import pytest
import spf

from ipv6milter import limits
from ipv6milter import resolver as resolver_mod
from ipv6milter.dkimcheck import check_dkim, unverified
from ipv6milter.iprev import MAX_NAMES, check_iprev, safe_name
from ipv6milter.model import Iprev
from ipv6milter.resolver import Budget, Resolver, TempFail, pyspf_bridge
from ipv6milter.spfcheck import ascii_domain, check_spf, envelope_address
from tests.growth.rows_dns import (
    WireResolver,
    mx_fanout,
    padded,
    rdata,
    spf_txt,
    txt_rdata,
    wire,
)
from tests.growth.rows_dns import zone as wire_zone

from .fakedns import TEMP, FakeResolver

ADDR = ipaddress.ip_address("2001:db8::25")
OTHER = ipaddress.ip_address("2001:db8::26")
REV = dns.reversename.from_address(str(ADDR)).to_text(omit_final_dot=True)


def budget() -> Budget:
    return Budget(20)


# -- iprev --


def test_iprev_pass_when_a_ptr_name_resolves_back():
    r = FakeResolver({(REV, "PTR"): "Mail.Example.COM.", ("mail.example.com", "AAAA"): str(ADDR)})
    res = check_iprev(r, ADDR, budget())
    assert res.result is Iprev.PASS
    assert res.names == ("mail.example.com",)
    assert res.confirmed == "mail.example.com"
    assert not res.ptr_temperror
    assert r.asked == [(REV, "PTR"), ("mail.example.com", "AAAA")]


def test_iprev_compares_addresses_not_strings():
    r = FakeResolver(
        {(REV, "PTR"): "mail.example.com.", ("mail.example.com", "AAAA"): "2001:DB8:0:0::25"}
    )
    assert check_iprev(r, ADDR, budget()).result is Iprev.PASS


def test_iprev_fail_when_no_ptr_name_confirms():
    r = FakeResolver(
        {
            (REV, "PTR"): ["a.example.com.", "b.example.com."],
            ("a.example.com", "AAAA"): str(OTHER),
            # b.example.com has no AAAA at all
        }
    )
    res = check_iprev(r, ADDR, budget())
    assert res.result is Iprev.FAIL
    assert res.names == ("a.example.com", "b.example.com")
    assert res.confirmed is None
    assert not res.ptr_temperror
    assert r.asked == [(REV, "PTR"), ("a.example.com", "AAAA"), ("b.example.com", "AAAA")]


def test_iprev_second_name_confirms():
    r = FakeResolver(
        {
            (REV, "PTR"): ["a.example.com.", "b.example.com."],
            ("a.example.com", "AAAA"): str(OTHER),
            ("b.example.com", "AAAA"): [str(OTHER), str(ADDR)],
        }
    )
    res = check_iprev(r, ADDR, budget())
    assert res.result is Iprev.PASS
    assert res.confirmed == "b.example.com"


def test_iprev_ipv4_uses_a_records():
    v4 = ipaddress.ip_address("192.0.2.25")
    rev4 = dns.reversename.from_address(str(v4)).to_text(omit_final_dot=True)
    r = FakeResolver({(rev4, "PTR"): "mail.example.com.", ("mail.example.com", "A"): "192.0.2.25"})
    assert check_iprev(r, v4, budget()).result is Iprev.PASS
    assert r.asked == [(rev4, "PTR"), ("mail.example.com", "A")]


def test_iprev_no_ptr_is_permerror_not_temperror():
    r = FakeResolver({})
    res = check_iprev(r, ADDR, budget())
    assert res.result is Iprev.PERMERROR
    assert res.names == ()
    assert not res.ptr_temperror
    assert r.asked == [(REV, "PTR")]


def test_iprev_ptr_lookup_temporary_failure():
    r = FakeResolver({(REV, "PTR"): TEMP})
    res = check_iprev(r, ADDR, budget())
    assert res.result is Iprev.TEMPERROR
    assert res.ptr_temperror
    assert res.names == ()
    assert r.asked == [(REV, "PTR")]


def test_iprev_forward_lookup_temporary_failure_keeps_the_names():
    r = FakeResolver(
        {
            (REV, "PTR"): ["a.example.com.", "b.example.com."],
            ("a.example.com", "AAAA"): TEMP,
            ("b.example.com", "AAAA"): str(OTHER),
        }
    )
    res = check_iprev(r, ADDR, budget())
    assert res.result is Iprev.TEMPERROR
    assert not res.ptr_temperror  # a PTR exists: ReverseDNS ptr is satisfied
    assert res.names == ("a.example.com", "b.example.com")


def test_iprev_a_confirming_name_wins_over_a_temporary_failure():
    r = FakeResolver(
        {
            (REV, "PTR"): ["a.example.com.", "b.example.com."],
            ("a.example.com", "AAAA"): TEMP,
            ("b.example.com", "AAAA"): str(ADDR),
        }
    )
    assert check_iprev(r, ADDR, budget()).result is Iprev.PASS


def test_iprev_hostile_ptr_names_are_never_echoed_nor_looked_up():
    hostile = [
        "evil\\;\\040spf=pass\\(x\\).example.com.",
        'quote\\"\\013\\010.example.',
        "-leading-hyphen.example.",
    ]
    r = FakeResolver({(REV, "PTR"): hostile})
    res = check_iprev(r, ADDR, budget())
    assert res.result is Iprev.FAIL
    assert len(res.names) == 3  # they exist, for ReverseDNS ptr
    assert all(re.fullmatch(r"[a-z0-9.-]+", n) for n in res.names)
    text = " ".join(res.names) + res.detail
    for bad in (";", "(", '"', "\\", "spf=pass", "\n", "\r", "leading-hyphen"):
        assert bad not in text
    assert r.asked == [(REV, "PTR")]


def test_iprev_hostile_name_next_to_a_good_one():
    r = FakeResolver(
        {
            (REV, "PTR"): ["bad\\;name.example.", "mail.example.com."],
            ("mail.example.com", "AAAA"): str(ADDR),
        }
    )
    res = check_iprev(r, ADDR, budget())
    assert res.result is Iprev.PASS
    assert "mail.example.com" in res.names
    assert not any(";" in n for n in res.names)


def test_iprev_tries_at_most_max_names():
    names = [f"n{i}.example.com." for i in range(MAX_NAMES + 5)]
    r = FakeResolver({(REV, "PTR"): names})
    res = check_iprev(r, ADDR, budget())
    assert res.result is Iprev.FAIL
    forward = [q for q in r.asked if q[1] == "AAAA"]
    assert len(forward) == MAX_NAMES


def test_iprev_with_spent_budget_is_temperror():
    r = FakeResolver({(REV, "PTR"): "mail.example.com.", ("mail.example.com", "AAAA"): str(ADDR)})
    res = check_iprev(r, ADDR, Budget(-1))
    assert res.result is Iprev.TEMPERROR
    assert res.ptr_temperror


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("Mail.Example.COM.", "mail.example.com"),
        ("_spf.example", "_spf.example"),
        ("bad;name.example", None),
        ("bad name.example", None),
        ("bad..example", None),
        ("-a.example", None),
        ("a" * 64 + ".example", "a" * 64 + ".example"),  # label length: not our business
        ("a." * 130 + "example", None),
    ],
)
def test_safe_name(name: str, expected: str | None):
    assert safe_name(name) == expected


# -- SPF --


def spf_check(
    zone: dict[tuple[str, str], Any],
    mail_from: str = "sender@example.com",
    helo: str = "mail.example.com",
) -> tuple[Any, FakeResolver]:
    r = FakeResolver(zone)
    return check_spf(r, ADDR, mail_from, helo, budget()), r


def test_spf_pass_via_include():
    res, r = spf_check(
        {
            ("example.com", "TXT"): "v=spf1 include:_spf.example.net -all",
            ("_spf.example.net", "TXT"): "v=spf1 ip6:2001:db8::/64 -all",
        }
    )
    assert (res.result, res.identity, res.scope) == ("pass", "sender@example.com", "mailfrom")
    assert r.asked == [("example.com", "TXT"), ("_spf.example.net", "TXT")]


def test_spf_pass_via_a_mx_and_ptr_mechanisms():
    # The bridge must hand pyspf A/AAAA, MX and PTR answers in its own shapes.
    res, _ = spf_check(
        {
            ("example.com", "TXT"): "v=spf1 a:web.example.com mx -all",
            ("web.example.com", "AAAA"): str(OTHER),
            ("example.com", "MX"): "10 mx.example.com.",
            ("mx.example.com", "AAAA"): str(ADDR),
        }
    )
    assert res.result == "pass"
    res, _ = spf_check(
        {
            ("example.com", "TXT"): "v=spf1 ptr -all",
            (REV, "PTR"): "mail.example.com.",
            ("mail.example.com", "AAAA"): str(ADDR),
        }
    )
    assert res.result == "pass"


def test_spf_record_split_into_several_strings():
    long_record = (
        "v=spf1 "
        + " ".join(f"ip6:2001:db8:{i:x}::/48" for i in range(40))
        + " ip6:2001:db8::25 -all"
    )
    assert len(long_record) > 255  # fakedns splits it into several character-strings
    res, _ = spf_check({("example.com", "TXT"): long_record})
    assert res.result == "pass"


@pytest.mark.parametrize(
    ("record", "result"),
    [
        ("v=spf1 -all", "fail"),
        ("v=spf1 ~all", "softfail"),
        ("v=spf1 ?all", "neutral"),
        ("v=spf1 ip6:2001:db8::99", "neutral"),  # no match, no all: neutral
        ("v=spf1 +all", "pass"),
        ("v=spf1 ip6:2001:db8::/33 -all", "pass"),
        ("v=spf1 ip4:192.0.2.0/24 -all", "fail"),
    ],
)
def test_spf_results(record: str, result: str):
    res, r = spf_check({("example.com", "TXT"): record})
    assert res.result == result
    assert res.scope == "mailfrom"
    assert r.asked == [("example.com", "TXT")]


def test_spf_none_without_a_record():
    res, r = spf_check({("example.com", "TXT"): "some other text record"})
    assert res.result == "none"
    assert r.asked == [("example.com", "TXT")]


def test_spf_permerror_two_records():
    res, _ = spf_check({("example.com", "TXT"): ["v=spf1 -all", "v=spf1 +all"]})
    assert res.result == "permerror"


def test_spf_permerror_syntax():
    res, _ = spf_check({("example.com", "TXT"): "v=spf1 ip6:not-an-address -all"})
    assert res.result == "permerror"


def test_spf_permerror_more_than_ten_lookups():
    zone: dict[tuple[str, str], Any] = {
        ("example.com", "TXT"): "v=spf1 "
        + " ".join(f"include:i{i}.example.com" for i in range(11))
        + " ip6:2001:db8::25 -all"
    }
    for i in range(11):
        zone[(f"i{i}.example.com", "TXT")] = "v=spf1 ip6:2001:db8:ffff::/48 -all"
    res, r = spf_check(zone)
    assert res.result == "permerror"
    assert ("i10.example.com", "TXT") not in r.asked  # RFC 7208 §4.6.4: stop at the limit


def test_spf_permerror_include_loop():
    res, r = spf_check(
        {
            ("example.com", "TXT"): "v=spf1 include:loop.example.net -all",
            ("loop.example.net", "TXT"): "v=spf1 include:example.com -all",
        }
    )
    assert res.result == "permerror"
    assert len(r.asked) <= 11


def test_spf_permerror_include_without_record():
    res, _ = spf_check({("example.com", "TXT"): "v=spf1 include:nothing.example.net -all"})
    assert res.result == "permerror"


def test_spf_temperror_on_the_record():
    res, r = spf_check({("example.com", "TXT"): TEMP})
    assert res.result == "temperror"
    assert r.asked == [("example.com", "TXT")]


def test_spf_temperror_on_an_include():
    res, _ = spf_check(
        {
            ("example.com", "TXT"): "v=spf1 include:_spf.example.net -all",
            ("_spf.example.net", "TXT"): TEMP,
        }
    )
    assert res.result == "temperror"


def test_spf_temperror_on_an_address_lookup():
    res, _ = spf_check(
        {("example.com", "TXT"): "v=spf1 a:mx.example.com -all", ("mx.example.com", "AAAA"): TEMP}
    )
    assert res.result == "temperror"


def test_spf_with_spent_budget_is_temperror():
    r = FakeResolver({("example.com", "TXT"): "v=spf1 +all"})
    res = check_spf(r, ADDR, "sender@example.com", "mail.example.com", Budget(-1))
    assert res.result == "temperror"


@pytest.mark.parametrize("null", ["<>", "", " <> "])
def test_spf_null_sender_checks_the_helo_identity(null: str):
    res, r = spf_check(
        {
            ("mail.example.com", "TXT"): "v=spf1 ip6:2001:db8::25 -all",
            ("example.com", "TXT"): "v=spf1 -all",
        },
        mail_from=null,
        helo="Mail.Example.COM",
    )
    assert (res.result, res.identity, res.scope) == ("pass", "mail.example.com", "helo")
    assert r.asked == [("mail.example.com", "TXT")]


def test_spf_null_sender_helo_fail():
    res, _ = spf_check(
        {("mail.example.com", "TXT"): "v=spf1 -all"}, mail_from="<>", helo="mail.example.com"
    )
    assert (res.result, res.scope) == ("fail", "helo")


@pytest.mark.parametrize("helo", ["[IPv6:2001:db8::1]", "[192.0.2.1]", "localhost", "", "a;b"])
def test_spf_null_sender_with_unusable_helo_is_none_without_lookups(helo: str):
    res, r = spf_check({}, mail_from="<>", helo=helo)
    assert (res.result, res.scope) == ("none", "helo")
    assert r.asked == []


def test_spf_mail_from_without_a_domain_is_none_without_lookups():
    for mail_from in ("<postmaster>", "<user@[192.0.2.1]>", "<@>"):
        res, r = spf_check({}, mail_from=mail_from)
        assert res.result == "none", mail_from
        assert r.asked == []


def test_spf_empty_local_part_is_postmaster():
    # RFC 7208 §4.3: "If the <sender> has no local-part, substitute the string
    # 'postmaster' for the local-part"; %{l} shows which one was used.
    zone = {
        ("example.net", "TXT"): "v=spf1 exists:%{l}.allow.example.net -all",
        ("postmaster.allow.example.net", "A"): "127.0.0.2",
    }
    res, r = spf_check(zone, mail_from="<@example.net>")
    assert (res.result, res.identity) == ("pass", "postmaster@example.net")
    assert r.asked == [("example.net", "TXT"), ("postmaster.allow.example.net", "A")]


def test_spf_brackets_and_source_route_are_removed():
    res, r = spf_check(
        {("example.com", "TXT"): "v=spf1 +all"}, mail_from="<@relay.example:sender@Example.COM>"
    )
    assert res.result == "pass"
    assert res.identity == "sender@example.com"
    assert r.asked == [("example.com", "TXT")]


def test_spf_idn_domain_is_looked_up_as_a_label():
    res, r = spf_check(
        {
            ("xn--bcher-kva.de", "TXT"): "v=spf1 a -all",
            ("xn--bcher-kva.de", "AAAA"): str(ADDR),
        },
        mail_from="<info@bücher.de>",
    )
    assert res.result == "pass"
    assert res.identity == "info@xn--bcher-kva.de"
    assert r.asked == [("xn--bcher-kva.de", "TXT"), ("xn--bcher-kva.de", "AAAA")]


def test_spf_smtputf8_local_part():
    res, r = spf_check(
        {("xn--bcher-kva.de", "TXT"): "v=spf1 ip6:2001:db8::/32 -all"},
        mail_from="<jürgen@bücher.de>",
    )
    assert res.result == "pass"
    assert res.identity == "jürgen@xn--bcher-kva.de"
    assert r.asked == [("xn--bcher-kva.de", "TXT")]


def test_spf_result_words_are_lower_case():
    res, _ = spf_check({("example.com", "TXT"): "v=spf1 ~all"})
    assert res.result == res.result.lower()


@pytest.mark.parametrize(
    ("raw", "address"),
    [
        ("<a@example.com>", "a@example.com"),
        (" a@example.com ", "a@example.com"),
        ("<>", ""),
        ("<@r1.example,@r2.example:a@example.com>", "a@example.com"),
    ],
)
def test_envelope_address(raw: str, address: str):
    assert envelope_address(raw) == address


@pytest.mark.parametrize(
    ("domain", "expected"),
    [
        ("Example.COM.", "example.com"),
        ("bücher.de", "xn--bcher-kva.de"),
        ("[192.0.2.1]", None),
        ("localhost", None),
        ("a;b.example", None),
        ("", None),
    ],
)
def test_ascii_domain(domain: str, expected: str | None):
    assert ascii_domain(domain) == expected


# -- DKIM --


@dataclass(frozen=True)
class Key:
    private_pem: bytes
    txt: str  # the key record: v=DKIM1; k=rsa; p=BASE64


def _new_key(directory: Path, name: str) -> Key:
    pem = directory / f"{name}.pem"
    subprocess.run(["openssl", "genrsa", "-out", str(pem), "2048"], check=True, capture_output=True)
    der = subprocess.run(
        ["openssl", "rsa", "-in", str(pem), "-pubout", "-outform", "DER"],
        check=True,
        capture_output=True,
    ).stdout
    return Key(pem.read_bytes(), "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode("ascii"))


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Key, Key]:
    d = tmp_path_factory.mktemp("dkim-keys")
    return _new_key(d, "one"), _new_key(d, "two")


MESSAGE = (
    b"From: Sender <sender@example.com>\r\n"
    b"To: rcpt@example.org\r\n"
    b"Subject:  folded\r\n"
    b"\tsubject line\r\n"
    b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
    b"Message-ID: <1@example.com>\r\n"
    b"\r\n"
    b"Hello,\r\n"
    b"\r\n"
    b"a body.\r\n"
)


def sign(
    message: bytes,
    key: Key,
    domain: bytes = b"example.com",
    selector: bytes = b"sel1",
    canon: tuple[bytes, bytes] = (b"relaxed", b"simple"),
) -> bytes:
    return dkim.sign(message, selector, domain, key.private_pem, canonicalize=canon) + message


def key_zone(key: Key, domain: str = "example.com", selector: str = "sel1") -> dict:
    return {(f"{selector}._domainkey.{domain}", "TXT"): key.txt}


def b_tag(signed: bytes, n: int = 0) -> str:
    """The b= value of the n-th DKIM-Signature, unfolded."""
    sigs = re.findall(
        rb"(?ims)^dkim-signature:(.*?)(?=^\S)", signed.split(b"\r\n\r\n")[0] + b"\r\nX"
    )
    m = re.search(rb"(?:^|;)\s*b=([^;]*)", sigs[n])
    assert m
    return re.sub(rb"\s+", b"", m.group(1)).decode("ascii")


def dkim_check(message: bytes, zone: dict, max_signatures: int = 5) -> tuple[Any, FakeResolver]:
    r = FakeResolver(zone)
    return check_dkim(r, message, budget(), max_signatures), r


def test_dkim_pass(keys: tuple[Key, Key]):
    signed = sign(MESSAGE, keys[0])
    (res,), r = dkim_check(signed, key_zone(keys[0]))
    assert res.result == "pass"
    assert (res.domain, res.selector) == ("example.com", "sel1")
    assert res.b == b_tag(signed)[:8]
    assert len(res.b) == 8
    assert r.asked == [("sel1._domainkey.example.com", "TXT")]


def test_dkim_fail_when_the_body_is_altered(keys: tuple[Key, Key]):
    signed = sign(MESSAGE, keys[0]).replace(b"a body.", b"a b0dy.")
    (res,), _ = dkim_check(signed, key_zone(keys[0]))
    assert res.result == "fail"
    assert res.domain == "example.com"


def test_dkim_fail_when_a_signed_header_is_altered(keys: tuple[Key, Key]):
    signed = sign(MESSAGE, keys[0]).replace(b"To: rcpt@", b"To: other@")
    (res,), _ = dkim_check(signed, key_zone(keys[0]))
    assert res.result == "fail"


def test_dkim_fail_with_the_wrong_key(keys: tuple[Key, Key]):
    signed = sign(MESSAGE, keys[0])
    (res,), _ = dkim_check(signed, key_zone(keys[1]))
    assert res.result == "fail"


def test_dkim_permerror_without_key_record(keys: tuple[Key, Key]):
    signed = sign(MESSAGE, keys[0])
    (res,), r = dkim_check(signed, {})
    assert res.result == "permerror"
    assert (res.domain, res.selector) == ("example.com", "sel1")
    assert r.asked == [("sel1._domainkey.example.com", "TXT")]


@pytest.mark.parametrize(
    "record",
    [
        "v=DKIM1; k=rsa; p=AAAA",
        "v=DKIM1; k=rsa; p=",  # revoked
        "v=DKIM1; k=rsa",
        "v=DKIM1; k=unknown; p=AAAA",
        "v=DKIM2; k=rsa; p=AAAA",
        "not a key record at all",
    ],
)
def test_dkim_permerror_with_a_broken_key_record(keys: tuple[Key, Key], record: str):
    signed = sign(MESSAGE, keys[0])
    (res,), _ = dkim_check(signed, {("sel1._domainkey.example.com", "TXT"): record})
    assert res.result == "permerror"


@pytest.mark.parametrize(
    "signature",
    [
        b"v=1; a=rsa-sha256; s=sel1; h=from; bh=AAAA; b=AAAA",  # no d=
        b"v=1; a=rsa-sha256; d=example.com; h=from; bh=AAAA; b=AAAA",  # no s=
        b"v=1; a=rsa-sha256; d=example.com; s=sel1; bh=AAAA; b=AAAA",  # no h=
        b"v=1; a=rsa-sha256; d=example.com; s=sel1; h=from; b=AAAA",  # no bh=
        b"v=1; a=rsa-md5; d=example.com; s=sel1; h=from; bh=AAAA; b=AAAA",
        b"v=1; a=rsa-sha256; d=example.com; s=sel1; c=bogus; h=from; bh=AAAA; b=AAAA",
        b"garbage without any tag",
    ],
)
def test_dkim_permerror_with_a_broken_signature_header(signature: bytes):
    message = b"DKIM-Signature: " + signature + b"\r\n" + MESSAGE
    (res,), r = dkim_check(message, {("sel1._domainkey.example.com", "TXT"): "v=DKIM1; p=AAAA"})
    assert res.result == "permerror"
    # A signature missing its tags needs no key to be judged.
    if b"c=bogus" not in signature:
        assert r.asked == []


def test_dkim_temperror_on_the_key_lookup(keys: tuple[Key, Key]):
    signed = sign(MESSAGE, keys[0])
    (res,), r = dkim_check(signed, {("sel1._domainkey.example.com", "TXT"): TEMP})
    assert res.result == "temperror"
    assert (res.domain, res.selector) == ("example.com", "sel1")
    assert r.asked == [("sel1._domainkey.example.com", "TXT")]


def test_dkim_with_spent_budget_is_temperror(keys: tuple[Key, Key]):
    signed = sign(MESSAGE, keys[0])
    r = FakeResolver(key_zone(keys[0]))
    (res,) = check_dkim(r, signed, Budget(-1), 5)
    assert res.result == "temperror"


def test_dkim_every_signature_is_reported_topmost_first(keys: tuple[Key, Key]):
    once = sign(MESSAGE, keys[0])
    twice = sign(once, keys[1], domain=b"example.net", selector=b"sel2")
    zone = {**key_zone(keys[0]), **key_zone(keys[1], "example.net", "sel2")}
    results, r = dkim_check(twice, zone)
    assert [(x.result, x.domain, x.selector) for x in results] == [
        ("pass", "example.net", "sel2"),
        ("pass", "example.com", "sel1"),
    ]
    assert [x.b for x in results] == [b_tag(twice, 0)[:8], b_tag(twice, 1)[:8]]
    assert r.asked == [
        ("sel2._domainkey.example.net", "TXT"),
        ("sel1._domainkey.example.com", "TXT"),
    ]


def test_dkim_one_failing_signature_does_not_hide_a_passing_one(keys: tuple[Key, Key]):
    once = sign(MESSAGE, keys[0])
    twice = sign(once, keys[1], domain=b"example.net", selector=b"sel2")
    # example.net's key record is missing: its signature is a permerror, the other still passes.
    results, _ = dkim_check(twice, key_zone(keys[0]))
    assert [x.result for x in results] == ["permerror", "pass"]


def test_dkim_only_the_topmost_max_signatures_are_tried(keys: tuple[Key, Key]):
    m = sign(MESSAGE, keys[0], selector=b"s1")
    m = sign(m, keys[0], selector=b"s2")
    m = sign(m, keys[0], selector=b"s3")
    zone = {
        **key_zone(keys[0], selector="s1"),
        **key_zone(keys[0], selector="s2"),
        **key_zone(keys[0], selector="s3"),
    }
    results, r = dkim_check(m, zone, max_signatures=2)
    assert [x.selector for x in results] == ["s3", "s2"]
    assert ("s1._domainkey.example.com", "TXT") not in r.asked
    results, _ = dkim_check(m, zone, max_signatures=5)
    assert [x.selector for x in results] == ["s3", "s2", "s1"]


def test_dkim_simple_canonicalization_verifies_on_crlf_bytes(keys: tuple[Key, Key]):
    signed = sign(MESSAGE, keys[0], canon=(b"simple", b"simple"))
    assert b"c=simple/simple" in signed
    assert b"\r\n" in signed and b"\n" not in signed.replace(b"\r\n", b"")
    (res,), _ = dkim_check(signed, key_zone(keys[0]))
    assert res.result == "pass"


def test_dkim_simple_canonicalization_notices_header_whitespace(keys: tuple[Key, Key]):
    # Why the adapter must rebuild headers byte-exact: simple breaks, relaxed survives.
    def respace(m: bytes) -> bytes:
        return m.replace(b"Subject:  folded\r\n\tsubject", b"Subject: folded\r\n subject")

    simple = sign(MESSAGE, keys[0], canon=(b"simple", b"simple"))
    relaxed = sign(MESSAGE, keys[0], canon=(b"relaxed", b"simple"))
    assert dkim_check(respace(simple), key_zone(keys[0]))[0][0].result == "fail"
    assert dkim_check(respace(relaxed), key_zone(keys[0]))[0][0].result == "pass"


def test_dkim_no_signature_gives_no_results():
    results, r = dkim_check(MESSAGE, {})
    assert results == ()
    assert r.asked == []


def test_dkim_unparseable_message_is_permerror_per_signature():
    broken = b"DKIM-Signature: v=1; d=example.com; s=sel1\r\nthis line has no colon\r\n\r\nbody\r\n"
    results, r = dkim_check(broken, {})
    assert [x.result for x in results] == ["permerror"]
    assert r.asked == []


def test_dkim_hostile_tags_are_not_echoed():
    sig = b'v=1; a=rsa-sha256; d=evil(x);.example; s=s"el; h=from; bh=AAAA; b=A(b)c;d'
    (res,), _ = dkim_check(b"DKIM-Signature: " + sig + b"\r\n" + MESSAGE, {})
    assert res.result == "permerror"
    for field in (res.domain, res.selector, res.b):
        assert re.fullmatch(r"[A-Za-z0-9._+/=-]*", field)
    assert "(" not in res.domain + res.selector + res.b


def test_dkim_unverified_signatures_are_neutral(keys: tuple[Key, Key]):
    sigs = [
        b"v=1; a=rsa-sha256; d=Example.COM; s=s1; h=from; bh=AAAA; b=abcdefghij",
        b"v=1; a=rsa-sha256; d=example.net; s=s2; h=from; bh=AAAA; b=klmnopqrst",
        b"v=1; a=rsa-sha256; d=example.org; s=s3; h=from; bh=AAAA; b=uvwxyz0123",
    ]
    results = unverified(sigs, "message too large", 2)
    assert [(x.result, x.domain, x.selector, x.b) for x in results] == [
        ("neutral", "example.com", "s1", "abcdefgh"),
        ("neutral", "example.net", "s2", "klmnopqr"),
    ]


# -- the DNS layer --


class StubDns:
    """Stands in for dnspython's resolver inside a real ``Resolver``."""

    def __init__(self, outcome: BaseException | list[str], rdtype: str = "TXT"):
        self.outcome = outcome
        self.rdtype = rdtype
        self.calls: list[dict[str, Any]] = []

    def resolve(self, name: Any, rdtype: str, **kwargs: Any) -> Any:
        self.calls.append({"name": str(name), "rdtype": rdtype, **kwargs})
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        rds = [
            dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.from_text(self.rdtype), t)
            for t in self.outcome
        ]

        class Answer:
            rrset = rds or None

        return Answer()


def real_resolver(stub: StubDns, timeout: float = 5.0) -> Resolver:
    r = Resolver((("127.0.0.1", 9),), timeout=timeout)
    r._r = stub  # type: ignore[assignment]
    return r


@pytest.mark.parametrize(
    "exc",
    [
        dns.resolver.NXDOMAIN(),
        dns.name.LabelTooLong(),
        dns.name.NameTooLong(),
        dns.name.EmptyLabel(),
        dns.resolver.YXDOMAIN(),
        dns.name.IDNAException(),
    ],
)
def test_resolver_no_data_is_an_empty_answer(exc: BaseException):
    trace: list[str] = []
    assert real_resolver(StubDns(exc)).query("x.example", "TXT", Budget(20, trace)) == []
    assert len(trace) == 1


@pytest.mark.parametrize(
    "exc",
    [
        dns.exception.Timeout(),
        dns.resolver.LifetimeTimeout(timeout=5.0, errors=[]),
        dns.resolver.NoNameservers(),
        dns.exception.FormError(),
    ],
)
def test_resolver_outages_are_tempfail(exc: BaseException):
    with pytest.raises(TempFail):
        real_resolver(StubDns(exc)).query("x.example", "TXT", budget())


@pytest.mark.parametrize("name", ["\u0300abc.example", "☃.example", "a\u2028b.example"])
def test_resolver_name_that_is_not_idna_is_no_data_without_a_query(name: str):
    stub = StubDns(dns.exception.Timeout())
    trace: list[str] = []
    assert real_resolver(stub).query(name, "TXT", Budget(20, trace)) == []
    assert stub.calls == []
    assert "impossible name" in trace[0]


def test_resolver_u_label_is_asked_as_an_a_label():
    stub = StubDns([])
    real_resolver(stub).query("sel1._domainkey.bücher.de", "TXT", budget())
    assert stub.calls[0]["name"] == "sel1._domainkey.xn--bcher-kva.de"


@pytest.mark.parametrize(
    "name", [b"sel1._domainkey.\xff\xfe.example.", b"s._domainkey.caf\xe9.example."]
)
def test_dkim_dnsfunc_8bit_name_is_no_key_without_a_query(name: bytes):
    stub = StubDns(dns.exception.Timeout())
    assert real_resolver(stub).dkim_dnsfunc(budget())(name) is None
    assert stub.calls == []


def test_dkim_dnsfunc_utf8_name_is_asked_as_an_a_label():
    stub = StubDns(['"v=DKIM1; p=AAAA"'])
    f = real_resolver(stub).dkim_dnsfunc(budget())
    assert f("sel1._domainkey.bücher.de.".encode()) == b"v=DKIM1; p=AAAA"
    assert stub.calls[0]["name"] == "sel1._domainkey.xn--bcher-kva.de"


def test_resolver_empty_answer_is_no_data():
    stub = StubDns([])
    assert real_resolver(stub).query("x.example", "TXT", budget()) == []
    assert stub.calls[0]["raise_on_no_answer"] is False
    assert stub.calls[0]["search"] is False


def test_resolver_lifetime_is_bounded_by_timeout_and_budget():
    stub = StubDns(['"v=spf1 -all"'])
    r = real_resolver(stub, timeout=3.0)
    r.query("x.example", "TXT", Budget(20))
    assert stub.calls[-1]["lifetime"] == 3.0
    r.query("x.example", "TXT", Budget(1))
    assert 0 < stub.calls[-1]["lifetime"] <= 1


def test_spent_budget_is_tempfail_without_asking():
    stub = StubDns(['"v=spf1 -all"'])
    trace: list[str] = []
    b = Budget(-1, trace)
    assert b.remaining() < 0
    with pytest.raises(TempFail):
        real_resolver(stub).query("x.example", "TXT", b)
    assert stub.calls == []
    assert trace and "budget" in trace[0]


def test_budget_trace_records_queries_and_answers():
    trace: list[str] = []
    r = FakeResolver({("example.com", "TXT"): "v=spf1 -all"})
    r.txt("example.com", Budget(20, trace))
    assert trace == ["example.com TXT: 1 record(s)"]
    Budget(20).note("nothing happens without a trace list")


def test_resolver_typed_helpers():
    r = FakeResolver(
        {
            (REV, "PTR"): ["Mail.Example.COM.", "other.example."],
            ("mail.example.com", "AAAA"): [str(ADDR), "2001:db8::99"],
            ("mail.example.com", "A"): "192.0.2.25",
            ("example.com", "TXT"): ["v=spf1 " + "x" * 300, "second"],
        }
    )
    assert r.ptr(ADDR, budget()) == ["mail.example.com", "other.example"]
    assert r.addresses("mail.example.com", 6, budget()) == [
        ADDR,
        ipaddress.ip_address("2001:db8::99"),
    ]
    assert r.addresses("mail.example.com", 4, budget()) == [ipaddress.ip_address("192.0.2.25")]
    assert r.txt("example.com", budget()) == [b"v=spf1 " + b"x" * 300, b"second"]


def test_dkim_dnsfunc_contract():
    r = FakeResolver({("sel._domainkey.example.com", "TXT"): "v=DKIM1; p=AAAA"})
    f = r.dkim_dnsfunc(budget())
    assert f(b"sel._domainkey.example.com.") == b"v=DKIM1; p=AAAA"
    assert f(b"none._domainkey.example.com.", timeout=5) is None
    r.add("temp._domainkey.example.com", "TXT", TEMP)
    with pytest.raises(TempFail) as info:
        f(b"temp._domainkey.example.com.")
    # Not a DKIMException: dkimpy must let it through.
    assert not isinstance(info.value, dkim.DKIMException)


# -- the pyspf bridge --


def test_pyspf_lookup_is_ours_only_while_installed():
    original = spf.DNSLookup
    assert original is not resolver_mod._pyspf_lookup
    r = FakeResolver({("example.com", "TXT"): "v=spf1 -all"})
    with r.for_pyspf(budget()):
        assert spf.DNSLookup is resolver_mod._pyspf_lookup
    pyspf_bridge.uninstall()
    assert spf.DNSLookup is original
    pyspf_bridge.uninstall()  # twice is harmless
    assert spf.DNSLookup is original


def test_pyspf_bridge_installs_once():
    original = spf.DNSLookup
    pyspf_bridge.install()
    pyspf_bridge.install()
    assert spf.DNSLookup is resolver_mod._pyspf_lookup
    pyspf_bridge.uninstall()
    assert spf.DNSLookup is original


def test_pyspf_lookup_outside_a_check_is_a_temporary_error():
    pyspf_bridge.install()
    with pytest.raises(spf.TempError):
        spf.DNSLookup("example.com", "TXT", True, 5)


def test_pyspf_lookup_shapes():
    r = FakeResolver(
        {
            ("example.com", "TXT"): "v=spf1 " + "a" * 300,
            ("example.com", "MX"): "10 MX.Example.COM.",
            ("example.com", "AAAA"): str(ADDR),
            ("example.com", "A"): "192.0.2.1",
            (REV, "PTR"): "mail.example.com.",
            ("temp.example.com", "TXT"): TEMP,
        }
    )
    lookup = resolver_mod._pyspf_lookup
    with r.for_pyspf(budget()):
        ((key, txt),) = lookup("example.com", "TXT")
        assert key == ("example.com", "TXT")
        assert b"".join(txt) == b"v=spf1 " + b"a" * 300
        assert all(isinstance(s, bytes) for s in txt)
        assert lookup("example.com", "MX") == [(("example.com", "MX"), (10, "MX.Example.COM"))]
        assert lookup("example.com", "AAAA") == [(("example.com", "AAAA"), str(ADDR))]
        assert lookup("example.com", "A") == [(("example.com", "A"), "192.0.2.1")]
        assert lookup(REV, "PTR") == [((REV, "PTR"), "mail.example.com")]
        assert lookup("nothing.example.com", "TXT") == []
        with pytest.raises(spf.TempError):
            lookup("temp.example.com", "TXT")


def test_pyspf_contexts_nest_and_restore():
    outer = FakeResolver({("example.com", "TXT"): "outer"})
    inner = FakeResolver({("example.com", "TXT"): "inner"})
    lookup = resolver_mod._pyspf_lookup
    with outer.for_pyspf(budget()):
        with inner.for_pyspf(budget()):
            assert lookup("example.com", "TXT")[0][1] == (b"inner",)
        assert lookup("example.com", "TXT")[0][1] == (b"outer",)
    with pytest.raises(spf.TempError):
        lookup("example.com", "TXT")


def test_pyspf_lookups_of_other_threads_do_not_mix():
    main = FakeResolver({("example.com", "TXT"): "v=spf1 +all"})
    other = FakeResolver({("example.com", "TXT"): "v=spf1 -all"})
    seen: list[str] = []

    def worker() -> None:
        seen.append(check_spf(other, ADDR, "a@example.com", "h.example.com", budget()).result)
        try:
            resolver_mod._pyspf_lookup("example.com", "TXT")
        except spf.TempError:
            seen.append("no context")

    with main.for_pyspf(budget()):
        t = threading.Thread(target=worker)
        t.start()
        t.join()
        assert resolver_mod._pyspf_lookup("example.com", "TXT")[0][1] == (b"v=spf1 +all",)
    assert seen == ["fail", "no context"]
    assert main.asked == [("example.com", "TXT")]
    assert other.asked == [("example.com", "TXT")]


# -- SPF: the RFC 7208 edges of SPEC §1 --


@pytest.mark.parametrize("helo", ["holahola", "[192.0.2.1]", "[IPv6:2001:db8::1]"])
def test_spf_h_macro_is_the_helo_as_given(helo: str):
    # RFC 7208 §7.3: %{h} is the HELO/EHLO domain as given, whatever its form.
    res, r = spf_check({("example.com", "TXT"): "v=spf1 exists:%{h}.example.net ~all",
                        (f"{helo}.example.net", "A"): "127.0.0.2"}, helo=helo)
    assert res.result == "pass", res
    assert (f"{helo}.example.net".lower(), "A") in r.asked


@pytest.mark.parametrize("helo", ["a\\", "x\\999", "a b", "a..b"])
def test_spf_h_macro_with_a_helo_that_is_no_dns_name_is_no_data(helo: str):
    # Through the real Resolver: the expanded name cannot be a DNS name (a bad
    # escape, an empty label), which is no data, never a temporary failure.
    r = _wired({("example.com", "TXT"): [spf_txt("v=spf1 exists:%{h}.example.net ~all")]})
    res = check_spf(r, ADDR, "sender@example.com", helo, budget())
    assert res.result == "softfail", res


def test_spf_ptr_skips_a_name_whose_address_lookup_fails_temporarily():
    # RFC 7208 §5.5: "If a DNS error occurs while doing an A RR lookup, then
    # that domain name is skipped and the search continues."
    zone = {("example.com", "TXT"): "v=spf1 ptr:example.com -all",
            (REV, "PTR"): ["down.example.com.", "mail.example.com."],
            ("down.example.com", "AAAA"): TEMP,
            ("mail.example.com", "AAAA"): str(ADDR)}
    res, r = spf_check(zone)
    assert res.result == "pass", res
    assert ("down.example.com", "AAAA") in r.asked
    zone[(REV, "PTR")] = "down.example.com."  # the only name: no match, not temperror
    assert spf_check(zone)[0].result == "fail"


def test_spf_ptr_lookup_failure_is_no_match():
    # RFC 7208 §5.5: "If a DNS error occurs while doing the PTR RR lookup,
    # then this mechanism fails to match."
    res, _ = spf_check({("example.com", "TXT"): "v=spf1 ptr ~all", (REV, "PTR"): TEMP})
    assert res.result == "softfail", res


def test_spf_ptr_with_a_spent_budget_is_still_temperror():
    class Spending(FakeResolver):
        def query(self, name: Any, rdtype: str, budget: Budget) -> list[Any]:
            if rdtype == "AAAA":
                budget.deadline = 0.0  # the stage's time runs out during this lookup
                raise TempFail("timeout")
            return super().query(name, rdtype, budget)

    r = Spending({("example.com", "TXT"): "v=spf1 ptr -all", (REV, "PTR"): "mail.example.com."})
    assert check_spf(r, ADDR, "sender@example.com", "mail.example.com", budget()).result \
        == "temperror"


V4ONLY = {
    ("voids.example", "TXT"):
        f"v=spf1 a:v4a.voids.example a:v4b.voids.example a:v4c.voids.example ip6:{ADDR} -all",
    ("v4a.voids.example", "A"): "192.0.2.1",
    ("v4b.voids.example", "A"): "192.0.2.2",
    ("v4c.voids.example", "A"): "192.0.2.3",
}


def test_spf_void_lookup_limit_is_per_evaluation_not_pyspfs_constant():
    r = FakeResolver(V4ONLY)
    default = check_spf(r, ADDR, "a@voids.example", "mail.example.com", budget())
    assert default.result == "permerror"
    assert "Void lookup limit of 2 exceeded" in default.detail
    raised = check_spf(r, ADDR, "a@voids.example", "mail.example.com", budget(), void_limit=3)
    assert raised.result == "pass"
    assert spf.MAX_VOID_LOOKUPS == 2  # never assigned
    # Two threads with different limits at once (pyspf's constant is shared).
    results: dict[int, str] = {}

    def run(limit: int) -> None:
        for _ in range(20):
            res = check_spf(FakeResolver(V4ONLY), ADDR, "a@voids.example", "h.example", budget(),
                            void_limit=limit)
            if results.setdefault(limit, res.result) != res.result:
                results[limit] = "mixed"

    threads = [threading.Thread(target=run, args=(limit,)) for limit in (2, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {2: "permerror", 3: "pass"}


def test_spf_explain_counts_void_lookups_and_names_ipv4_only_hosts():
    trace: list[str] = []
    res = check_spf(FakeResolver(V4ONLY), ADDR, "a@voids.example", "mail.example.com",
                    Budget(20, trace))
    assert res.result == "permerror"
    assert "3 void lookup(s), limit 2: v4a.voids.example AAAA, v4b.voids.example AAAA, " \
        "v4c.voids.example AAAA" in res.detail
    assert "AAAA lookups for IPv4-only hosts (v4a.voids.example, v4b.voids.example, " \
        "v4c.voids.example)" in res.detail
    # Without a trace (the milter), the detail is pyspf's own and nothing more is asked.
    r = FakeResolver(V4ONLY)
    plain = check_spf(r, ADDR, "a@voids.example", "mail.example.com", budget())
    assert "void lookup(s)" not in plain.detail
    assert not [q for q in r.asked if q[1] == "A"]


def test_spf_void_lookups_of_hosts_without_any_address_are_not_called_ipv4_only():
    zone = {("voids.example", "TXT"): "v=spf1 a:x.voids.example a:y.voids.example "
                                      "a:z.voids.example -all"}
    res = check_spf(FakeResolver(zone), ADDR, "a@voids.example", "h.example", Budget(20, []))
    assert res.result == "permerror"
    assert "3 void lookup(s)" in res.detail
    assert "IPv4-only" not in res.detail


# -- bounds on DNS answers and on the SPF records in them (limits.py, "DNS answers") --


def _wired(records: dict[tuple[str, str], list[Any]], **kwargs: Any) -> WireResolver:
    return WireResolver(wire_zone(records), **kwargs)


def test_spf_long_label_is_permerror_without_quadratic_cpu():
    # issue 16: pyspf's RE_TOPLAB took ~40 s over a 60,000-letter label.
    for n in (64, 4000):
        r = FakeResolver({("example.com", "TXT"): f"v=spf1 a:x.{'a' * n}.y -all"})
        start = time.thread_time()
        res = check_spf(r, ADDR, "sender@example.com", "mail.example.com", budget())
        assert time.thread_time() - start < 0.05
        assert res.result == "permerror"
        assert "Invalid domain found" in res.detail
        assert r.asked == [("example.com", "TXT")]


def test_spf_labels_and_names_at_rfc_1035s_bounds_are_used():
    label = "a" * limits.DNS_LABEL_CHARS
    name = ".".join([label] * 3 + ["b" * 53]) + ".example"  # 253 characters
    assert len(name) == limits.DNS_NAME_CHARS
    res, _ = spf_check({("example.com", "TXT"): f"v=spf1 a:{name} -all",
                        (name, "AAAA"): str(ADDR)})
    assert res.result == "pass"
    res, _ = spf_check({("example.com", "TXT"): f"v=spf1 a:x{name} -all"})
    assert res.result == "permerror"


def test_spf_record_over_the_txt_bounds_is_permerror():
    big = "v=spf1 " + "ip6:2001:db8::1 " * (limits.TXT_RECORD_BYTES // 16) + "-all"
    assert len(big) > limits.TXT_RECORD_BYTES
    res = check_spf(_wired({("example.com", "TXT"): [spf_txt(big)]}), ADDR,
                    "sender@example.com", "mail.example.com", budget())
    assert res.result == "permerror"
    assert "over 8192 bytes" in res.detail
    # the same record in one-byte strings: over TXT_RECORD_STRINGS
    pieces = [c.encode() for c in f"v=spf1 ip6:{ADDR} -all"] + [b" "] * limits.TXT_RECORD_STRINGS
    res = check_spf(_wired({("example.com", "TXT"): [txt_rdata(*pieces)]}), ADDR,
                    "sender@example.com", "mail.example.com", budget())
    assert res.result == "permerror"
    # within the bound, the same splitting is one record (RFC 7208 §3.3)
    pieces = [c.encode() for c in f"v=spf1 ip6:{ADDR} -all"]
    res = check_spf(_wired({("example.com", "TXT"): [txt_rdata(*pieces)]}), ADDR,
                    "sender@example.com", "mail.example.com", budget())
    assert res.result == "pass"


def test_a_large_txt_record_beside_the_spf_record_is_left_out():
    records = [spf_txt(f"v=spf1 ip6:{ADDR} -all"),
               txt_rdata(*([b"x" * 255] * (limits.TXT_RECORD_BYTES // 255 + 1)))]
    res = check_spf(_wired({("example.com", "TXT"): records}), ADDR, "sender@example.com",
                    "mail.example.com", budget())
    assert res.result == "pass"


def test_explanation_over_the_macro_string_bound_is_no_explanation():
    for n, expected in ((100, "go away " + "." * 100),
                        (limits.SPF_MACRO_STRING_CHARS + 1, spf.EXPLANATIONS["fail"])):
        text = "go away " + "." * n
        res, _ = spf_check({("example.com", "TXT"): "v=spf1 -all exp=why.example.com",
                            ("why.example.com", "TXT"): text[: len("go away ") + n]})
        assert res.result == "fail"
        assert res.detail == expected[: len("go away ") + n]


def test_unknown_modifier_over_the_macro_string_bound_is_permerror():
    value = "%{d}" + "." * limits.SPF_MACRO_STRING_CHARS
    res, _ = spf_check({("example.com", "TXT"): f"v=spf1 ip6:{ADDR} x-note={value} -all"})
    assert res.result == "permerror"
    res, _ = spf_check({("example.com", "TXT"): f"v=spf1 ip6:{ADDR} x-note=%{{d}}.a -all"})
    assert res.result == "pass"


@pytest.mark.parametrize("rdtype", ["AAAA", "PTR", "TXT"])
def test_an_answer_with_too_many_records_is_no_data_and_kept_so(rdtype: str):
    n = limits.DNS_ANSWER_RECORDS + 1
    texts = {"AAAA": [str(ADDR + k) for k in range(n)],
             "PTR": [f"h{k}.example.com." for k in range(n)],
             "TXT": [f'"r{k}"' for k in range(n)]}[rdtype]
    r = _wired({("big.example", rdtype): [rdata(rdtype, t) for t in texts]})
    trace: list[str] = []
    assert r.query("big.example", rdtype, Budget(5, trace)) == []
    assert trace == [f"big.example {rdtype}: answer ignored "
                     f"(more than {limits.DNS_ANSWER_RECORDS} records)"]
    assert r.query("big.example", rdtype, budget()) == []
    assert r.resolved == [("big.example", rdtype)]  # the verdict is what is cached
    ok = _wired({("big.example", rdtype): [rdata(rdtype, t) for t in texts[:-1]]})
    assert len(ok.query("big.example", rdtype, budget())) == limits.DNS_ANSWER_RECORDS


def test_an_answer_with_too_much_record_data_is_no_data():
    # 5 distinct records of 30 strings of 255 bytes: 38 KiB of data in one message
    records = [txt_rdata(*([b"%d" % k + b"y" * 250] * 30)) for k in range(5)]
    r = _wired({("big.example", "TXT"): records})
    assert r.query("big.example", "TXT", budget()) == []
    # 140 PTR names of 250 characters: 35 KiB of names
    names = [rdata("PTR", ".".join([f"h{k:03d}" + "a" * 59, "b" * 63, "c" * 63, "d" * 59]) + ".")
             for k in range(140)]
    assert _wired({(REV, "PTR"): names}).ptr(ADDR, budget()) == []
    assert len(_wired({(REV, "PTR"): names[:120]}).ptr(ADDR, budget())) == 120


def test_iprev_with_too_many_ptr_names_is_no_ptr():
    names = [rdata("PTR", f"h{k}.example.com.") for k in range(limits.DNS_ANSWER_RECORDS + 1)]
    res = check_iprev(_wired({(REV, "PTR"): names}), ADDR, budget())
    assert res.result is Iprev.PERMERROR


def test_dkim_key_over_the_txt_bounds_is_no_key():
    key = b"v=DKIM1; k=rsa; p=" + b"A" * 300
    f = _wired({("s._domainkey.example.com", "TXT"): [spf_txt(key.decode())]}).dkim_dnsfunc(
        budget())
    assert f(b"s._domainkey.example.com") == key
    split = [key[i:i + 2] for i in range(0, len(key), 2)]  # 159 strings
    assert len(split) > limits.TXT_RECORD_STRINGS
    f = _wired({("s._domainkey.example.com", "TXT"): [txt_rdata(*split)]}).dkim_dnsfunc(budget())
    assert f(b"s._domainkey.example.com") is None
    long = key + b"A" * limits.TXT_RECORD_BYTES
    f = _wired({("s._domainkey.example.com", "TXT"): [spf_txt(long.decode())]}).dkim_dnsfunc(
        budget())
    assert f(b"s._domainkey.example.com") is None


# -- the answer cache, bounded in bytes (limits.py, "the DNS answer cache") --


# Run in a process of its own: tracemalloc counts every thread's allocations,
# and a full test session keeps the threads of its session fixtures (DNS
# relays, log readers) running beside this test.
_MEASURE = """
import gc, sys, tracemalloc
import dns.message
from ipv6milter.resolver import estimated_bytes
message = sys.stdin.buffer.read()
dns.message.from_wire(message)  # the record types' modules are imported on first use
gc.collect()
tracemalloc.start()
base = tracemalloc.get_traced_memory()[0]
response = dns.message.from_wire(message)
items = tuple(response.answer[0]) if response.answer else ()
del response
gc.collect()
measured = tracemalloc.get_traced_memory()[0] - base
tracemalloc.stop()
print(len(items), measured, estimated_bytes("big.example", items))
"""


def _parse_measured(message: bytes) -> tuple[int, int, int]:
    """How many records ``message`` holds, what they hold in memory
    (tracemalloc), and the cache's estimate for them."""
    out = subprocess.run([sys.executable, "-c", _MEASURE], input=message, capture_output=True,
                         check=True, timeout=60)
    count, measured, estimate = (int(x) for x in out.stdout.split())
    return count, measured, estimate


CACHE_SHAPES = {
    "AAAA": ("AAAA", [str(ADDR + k) for k in range(200)]),
    "A": ("A", [f"192.0.2.{k}" for k in range(200)]),
    "TXT long strings": ("TXT", [" ".join(['"' + "a" * 255 + '"'] * 32)]),
    "TXT many strings": ("TXT", [" ".join([f'"{k % 10}{k}"' for k in range(128)])] * 1),
    "TXT many records": ("TXT", [f'"site-verification={k:08d}"' for k in range(200)]),
    "PTR long names": ("PTR", [".".join([f"h{k}" + "a" * 60, "b" * 63, "c" * 63]) + ".example."
                               for k in range(100)]),
    "PTR many labels": ("PTR", [".".join(["x"] * 100) + f".h{k}." for k in range(100)]),
    "MX": ("MX", [f"{k} mx{k}.example.com." for k in range(200)]),
}


@pytest.mark.parametrize("shape", list(CACHE_SHAPES))
def test_cache_estimate_is_above_what_an_answer_holds(shape: str):
    rdtype, texts = CACHE_SHAPES[shape]
    message = wire("big.example.", rdtype, [rdata(rdtype, t) for t in texts])
    count, measured, estimate = _parse_measured(message)
    assert count == len(texts)
    # the entry's own key and tuples are counted in the estimate, not in items
    assert measured + 8 * count + 300 <= estimate, (measured, estimate)
    # conservative, not absurd (one-letter labels are shared objects in Python:
    # the estimate counts each as a full bytes object)
    assert estimate <= 10 * measured + 4096


def test_cache_stays_within_its_byte_budget_and_keeps_small_answers():
    budget_bytes = 2 * 1024 * 1024
    big = {(f"big{k}.example", "AAAA"): [rdata("AAAA", str(ADDR + j)) for j in range(150)]
           for k in range(120)}  # ~50 KiB each, 6 MiB in all
    small = {("small.example", "AAAA"): [rdata("AAAA", str(ADDR))]}
    r = _wired({**big, **small}, cache_bytes=budget_bytes)
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for name, rdtype in big:
            assert len(r.query(name, rdtype, budget())) == 150
            assert r._answers.bytes <= budget_bytes
        gc.collect()
        measured = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    cache = r._answers
    assert 0 < len(cache) < len(big)
    assert cache.bytes <= budget_bytes
    # r.resolved (the test's own list) grew too: the cache alone is below it
    assert measured <= cache.bytes + 64 * 1024, (measured, cache.bytes)
    assert measured <= budget_bytes, measured
    assert measured * 3 > cache.bytes  # the estimate is of the right magnitude
    r.query("small.example", "AAAA", budget())
    r.query("small.example", "AAAA", budget())
    assert r.resolved.count(("small.example", "AAAA")) == 1  # still cached


def test_an_answer_over_the_entry_ceiling_is_used_but_not_kept():
    n = limits.DNS_ANSWER_RECORDS
    r = _wired({("big.example", "AAAA"): [rdata("AAAA", str(ADDR + k)) for k in range(n)]})
    assert resolver_mod.estimated_bytes("big.example", tuple(
        rdata("AAAA", str(ADDR + k)) for k in range(n))) > limits.DNS_CACHE_ENTRY_BYTES
    for _ in range(2):
        assert len(r.query("big.example", "AAAA", budget())) == n
    assert r.resolved.count(("big.example", "AAAA")) == 2
    assert r._answers.bytes == 0


# -- the DNS messages one stage parses (limits.DNS_STAGE_BYTES) --


def test_spf_stops_asking_past_the_stages_dns_bytes_and_is_permerror():
    # 10 mx terms of 10 names, every AAAA response padded to 60 KiB: 111
    # lookups and ~16 s of dnspython's parsing before the bound.
    r = WireResolver(mx_fanout(60 * 1024))
    start = time.thread_time()
    res = check_spf(r, ADDR, "a@example.com", "mail.example.com", budget())
    assert res.result == "permerror"
    assert "DNS answers of this evaluation over" in res.detail
    assert len(r.resolved) <= 2 + limits.DNS_STAGE_BYTES // (60 * 1024) + 1
    assert time.thread_time() - start < 2.0
    # small answers: the same 111 lookups stay far below the bound
    r = WireResolver(mx_fanout(28))
    assert check_spf(r, ADDR, "a@example.com", "mail.example.com", budget()).result == "fail"
    assert len(r.resolved) == 111


def test_iprev_past_the_stages_dns_bytes_is_no_data_not_temperror():
    names = [rdata("PTR", f"h{k}.example.com.") for k in range(10)]
    wires = {(REV, "PTR"): wire(REV + ".", "PTR", names)}
    for k in range(10):
        wires[(f"h{k}.example.com", "AAAA")] = padded(
            f"h{k}.example.com.", "AAAA", [rdata("AAAA", str(OTHER))], 60 * 1024)
    trace: list[str] = []
    r = WireResolver(wires)
    res = check_iprev(r, ADDR, Budget(20, trace))
    assert res.result is Iprev.FAIL
    assert len(r.resolved) < 5
    assert any("not asked (this stage's DNS answers passed" in t for t in trace)
