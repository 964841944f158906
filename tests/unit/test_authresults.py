"""Our Authentication-Results header (SPEC §2): built with authres, parsed back by authres."""

from __future__ import annotations

import ipaddress
import re
from typing import Any

import authres
import dns.reversename
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipv6milter import authresults
from ipv6milter.authresults import authserv_id_of, build, forged_indexes
from ipv6milter.dkimcheck import check_dkim
from ipv6milter.iprev import check_iprev
from ipv6milter.model import DkimResult, Iprev, IprevResult, SpfResult
from ipv6milter.resolver import Budget
from ipv6milter.spfcheck import check_spf

from .fakedns import FakeResolver

ADDR = ipaddress.ip_address("2001:db8::25")
ID = "mx.example.org"

IPREV_PASS = IprevResult(Iprev.PASS, ("mail.example.com",), confirmed="mail.example.com")
SPF_PASS = SpfResult("pass", "sender@example.com", "mailfrom")
DKIM_PASS = DkimResult("pass", "example.com", "sel1", "AbCdEfGh")


Clause = tuple[str, str, dict[str, str]]


def clauses(value: str) -> list[Clause]:
    """(method, result, {"type.name": value}) of each result, as authres parses them."""
    header = authresults.parse(value)
    assert header.authserv_id == ID
    return [
        (r.method, r.result, {f"{p.type}.{p.name}": p.value for p in r.properties})
        for r in header.results
    ]


# -- the golden header --


def test_golden_header():
    value = build(ID, ADDR, IPREV_PASS, SPF_PASS, (DKIM_PASS,))
    assert value == (
        "mx.example.org;\n"
        '\tiprev=pass policy.iprev="2001:db8::25" (mail.example.com);\n'
        "\tspf=pass smtp.mailfrom=sender@example.com;\n"
        "\tdkim=pass header.d=example.com header.s=sel1 header.b=AbCdEfGh"
    )


def test_golden_header_parses_back():
    value = build(ID, ADDR, IPREV_PASS, SPF_PASS, (DKIM_PASS,))
    assert clauses(value) == [
        ("iprev", "pass", {"policy.iprev": "2001:db8::25"}),
        ("spf", "pass", {"smtp.mailfrom": "sender@example.com"}),
        (
            "dkim",
            "pass",
            {"header.d": "example.com", "header.s": "sel1", "header.b": "AbCdEfGh"},
        ),
    ]


def test_header_is_folded_one_clause_a_line():
    value = build(ID, ADDR, IPREV_PASS, SPF_PASS, (DKIM_PASS,))
    lines = value.split("\n")
    assert lines[0] == "mx.example.org;"
    assert all(line.startswith("\t") for line in lines[1:])
    assert len(lines) == 4
    # Unfolded by hand, authres parses it the same.
    flat = authres.AuthenticationResultsHeader.parse_value(value.replace("\n\t", " "))
    assert [r.method for r in flat.results] == ["iprev", "spf", "dkim"]


def test_header_is_what_authres_formats():
    value = build(ID, ADDR, IPREV_PASS, SPF_PASS, (DKIM_PASS,))
    results = authresults.results_for(ADDR, IPREV_PASS, SPF_PASS, (DKIM_PASS,))
    formatted = authres.AuthenticationResultsHeader(authserv_id=ID, results=results)
    assert authresults.unfold(value).replace(";\t", "; ") == formatted.header_value()


# -- iprev --


@pytest.mark.parametrize("result", list(Iprev))
def test_iprev_every_result_round_trips(result: Iprev):
    names = ("a.example.com", "b.example.com") if result is not Iprev.PERMERROR else ()
    value = build(ID, ADDR, IprevResult(result, names), None, ())
    assert clauses(value)[0] == ("iprev", result.value, {"policy.iprev": "2001:db8::25"})
    if names:
        assert "(a.example.com, b.example.com)" in value
    else:
        assert "(" not in value


def test_iprev_ipv4_address():
    v4 = ipaddress.ip_address("192.0.2.25")
    value = build(ID, v4, IprevResult(Iprev.FAIL, ("x.example",)), None, ())
    assert clauses(value)[0] == ("iprev", "fail", {"policy.iprev": "192.0.2.25"})


def test_iprev_comment_lists_at_most_five_names():
    names = tuple(f"n{i}.example.com" for i in range(8))
    value = build(ID, ADDR, IprevResult(Iprev.FAIL, names), None, ())
    assert "n4.example.com" in value
    assert "n5.example.com" not in value


def test_no_iprev_clause_without_a_result_or_address():
    assert [c[0] for c in clauses(build(ID, ADDR, None, SPF_PASS, ()))] == ["spf", "dkim"]
    assert [c[0] for c in clauses(build(ID, None, IPREV_PASS, SPF_PASS, ()))] == ["spf", "dkim"]


def test_hostile_ptr_names_from_check_iprev_stay_out_of_the_header():
    rev = dns.reversename.from_address(str(ADDR)).to_text(omit_final_dot=True)
    r = FakeResolver({(rev, "PTR"): ["x\\;\\040spf=pass\\;.example.", "y\\(\\).example."]})
    iprev = check_iprev(r, ADDR, Budget(20))
    value = build(ID, ADDR, iprev, SpfResult("fail", "a@example.com", "mailfrom"), ())
    assert "spf=pass" not in value
    assert [(c[0], c[1]) for c in clauses(value)] == [
        ("iprev", "fail"),
        ("spf", "fail"),
        ("dkim", "none"),
    ]


# -- spf --


@pytest.mark.parametrize(
    "result", ["pass", "fail", "softfail", "neutral", "none", "temperror", "permerror"]
)
def test_spf_mailfrom_round_trips(result: str):
    value = build(ID, ADDR, None, SpfResult(result, "sender@example.com", "mailfrom"), ())
    assert clauses(value)[0] == ("spf", result, {"smtp.mailfrom": "sender@example.com"})


def test_spf_helo_round_trips():
    value = build(ID, ADDR, None, SpfResult("pass", "mail.example.com", "helo"), ())
    assert clauses(value)[0] == ("spf", "pass", {"smtp.helo": "mail.example.com"})
    assert "smtp.mailfrom" not in value


def test_spf_helo_address_literal_round_trips():
    value = build(ID, ADDR, None, SpfResult("none", "[IPv6:2001:db8::1]", "helo"), ())
    assert clauses(value)[0] == ("spf", "none", {"smtp.helo": "[IPv6:2001:db8::1]"})


def test_spf_idn_sender_is_written_in_a_labels():
    r = FakeResolver({("xn--bcher-kva.de", "TXT"): "v=spf1 +all"})
    spf = check_spf(r, ADDR, "<info@bücher.de>", "mail.example.com", Budget(20))
    value = build(ID, ADDR, None, spf, ())
    assert value.isascii()
    assert clauses(value)[0] == ("spf", "pass", {"smtp.mailfrom": "info@xn--bcher-kva.de"})


def test_spf_smtputf8_local_part_gives_the_domain_only():
    value = build(ID, ADDR, None, SpfResult("pass", "jürgen@xn--bcher-kva.de", "mailfrom"), ())
    assert value.isascii()
    assert clauses(value)[0] == ("spf", "pass", {"smtp.mailfrom": "xn--bcher-kva.de"})


# -- dkim --


def test_dkim_none_without_signatures():
    value = build(ID, ADDR, IPREV_PASS, SPF_PASS, ())
    assert value.endswith("\tdkim=none")
    assert clauses(value)[-1] == ("dkim", "none", {})


@pytest.mark.parametrize("b", ["Ab/dEfGh", "ab+c/d==", "////////", "AbCd/fG="])
def test_dkim_header_b_with_slash_is_quoted_and_survives(b: str):
    value = build(ID, ADDR, None, None, (DkimResult("pass", "example.com", "sel1", b),))
    assert f'header.b="{b}"' in value
    assert clauses(value) == [
        ("dkim", "pass", {"header.d": "example.com", "header.s": "sel1", "header.b": b})
    ]


def test_several_dkim_results_each_keep_their_properties():
    results = (
        DkimResult("fail", "example.net", "s2", "Zz/yXw+v"),
        DkimResult("pass", "example.com", "sel1", "AbCdEfGh"),
        DkimResult("temperror", "example.org", "s3", "a/b/c/d/"),
        DkimResult("permerror"),
    )
    value = build(ID, ADDR, IPREV_PASS, SPF_PASS, results)
    assert clauses(value)[2:] == [
        ("dkim", "fail", {"header.d": "example.net", "header.s": "s2", "header.b": "Zz/yXw+v"}),
        ("dkim", "pass", {"header.d": "example.com", "header.s": "sel1", "header.b": "AbCdEfGh"}),
        (
            "dkim",
            "temperror",
            {"header.d": "example.org", "header.s": "s3", "header.b": "a/b/c/d/"},
        ),
        ("dkim", "permerror", {}),
    ]


@pytest.mark.parametrize("result", ["pass", "fail", "neutral", "temperror", "permerror"])
def test_dkim_every_result_round_trips(result: str):
    value = build(ID, ADDR, None, None, (DkimResult(result, "example.com", "s", "abcdefgh"),))
    assert clauses(value)[0][:2] == ("dkim", result)


def test_hostile_signature_tags_from_check_dkim_stay_out_of_the_header():
    sig = b'v=1; a=rsa-sha256; d=x;dkim=pass.example; s=a"b(c); h=from; bh=AAAA; b=Q(x)"y";z'
    message = b"DKIM-Signature: " + sig + b"\r\nFrom: a@example.com\r\n\r\nbody\r\n"
    results = check_dkim(FakeResolver({}), message, Budget(20), 5)
    value = build(ID, ADDR, None, None, results)
    assert "dkim=pass" not in value
    parsed = clauses(value)
    assert [(c[0], c[1]) for c in parsed] == [("dkim", "permerror")]


# -- hostile identities --


HOSTILE_LOCAL_PARTS = [
    "a;b",
    "a(b",
    "a)b",
    'a"b',
    '"quoted local"',
    "a\r\nX-Injected: yes\r\n b",
    "a\nb",
    "x; spf=pass smtp.mailfrom=ok",
    "(comment)",
    "a\\b",
]


def assert_says_nothing_false(value: str, spf_result: str) -> dict[str, str]:
    assert "\r" not in value
    assert re.fullmatch(r"[^\n]*(\n\t[^\n]*)*", value)  # only our folding
    parsed = clauses(value)
    assert [(c[0], c[1]) for c in parsed] == [
        ("iprev", "pass"),
        ("spf", spf_result),
        ("dkim", "none"),
    ]
    return parsed[1][2]


@pytest.mark.parametrize("local", HOSTILE_LOCAL_PARTS)
def test_hostile_mail_from_gives_a_parseable_header(local: str):
    spf = SpfResult("fail", f"{local}@example.com", "mailfrom")
    value = build(ID, ADDR, IPREV_PASS, spf, ())
    props = assert_says_nothing_false(value, "fail")
    assert props.get("smtp.mailfrom") in ("example.com", None)


@pytest.mark.parametrize("local", HOSTILE_LOCAL_PARTS)
def test_hostile_mail_from_through_check_spf(local: str):
    r = FakeResolver({("example.com", "TXT"): "v=spf1 -all"})
    spf = check_spf(r, ADDR, f"<{local}@example.com>", "mail.example.com", Budget(20))
    value = build(ID, ADDR, IPREV_PASS, spf, ())
    props = assert_says_nothing_false(value, spf.result)
    assert props.get("smtp.mailfrom") in ("example.com", None)


@pytest.mark.parametrize(
    "domain", ["exa;mple.com", "example.com;x", "example.com\r\nX: y", "exa(mple).com"]
)
def test_hostile_mail_from_domain_is_left_out(domain: str):
    value = build(ID, ADDR, IPREV_PASS, SpfResult("none", f"a@{domain}", "mailfrom"), ())
    props = assert_says_nothing_false(value, "none")
    assert props == {}


@pytest.mark.parametrize("helo", [*HOSTILE_LOCAL_PARTS, "a@b;c", "a@b.example", "x\r\n"])
def test_hostile_helo_gives_a_parseable_header(helo: str):
    value = build(ID, ADDR, IPREV_PASS, SpfResult("none", helo, "helo"), ())
    props = assert_says_nothing_false(value, "none")
    assert props.get("smtp.helo") in (helo, None)


@pytest.mark.parametrize("helo", [*HOSTILE_LOCAL_PARTS, "a@b;c", "[IPv6:2001:db8::1];x"])
def test_hostile_helo_through_check_spf_with_null_sender(helo: str):
    r = FakeResolver({})
    spf = check_spf(r, ADDR, "<>", helo, Budget(20))
    value = build(ID, ADDR, IPREV_PASS, spf, ())
    props = assert_says_nothing_false(value, "none")
    assert props.get("smtp.helo") in (helo, None)


# -- forged headers --


@pytest.mark.parametrize(
    "value",
    [
        "mx.example.org; spf=pass",
        "MX.Example.ORG; spf=pass",
        "mx.example.org;\r\n\tspf=pass smtp.mailfrom=a@example.com",
        "mx.example.org;\n spf=pass",
        "mx.example.org\r\n ; spf=pass",
        "(comment) mx.example.org; dkim=pass",
        "(nested (comment)) mx.example.org; dkim=pass",
        "  mx.example.org(trailing comment); none",
        '"mx.example.org"; spf=pass',
        '"MX.example.org" ; none',
        "mx.example.org 1; spf=pass",
        "mx.example.org; none",
        "mx.example.org",
        "mx.example.org;;; this (( does not parse",
        "mx.example.org; spf=",
    ],
)
def test_authserv_id_of_our_headers(value: str):
    assert authserv_id_of(value) == "mx.example.org"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("other.example; spf=pass", "other.example"),
        ("mx.example.org.evil; spf=pass", "mx.example.org.evil"),
        ("evil.mx.example.org; spf=pass", "evil.mx.example.org"),
        ("(mx.example.org) other.example; spf=pass", "other.example"),
        ('"other.example"; spf=pass', "other.example"),
        ("", ""),
    ],
)
def test_authserv_id_of_foreign_headers(value: str, expected: str):
    assert authserv_id_of(value) == expected


def test_unparseable_header_claiming_our_id_is_still_ours():
    value = "mx.example.org; spf=pass (((broken"
    with pytest.raises(authres.SyntaxError):
        authresults.parse(value)
    assert forged_indexes([value], ID) == [1]


def test_forged_indexes_highest_first_and_one_based():
    values = [
        "other.example; spf=pass",  # 1: kept
        "MX.EXAMPLE.ORG; spf=pass",  # 2
        "mx.example.org;\r\n\tdkim=pass header.d=example.com",  # 3
        "another.example; dkim=fail",  # 4: kept
        "(forged) mx.example.org; iprev=pass",  # 5
        '"mx.example.org"; none',  # 6
    ]
    assert forged_indexes(values, "mx.example.org") == [6, 5, 3, 2]
    assert forged_indexes(values, "MX.Example.Org") == [6, 5, 3, 2]


def test_forged_indexes_keeps_foreign_headers():
    values = ["a.example; spf=pass", "b.example; none"]
    assert forged_indexes(values, ID) == []
    assert forged_indexes([], ID) == []


def test_our_own_header_would_be_recognised_as_ours():
    value = build(ID, ADDR, IPREV_PASS, SPF_PASS, (DKIM_PASS,))
    assert forged_indexes([value], ID) == [1]
    assert forged_indexes([value], "other.example") == []


def test_parse_unfolds_first():
    value = "mx.example.org;\r\n\tspf=pass\r\n  smtp.mailfrom=a@example.com"
    header = authresults.parse(value)
    props: dict[str, Any] = {p.name: p.value for p in header.results[0].properties}
    assert props == {"mailfrom": "a@example.com"}


# -- the authserv-id behind comments of any length and depth (RFC 8601 §5) ---------------


@pytest.mark.parametrize(
    "value",
    [
        "(" + "x " * 500_000 + ") mx.example.org; spf=pass",  # a 1 MB comment, nothing cut
        "(" * 100_000 + ")" * 100_000 + " mx.example.org; spf=pass",  # nested 100,000 deep
        "(a" * 50_000 + "b)" * 50_000 + "\r\n\tmx.example.org; none",
        "(\\)) mx.example.org; none",  # an escaped parenthesis does not close the comment
        "(a (b \\( c) d) (e)\r\n (f) mx.example.org(g); none",
        "mx.example.org(never closed; spf=pass",
        '"mx.\\example.org"; none',
    ],
)
def test_our_id_is_found_behind_any_comment(value: str):
    assert authserv_id_of(value) == "mx.example.org"
    assert forged_indexes(["other.example; none", value], "mx.example.org") == [2]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("(" * 100_000 + " mx.example.org; none", ""),  # never closed: all of it is comment
        ("(a) (b mx.example.org; none", ""),
        ('"mx.example.org; none', ""),  # a quoted-string never closed
        (") mx.example.org; none", ")"),  # a stray ')' is text, as it was
    ],
)
def test_an_unclosed_comment_or_quote_hides_no_id(value: str, expected: str):
    assert authserv_id_of(value) == expected



# -- the kept clauses: the same header as authres's whole rendering ------------------

_TEXT = st.text(max_size=30)  # no surrogates: st.text leaves them out
_IPREV = st.builds(IprevResult, st.sampled_from(list(Iprev)),
                   st.lists(st.one_of(st.sampled_from(["mail.example.com", "x.test"]), _TEXT),
                            max_size=7).map(tuple))
_SPF = st.builds(SpfResult, st.sampled_from(["pass", "fail", "none", "temperror"]),
                 st.one_of(st.sampled_from(["a@example.com", "example.com", "[::1]"]), _TEXT),
                 st.sampled_from(["mailfrom", "helo"]), _TEXT)
_DKIM = st.builds(DkimResult, st.sampled_from(["pass", "fail", "permerror"]),
                  st.sampled_from(["example.com", ""]), st.sampled_from(["s1", ""]),
                  st.sampled_from(["AbCdEfGh", "", "a b"]), _TEXT)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.none(), _IPREV), st.one_of(st.none(), _SPF), st.lists(_DKIM, max_size=3),
       st.sampled_from([ADDR, ipaddress.ip_address("192.0.2.1"), None]))
def test_build_writes_what_authres_writes_for_the_same_results(iprev, spf, dkim, addr):
    for _ in range(2):  # rendered, then from the kept clauses
        assert build(ID, addr, iprev, spf, tuple(dkim)) == authresults.header_value(
            ID, authresults.results_for(addr, iprev, spf, tuple(dkim)))
