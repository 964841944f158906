"""Regression tests: each defect this suite found, with the input that broke it.

Unit level, with the fake resolver of tests/unit (no server needed).
"""

from __future__ import annotations

import ipaddress
import time
import tracemalloc

import dkim
import pytest

from ipv6milter import authresults, config
from ipv6milter.config import ConfigError, DomainSet
from ipv6milter.dkimcheck import check_dkim
from ipv6milter.model import DkimResult, Iprev, IprevResult
from ipv6milter.resolver import Budget
from ipv6milter.spfcheck import ascii_domain
from tests.dkimkeys import make_key
from tests.unit.fakedns import FakeResolver

# -- IDNA 2003 made faß.de and fass.de one domain --------------------------------------------


def test_idna_2008_fass_and_fass_sharp_s_are_different_domains() -> None:
    accept = DomainSet.from_entries(["faß.de"])
    assert accept.matches("xn--fa-hia.de")
    assert accept.matches("FAß.DE.")
    assert not accept.matches("fass.de")  # IDNA 2003 said it was the same
    # SPF looks up the sender's own domain, not another one's record.
    assert ascii_domain("faß.de") == "xn--fa-hia.de"
    assert ascii_domain("Bücher.Example.") == "xn--bcher-kva.example"
    assert ascii_domain("_spf.example.com") == "_spf.example.com"
    assert ascii_domain("☃.net") is None  # not IDNA 2008
    with pytest.raises(ConfigError):
        config.parse("AcceptDomains ☃.net\n")


# -- a NUL in a path was a ValueError traceback, not a ConfigError -------------------------------


@pytest.mark.parametrize("line", [
    "AcceptDomains /tmp/\0x", "AcceptDomains file:/tmp/\0", "PidFile /run/\0milter.pid",
])
def test_nul_in_a_path_is_a_config_error_naming_the_line(line: str) -> None:
    with pytest.raises(ConfigError) as e:
        config.parse(f"# x\n{line}\n", "f.conf")
    assert e.value.errors[0].startswith("f.conf:2: ")


# -- str.splitlines numbered lines differently from grep -n -----------------------------------


@pytest.mark.parametrize("sep", ["\x0c", "\x85", "\u2028", "\x1c", "\r"])
def test_error_names_the_line_grep_shows(sep: str) -> None:
    text = f"Mode monitor {sep} # odd character\nBogus 1\n"
    with pytest.raises(ConfigError) as e:
        config.parse(text, "f.conf")
    assert [m.split(": ", 1)[0] for m in e.value.errors][-1] == "f.conf:2"


# -- dkimpy's per-line parse: a body of empty lines cost GBs and minutes -----------------------


def test_a_signed_body_of_two_million_empty_lines_is_verified_quickly_in_little_memory() -> None:
    private, record = make_key()
    msg = (b"From: a@example.com\r\nTo: b@example.org\r\nSubject: s\r\n\r\nx\r\n"
           + b"\r\n" * 2_000_000)
    for canon in ((b"simple", b"simple"), (b"relaxed", b"relaxed")):
        signed = dkim.sign(msg, b"sel1", b"example.com", private, canonicalize=canon) + msg
        resolver = FakeResolver({("sel1._domainkey.example.com", "TXT"): record})
        tracemalloc.start()
        start = time.monotonic()
        try:
            results = check_dkim(resolver, signed, Budget(20), 5)
            elapsed = time.monotonic() - start
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert [r.result for r in results] == ["pass"], results
        # Before: ~50 times the message in memory and tens of seconds.
        assert elapsed < 5, elapsed
        assert peak < 4 * len(signed), (peak, len(signed))


def test_an_unsigned_message_is_not_handed_to_dkimpy() -> None:
    msg = b"From: a@example.com\r\n\r\n" + b"ab\r\n" * 1_000_000
    tracemalloc.start()
    try:
        assert check_dkim(FakeResolver(), msg, Budget(20), 5) == ()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024, peak


# -- the header builder trusted every value of a result ------------------------------------------


def test_the_header_stays_well_formed_whatever_a_result_holds() -> None:
    value = authresults.build(
        "mx.example.org",
        ipaddress.ip_address("2001:db8::1"),
        IprevResult(Iprev.FAIL, ("a.example", "b) (c", "x;dkim=pass")),
        None,
        [DkimResult("fail", "a;b", "s s", "\0\r\n"), DkimResult("pass", "d@e", "x", "AbC/+=")],
    )
    assert "\0" not in value and "\r" not in value
    header = authresults.parse(value)
    got = [(r.method, r.result, {f"{p.type}.{p.name}": p.value for p in r.properties})
           for r in header.results]
    assert got == [
        ("iprev", "fail", {"policy.iprev": "2001:db8::1"}),
        ("dkim", "fail", {}),
        ("dkim", "pass", {"header.s": "x", "header.b": "AbC/+="}),
    ]
    assert "(a.example)" in value
