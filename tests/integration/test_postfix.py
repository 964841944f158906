"""Acceptance: ipv6milter behind a real Postfix, with a real DNS server,
judged by what the SMTP client sees and by what is delivered (SPEC §1, §2).

IPv6 clients are claimed with XCLIENT; every reply text is compared byte
for byte with the SPEC's.
"""

from __future__ import annotations

import re
import time

import dkim
import pytest

from .harness import (
    AUTHSERV_ID,
    ED25519_SELECTOR,
    NOT_OPTED_IN,
    UNSERVED,
    DnsWorld,
    MilterProcess,
    PostfixInstance,
    Sink,
    ed25519_key,
    wait_until,
)
from .replies import TEMPFAIL_DNS, no_ptr, not_authenticated, not_opted_in
from .smtpclient import (
    Outcome,
    Session,
    auth_results,
    by_method,
    header_fields,
    make_message,
    marker,
    parse_ar,
    transaction,
    unfold,
)

pytestmark = pytest.mark.timeout(60)





def send(
    postfix: PostfixInstance,
    *,
    addr: str | None,
    mail_from: str,
    rcpts: list[str],
    message: bytes,
    service: str = "main",
    **kw: str,
) -> Outcome:
    return transaction(
        postfix.port(service), addr=addr, mail_from=mail_from, rcpts=rcpts, message=message, **kw
    )


def delivered_ours(sink: Sink, mark: str) -> tuple[bytes, list]:
    """The delivered message, checked to start with our header; and its results."""
    raw = sink.wait_for(mark).data
    first_line = raw.split(b"\r\n", 1)[0]
    assert first_line.startswith(f"Authentication-Results: {AUTHSERV_ID};".encode()), raw[:400]
    fields = header_fields(raw)
    assert fields[0][0] == "Authentication-Results"
    ours = [v for v in auth_results(raw) if v.lower().startswith(AUTHSERV_ID + ";")]
    assert len(ours) == 1, ours
    header = parse_ar(fields[0][1])
    assert header.authserv_id == AUTHSERV_ID
    return raw, header


def assert_not_stamped(raw: bytes) -> None:
    fields = header_fields(raw)
    assert fields[0][0] == "Received", fields[0]
    assert not [v for v in auth_results(raw) if v.lower().startswith(AUTHSERV_ID + ";")]


# -- RCPT TO ----------------------------------------------------------------------------


def test_recipient_domain_not_opted_in_gets_550(postfix: PostfixInstance, dns: DnsWorld) -> None:
    mark = marker()
    out = send(
        postfix,
        addr=dns.good_ip,
        name="mail.example.com",
        mail_from="sender@example.com",
        rcpts=[f"Someone@{NOT_OPTED_IN.upper()}"],
        message=make_message(mark, from_addr="sender@example.com", to=f"someone@{NOT_OPTED_IN}"),
    )
    assert str(out.rcpt) == not_opted_in(NOT_OPTED_IN)
    assert out.data is None


def test_no_ptr_gets_450_4_7_25_with_the_canonical_address(
    postfix: PostfixInstance, dns: DnsWorld
) -> None:
    mark = marker()
    out = send(
        postfix,
        addr="2001:DB8:0:0:0:0:0:DEAD",  # RFC 5952 form in the reply: 2001:db8::dead
        mail_from="sender@example.com",
        rcpts=["someone@example.com"],
        message=make_message(mark, from_addr="sender@example.com", to="someone@example.com"),
    )
    assert dns.noptr_ip == "2001:db8::dead"
    assert str(out.rcpt) == no_ptr("2001:db8::dead")
    assert out.data is None


def test_each_recipient_is_judged_on_its_own(
    postfix: PostfixInstance, dns: DnsWorld, sink: Sink
) -> None:
    """No PTR: 550 for the domain not opted in (it wins over the PTR problem),
    450 4.7.25 for the opted-in one.  With a PTR: 550 and 250 in one
    transaction, and the message goes to the accepted recipient only."""
    mark = marker()
    msg = make_message(mark, from_addr="sender@example.com", to="someone@example.com")
    rcpts = [f"a@{NOT_OPTED_IN}", "b@example.com", "c@Example.NET"]
    out = send(postfix, addr=dns.noptr_ip, mail_from="sender@example.com", rcpts=rcpts, message=msg)
    assert [str(r) for r in out.rcpts] == [
        not_opted_in(NOT_OPTED_IN),
        no_ptr(dns.noptr_ip),
        no_ptr(dns.noptr_ip),
    ]
    assert out.data is None

    out = send(postfix, addr=dns.good_ip, mail_from="sender@example.com", rcpts=rcpts, message=msg)
    assert [r.code for r in out.rcpts] == [550, 250, 250], out.rcpts
    assert str(out.rcpts[0]) == not_opted_in(NOT_OPTED_IN)
    assert out.data is not None and out.data.code == 250, out
    got = sink.wait_for(mark)
    assert got.rcpts == ("b@example.com", "c@Example.NET")
    delivered_ours(sink, mark)


# -- end of message -----------------------------------------------------------------------


def test_spf_fail_without_dkim_gets_450_4_7_26(postfix: PostfixInstance, dns: DnsWorld) -> None:
    mark = marker()
    out = send(
        postfix,
        addr=dns.good_ip,
        name="mail.example.com",
        mail_from="someone@spffail.test",
        rcpts=["rcpt@example.com"],
        message=make_message(mark, from_addr="someone@spffail.test", to="rcpt@example.com"),
    )
    assert out.rcpt.code == 250, out
    assert out.data is not None
    assert str(out.data) == not_authenticated(dns.good_ip)


def test_spf_fail_with_a_broken_signature_gets_450_4_7_26(
    postfix: PostfixInstance, dns: DnsWorld
) -> None:
    mark = marker()
    msg = make_message(mark, from_addr="someone@spffail.test", to="rcpt@example.com")
    signed = dns.sign(msg, "spffail.test")
    tampered = signed.replace(b"This is a test message.", b"This is a forged message.")
    assert tampered != signed
    out = send(
        postfix,
        addr=dns.good_ip,
        mail_from="someone@spffail.test",
        rcpts=["rcpt@example.com"],
        message=tampered,
    )
    assert out.data is not None
    assert str(out.data) == not_authenticated(dns.good_ip)


def test_accepted_by_spf_pass_is_stamped_first(
    postfix: PostfixInstance, dns: DnsWorld, sink: Sink
) -> None:
    mark = marker()
    out = send(
        postfix,
        addr=dns.good_ip,
        name="mail.example.com",
        mail_from="sender@example.com",
        rcpts=["rcpt@example.com"],
        message=make_message(mark, from_addr="sender@example.com", to="rcpt@example.com"),
    )
    assert out.rcpt.code == 250 and out.data is not None and out.data.code == 250, out
    raw, header = delivered_ours(sink, mark)
    assert header_fields(raw)[1][0] == "Received"  # ours above Postfix's own
    (iprev,) = by_method(header, "iprev")
    assert iprev.result == "pass"
    assert iprev.props == {"policy.iprev": dns.good_ip}
    (spf,) = by_method(header, "spf")
    assert spf.result == "pass"
    assert spf.props == {"smtp.mailfrom": "sender@example.com"}
    assert [r.result for r in by_method(header, "dkim")] == ["none"]
    assert "mail.example.com" in header_fields(raw)[0][1]  # the PTR name, in a comment


def test_spf_pass_through_include_with_unconfirmed_ptr(
    postfix: PostfixInstance, dns: DnsWorld, sink: Sink
) -> None:
    """2001:db8::26 has a PTR whose name has no AAAA: iprev=fail is reported,
    but with ReverseDNS ptr the PTR requirement is met."""
    mark = marker()
    out = send(
        postfix,
        addr=dns.unconfirmed_ip,
        name="mail.example.net",
        helo="mail.example.net",
        mail_from="sender@example.net",
        rcpts=["rcpt@example.net"],
        message=make_message(mark, from_addr="sender@example.net", to="rcpt@example.net"),
    )
    assert out.rcpt.code == 250 and out.data is not None and out.data.code == 250, out
    _, header = delivered_ours(sink, mark)
    assert [r.result for r in by_method(header, "iprev")] == ["fail"]
    (spf,) = by_method(header, "spf")
    assert (spf.result, spf.props) == ("pass", {"smtp.mailfrom": "sender@example.net"})


def test_accepted_by_dkim_alone(postfix: PostfixInstance, dns: DnsWorld, sink: Sink) -> None:
    mark = marker()
    msg = make_message(mark, from_addr="someone@spffail.test", to="rcpt@example.com")
    signed = dns.sign(msg, "spffail.test")
    b_value = _b_tag(signed)
    out = send(
        postfix,
        addr=dns.good_ip,
        mail_from="someone@spffail.test",
        rcpts=["rcpt@example.com"],
        message=signed,
    )
    assert out.data is not None and out.data.code == 250, out
    raw, header = delivered_ours(sink, mark)
    (spf,) = by_method(header, "spf")
    assert (spf.result, spf.props) == ("fail", {"smtp.mailfrom": "someone@spffail.test"})
    (dkim,) = by_method(header, "dkim")
    assert dkim.result == "pass"
    assert dkim.props == {
        "header.d": "spffail.test",
        "header.s": dns.selector,
        "header.b": b_value[:8],
    }
    # The signature still verifies downstream: the body reached the sink unchanged.
    assert raw.split(b"\r\n\r\n", 1)[1] == signed.split(b"\r\n\r\n", 1)[1]


def test_ed25519_only_message_is_accepted(
    postfix: PostfixInstance, dns: DnsWorld, sink: Sink
) -> None:
    """RFC 8463: ed25519-sha256 verifies on every install path (PyNaCl declared)."""
    mark = marker()
    msg = make_message(mark, from_addr="someone@spffail.test", to="rcpt@example.com")
    seed, _ = ed25519_key()
    signed = dkim.sign(msg, ED25519_SELECTOR.encode(), b"spffail.test", seed,
                       signature_algorithm=b"ed25519-sha256") + msg
    out = send(postfix, addr=dns.good_ip, mail_from="someone@spffail.test",
               rcpts=["rcpt@example.com"], message=signed)
    assert out.data is not None and out.data.code == 250, out
    _, header = delivered_ours(sink, mark)
    (result,) = by_method(header, "dkim")
    assert (result.result, result.props["header.d"], result.props["header.s"]) == (
        "pass", "spffail.test", ED25519_SELECTOR)


def _rsa_sha1_signed(dns: DnsWorld, mark: str) -> bytes:
    msg = make_message(mark, from_addr="someone@spffail.test", to="rcpt@example.com")
    return dkim.sign(msg, dns.selector.encode(), b"spffail.test", dns.keys["spffail.test"],
                     signature_algorithm=b"rsa-sha1") + msg


def test_rsa_sha1_only_message_is_refused_with_dkim_policy(
    postfix: PostfixInstance, dns: DnsWorld, milter: MilterProcess
) -> None:
    """RFC 8301 §3.1: an rsa-sha1 signature that verifies still never passes."""
    before = len(milter.log_text())
    out = send(postfix, addr=dns.good_ip, mail_from="someone@spffail.test",
               rcpts=["rcpt@example.com"], message=_rsa_sha1_signed(dns, marker()))
    assert out.data is not None
    assert str(out.data) == not_authenticated(dns.good_ip)

    def logged() -> list[str]:
        return [line for line in milter.log_text()[before:].splitlines()
                if "stage=eom" in line and "from_domain=spffail.test" in line]

    wait_until("the eom decision line", lambda: bool(logged()), timeout=10)
    (line,) = logged()
    assert " dkim=policy " in line and ' reply="450 4.7.26" ' in line, line


def test_rsa_sha1_signature_is_stamped_dkim_policy_with_the_reason(
    postfix: PostfixInstance, dns: DnsWorld, sink: Sink
) -> None:
    mark = marker()
    out = send(postfix, service="monitor", addr=dns.good_ip, mail_from="someone@spffail.test",
               rcpts=["rcpt@example.com"], message=_rsa_sha1_signed(dns, mark))
    assert out.data is not None and out.data.code == 250, out
    raw, header = delivered_ours(sink, mark)
    (result,) = by_method(header, "dkim")
    assert (result.result, result.props["header.d"]) == ("policy", "spffail.test")
    assert "dkim=policy (rsa-sha1 is not acceptable, RFC 8301) header.d=spffail.test" in unfold(
        header_fields(raw)[0][1])


def _b_tag(signed: bytes) -> str:
    head = signed.split(b"\r\n\r\n")[0].replace(b"\r\n", b"")
    m = re.search(rb"\bb=([^;]+)", head)
    assert m is not None
    return re.sub(rb"\s", b"", m.group(1)).decode()


def test_header_b_with_a_slash_survives_the_round_trip(
    postfix: PostfixInstance, dns: DnsWorld, sink: Sink
) -> None:
    """A header.b with "/" must be quoted, and authres 1.2.0 drops a quoted
    value followed by another property: the header must still parse with it."""
    for _ in range(500):
        mark = marker()
        signed = dns.sign(
            make_message(mark, from_addr="someone@spffail.test", to="rcpt@example.com"),
            "spffail.test",
        )
        if "/" in _b_tag(signed)[:8]:
            break
    else:
        pytest.fail("no signature with '/' in its first 8 characters")
    out = send(
        postfix,
        addr=dns.good_ip,
        mail_from="someone@spffail.test",
        rcpts=["rcpt@example.com"],
        message=signed,
    )
    assert out.data is not None and out.data.code == 250, out
    _, header = delivered_ours(sink, mark)
    (dkim,) = by_method(header, "dkim")
    assert dkim.result == "pass"
    assert dkim.props.get("header.b") == _b_tag(signed)[:8], dkim.props
    assert dkim.props.get("header.d") == "spffail.test"


def test_one_good_signature_among_failing_ones_passes(
    postfix: PostfixInstance, dns: DnsWorld, sink: Sink
) -> None:
    mark = marker()
    msg = make_message(mark, from_addr="someone@spffail.test", to="rcpt@example.com")
    good = dns.sign(msg, "spffail.test")
    # On top: a signature by example.com made with the wrong key (fails).
    both = dns.sign(good, "example.com", key_domain="spffail.test")
    out = send(
        postfix,
        addr=dns.good_ip,
        mail_from="someone@spffail.test",
        rcpts=["rcpt@example.com"],
        message=both,
    )
    assert out.data is not None and out.data.code == 250, out
    _, header = delivered_ours(sink, mark)
    got = sorted((r.result, r.props["header.d"]) for r in by_method(header, "dkim"))
    assert got == [("fail", "example.com"), ("pass", "spffail.test")]


def test_null_sender_is_judged_by_helo(postfix: PostfixInstance, dns: DnsWorld, sink: Sink) -> None:
    mark = marker()
    out = send(
        postfix,
        addr=dns.good_ip,
        helo="mail.example.com",
        mail_from="",
        rcpts=["rcpt@example.com"],
        message=make_message(mark, from_addr="mailer-daemon@example.com", to="rcpt@example.com"),
    )
    assert out.data is not None and out.data.code == 250, out
    _, header = delivered_ours(sink, mark)
    (spf,) = by_method(header, "spf")
    assert (spf.result, spf.props) == ("pass", {"smtp.helo": "mail.example.com"})


# -- temporary DNS failures ----------------------------------------------------------------


def test_ptr_lookup_refused_gets_451_4_4_3(postfix: PostfixInstance, dns: DnsWorld) -> None:
    mark = marker()
    out = send(
        postfix,
        addr=dns.refused_ip,
        mail_from="sender@example.com",
        rcpts=["rcpt@example.com", f"rcpt@{NOT_OPTED_IN}"],
        message=make_message(mark, from_addr="sender@example.com", to="rcpt@example.com"),
    )
    assert TEMPFAIL_DNS.match(str(out.rcpts[0])), out.rcpts
    assert str(out.rcpts[1]) == not_opted_in(NOT_OPTED_IN)


def test_ptr_lookup_timeout_gets_451_4_4_3_in_bounded_time(
    postfix: PostfixInstance, dns: DnsWorld
) -> None:
    """The blackhole milter's nameserver never answers (DNSTimeout 1, StageTimeout 2)."""
    mark = marker()
    start = time.monotonic()
    out = send(
        postfix,
        service="blackhole",
        addr=dns.good_ip,
        mail_from="sender@example.com",
        rcpts=["rcpt@example.com"],
        message=make_message(mark, from_addr="sender@example.com", to="rcpt@example.com"),
    )
    elapsed = time.monotonic() - start
    assert TEMPFAIL_DNS.match(str(out.rcpt)), out.rcpt
    assert elapsed < 10, f"the DNS time was not bounded: {elapsed:.1f} s"


def test_spf_temperror_gets_451_4_4_3_at_end_of_data(
    postfix: PostfixInstance, dns: DnsWorld
) -> None:
    mark = marker()
    out = send(
        postfix,
        addr=dns.good_ip,
        mail_from="sender@tempspf.test",
        rcpts=["rcpt@example.com"],
        message=make_message(mark, from_addr="sender@tempspf.test", to="rcpt@example.com"),
    )
    assert out.rcpt.code == 250, out
    assert out.data is not None and TEMPFAIL_DNS.match(str(out.data)), out.data


def test_dkim_key_temperror_gets_451_4_4_3_when_it_decides(
    postfix: PostfixInstance, dns: DnsWorld
) -> None:
    mark = marker()
    msg = make_message(mark, from_addr="someone@spffail.test", to="rcpt@example.com")
    signed = dns.sign(msg, UNSERVED, key_domain="spffail.test")  # key lookup REFUSED
    out = send(
        postfix,
        addr=dns.good_ip,
        mail_from="someone@spffail.test",
        rcpts=["rcpt@example.com"],
        message=signed,
    )
    assert out.data is not None and TEMPFAIL_DNS.match(str(out.data)), out.data


# -- forged Authentication-Results ------------------------------------------------------------

FORGED = [
    "Authentication-Results: other.example; spf=pass smtp.mailfrom=x@example.com",
    "Authentication-Results: MX.Test.Example; spf=pass smtp.mailfrom=forged@example.com",
    "Authentication-Results: third.example;\r\n\tdkim=pass header.d=example.com",
    "Authentication-Results: mx.test.example;\r\n\tdkim=pass header.d=forged.example\r\n"
    "\theader.s=x",
]
FOREIGN = [
    "other.example; spf=pass smtp.mailfrom=x@example.com",
    "third.example;\tdkim=pass header.d=example.com",
]


def _forged_message(mark: str) -> bytes:
    return make_message(
        mark, from_addr="sender@example.com", to="rcpt@example.com", extra_headers=FORGED
    )


def test_forged_headers_are_removed_foreign_ones_kept(
    postfix: PostfixInstance, dns: DnsWorld, sink: Sink
) -> None:
    mark = marker()
    out = send(
        postfix,
        addr=dns.good_ip,
        mail_from="sender@example.com",
        rcpts=["rcpt@example.com"],
        message=_forged_message(mark),
    )
    assert out.data is not None and out.data.code == 250, out
    raw, header = delivered_ours(sink, mark)
    values = auth_results(raw)
    assert values[1:] == FOREIGN, values
    assert [r.result for r in by_method(header, "spf")] == ["pass"]
    assert b"forged" not in raw


def test_ipv4_client_is_not_judged_but_forged_headers_go(
    postfix: PostfixInstance, dns: DnsWorld, sink: Sink
) -> None:
    mark = marker()
    out = send(
        postfix,
        addr=dns.ipv4_ip,
        mail_from="sender@spffail.test",  # SPF would fail; nobody asks
        rcpts=[f"rcpt@{NOT_OPTED_IN}"],
        message=_forged_message(mark),
    )
    assert out.rcpt.code == 250 and out.data is not None and out.data.code == 250, out
    raw = sink.wait_for(mark).data
    assert_not_stamped(raw)
    assert auth_results(raw) == FOREIGN


@pytest.mark.parametrize("addr", ["::ffff:192.0.2.10"])
def test_ipv4_mapped_client_counts_as_ipv4(postfix: PostfixInstance, sink: Sink, addr: str) -> None:
    mark = marker()
    out = send(
        postfix,
        addr=addr,
        mail_from="sender@spffail.test",
        rcpts=[f"rcpt@{NOT_OPTED_IN}"],
        message=make_message(mark, from_addr="sender@spffail.test", to=f"rcpt@{NOT_OPTED_IN}"),
    )
    assert out.rcpt.code == 250 and out.data is not None and out.data.code == 250, out
    assert_not_stamped(sink.wait_for(mark).data)


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_trusted_host_keeps_its_own_headers(
    postfix: PostfixInstance, sink: Sink, host: str
) -> None:
    mark = marker()
    out = transaction(
        postfix.port(),
        host=host,
        mail_from="sender@spffail.test",
        rcpts=[f"rcpt@{NOT_OPTED_IN}"],
        message=_forged_message(mark),
    )
    assert out.data is not None and out.data.code == 250, out
    raw = sink.wait_for(mark).data
    assert header_fields(raw)[0][0] == "Received"  # nothing stamped
    # TrustedHosts may carry legitimate results of ours: all kept, in order.
    assert auth_results(raw) == [unfold(h.split(":", 1)[1]).strip() for h in FORGED]


def test_authenticated_ipv6_client_is_not_refused(
    postfix: PostfixInstance, dns: DnsWorld, sink: Sink
) -> None:
    """XCLIENT LOGIN= makes Postfix pass {auth_authen}: not anonymous, so
    neither the opt-in, the PTR nor SPF/DKIM apply."""
    mark = marker()
    out = send(
        postfix,
        addr=dns.noptr_ip,
        login="someone",
        mail_from="sender@spffail.test",
        rcpts=[f"rcpt@{NOT_OPTED_IN}", "rcpt@example.com"],
        message=make_message(mark, from_addr="sender@spffail.test", to="rcpt@example.com"),
    )
    assert [r.code for r in out.rcpts] == [250, 250], out.rcpts
    assert out.data is not None and out.data.code == 250, out
    assert_not_stamped(sink.wait_for(mark).data)


# -- one connection, several messages --------------------------------------------------------


def test_messages_on_one_connection_are_judged_each_on_its_own(
    postfix: PostfixInstance, dns: DnsWorld, sink: Sink
) -> None:
    marks = [marker() for _ in range(4)]
    with Session(postfix.port(), addr=dns.good_ip, name="mail.example.com") as s:
        first = s.send(
            "sender@example.com",
            ["rcpt@example.com"],
            make_message(marks[0], from_addr="sender@example.com", to="rcpt@example.com"),
        )
        second = s.send(
            "someone@spffail.test",
            ["rcpt@example.com"],
            make_message(marks[1], from_addr="someone@spffail.test", to="rcpt@example.com"),
        )
        third = s.send(
            "someone@spffail.test",
            ["rcpt@example.com"],
            dns.sign(
                make_message(marks[2], from_addr="someone@spffail.test", to="rcpt@example.com"),
                "spffail.test",
            ),
        )
        fourth = s.send(
            "sender@example.com",
            [f"rcpt@{NOT_OPTED_IN}"],
            make_message(marks[3], from_addr="sender@example.com", to=f"rcpt@{NOT_OPTED_IN}"),
        )
    assert first.data is not None and first.data.code == 250, first
    assert second.data is not None and str(second.data) == not_authenticated(dns.good_ip)
    assert third.data is not None and third.data.code == 250, third
    assert str(fourth.rcpt) == not_opted_in(NOT_OPTED_IN)

    _, h1 = delivered_ours(sink, marks[0])
    assert [(r.result, r.props) for r in by_method(h1, "spf")] == [
        ("pass", {"smtp.mailfrom": "sender@example.com"})
    ]
    assert [r.result for r in by_method(h1, "dkim")] == ["none"]
    _, h3 = delivered_ours(sink, marks[2])
    assert [(r.result, r.props) for r in by_method(h3, "spf")] == [
        ("fail", {"smtp.mailfrom": "someone@spffail.test"})
    ]
    assert [r.result for r in by_method(h3, "dkim")] == ["pass"]
    assert not sink.find(marks[1]) and not sink.find(marks[3])


# -- monitor mode ------------------------------------------------------------------------------


def test_monitor_mode_never_refuses_and_stamps(
    postfix: PostfixInstance, dns: DnsWorld, sink: Sink
) -> None:
    mark = marker()
    out = send(
        postfix,
        service="monitor",
        addr=dns.noptr_ip,
        mail_from="someone@spffail.test",
        rcpts=[f"rcpt@{NOT_OPTED_IN}", "rcpt@example.com"],
        message=make_message(mark, from_addr="someone@spffail.test", to="rcpt@example.com"),
    )
    assert [r.code for r in out.rcpts] == [250, 250], out.rcpts
    assert out.data is not None and out.data.code == 250, out
    _, header = delivered_ours(sink, mark)
    assert [r.result for r in by_method(header, "iprev")] == ["permerror"]
    assert [r.result for r in by_method(header, "spf")] == ["fail"]


# -- recipients without a domain (SPEC §1) -------------------------------------------------------


def test_recipient_without_domain_is_judged_postmaster_is_not(
    postfix: PostfixInstance, dns: DnsWorld, sink: Sink
) -> None:
    """From a client without PTR: ``<root>`` gets 450 4.7.25 (never the 550,
    never a way around the PTR check), ``<PostMaster>`` is accepted and the
    message delivered, stamped."""
    mark = marker()
    msg = make_message(mark, from_addr="sender@example.com", to="postmaster")
    out = send(postfix, addr=dns.noptr_ip, mail_from="sender@example.com",
               rcpts=["root", "PostMaster"], message=msg)
    assert [str(r) for r in out.rcpts[:1]] == [no_ptr(dns.noptr_ip)]
    assert out.rcpts[1].code == 250, out.rcpts
    assert out.data is not None and out.data.code == 250, out
    _, header = delivered_ours(sink, mark)
    assert [r.result for r in by_method(header, "iprev")] == ["permerror"]
