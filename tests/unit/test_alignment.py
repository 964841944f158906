"""From-aligned mode: the From domain, RFC 9989's tree walk, and the
decision and header it leads to (SPEC §1, §2)."""

from __future__ import annotations

import dataclasses
import ipaddress
import re

import authres
import pytest

from ipv6milter import alignment, authresults, config, policy
from ipv6milter.model import Aligned, Alignment, DkimResult, SpfResult
from ipv6milter.resolver import Budget

from .fakedns import TEMP, FakeResolver

ADDR = ipaddress.ip_address("2001:db8::25")
ALIGNED_TEXT = ("Service unavailable, message sent over IPv6 [2001:db8::25] must pass either "
                "SPF or DKIM validation aligned with the From domain.")


def budget() -> Budget:
    return Budget(20)


def cfg(mode: str) -> config.Config:
    return dataclasses.replace(config.parse("AcceptDomains *\n"), alignment=mode)


# -- the From domain ---------------------------------------------------------------------


@pytest.mark.parametrize(("values", "domain"), [
    ([b"alice@example.com"], "example.com"),
    ([b'"Alice Example" <alice@Example.COM>'], "example.com"),
    ([b"alice@example.com (Alice)"], "example.com"),
    # two mailboxes of one domain, the field folded
    ([b"Alice <alice@example.com>,\r\n bob@example.com"], "example.com"),
    ([b"Team: alice@example.com, Bob <bob@example.com>;"], "example.com"),  # RFC 6854 group
    ([b"=?utf-8?q?B=C3=B6b?= <bob@example.com>"], "example.com"),  # an encoded word
    (["Jörg <jörg@bücher.example>".encode()], "xn--bcher-kva.example"),  # U-label: A-label
    ([b"alice@example.com, ,"], "example.com"),  # obs-mbox-list's empty elements
    ([b"\xe9t\xe9 <ete@example.com>"], "example.com"),  # raw 8-bit display name
])
def test_from_domain(values: list[bytes], domain: str) -> None:
    assert alignment.author_domain(values) == (domain, "")


@pytest.mark.parametrize(("values", "why"), [
    ([], "no From field"),
    ([b"a@example.com", b"a@example.com"], "more than one From field"),
    ([b"alice@example.com, bob@example.org"], "more than one domain"),
    ([b"Undisclosed recipients:;"], "no address"),  # an empty group
    ([b"alice@[192.0.2.1]"], "address literal"),
    ([b"alice@[IPv6:2001:db8::1]"], "address literal"),
    ([b"alice@example.com."], "does not parse"),  # the From domain keeps no trailing dot
    ([b"alice@example.org)<bob@example.org>"], "does not parse"),  # CVE-2023-27043
    ([b"a@exa mple.com"], "does not parse"),
    ([b"<a @ example.com>"], "does not parse"),  # the address is not written literally
    ([b"alice(x)@example.com"], "does not parse"),
    ([b"Alice <alice@example.com"], "does not parse"),
    ([b"(Alice <alice@example.com>"], "does not parse"),
    ([b'"Alice <alice@example.com>'], "does not parse"),
    ([b"<@relay.example:alice@example.com>"], "does not parse"),  # obs-route
    ([b"Team: a@example.com"], "does not parse"),  # the group is never closed
    ([b"alice@example.com\x00"], "does not parse"),
    ([b""], "no address"),
    ([b"alice@exa\xffmple.com"], "not a domain name"),
    ([b"alice@" + b"a" * 64 + b".com"], "not a domain name"),
    ([b"alice@ex_am!ple.com"], "not a domain name"),
])
def test_no_from_domain(values: list[bytes], why: str) -> None:
    domain, problem = alignment.author_domain(values)
    assert domain is None
    assert why in problem


def test_a_from_field_past_its_limit_is_not_parsed() -> None:
    from ipv6milter.limits import FROM_FIELD_MAX
    field = b"x" * (FROM_FIELD_MAX - len(b" <a@example.com>")) + b" <a@example.com>"
    assert alignment.author_domain([field]) == ("example.com", "")
    domain, problem = alignment.author_domain([b"x" + field])
    assert domain is None and "longer than" in problem


@pytest.mark.parametrize(("raw", "drop", "out"), [
    ("Example.COM.", True, "example.com"),
    ("example.com.", False, None),
    ("bücher.example", True, "xn--bcher-kva.example"),
    ("XN--BCHER-KVA.example", True, "xn--bcher-kva.example"),
    ("", True, None),
    (".", True, None),
    ("a..b", True, None),
])
def test_normalise(raw: str, drop: bool, out: str | None) -> None:
    assert alignment.normalise(raw, drop_dot=drop) == out


# -- the _dmarc records ----------------------------------------------------------------------


@pytest.mark.parametrize(("record", "psd"), [
    (b"v=DMARC1; p=none", "u"),
    (b"v=DMARC1", "u"),
    (b"v = DMARC1 ;p=reject; psd=y", "y"),
    (b"v=DMARC1; p=reject; PSD=N", "n"),
    (b"v=DMARC1; psd=u", "u"),
    (b"v=DMARC1; psd=maybe", "u"),
    (b"v=DMARC2; p=none", None),
    (b"v=dmarc1; p=none", None),  # DMARC1 is case sensitive
    (b"p=none; v=DMARC1", None),  # v must come first
    (b" v=DMARC1", None),
    (b"v=spf1 -all", None),
    (b"v=DMARC1x; p=none", None),
])
def test_dmarc_record(record: bytes, psd: str | None) -> None:
    assert alignment.dmarc_psd(record) == psd


def test_several_dmarc_records_at_one_name_count_as_none() -> None:
    assert alignment.dmarc_answer([b"v=spf1 -all", b"v=DMARC1; psd=n"]) == "n"
    assert alignment.dmarc_answer([b"v=DMARC1; p=none", b"v=DMARC1; psd=n"]) is None
    assert alignment.dmarc_answer([]) is None


# -- RFC 9989's tree walk and its worked examples --------------------------------------------


def _walk(zone: dict[str, str | list[str]], domain: str) -> tuple[str | None, list[str]]:
    dns = FakeResolver({("_dmarc." + k, "TXT"): v for k, v in zone.items()})
    org = alignment.Walk(dns, budget()).organizational(domain)
    return org, [name for name, _ in dns.asked]


def test_rfc9989_4_10_eight_queries_for_a_thirteen_label_name() -> None:
    # RFC 9989 §4.10: "a full DNS Tree Walk would require the following eight queries".
    org, asked = _walk({}, "a.b.c.d.e.f.g.h.i.j.mail.example.com")
    assert asked == [
        "_dmarc.a.b.c.d.e.f.g.h.i.j.mail.example.com",
        "_dmarc.g.h.i.j.mail.example.com",
        "_dmarc.h.i.j.mail.example.com",
        "_dmarc.i.j.mail.example.com",
        "_dmarc.j.mail.example.com",
        "_dmarc.mail.example.com",
        "_dmarc.example.com",
        "_dmarc.com",
    ]
    assert org == "a.b.c.d.e.f.g.h.i.j.mail.example.com"  # nothing found: its own


SIMPLE = {"example.com": "v=DMARC1; p=reject", "signing.example.com": "v=DMARC1; p=none"}


def test_rfc9989_b_4_1_simple_example() -> None:
    # Author Domain example.com: "_dmarc.example.com" and "_dmarc.com".
    assert _walk(SIMPLE, "example.com") == ("example.com", ["_dmarc.example.com", "_dmarc.com"])
    # DKIM signing.example.com: three queries, the fewest labels wins.
    assert _walk(SIMPLE, "signing.example.com") == (
        "example.com", ["_dmarc.signing.example.com", "_dmarc.example.com", "_dmarc.com"])


def test_rfc9989_b_4_2_deep_tree_walk_example() -> None:
    zone = {"example.com": "v=DMARC1; p=reject", "signing.example.com": "v=DMARC1; p=none"}
    org, asked = _walk(zone, "a.b.c.d.e.f.g.h.i.j.k.example.com")
    assert asked == [
        "_dmarc.a.b.c.d.e.f.g.h.i.j.k.example.com",
        "_dmarc.g.h.i.j.k.example.com",  # the intermediate names are skipped
        "_dmarc.h.i.j.k.example.com",
        "_dmarc.i.j.k.example.com",
        "_dmarc.j.k.example.com",
        "_dmarc.k.example.com",
        "_dmarc.example.com",
        "_dmarc.com",
    ]
    assert org == "example.com"


PSD = {"bank.example": "v=DMARC1; p=reject; psd=y", "giant.bank.example": "v=DMARC1; p=reject"}


def test_rfc9989_b_4_3_psd_example() -> None:
    assert _walk(PSD, "giant.bank.example") == (
        "giant.bank.example", ["_dmarc.giant.bank.example", "_dmarc.bank.example"])
    assert _walk(PSD, "mail.giant.bank.example") == (
        "giant.bank.example",
        ["_dmarc.mail.giant.bank.example", "_dmarc.giant.bank.example", "_dmarc.bank.example"])
    assert _walk(PSD, "mail.mega.bank.example") == (
        "mega.bank.example",
        ["_dmarc.mail.mega.bank.example", "_dmarc.mega.bank.example", "_dmarc.bank.example"])


def test_rfc9989_4_10_2_examples() -> None:
    both = {"mail.example.com": "v=DMARC1; p=none", "example.com": "v=DMARC1; p=none"}
    assert _walk(both, "a.mail.example.com")[0] == "example.com"
    assert _walk({"mail.example.com": "v=DMARC1; psd=n"}, "a.mail.example.com") == (
        "mail.example.com", ["_dmarc.a.mail.example.com", "_dmarc.mail.example.com"])
    assert _walk({"com": "v=DMARC1; psd=y"}, "a.mail.example.com")[0] == "example.com"


def test_psd_y_at_the_start_is_its_own_organizational_domain() -> None:
    assert _walk(PSD, "bank.example") == ("bank.example", ["_dmarc.bank.example"])


def test_several_records_at_one_name_are_passed_over() -> None:
    zone: dict[str, str | list[str]] = {
        "example.com": ["v=DMARC1; p=none", "v=DMARC1; p=reject"],
        "mail.example.com": "v=DMARC1; p=none"}
    assert _walk(zone, "x.mail.example.com")[0] == "mail.example.com"


def test_a_temporary_failure_leaves_the_organizational_domain_unknown() -> None:
    dns = FakeResolver({("_dmarc.example.com", "TXT"): TEMP})
    walk = alignment.Walk(dns, budget())
    assert walk.organizational("mail.example.com") is None
    assert walk.organizational("x.example.com") is None
    # The failed name is not asked twice in one message.
    assert [n for n, _ in dns.asked].count("_dmarc.example.com") == 1


def test_a_spent_budget_is_a_temporary_failure() -> None:
    walk = alignment.Walk(FakeResolver(), Budget(-1))
    assert walk.organizational("mail.example.com") is None


# -- strict and relaxed ----------------------------------------------------------------------

ZONE = {
    ("_dmarc.example.com", "TXT"): "v=DMARC1; p=reject",
    ("_dmarc.bank.example", "TXT"): "v=DMARC1; psd=y",
}


def _spf(domain: str, result: str = "pass") -> SpfResult:
    return SpfResult(result, f"bounce@{domain}", "mailfrom")


def _dk(domain: str, result: str = "pass") -> DkimResult:
    return DkimResult(result, domain, "sel")


@pytest.mark.parametrize(("from_domain", "other", "strict", "relaxed"), [
    ("example.com", "example.com", Aligned.YES, Aligned.YES),
    ("example.com", "EXAMPLE.com.", Aligned.YES, Aligned.YES),  # d= with a trailing dot
    ("example.com", "bounce.example.com", Aligned.NO, Aligned.YES),
    ("news.example.com", "bounce.example.com", Aligned.NO, Aligned.YES),
    ("example.com", "example.net", Aligned.NO, Aligned.NO),
    ("example.com", "examplecom.com", Aligned.NO, Aligned.NO),
    ("giant.bank.example", "mail.giant.bank.example", Aligned.NO, Aligned.YES),
    ("giant.bank.example", "mega.bank.example", Aligned.NO, Aligned.NO),
    # No DMARC record anywhere: each domain is its own, relaxed is strict.
    ("nodmarc.test", "mail.nodmarc.test", Aligned.NO, Aligned.NO),
    ("bücher.example", "xn--bcher-kva.example", Aligned.YES, Aligned.YES),
])
def test_alignment_tables(from_domain: str, other: str, strict: Aligned, relaxed: Aligned) -> None:
    field = f"a@{from_domain}".encode()
    for mode, want in (("strict", strict), ("relaxed", relaxed)):
        dns = FakeResolver(ZONE)
        al = alignment.evaluate(dns, mode, [field], _spf("unrelated.invalid", "fail"),
                                (_dk(other),), budget())
        assert al.dkim == (want,), (mode, other)
        if mode == "strict":
            assert dns.asked == []  # strict asks no DNS
        dns = FakeResolver(ZONE)
        spf_domain = other.rstrip(".").lower() if other.isascii() else other
        al = alignment.evaluate(dns, mode, [field], _spf(spf_domain), (), budget())
        assert al.spf is want, (mode, other)


def test_names_without_a_common_top_level_domain_cost_no_dns() -> None:
    dns = FakeResolver(ZONE)
    al = alignment.evaluate(dns, "relaxed", [b"a@example.com"], _spf("example.net"), (), budget())
    assert al.spf is Aligned.NO and dns.asked == []


def test_the_same_name_is_asked_once_per_message() -> None:
    # RFC 9989 B.4.1 as one message: From example.com, MAIL FROM example.com,
    # d=signing.example.com: three distinct names.
    dns = FakeResolver({("_dmarc." + k, "TXT"): v for k, v in SIMPLE.items()})
    al = alignment.evaluate(dns, "relaxed", [b"a@example.com"], _spf("example.com"),
                            (_dk("signing.example.com"),), budget())
    assert (al.spf, al.dkim) == (Aligned.YES, (Aligned.YES,))
    assert [n for n, _ in dns.asked] == [
        "_dmarc.signing.example.com", "_dmarc.example.com", "_dmarc.com"]


# -- the decision (SPEC §1) ----------------------------------------------------------------


def _decide(mode: str, zone: dict[tuple[str, str], str], from_field: bytes, spf: SpfResult,
            dkim: tuple[DkimResult, ...]) -> tuple[policy.Verdict, Alignment]:
    al = alignment.evaluate(FakeResolver(zone), mode, [from_field], spf, dkim, budget())
    return policy.decide_eom(cfg(mode), ADDR, spf, dkim, al), al


def test_an_unaligned_spf_pass_without_dkim_is_refused_with_the_aligned_text() -> None:
    v, al = _decide("relaxed", ZONE, b"ceo@example.com", _spf("spammer.example"), ())
    assert v.refuses and v.reply is not None
    assert (v.reply.code, v.reply.xcode, v.reply.text) == ("450", "4.7.26", ALIGNED_TEXT)
    assert policy.aligned_summary(_spf("spammer.example"), (), al) == "none"


def test_off_mode_accepts_the_same_message() -> None:
    assert policy.decide_eom(cfg("off"), ADDR, _spf("spammer.example"), ()) is policy.ACCEPT


@pytest.mark.parametrize(("spf", "dkim", "summary"), [
    (_spf("bounce.example.com"), (), "spf"),
    (_spf("x.example.net", "fail"), (_dk("example.com"),), "dkim"),
    (_spf("example.com"), (_dk("example.net"), _dk("mail.example.com")), "spf,dkim"),
])
def test_an_aligned_pass_is_accepted(spf: SpfResult, dkim: tuple[DkimResult, ...],
                                     summary: str) -> None:
    v, al = _decide("relaxed", ZONE, b"a@example.com", spf, dkim)
    assert v is policy.ACCEPT
    assert policy.aligned_summary(spf, dkim, al) == summary


def test_no_single_from_domain_aligns_nothing() -> None:
    v, al = _decide("relaxed", ZONE, b"a@example.com, b@example.net", _spf("example.com"),
                    (_dk("example.com"),))
    assert v.reply is not None and v.reply.text == ALIGNED_TEXT
    assert al.from_domain is None and al.spf is Aligned.NO


def test_servfail_at_a_dmarc_name_that_decides_is_451() -> None:
    # The only pass is SPF for bounce.example.com; whether it is aligned with
    # example.com depends on _dmarc.example.com, which fails.
    zone = {("_dmarc.example.com", "TXT"): TEMP}
    v, al = _decide("relaxed", zone, b"a@example.com", _spf("bounce.example.com"), ())
    assert al.spf is Aligned.UNKNOWN
    assert v.summary == "451 4.4.3"
    assert policy.aligned_summary(_spf("bounce.example.com"), (), al) == "unknown"


def test_servfail_at_a_dmarc_name_that_does_not_decide_is_the_refusal() -> None:
    # _dmarc.example.com fails, but the DKIM pass is for example.net: never
    # aligned with example.com whatever the walk says; the refusal stands.
    zone = {("_dmarc.example.com", "TXT"): TEMP}
    v, _ = _decide("relaxed", zone, b"a@example.com", _spf("other.example.net", "fail"),
                   (_dk("example.net"),))
    assert v.summary == "450 4.7.26" and v.reply is not None and v.reply.text == ALIGNED_TEXT


def test_servfail_does_not_matter_when_a_pass_is_aligned() -> None:
    zone = {("_dmarc.example.com", "TXT"): TEMP}
    v, _ = _decide("relaxed", zone, b"a@example.com", _spf("bounce.example.com"),
                   (_dk("example.com"),))
    assert v is policy.ACCEPT


@pytest.mark.parametrize(("spf", "dkim", "summary"), [
    # An SPF temperror on an aligned domain decides: 451.
    (_spf("example.com", "temperror"), (_dk("example.net"),), "451 4.4.3"),
    # A DKIM key temperror on an aligned d= decides: 451.
    (_spf("example.net", "pass"), (_dk("example.com", "temperror"),), "451 4.4.3"),
    # The same failures on domains known not aligned decide nothing.
    (_spf("example.net", "temperror"), (_dk("example.org", "pass"),), "450 4.7.26"),
    (_spf("example.net", "pass"), (_dk("example.org", "temperror"),), "450 4.7.26"),
    # An SPF check that never finished: its domain is unknown.
    (SpfResult("temperror", "", "mailfrom", "did not finish in time"), (), "451 4.4.3"),
])
def test_temporary_failures_decide_only_where_alignment_could_hold(
        spf: SpfResult, dkim: tuple[DkimResult, ...], summary: str) -> None:
    v, _ = _decide("strict", ZONE, b"a@example.com", spf, dkim)
    assert v.summary == summary


def test_the_null_sender_is_judged_by_its_helo() -> None:
    helo_pass = SpfResult("pass", "mail.example.com", "helo")
    v, al = _decide("relaxed", ZONE, b"a@example.com", helo_pass, ())
    assert v is policy.ACCEPT and al.spf is Aligned.YES
    v, al = _decide("strict", ZONE, b"a@example.com", helo_pass, ())
    assert v.summary == "450 4.7.26" and al.spf is Aligned.NO
    v, _ = _decide("strict", ZONE, b"a@mail.example.com",
                   SpfResult("pass", "MAIL.example.com.", "helo"), ())
    assert v is policy.ACCEPT


def test_monitor_mode_and_the_share_still_apply() -> None:
    al = alignment.evaluate(FakeResolver(ZONE), "relaxed", [b"a@example.com"],
                            _spf("spammer.example"), (), budget())
    c = dataclasses.replace(cfg("relaxed"), mode="monitor")
    v = policy.decide_eom(c, ADDR, _spf("spammer.example"), (), al)
    assert not v.enforced and v.summary == "450 4.7.26"
    c = dataclasses.replace(cfg("relaxed"), enforce_share=0)
    assert not policy.decide_eom(c, ADDR, _spf("spammer.example"), (), al).enforced


# -- the header comments (SPEC §2) -----------------------------------------------------------


def _header(al: Alignment | None, spf: SpfResult, dkim: tuple[DkimResult, ...]) -> str:
    return authresults.build("mx.example.org", ADDR, None, spf, dkim, al)


def test_header_comments() -> None:
    spf, dkim = _spf("bounce.example.com"), (_dk("example.net"), _dk("example.com", "fail"))
    al = alignment.evaluate(FakeResolver(ZONE), "relaxed", [b"a@example.com"], spf, dkim,
                            budget())
    value = _header(al, spf, dkim)
    assert "spf=pass (aligned with example.com) smtp.mailfrom=bounce@bounce.example.com" in value
    assert "dkim=pass (not aligned with example.com) header.d=example.net" in value
    assert "dkim=fail header.d=example.com" in value  # only passes carry the comment
    assert "dmarc" not in value
    authres.AuthenticationResultsHeader.parse_value(authresults.unfold(value))
    al = alignment.evaluate(FakeResolver(ZONE), "relaxed", [b"a@example.com, b@example.net"],
                            spf, dkim, budget())
    assert "spf=pass (not aligned: no single From domain)" in _header(al, spf, dkim)
    al = alignment.evaluate(FakeResolver({("_dmarc.example.com", "TXT"): TEMP}), "relaxed",
                            [b"a@example.com"], spf, dkim, budget())
    assert "spf=pass (alignment unknown: temporary DNS failure)" in _header(al, spf, dkim)


def test_alignment_off_writes_the_header_as_before() -> None:
    spf, dkim = _spf("example.com"), (_dk("example.com"),)
    assert _header(None, spf, dkim) == authresults.build("mx.example.org", ADDR, None, spf, dkim)
    assert "(" not in _header(None, spf, dkim)


# -- through the milter adapter (TestCtx) ------------------------------------------------


def test_the_milter_judges_alignment_and_logs_it(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    import Milter

    from tests.unit.test_milter import GOOD, ctx_for, message, results, zone
    from tests.unit.test_milter import cfg as milter_cfg

    ctx = ctx_for(milter_cfg(alignment="relaxed"), zone())
    ctx.connect(GOOD)
    with caplog.at_level(logging.INFO, logger="ipv6milter"):
        # SPF passes for example.com, but From names another organization.
        out = ctx.transaction("a@example.com", ["b@example.org"], message("ceo@bank.example"))
    assert out["eom"] == Milter.TEMPFAIL
    assert out["eom_reply"] == ("450", "4.7.26", ALIGNED_TEXT)
    assert "alignment=relaxed aligned=none header_from=bank.example" in caplog.text

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ipv6milter"):
        # SPF fails; the DKIM signature of example.com is aligned with From.
        out = ctx.transaction("x@fail.example", ["b@example.org"],
                              message("a@example.com", sign=True))
    assert out["eom"] == Milter.CONTINUE, out
    assert results(ctx) == {"iprev": "pass", "spf": "fail", "dkim": "pass"}
    assert "alignment=relaxed aligned=dkim header_from=example.com" in caplog.text
    (add,) = [c for c in ctx.calls if c[0] == "add"]
    assert "dkim=pass (aligned with example.com)" in add[2]

    ctx = ctx_for(milter_cfg(), zone())  # Alignment off: the same message passes on SPF
    ctx.connect(GOOD)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ipv6milter"):
        out = ctx.transaction("a@example.com", ["b@example.org"], message("ceo@bank.example"))
    assert out["eom"] == Milter.CONTINUE
    assert "alignment=" not in caplog.text and "header_from=" not in caplog.text


# -- any bytes: a defined answer, and never an address that is not written ------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_PIECES = st.sampled_from([b"a", b"@", b"<", b">", b"(", b")", b'"', b"\\", b",", b";", b":",
                           b".", b" ", b"\r\n ", b"[", b"]", b"example.com", b"b\xc3\xbc",
                           b"\xff", b"\x00", b"xn--", b"-"])


@settings(max_examples=400, deadline=None, database=None)
@given(st.lists(_PIECES, max_size=30).map(b"".join))
def test_any_from_field_gets_a_defined_answer(field: bytes) -> None:
    domain, problem = alignment.author_domain([field])
    assert (domain is None) == bool(problem)
    if domain is not None:
        text = field.decode("utf-8", "surrogateescape")
        # The domain is written in the field, right after an "@".
        written = {alignment.normalise(re.split(r"[>,;( \t\r\n]", part)[0], drop_dot=False)
                   for part in text.split("@")[1:]}
        assert domain in written, (field, domain)


def test_a_u_label_d_is_reported_as_its_a_label_and_aligns() -> None:
    from ipv6milter import dkimcheck

    value = "v=1; a=rsa-sha256; d=bücher.example; s=sel; h=from; bh=x; b=abcd".encode()
    r = dkimcheck.describe(value, "pass", "signature verified")
    assert r.domain == "xn--bcher-kva.example"
    al = alignment.evaluate(FakeResolver(), "strict", ["a@BÜCHER.example".encode()], None,
                            (r,), budget())
    assert al.dkim == (Aligned.YES,)
    assert dkimcheck.describe(b"d=\xff.example; s=s", "permerror", "").domain == ""
