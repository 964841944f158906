"""The pymilter adapter, driven through pymilter's test context (no MTA)."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from functools import partial

import dkim
import dns.reversename
import Milter
import pytest

from ipv6milter import authresults, config, policy
from ipv6milter import engine as engine_mod
from ipv6milter.engine import Engine, Message
from ipv6milter.milter import Ipv6Milter
from ipv6milter.resolver import TempFail
from tests.dkimkeys import make_key
from tests.unit.fakedns import TEMP, FakeResolver
from tests.unit.milterctx import RecordingCtx

GOOD = "2001:db8::25"
NOPTR = "2001:db8::99"
TEMPPTR = "2001:db8::77"
AUTHSERV = "mx.example.org"


def rev(addr: str) -> str:
    return dns.reversename.from_address(addr).to_text()


def zone() -> FakeResolver:
    _, key = make_key()
    return FakeResolver({
        (rev(GOOD), "PTR"): "mail.example.com.",
        ("mail.example.com", "AAAA"): GOOD,
        (rev(TEMPPTR), "PTR"): TEMP,
        ("example.com", "TXT"): f"v=spf1 ip6:{GOOD} -all",
        ("fail.example", "TXT"): "v=spf1 -all",
        ("temp.example", "TXT"): TEMP,
        ("sel1._domainkey.example.com", "TXT"): key,
        (rev("192.0.2.10"), "PTR"): "v4.example.com.",
        ("v4.example.com", "A"): "192.0.2.10",
    })


def cfg(**kw: object) -> config.Config:
    base = config.parse("AcceptDomains example.org, .example.net\nAuthservID mx.example.org\n")
    return dataclasses.replace(base, **kw)


@pytest.fixture
def resolver() -> FakeResolver:
    return zone()


def ctx_for(c: config.Config, resolver: FakeResolver,
            opts: list[int] | None = None) -> RecordingCtx:
    engine = Engine(c, resolver, workers=2)
    return RecordingCtx(partial(Ipv6Milter, engine), opts)


def message(sender: str = "a@example.com", extra: bytes = b"", sign: bool = False,
            body: bytes = b"Hello.\r\n") -> bytes:
    msg = (extra + f"From: {sender}\r\nTo: b@example.org\r\nSubject: test\r\n".encode()
           + b"Message-ID: <1@example.com>\r\n\r\n" + body)
    if sign:
        private, _ = make_key()
        msg = dkim.sign(msg, b"sel1", b"example.com", private,
                        canonicalize=(b"simple", b"simple")) + msg
    return msg


def our_header(ctx: RecordingCtx):
    adds = [c for c in ctx.calls if c[0] == "add"]
    assert len(adds) == 1, ctx.calls
    _, field, value, idx = adds[0]
    assert (field, idx) == ("Authentication-Results", 0)
    return authresults.parse(value.strip())


def results(ctx: RecordingCtx) -> dict[str, str]:
    return {r.method: r.result for r in our_header(ctx).results}


# -- accept -----------------------------------------------------------------------


def test_clean_accept_stamps_one_header_at_the_top(resolver: FakeResolver) -> None:
    ctx = ctx_for(cfg(), resolver)
    assert ctx.connect(GOOD) == Milter.CONTINUE
    out = ctx.transaction("a@example.com", ["b@example.org"], message())
    assert out["rcpt"] == [(Milter.CONTINUE, None)]
    assert out["eom"] == Milter.CONTINUE
    hdr = our_header(ctx)
    assert hdr.authserv_id == AUTHSERV
    assert results(ctx) == {"iprev": "pass", "spf": "pass", "dkim": "none"}
    assert ctx.result_headers()[0][0] == "Authentication-Results"


def test_dkim_alone_is_enough(resolver: FakeResolver) -> None:
    ctx = ctx_for(cfg(), resolver)
    ctx.connect(GOOD)
    out = ctx.transaction("x@fail.example", ["b@example.org"], message(sign=True))
    assert out["eom"] == Milter.CONTINUE, out
    assert results(ctx) == {"iprev": "pass", "spf": "fail", "dkim": "pass"}


def test_dkim_simple_canonicalisation_with_leading_space_headers(resolver: FakeResolver) -> None:
    # With P_HDR_LEADSPC the values keep their space and folding: the message
    # is rebuilt byte for byte, so c=simple/simple verifies.
    folded = b"X-Folded: one\r\n\t two\r\n"
    ctx = ctx_for(cfg(), resolver)
    ctx.connect(GOOD)
    assert ctx._protocol & Milter.P_HDR_LEADSPC
    out = ctx.transaction("x@fail.example", ["b@example.org"], message(extra=folded, sign=True))
    assert out["eom"] == Milter.CONTINUE, out
    adds = [c for c in ctx.calls if c[0] == "add"]
    assert adds[0][2].startswith(" mx.example.org;")  # we supply the space ourselves


def test_without_leading_space_mode_relaxed_signature_still_verifies(
        resolver: FakeResolver) -> None:
    opts = list(Milter.testctx.TestCtx.default_opts)
    opts[1] &= ~Milter.P_HDR_LEADSPC
    ctx = ctx_for(cfg(), resolver, opts)
    ctx.connect(GOOD)
    assert not ctx._protocol & Milter.P_HDR_LEADSPC
    private, _ = make_key()
    msg = message()
    msg = dkim.sign(msg, b"sel1", b"example.com", private,
                    canonicalize=(b"relaxed", b"relaxed")) + msg
    out = ctx.transaction("x@fail.example", ["b@example.org"], msg)
    assert out["eom"] == Milter.CONTINUE
    assert results(ctx)["dkim"] == "pass"
    assert not ctx.calls[-1][2].startswith(" ")


# -- the replies -------------------------------------------------------------------


def test_domain_not_opted_in_gets_550_per_recipient(resolver: FakeResolver) -> None:
    ctx = ctx_for(cfg(), resolver)
    ctx.connect(GOOD)
    out = ctx.transaction("a@example.com", ["x@Contoso.COM", "b@example.org"], message())
    assert out["rcpt"][0] == (Milter.REJECT, (
        "550", "5.2.1", "Service unavailable, [contoso.com] does not accept email over IPv6."))
    assert out["rcpt"][1] == (Milter.CONTINUE, None)
    assert out["eom"] == Milter.CONTINUE


def test_550_wins_over_a_ptr_problem(resolver: FakeResolver) -> None:
    ctx = ctx_for(cfg(), resolver)
    ctx.connect(NOPTR)
    out = ctx.transaction("a@example.com", ["x@contoso.com", "b@example.org"], message())
    assert out["rcpt"][0][1][:2] == ("550", "5.2.1")
    assert out["rcpt"][1] == (Milter.TEMPFAIL, (
        "450", "4.7.25",
        "Service unavailable, sending IPv6 address [2001:db8::99] must have reverse DNS record."))


def test_ptr_temporary_failure_is_451_at_rcpt(resolver: FakeResolver) -> None:
    ctx = ctx_for(cfg(), resolver)
    ctx.connect(TEMPPTR)
    out = ctx.transaction("a@example.com", ["b@example.org"], message())
    rc, reply = out["rcpt"][0]
    assert rc == Milter.TEMPFAIL
    assert reply[:2] == ("451", "4.4.3") and "try again later" in reply[2]


def test_neither_spf_nor_dkim_is_450_4726_at_eom(resolver: FakeResolver) -> None:
    ctx = ctx_for(cfg(), resolver)
    ctx.connect(GOOD)
    out = ctx.transaction("x@fail.example", ["b@example.org"], message())
    assert out["eom"] == Milter.TEMPFAIL
    assert out["eom_reply"] == (
        "450", "4.7.26", "Service unavailable, message sent over IPv6 [2001:db8::25] must pass "
        "either SPF or DKIM validation.")
    assert not [c for c in ctx.calls if c[0] == "add"]


def test_spf_temperror_is_451_at_eom(resolver: FakeResolver) -> None:
    ctx = ctx_for(cfg(), resolver)
    ctx.connect(GOOD)
    out = ctx.transaction("x@temp.example", ["b@example.org"], message())
    assert out["eom"] == Milter.TEMPFAIL
    assert out["eom_reply"][:2] == ("451", "4.4.3")


def test_reply_address_is_rfc5952_canonical(resolver: FakeResolver) -> None:
    ctx = ctx_for(cfg(), resolver)
    ctx.connect("2001:0DB8:0:0:0:0:0:0099")
    out = ctx.transaction("a@example.com", ["b@example.org"], message())
    assert "[2001:db8::99]" in out["rcpt"][0][1][2]


# -- monitor mode ---------------------------------------------------------------------


def test_monitor_mode_never_refuses_and_logs_the_would_be_reply(
        resolver: FakeResolver, caplog: pytest.LogCaptureFixture) -> None:
    ctx = ctx_for(cfg(mode="monitor"), resolver)
    ctx.connect(NOPTR)
    with caplog.at_level(logging.INFO, logger="ipv6milter"):
        out = ctx.transaction("x@fail.example", ["x@contoso.com", "b@example.org"], message())
    assert [rc for rc, _ in out["rcpt"]] == [Milter.CONTINUE, Milter.CONTINUE]
    assert out["eom"] == Milter.CONTINUE
    assert results(ctx) == {"iprev": "permerror", "spf": "fail", "dkim": "none"}
    text = caplog.text
    assert 'would_reply="550 5.2.1"' in text
    assert 'would_reply="450 4.7.25"' in text
    # Enforce mode would have taken no recipient: no end-of-message verdict.
    assert "4.7.26" not in text

    ctx.connect(GOOD)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ipv6milter"):
        out = ctx.transaction("x@fail.example", ["b@example.org"], message())
    assert out["eom"] == Milter.CONTINUE
    assert 'stage=eom' in caplog.text and 'would_reply="450 4.7.26"' in caplog.text


# -- out of scope -----------------------------------------------------------------------


FORGED = (b"Authentication-Results: MX.Example.ORG; spf=pass smtp.mailfrom=x@example.com\r\n"
          b"Authentication-Results: other.example; spf=fail\r\n")


@pytest.mark.parametrize("ip", ["192.0.2.10", "::ffff:192.0.2.10"])
def test_ipv4_and_mapped_clients_untouched_but_forgeries_removed(
        resolver: FakeResolver, ip: str) -> None:
    ctx = ctx_for(cfg(), resolver)
    ctx.connect(ip)
    out = ctx.transaction("x@fail.example", ["x@contoso.com"], message(extra=FORGED))
    assert out["rcpt"] == [(Milter.CONTINUE, None)]
    assert out["eom"] == Milter.CONTINUE
    assert not [c for c in ctx.calls if c[0] == "add"]
    assert [c for c in ctx.calls if c[0] == "chg"] == [
        ("chg", "Authentication-Results", 1, "")]
    assert resolver.asked == []  # no DNS work for out-of-scope mail


def test_trusted_client_keeps_its_authentication_results(resolver: FakeResolver) -> None:
    ctx = ctx_for(cfg(), resolver)
    ctx.connect("::1")
    out = ctx.transaction("x@fail.example", ["x@contoso.com"], message(extra=FORGED))
    assert out["rcpt"] == [(Milter.CONTINUE, None)] and out["eom"] == Milter.CONTINUE
    assert ctx.calls == []


def test_authenticated_client_is_exempt(resolver: FakeResolver) -> None:
    ctx = ctx_for(cfg(), resolver)
    ctx.connect(NOPTR)
    ctx.macro("{auth_authen}", "alice")
    out = ctx.transaction("x@fail.example", ["x@contoso.com"], message())
    assert out["rcpt"] == [(Milter.CONTINUE, None)] and out["eom"] == Milter.CONTINUE
    assert not [c for c in ctx.calls if c[0] == "add"]


def test_authenticated_client_judged_when_skip_authenticated_is_off(
        resolver: FakeResolver) -> None:
    ctx = ctx_for(cfg(skip_authenticated=False), resolver)
    ctx.connect(NOPTR)
    ctx.macro("{auth_authen}", "alice")
    out = ctx.transaction("x@fail.example", ["x@contoso.com"], message())
    assert out["rcpt"][0][0] == Milter.REJECT


def test_local_submission_is_out_of_scope(resolver: FakeResolver) -> None:
    ctx = ctx_for(cfg(), resolver)
    ctx.connect(None)
    out = ctx.transaction("x@fail.example", ["x@contoso.com"], message())
    assert out["eom"] == Milter.CONTINUE and resolver.asked == []


def test_stamp_all_stamps_ipv4_mail_without_refusing(resolver: FakeResolver) -> None:
    ctx = ctx_for(cfg(stamp_all=True), resolver)
    ctx.connect("192.0.2.10")
    out = ctx.transaction("x@fail.example", ["x@contoso.com"], message())
    assert out["eom"] == Milter.CONTINUE
    assert results(ctx) == {"iprev": "pass", "spf": "fail", "dkim": "none"}
    assert str(our_header(ctx).results[0].policy_iprev) == "192.0.2.10"


# -- forged headers ---------------------------------------------------------------------


def test_forged_headers_removed_by_index_highest_first_on_both_mtas(
        resolver: FakeResolver) -> None:
    extra = (b"Authentication-Results: mx.example.org; dkim=pass\r\n"
             b"Authentication-Results: other.example; spf=pass\r\n"
             b"Authentication-Results: MX.EXAMPLE.ORG;\r\n\tspf=pass smtp.mailfrom=a@b.c\r\n"
             b"authentication-results: (comment) mx.example.org ; iprev=pass\r\n"
             b"Authentication-Results: mx.example.org (((unparseable\r\n")
    ctx = ctx_for(cfg(), resolver)
    ctx.connect(GOOD)
    out = ctx.transaction("a@example.com", ["b@example.org"], message(extra=extra))
    assert out["eom"] == Milter.CONTINUE
    chg = [c[2] for c in ctx.calls if c[0] == "chg"]
    assert chg == [5, 4, 3, 1]
    for renumber in (True, False):
        hdrs = ctx.result_headers(renumber=renumber)
        ars = [v for n, v in hdrs if n.lower() == "authentication-results"]
        assert len(ars) == 2, (renumber, ars)
        assert ars[0].strip().startswith("mx.example.org;")  # ours, on top
        assert ars[1].strip() == "other.example; spf=pass"


# -- the transaction life cycle -------------------------------------------------------------


def test_several_messages_on_one_connection_are_judged_each_on_their_own(
        resolver: FakeResolver) -> None:
    ctx = ctx_for(cfg(), resolver)
    ctx.connect(GOOD)
    first = ctx.transaction("x@fail.example", ["b@example.org"], message())
    assert first["eom"] == Milter.TEMPFAIL
    second = ctx.transaction("a@example.com", ["c@sub.example.net"], message())
    assert second["eom"] == Milter.CONTINUE
    assert results(ctx)["spf"] == "pass"
    ctx._abort()


def test_second_connect_after_xclient_is_what_counts(resolver: FakeResolver) -> None:
    ctx = ctx_for(cfg(), resolver)
    ctx.connect("127.0.0.1")  # the real peer: trusted
    ctx.connect(NOPTR)  # then XCLIENT's address
    out = ctx.transaction("a@example.com", ["b@example.org"], message())
    assert out["rcpt"][0][1][:2] == ("450", "4.7.25")


def test_postmaster_without_domain_is_never_refused(resolver: FakeResolver) -> None:
    ctx = ctx_for(cfg(), resolver)
    ctx.connect(NOPTR)
    out = ctx.transaction("x@fail.example", ["postmaster"], message())
    assert out["rcpt"] == [(Milter.CONTINUE, None)]
    assert out["eom"] == Milter.CONTINUE  # no opted-in recipient: no 4.7.26


def test_oversized_message_is_judged_without_dkim(resolver: FakeResolver) -> None:
    c = cfg(max_message_size=2048)
    ctx = ctx_for(c, resolver)
    ctx.connect(GOOD)
    msg = message(sign=True, body=b"x" * 5000 + b"\r\n")
    out = ctx.transaction("x@fail.example", ["b@example.org"], msg, chunk=1000)
    assert out["eom"] == Milter.TEMPFAIL
    assert out["eom_reply"][:2] == ("450", "4.7.26")
    assert ctx._priv.msg.chunks == []  # nothing past the limit was kept


def test_internal_error_tempfails_that_message_and_the_milter_goes_on(
        resolver: FakeResolver, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    ctx = ctx_for(cfg(), resolver)
    ctx.connect(GOOD)
    engine = ctx._priv.engine

    def broken(message: bytes, trace: object = None) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(engine, "dkim", broken)
    with caplog.at_level(logging.ERROR):
        out = ctx.transaction("a@example.com", ["b@example.org"], message(sign=True))
    assert out["eom"] == Milter.TEMPFAIL
    assert out["eom_reply"][:2] == ("451", "4.3.0")
    assert caplog.text.count("Traceback") == 1
    monkeypatch.undo()
    out = ctx.transaction("a@example.com", ["b@example.org"], message())
    assert out["eom"] == Milter.CONTINUE


def test_decision_log_line(resolver: FakeResolver, caplog: pytest.LogCaptureFixture) -> None:
    ctx = ctx_for(cfg(), resolver)
    ctx.connect(GOOD)
    ctx.macro("i", "4ABCDEF")
    with caplog.at_level(logging.INFO, logger="ipv6milter"):
        ctx.transaction("x@fail.example", ["b@example.org"], message())
    line = next(r.getMessage() for r in caplog.records if "stage=eom" in r.getMessage())
    for part in ("client=2001:db8::25", "qid=4ABCDEF", "iprev=pass", "spf=fail", "dkim=none",
                 'reply="450 4.7.26"', "mode=enforce", "helo=mail.example.com",
                 "from_domain=fail.example", "rcpt_domain=example.org", "elapsed_ms="):
        assert part in line, line


@pytest.mark.parametrize(("share", "mode"), [(0, "monitor"), (100, "enforce")])
def test_an_accepted_message_logs_how_its_client_is_handled(
        resolver: FakeResolver, caplog: pytest.LogCaptureFixture, share: int, mode: str) -> None:
    ctx = ctx_for(cfg(enforce_share=share), resolver)
    ctx.connect(GOOD)
    with caplog.at_level(logging.INFO, logger="ipv6milter"):
        ctx.transaction("a@example.com", ["b@example.org"], message())
    line = next(r.getMessage() for r in caplog.records if "stage=eom" in r.getMessage())
    assert "reply=accept" in line and "would_reply" not in line, line
    assert f"mode={mode} " in line, line


def test_header_callback_needs_no_reply_and_a_failure_there_tempfails_at_eom(
        resolver: FakeResolver, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    ctx = ctx_for(cfg(), resolver)
    ctx.connect(GOOD)
    assert ctx._protocol & Milter.P_NR_HDR  # negotiated: the MTA does not wait
    real = Message.header
    calls = []

    def broken(self: Message, name: str, value: bytes) -> None:  # the first field fails
        calls.append(name)
        if len(calls) == 1:
            raise RuntimeError("boom")
        real(self, name, value)

    monkeypatch.setattr(Message, "header", broken)
    with caplog.at_level(logging.ERROR):
        out = ctx.transaction("a@example.com", ["b@example.org"], message())
    assert out["eom"] == Milter.TEMPFAIL
    assert out["eom_reply"][:2] == ("451", "4.3.0")
    assert not [c for c in ctx.calls if c[0] == "add"]
    monkeypatch.undo()
    assert ctx.transaction("a@example.com", ["b@example.org"], message())["eom"] == Milter.CONTINUE


def test_connect_and_mail_from_need_no_reply_failures_tempfail_at_rcpt(
        resolver: FakeResolver, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    c = cfg()
    ctx = ctx_for(c, resolver)
    ctx._negotiate()
    assert ctx._protocol & Milter.P_NR_CONN and ctx._protocol & Milter.P_NR_MAIL
    m = ctx._priv

    def broken(*args: object) -> None:
        raise RuntimeError("boom")

    # A failing MAIL FROM: that transaction's RCPT tempfails; the next is fine.
    ctx.connect(GOOD)
    monkeypatch.setattr(m.engine.metrics.transactions, "labels", broken)
    with caplog.at_level(logging.ERROR):
        out = ctx.transaction("a@example.com", ["b@example.org"], message())
    assert out["mail"] == Milter.CONTINUE
    assert out["rcpt"] == [(Milter.TEMPFAIL, ("451", "4.3.0", policy.INTERNAL_ERROR.text))]
    monkeypatch.undo()
    assert ctx.transaction("a@example.com", ["b@example.org"], message())["eom"] == (
        Milter.CONTINUE)

    # A failing connect: every transaction of the connection tempfails.
    monkeypatch.setattr(policy, "classify", broken)
    ctx.connect(GOOD)
    monkeypatch.undo()
    out = ctx.transaction("a@example.com", ["b@example.org"], message())
    assert out["rcpt"][0][1][:2] == ("451", "4.3.0")
    assert caplog.text.count("Traceback") == 2


def test_accepted_recipients_are_logged_at_debug_only(
        resolver: FakeResolver, caplog: pytest.LogCaptureFixture) -> None:
    ctx = ctx_for(cfg(), resolver)
    ctx.connect(GOOD)
    with caplog.at_level(logging.INFO, logger="ipv6milter"):
        ctx.transaction("a@example.com", ["b@example.org", "x@contoso.com"], message())
    stages = [r.getMessage().split()[1] for r in caplog.records if "decision" in r.getMessage()]
    assert stages == ["stage=rcpt", "stage=eom"]  # the refusal, then the message
    assert 'reply="550 5.2.1"' in caplog.records[0].getMessage()


def test_max_message_size_counts_the_message_bytes(resolver: FakeResolver) -> None:
    # No charge per field on top of its bytes: a message under the limit is
    # verified, whatever its number of fields (issue 11: 573 bytes were
    # counted as more than 1024).
    small = message(sign=True)
    assert len(small) < 1024 - 100
    c = cfg(max_message_size=1024)
    ctx = ctx_for(c, resolver)
    ctx.connect(GOOD)
    out = ctx.transaction("x@fail.example", ["b@example.org"], small)
    assert out["eom"] == Milter.CONTINUE, out
    assert results(ctx)["dkim"] == "pass"
    assert ctx._priv.msg.size == len(small)  # the message's bytes, exactly


def test_message_bytes_are_counted_alike_without_leading_space_mode(
        resolver: FakeResolver) -> None:
    # Without P_HDR_LEADSPC the MTA strips the space and folds with bare LF:
    # still the message's own bytes, as it is rebuilt for DKIM.
    opts = list(Milter.testctx.TestCtx.default_opts)
    opts[1] &= ~Milter.P_HDR_LEADSPC
    ctx = ctx_for(cfg(), resolver, opts)
    ctx.connect(GOOD)
    msg = message(extra=b"X-Folded: one\r\n\ttwo\r\n\tthree\r\n")
    ctx.transaction("a@example.com", ["b@example.org"], msg)
    assert ctx._priv.msg.size == len(msg)


def test_past_max_header_fields_only_signatures_are_kept(
        resolver: FakeResolver, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_mod, "MAX_HEADER_FIELDS", 50)
    ctx = ctx_for(cfg(), resolver)
    ctx.connect(GOOD)
    extra = b"".join(b"X-N: %d\r\n" % i for i in range(400))
    out = ctx.transaction("x@fail.example", ["b@example.org"], message(extra=extra, sign=True))
    m = ctx._priv.msg
    assert m.too_big == "more than 50 header fields"
    assert m.headers == [] and m.chunks == []
    assert len(m.signatures()) == 1
    assert out["eom_reply"][:2] == ("450", "4.7.26")  # judged without DKIM


def test_too_many_fields_is_permerror_and_too_large_is_neutral(resolver: FakeResolver) -> None:
    """The two ways past the limits are reported differently: too many fields
    is the signature's own fault (as check_dkim says), size is only ours."""
    e = Engine(cfg(), resolver)
    sig = b"v=1; a=rsa-sha256; d=example.com; s=sel1; h=from; bh=x; b=y"
    many = engine_mod.Message(1 << 20, 5, "mx.example.org")
    for i in range(engine_mod.MAX_HEADER_FIELDS):
        many.header("X-N", b" %d" % i)
    many.header("DKIM-Signature", b" " + sig)
    big = engine_mod.Message(100, 5, "mx.example.org")
    big.header("DKIM-Signature", b" " + sig)
    big.body(b"x" * 200)
    budget = e.budget()
    assert [r.result for r in e.dkim_of(many, budget)] == ["permerror"]
    assert [r.result for r in e.dkim_of(big, budget)] == ["neutral"]


def test_past_max_message_size_at_most_max_signatures_and_no_ids_are_kept(
        resolver: FakeResolver) -> None:
    ctx = ctx_for(cfg(max_message_size=4096, max_signatures=3), resolver)
    ctx.connect(GOOD)
    sig = b"DKIM-Signature: v=1; a=rsa-sha256; d=example.com; s=sel1; h=from; bh=x; b=y\r\n"
    other = b"Authentication-Results: other.example; spf=pass\r\n"
    ours = b"Authentication-Results: mx.example.org; spf=pass\r\n"
    filler = b"X-Filler: " + b"f" * 200 + b"\r\n"
    extra = filler * 30 + (sig + other) * 500 + ours + other * 100 + ours
    out = ctx.transaction("a@example.com", ["b@example.org"], message(extra=extra))
    assert out["eom"] == Milter.CONTINUE
    m = ctx._priv.msg
    assert m.too_big and m.headers == []
    assert len(m.signatures()) == 3
    assert m.ar_count == 602 and len(m._ours) == 2  # a count and our indexes only
    chg = [c[2] for c in ctx.calls if c[0] == "chg"]
    assert chg == [602, 501]


# -- one connection never harms another (engine.Session) ----------------------------------


class SlowResolver(FakeResolver):
    """A zone whose names in ``slow`` answer only after that many seconds
    (or when ``release`` is set), bounded by the check's budget, as a real
    resolver bounded by the lifetime it is given."""

    def __init__(self, zone: dict, slow: dict[str, float]):
        super().__init__(zone)
        self.slow = slow
        self.release = threading.Event()
        self.lock = threading.Lock()

    def query(self, name, rdtype, budget):  # type: ignore[override]
        n = str(name).lower().rstrip(".")
        delay = next((d for suffix, d in self.slow.items() if n.endswith(suffix)), 0.0)
        if delay and budget.remaining() > 0:
            with self.lock:
                self.asked.append((n, rdtype))
            self.release.wait(min(delay, budget.remaining()))
            if budget.remaining() <= 0:
                raise TempFail(f"{n} {rdtype}: timeout")
            with self.lock:
                self.asked.pop()
        with self.lock:
            return super().query(name, rdtype, budget)


def slow_zone(slow: dict[str, float]) -> SlowResolver:
    base = zone()
    r = SlowResolver({}, slow)
    r.zone = dict(base.zone)
    for i in range(3):
        r.add(f"inc{i}.slow.example", "TXT", "v=spf1 ?all")
    r.add("slow.example", "TXT",
          "v=spf1 " + " ".join(f"include:inc{i}.slow.example" for i in range(3)) + " -all")
    return r


def wait_for(cond, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.005)
    return cond()


def test_rset_cancels_the_running_spf_check_at_its_next_lookup() -> None:
    r = slow_zone({"slow.example": 30.0})
    ctx = ctx_for(cfg(), r)
    ctx.connect(GOOD)
    m = ctx._priv
    ctx._envfrom("<a@slow.example>")
    assert wait_for(lambda: ("slow.example", "TXT") in r.asked)
    chk = m.spf_chk
    m.abort()  # RSET
    ctx._envfrom("<a@example.com>")  # another sender: the parked check is cancelled
    assert chk.cancelled
    r.release.set()  # the lookup in flight comes back; nothing more is asked
    assert wait_for(lambda: chk.future.done())
    assert chk.future.result().result == "temperror"
    assert not [q for q in r.asked if q[0].startswith("inc")]
    assert wait_for(lambda: m.session.pooled == 0)


def test_a_mail_from_rset_flood_holds_at_most_max_pooled_checks() -> None:
    r = slow_zone({"slow.example": 30.0})
    eng = Engine(cfg(), r, workers=16)
    ctx = RecordingCtx(partial(Ipv6Milter, eng))
    ctx.connect(GOOD)
    m = ctx._priv
    for i in range(50):
        ctx._envfrom(f"<a{i}@x{i}.slow.example>")
        assert m.session.pooled <= engine_mod.MAX_POOLED
        m.abort()  # RSET
    # The pool threads busy for this connection, at most the cap: the first
    # checks are cancelled and the ones over the cap never ran.
    started = [q for q in r.asked if q[0].endswith("slow.example")]
    assert len(started) <= engine_mod.MAX_POOLED
    r.release.set()
    assert wait_for(lambda: m.session.pooled == 0)
    ctx._close()
    eng.shutdown()


def test_the_same_mail_from_after_rset_reuses_the_spf_check() -> None:
    r = slow_zone({"slow.example": 0.2})
    ctx = ctx_for(cfg(), r)
    ctx.connect(GOOD)
    m = ctx._priv
    ctx._envfrom("<a@slow.example>")
    first = m.spf_chk
    m.abort()  # RSET
    ctx._envfrom("<a@slow.example>")
    assert m.spf_chk is first and not first.cancelled
    m.abort()  # RSET
    ctx._envfrom("<b@slow.example>")  # another identity: a check of its own
    assert m.spf_chk is not first and first.cancelled


def test_a_finished_check_is_reused_unless_its_answer_is_stale(resolver: FakeResolver) -> None:
    session = Engine(cfg(), resolver).session()
    answers = iter(["temperror", "pass"])
    first = session.start(lambda budget: next(answers), key="q")
    assert session.wait(first, "") == "temperror"
    # A temporary error is asked again; a good answer to the same question is kept.
    second = session.reuse_or_start(first, lambda budget: next(answers), "q",
                                    stale=lambda r: r == "temperror")
    assert second is not first and session.wait(second, "") == "pass"
    assert session.reuse_or_start(second, lambda budget: "unused", "q",
                                  stale=lambda r: r == "temperror") is second
    third = session.reuse_or_start(second, lambda budget: "other", "other question",
                                   stale=lambda r: False)
    assert third is not second and second.cancelled


def test_queued_work_of_one_client_never_delays_another_clients_check() -> None:
    """One pool thread, held by a check of another client for longer than
    StageTimeout: the next client's PTR check, queued behind it, is run by
    the RCPT that waits for it instead of timing out into 451 4.4.3."""
    r = slow_zone({"slow.example": 30.0})
    eng = Engine(cfg(stage_timeout=1.0, dns_timeout=1.0), r, workers=1)
    hog = eng.session()
    hog.start(lambda budget: r.query("slow.example", "TXT", engine_mod.Budget(30)))
    assert wait_for(lambda: ("slow.example", "TXT") in r.asked)
    ctx = RecordingCtx(partial(Ipv6Milter, eng))
    ctx.connect(GOOD)
    start = time.monotonic()
    out = ctx.transaction("a@example.com", ["b@example.org"], message())
    elapsed = time.monotonic() - start
    assert out["rcpt"] == [(Milter.CONTINUE, None)], out
    assert out["eom"] == Milter.CONTINUE, out
    assert results(ctx) == {"iprev": "pass", "spf": "pass", "dkim": "none"}
    assert elapsed < 1.0  # not StageTimeout + grace behind the hog
    r.release.set()
    eng.shutdown()


def test_end_of_message_waits_for_spf_and_dkim_within_one_stage_timeout() -> None:
    """SPF that runs out its budget and a slow DKIM key: together they end
    within one StageTimeout (they used to add up)."""
    r = slow_zone({"slow.example": 10.0, "_domainkey.example.com": 1.6})
    ctx = ctx_for(cfg(stage_timeout=2.0, dns_timeout=2.0), r)
    ctx.connect(GOOD)
    ctx._envfrom("<a@slow.example>")
    start = time.monotonic()
    rest = ctx.transaction("a@slow.example", ["b@example.org"], message(sign=True))
    elapsed = time.monotonic() - start
    assert rest["eom"] == Milter.CONTINUE, rest  # DKIM passed in time
    assert results(ctx)["dkim"] == "pass" and results(ctx)["spf"] == "temperror"
    assert elapsed < 2.0 + 0.7, elapsed  # 1.6 + 2.0 before


def test_recipient_without_domain_is_judged_like_an_opted_in_one(resolver: FakeResolver) -> None:
    ctx = ctx_for(cfg(), resolver)
    ctx.connect(NOPTR)
    out = ctx.transaction("a@example.com", ["root", "@relay.example:root"], message())
    assert [rc for rc, _ in out["rcpt"]] == [Milter.TEMPFAIL, Milter.TEMPFAIL]
    assert out["rcpt"][0][1][:2] == ("450", "4.7.25")  # never the 550
    ctx.connect(GOOD)
    out = ctx.transaction("x@fail.example", ["root"], message())
    assert out["rcpt"] == [(Milter.CONTINUE, None)]
    assert out["eom_reply"][:2] == ("450", "4.7.26")  # and SPF or DKIM at end of message
    ctx.connect(NOPTR)
    out = ctx.transaction("x@fail.example", ["PostMaster", "root"], message())
    assert out["rcpt"][0] == (Milter.CONTINUE, None)
    assert out["eom"] == Milter.CONTINUE  # postmaster alone: no policy at end of message


# -- SMTP arguments past RFC 5321's bounds (limits.py, SMTP section) ------------------------


def test_an_over_long_helo_is_not_a_domain_name(
        resolver: FakeResolver, caplog: pytest.LogCaptureFixture) -> None:
    ctx = ctx_for(cfg(), resolver)
    ctx.connect(GOOD, helo="mail." + "a" * 300 + ".example.com")
    with caplog.at_level(logging.INFO, logger="ipv6milter"):
        out = ctx.transaction("", ["b@example.org"], message(sign=True))
    assert out["eom"] == Milter.CONTINUE, out  # DKIM passes
    assert results(ctx)["spf"] == "none"  # the null sender: HELO identity, not a domain
    assert not [q for q in resolver.asked if q[1] == "TXT" and "aaaa" in q[0]]
    assert 'helo="[too long]"' in caplog.text


@pytest.mark.parametrize("local", [300, 60_000])
def test_an_over_long_mail_from_is_spf_none_without_a_lookup(
        resolver: FakeResolver, local: int) -> None:
    ctx = ctx_for(cfg(), resolver)
    ctx.connect(GOOD)
    out = ctx.transaction("a" * local + "@example.com", ["b@example.org"], message(sign=True))
    assert out["eom"] == Milter.CONTINUE, out
    assert results(ctx) == {"iprev": "pass", "spf": "none", "dkim": "pass"}
    assert ("example.com", "TXT") not in resolver.asked


def test_a_mail_from_at_the_bound_is_checked() -> None:
    from ipv6milter import limits
    from ipv6milter.milter import sender_too_long

    at_bound = "<" + "a" * (limits.SMTP_PATH - 14) + "@example.com>"
    assert len(at_bound) == limits.SMTP_PATH
    assert sender_too_long(at_bound) is None
    assert sender_too_long(at_bound[:-1] + "m>") is not None


@pytest.mark.parametrize(("rcpt", "reads_as"), [
    ("<b@example.org>", "<b@example.org>"),
    ("<" + "a" * 300 + "@example.org>", "<" + "a" * 64 + "@example.org>"),
    ("<b@" + "x." * 3000 + "example.net>", "<b@" + ("x." * 3000 + "example.net")[-255:] + ">"),
    ("<b@" + "y" * 3000 + ".example.org>", "<b@" + "y" * 243 + ".example.org>"),
    ("<" + "r" * 3000 + ">", "<" + "r" * 64 + ">"),
])
def test_a_recipient_is_read_within_the_bounds(rcpt: str, reads_as: str) -> None:
    from ipv6milter.milter import bounded_recipient

    assert bounded_recipient(rcpt) == reads_as
    assert len(bounded_recipient(rcpt)) <= 256 + 64


def test_over_long_recipients_keep_their_defined_replies(resolver: FakeResolver) -> None:
    ctx = ctx_for(cfg(), resolver)
    ctx.connect(GOOD)
    out = ctx.transaction("a@example.com", [
        "a" * 300 + "@example.org",  # a long local part: judged by its domain
        "b@" + "x." * 3000 + "example.net",  # under .example.net: judged
        "b@" + "y" * 3000 + ".example.org",  # example.org is exact: never this domain
    ], message())
    assert [rc for rc, _ in out["rcpt"]] == [Milter.CONTINUE, Milter.CONTINUE, Milter.REJECT]
    assert out["rcpt"][2][1][:2] == ("550", "5.2.1"), out["rcpt"][2]
    assert out["eom"] == Milter.CONTINUE


class _ThreadRecorder(FakeResolver):
    """Records which thread asks each question; ``cache`` says what counts as cached."""

    def __init__(self, cache: set[tuple[str, str]]):
        super().__init__(zone().zone)
        self.cache = cache
        self.threads: dict[tuple[str, str], str] = {}

    def cached(self, name: str, rdtype: str) -> bool:
        return (name.lower().rstrip("."), rdtype) in self.cache

    def query(self, name: object, rdtype: str, budget: object) -> list[object]:
        self.threads[(str(name).lower().rstrip("."), rdtype)] = threading.current_thread().name
        return super().query(name, rdtype, budget)  # type: ignore[arg-type]


@pytest.mark.parametrize("cached", [True, False])
def test_checks_whose_first_answer_is_cached_run_in_the_connection_thread(cached: bool) -> None:
    """A check with nothing to wait for costs less where it is waited for
    than handed to a pool thread and back; one that may wait on DNS starts
    in the pool at once (its wait hides behind the SMTP dialogue)."""
    first = {(rev(GOOD).lower().rstrip("."), "PTR"), ("example.com", "TXT")}
    r = _ThreadRecorder(first if cached else set())
    eng = Engine(cfg(), r, workers=2)
    ctx = RecordingCtx(partial(Ipv6Milter, eng))
    ctx.connect(GOOD)
    m = ctx._priv
    assert (m.iprev_chk.future is None) is cached
    ctx._envfrom("<a@example.com>")
    assert (m.spf_chk.future is None) is cached
    m.abort()  # RSET: the same MAIL FROM next reuses the check
    out = ctx.transaction("a@example.com", ["b@example.org"], message())
    assert out["eom"] == Milter.CONTINUE
    assert results(ctx) == {"iprev": "pass", "spf": "pass", "dkim": "none"}
    if cached:
        here = threading.current_thread().name
        assert all(r.threads[question] == here for question in first), r.threads
    eng.shutdown()
