"""The pure policy: one test per row of SPEC §1 and per DNS-failure path."""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress

import pytest

from ipv6milter import config, policy
from ipv6milter.metrics import Metrics
from ipv6milter.model import DkimResult, Iprev, IprevResult, Scope, SpfResult

ADDR = ipaddress.ip_address("2001:db8::25")


def cfg(**kw: object) -> config.Config:
    base = config.parse("AcceptDomains example.org, .example.net, bücher.de\n")
    return dataclasses.replace(base, **kw)


PASS = IprevResult(Iprev.PASS, ("mail.example.com",), confirmed="mail.example.com")
UNCONFIRMED = IprevResult(Iprev.FAIL, ("elsewhere.example",))
NO_PTR = IprevResult(Iprev.PERMERROR)
PTR_TEMP = IprevResult(Iprev.TEMPERROR, ptr_temperror=True)
FORWARD_TEMP = IprevResult(Iprev.TEMPERROR, ("mail.example.com",))


def spf(result: str) -> SpfResult:
    return SpfResult(result, "a@example.com", "mailfrom")


def dk(*results: str) -> tuple[DkimResult, ...]:
    return tuple(DkimResult(r, "example.com", "sel1") for r in results)


# -- scope ------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "auth", "scope"), [
    ("2001:db8::25", False, Scope.IPV6),
    ("IPv6:2001:db8:0:0:0:0:0:25", False, Scope.IPV6),  # Sendmail's macro form
    ("[2001:db8::25]", False, Scope.IPV6),
    ("fe80::1%eth0", False, Scope.IPV6),
    ("192.0.2.1", False, Scope.IPV4),
    ("::ffff:192.0.2.1", False, Scope.MAPPED),
    ("IPv6:::ffff:192.0.2.1", False, Scope.MAPPED),
    ("::1", False, Scope.TRUSTED),
    ("::ffff:127.0.0.1", False, Scope.TRUSTED),  # mapped, then matched as IPv4
    ("2001:db8::25", True, Scope.AUTHENTICATED),
    (None, False, Scope.LOCAL),
    ("not-an-address", False, Scope.LOCAL),
])
def test_classify(raw: str | None, auth: bool, scope: Scope) -> None:
    assert policy.classify(cfg(), policy.parse_address(raw), auth) is scope
    assert scope.in_scope == (scope is Scope.IPV6)


@pytest.mark.parametrize("entry", ["::ffff:192.0.2.5", "::FFFF:192.0.2.0/120",
                                   "::ffff:c000:205"])
def test_mapped_trusted_hosts_mean_their_ipv4_form(entry: str) -> None:
    c = config.parse(f"TrustedHosts {entry}\n")
    for client in ("::ffff:192.0.2.5", "192.0.2.5", "IPv6:::ffff:192.0.2.5"):
        assert policy.classify(c, policy.parse_address(client)) is Scope.TRUSTED, client
    assert policy.classify(c, policy.parse_address("192.0.3.5")) is Scope.IPV4


def test_trusted_networks_from_config() -> None:
    c = config.parse("TrustedHosts 2001:db8:1::/48, 192.0.2.0/24\n")
    assert policy.classify(c, policy.parse_address("2001:db8:1::7")) is Scope.TRUSTED
    assert policy.classify(c, policy.parse_address("::ffff:192.0.2.9")) is Scope.TRUSTED
    assert policy.classify(c, policy.parse_address("::1")) is Scope.IPV6  # default replaced


def test_authenticated_in_scope_when_not_skipped() -> None:
    assert policy.classify(cfg(skip_authenticated=False), ADDR, True) is Scope.IPV6


# -- RCPT: 550 5.2.1 -----------------------------------------------------------------


def test_row1_domain_not_opted_in() -> None:
    v = policy.decide_rcpt(cfg(), ADDR, "contoso.com", PASS)
    assert v.refuses
    assert str(v.reply) == (
        "550 5.2.1 Service unavailable, [contoso.com] does not accept email over IPv6.")


@pytest.mark.parametrize("iprev", [NO_PTR, PTR_TEMP, None])
def test_row1_wins_over_any_ptr_problem(iprev: IprevResult | None) -> None:
    assert str(policy.decide_rcpt(cfg(), ADDR, "contoso.com", iprev).reply).startswith("550 5.2.1")


@pytest.mark.parametrize(("domain", "ok"), [
    ("example.org", True), ("EXAMPLE.ORG.", True), ("sub.example.org", False),
    ("example.net", False), ("a.example.net", True), ("a.b.example.net", True),
    ("bücher.de", True), ("xn--bcher-kva.de", True), ("BÜCHER.DE", True),
])
def test_opt_in_matching(domain: str, ok: bool) -> None:
    v = policy.decide_rcpt(cfg(), ADDR, policy.recipient_domain(f"<x@{domain}>"), PASS)
    assert (v.reply is None) == ok


def test_reply_domain_is_lower_case_ascii_and_safe() -> None:
    assert "[contoso.com]" in policy.decide_rcpt(cfg(), ADDR, "contoso.com", PASS).reply.text
    assert "[xn--mnchen-3ya.de]" in policy.decide_rcpt(cfg(), ADDR, "münchen.de", PASS).reply.text
    assert "%" not in policy.decide_rcpt(cfg(), ADDR, "a%b.example", PASS).reply.text


def test_star_accepts_every_domain() -> None:
    c = config.parse("AcceptDomains *\n")
    assert policy.decide_rcpt(c, ADDR, "anything.example", PASS).reply is None


@pytest.mark.parametrize(("rcpt", "domain"), [
    ("<b@Example.ORG>", "example.org"), ("<@relay.example:b@example.org>", "example.org"),
    ("<postmaster>", ""), ("b@example.org.", "example.org"),
])
def test_recipient_domain(rcpt: str, domain: str) -> None:
    assert policy.recipient_domain(rcpt) == domain


@pytest.mark.parametrize("rcpt", ["<postmaster>", "<PostMaster>", "postmaster",
                                  "<@relay.example:POSTMASTER>"])
def test_postmaster_without_domain_is_never_refused(rcpt: str) -> None:
    assert policy.is_postmaster(rcpt)
    assert not policy.judged(cfg(), rcpt)
    for iprev in (NO_PTR, PTR_TEMP, None):
        v = policy.decide_rcpt(cfg(), ADDR, policy.recipient_domain(rcpt), iprev,
                               postmaster=True)
        assert v.reply is None


@pytest.mark.parametrize("rcpt", ["<root>", "<@relay.example:root>", "<Root>", "<>",
                                  "<postmaster.x>"])
def test_other_recipients_without_domain_are_judged_but_never_get_550(rcpt: str) -> None:
    assert not policy.is_postmaster(rcpt) and policy.recipient_domain(rcpt) == ""
    assert policy.judged(cfg(), rcpt)  # PTR at RCPT, SPF/DKIM at end of message
    decide = lambda iprev: policy.decide_rcpt(cfg(), ADDR, "", iprev)  # noqa: E731
    assert decide(PASS).reply is None
    assert decide(NO_PTR).summary == "450 4.7.25"
    assert decide(PTR_TEMP).summary == "451 4.4.3"
    assert decide(None).summary == "451 4.4.3"


def test_postmaster_with_a_domain_is_an_ordinary_recipient() -> None:
    assert not policy.is_postmaster("<postmaster@contoso.com>")
    assert not policy.judged(cfg(), "<postmaster@contoso.com>")
    assert policy.judged(cfg(), "<postmaster@example.org>")
    v = policy.decide_rcpt(cfg(), ADDR, "contoso.com", NO_PTR)
    assert v.summary == "550 5.2.1"


@pytest.mark.parametrize("length", [900, 925, 926, 1000, 5000])
def test_a_long_domain_keeps_the_550_with_a_shortened_text(length: int) -> None:
    domain = ("a" * 60 + ".") * (length // 61) + "end.example"
    v = policy.decide_rcpt(cfg(), ADDR, domain, PASS)
    assert v.summary == "550 5.2.1"
    text = v.reply.text
    assert len(text) <= policy.MAX_REPLY_TEXT
    assert text.startswith("Service unavailable, [aaaa")
    assert text.endswith(".end.example] does not accept email over IPv6.")
    if len(domain) + 56 <= policy.MAX_REPLY_TEXT:
        assert f"[{domain}]" in text
    else:
        assert "..." in text and len(text) == policy.MAX_REPLY_TEXT


# -- RCPT: 450 4.7.25 and its DNS failures --------------------------------------------------


def test_row2_no_ptr() -> None:
    v = policy.decide_rcpt(cfg(), ADDR, "example.org", NO_PTR)
    assert str(v.reply) == ("450 4.7.25 Service unavailable, sending IPv6 address "
                            "[2001:db8::25] must have reverse DNS record.")


@pytest.mark.parametrize(("mode", "iprev", "expect"), [
    ("ptr", PASS, None),
    ("ptr", UNCONFIRMED, None),  # a PTR exists: enough for "ptr"
    ("ptr", FORWARD_TEMP, None),  # the PTR exists; the forward lookup does not matter
    ("ptr", NO_PTR, "450 4.7.25"),
    ("ptr", PTR_TEMP, "451 4.4.3"),
    ("fcrdns", PASS, None),
    ("fcrdns", UNCONFIRMED, "450 4.7.25"),
    ("fcrdns", NO_PTR, "450 4.7.25"),
    ("fcrdns", FORWARD_TEMP, "451 4.4.3"),
    ("fcrdns", PTR_TEMP, "451 4.4.3"),
])
def test_reverse_dns_modes(mode: str, iprev: IprevResult, expect: str | None) -> None:
    v = policy.decide_rcpt(cfg(reverse_dns=mode), ADDR, "example.org", iprev)
    assert (v.summary if v.reply else None) == expect


def test_ptr_check_that_never_finished_is_a_temporary_failure() -> None:
    v = policy.decide_rcpt(cfg(), ADDR, "example.org", None)
    assert v.summary == "451 4.4.3"
    assert v.reply.text.startswith("Temporary DNS failure") and "try again later" in v.reply.text


# -- end of message: 450 4.7.26 and its DNS failures ------------------------------------------


def test_row3_neither_spf_nor_dkim() -> None:
    v = policy.decide_eom(cfg(), ADDR, spf("fail"), dk("fail"))
    assert str(v.reply) == ("450 4.7.26 Service unavailable, message sent over IPv6 "
                            "[2001:db8::25] must pass either SPF or DKIM validation.")


@pytest.mark.parametrize(("spf_result", "dkim", "expect"), [
    ("pass", (), None),
    ("fail", ("pass",), None),
    ("softfail", ("fail", "pass"), None),  # any verified signature
    ("temperror", ("pass",), None),  # a pass decides; the temperror does not matter
    ("pass", ("temperror",), None),
    ("fail", (), "450 4.7.26"),
    ("softfail", (), "450 4.7.26"),
    ("neutral", ("fail",), "450 4.7.26"),
    ("none", ("permerror",), "450 4.7.26"),
    ("permerror", ("neutral",), "450 4.7.26"),  # permerror is "did not pass"
    ("temperror", (), "451 4.4.3"),
    ("temperror", ("fail",), "451 4.4.3"),
    ("fail", ("temperror",), "451 4.4.3"),  # a key lookup temp error that decides
    ("none", ("fail", "temperror"), "451 4.4.3"),
])
def test_eom_ladder(spf_result: str, dkim: tuple[str, ...], expect: str | None) -> None:
    v = policy.decide_eom(cfg(), ADDR, spf(spf_result), dk(*dkim))
    assert (v.summary if v.reply else None) == expect


def test_spf_check_that_never_finished_is_a_temporary_failure() -> None:
    assert policy.decide_eom(cfg(), ADDR, None, ()).summary == "451 4.4.3"


def test_dns_failures_never_become_a_5xx_or_the_policy_texts() -> None:
    for v in (policy.decide_rcpt(cfg(), ADDR, "example.org", PTR_TEMP),
              policy.decide_eom(cfg(), ADDR, spf("temperror"), ())):
        assert v.reply.code == "451" and v.reply.xcode == "4.4.3"
        assert "must" not in v.reply.text


# -- monitor mode -------------------------------------------------------------------------------


def test_monitor_mode_records_the_reply_without_enforcing_it() -> None:
    c = cfg(mode="monitor")
    for v in (policy.decide_rcpt(c, ADDR, "contoso.com", PASS),
              policy.decide_rcpt(c, ADDR, "example.org", NO_PTR),
              policy.decide_rcpt(c, ADDR, "example.org", PTR_TEMP),
              policy.decide_eom(c, ADDR, spf("fail"), ())):
        assert v.reply is not None and not v.enforced and not v.refuses


def test_replies_carry_no_percent_for_libmilter() -> None:
    for r in (policy.not_opted_in("x"), policy.no_reverse_dns(ADDR),
              policy.not_authenticated(ADDR), policy.dns_tempfail("x", ADDR),
              policy.INTERNAL_ERROR):
        assert "%" not in r.text and r.code[0] in "45"


# -- staged enforcement (EnforceShare) ------------------------------------------------------


def _in_bucket(pred: object) -> ipaddress.IPv6Address:
    """A client address whose /64 falls in a bucket satisfying ``pred``."""
    for n in range(10_000):
        a = ipaddress.ip_address(f"2001:db8:{n:x}::25")
        if pred(policy.share_bucket(a)):  # type: ignore[operator]
            return a
    raise AssertionError("no such network")


def _refusals(c: config.Config, addr: ipaddress.IPv6Address) -> list[policy.Verdict]:
    return [policy.decide_rcpt(c, addr, "contoso.com", PASS),
            policy.decide_rcpt(c, addr, "example.org", NO_PTR),
            policy.decide_rcpt(c, addr, "example.org", PTR_TEMP),
            policy.decide_eom(c, addr, spf("fail"), ()),
            policy.decide_eom(c, addr, spf("temperror"), ())]


def test_share_bucket_is_a_stable_digest_of_the_64() -> None:
    a = ipaddress.ip_address("2001:db8:1:2::25")
    assert 0 <= policy.share_bucket(a) < 100
    # Every address of one /64 shares its bucket; the value does not depend on
    # the process (sha256 of the packed prefix, not hash()).
    assert policy.share_bucket(ipaddress.ip_address("2001:db8:1:2:ffff::1")) == \
        policy.share_bucket(a)
    expected = int.from_bytes(hashlib.sha256(a.packed[:8]).digest()[:8], "big") % 100
    assert policy.share_bucket(a) == expected
    buckets = {policy.share_bucket(ipaddress.ip_address(f"2001:db8:{n:x}::1"))
               for n in range(2000)}
    assert len(buckets) == 100  # every bucket is reachable


def test_share_zero_handles_every_client_as_monitor_mode() -> None:
    c = cfg(enforce_share=0)
    for v in _refusals(c, ADDR):
        assert v.reply is not None and not v.enforced and not v.refuses
        assert v.mode == "monitor"
        assert "EnforceShare 0%" in v.reasons[0]
    assert policy.decide_eom(c, ADDR, spf("pass"), ()) is policy.ACCEPT


def test_share_hundred_enforces_every_client() -> None:
    for v in _refusals(cfg(enforce_share=100), ADDR):
        assert v.refuses and v.mode == "enforce"


def test_partial_share_enforces_inside_and_monitors_outside() -> None:
    inside = _in_bucket(lambda b: b < 30)
    outside = _in_bucket(lambda b: b >= 30)
    c = cfg(enforce_share=30)
    assert all(v.refuses and v.mode == "enforce" for v in _refusals(c, inside))
    assert all(not v.enforced and v.mode == "monitor" for v in _refusals(c, outside))
    # The same /64, another host: the same answer (a retry from a pool).
    sibling = ipaddress.ip_address(int(outside) + 0x1234)
    assert not policy.decide_eom(c, sibling, spf("fail"), ()).enforced
    # Raising the share only adds networks.
    for share in range(0, 101):
        if policy.enforced_for(cfg(enforce_share=share), inside):
            assert policy.enforced_for(cfg(enforce_share=min(100, share + 1)), inside)


def test_monitor_mode_wins_over_the_share() -> None:
    c = cfg(mode="monitor", enforce_share=100)
    for v in _refusals(c, ADDR):
        assert not v.enforced and v.mode == "monitor"
        assert "EnforceShare" not in v.reasons[0]


def _count(m: Metrics, stage: str, reply: str, mode: str) -> float:
    v = m.registry.get_sample_value(
        "ipv6milter_decisions_total", {"stage": stage, "reply": reply, "mode": mode})
    return v or 0.0


def test_metrics_tell_enforced_from_would_be_refusals() -> None:
    m = Metrics()
    c = cfg(enforce_share=50)
    m.loaded(c)
    inside = _in_bucket(lambda b: b < 50)
    outside = _in_bucket(lambda b: b >= 50)
    # Both label sets are exported from the start while the share is partial.
    assert m.registry.get_sample_value("ipv6milter_decisions_total", {
        "stage": "eom", "reply": "4.7.26", "mode": "monitor"}) == 0.0
    assert m.registry.get_sample_value("ipv6milter_enforce_share_percent") == 50
    m.decision("eom", policy.decide_eom(c, inside, spf("fail"), ()))
    m.decision("eom", policy.decide_eom(c, outside, spf("fail"), ()))
    m.decision("eom", policy.decide_eom(c, outside, spf("fail"), ()))
    m.decision("eom", policy.decide_eom(c, outside, spf("pass"), ()))
    assert _count(m, "eom", "4.7.26", "enforce") == 1
    assert _count(m, "eom", "4.7.26", "monitor") == 2
    assert _count(m, "eom", "accept", "enforce") == 1
    # Monitor mode: accepts are counted under it too.
    m.loaded(cfg(mode="monitor"))
    m.decision("rcpt", policy.ACCEPT)
    assert _count(m, "rcpt", "accept", "monitor") == 1
    assert m.registry.get_sample_value("ipv6milter_enforce_share_percent") == 0
