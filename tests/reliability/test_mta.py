"""Hostile input and forged results through the real Postfix (issue #6).

What a sending MTA can actually get past Postfix: the null sender with an
address-literal HELO, SMTPUTF8 and IDN addresses, quoted local parts with
``;``, ``(`` and ``"``, odd folding, bare LF line ends, 8-bit bytes, a
message with no body, a 100 kB header; and incoming Authentication-Results
that claim our authserv-id in every disguise.  Each message must arrive
with exactly one header of ours, first, that authres parses, and that says
only what the milter found.
"""

from __future__ import annotations

import smtplib
import socket
import uuid

import pytest

from tests.integration.harness import AUTHSERV_ID, GOOD_IP, PostfixInstance, Sink
from tests.integration.smtpclient import auth_results, header_fields, parse_ar, unfold

from .hostile import plain, sign
from .servers import MilterRunner
from .zones import HOSTILE, HOSTILE_IP

pytestmark = pytest.mark.timeout(60)


def mark() -> str:
    return "m" + uuid.uuid4().hex


def session(port: int, addr: str, helo: str) -> smtplib.SMTP:
    s = smtplib.SMTP("127.0.0.1", port, timeout=30)
    s.ehlo("client.test")
    code, text = s.docmd("XCLIENT", f"ADDR=IPV6:{addr} NAME=[UNAVAILABLE]")
    assert code == 220, (code, text)
    code, text = s.ehlo(helo)
    assert code == 250, (code, text)
    return s


def ours(sink: Sink, marker: str) -> tuple[bytes, dict[str, list[tuple[str, dict[str, str]]]]]:
    """The delivered message and our header's results, checked to be the only one, first."""
    raw = sink.wait_for(marker).data
    fields = header_fields(raw)
    mine = [v for n, v in fields if n.lower() == "authentication-results"
            and unfold(v).strip().lower().startswith(AUTHSERV_ID + ";")]
    assert len(mine) == 1, mine
    assert fields[0][0] == "Authentication-Results" and fields[0][1] == mine[0], fields[:2]
    header = parse_ar(mine[0])
    assert header.authserv_id == AUTHSERV_ID
    out: dict[str, list[tuple[str, dict[str, str]]]] = {}
    for r in header.results:
        props = {f"{p.type}.{p.name}": p.value for p in r.properties}
        out.setdefault(r.method, []).append((r.result, props))
    assert set(out) <= {"iprev", "spf", "dkim"}, out
    return raw, out


def test_null_sender_with_an_address_literal_helo(
    postfix: PostfixInstance, sink: Sink, main_milter: MilterRunner
) -> None:
    m = mark()
    msg = sign(plain(extra=[f"X-Mark: {m}".encode()]))
    with session(postfix.port("main"), GOOD_IP, "[IPv6:2001:db8::1]") as s:
        assert s.mail("<>")[0] == 250
        assert s.rcpt("rcpt@example.com")[0] == 250
        assert s.data(msg)[0] == 250  # SPF: nothing to check for a literal; DKIM passes
    _, res = ours(sink, m)
    assert res["spf"] == [("none", {"smtp.helo": "[IPv6:2001:db8::1]"})]
    assert [r for r, _ in res["dkim"]] == ["pass"]


def test_smtputf8_idn_sender_and_recipients(
    postfix: PostfixInstance, sink: Sink, main_milter: MilterRunner
) -> None:
    """U-label, A-label in capitals with a trailing dot: both opted in
    (AcceptDomains lists Bücher.example); the SPF domain is looked up as A-labels."""
    m = mark()
    with session(postfix.port("main"), HOSTILE_IP, f"mail.{HOSTILE}") as s:
        assert s.mail(f"üser@Bücher.{HOSTILE}", ["SMTPUTF8"])[0] == 250
        assert s.rcpt("x@bücher.example")[0] == 250
        assert s.rcpt("y@XN--BCHER-KVA.EXAMPLE.")[0] == 250
        code, text = s.rcpt("z@fass.example")  # IDNA 2008: not faß.example
        assert (code, text.decode()[:5]) == (550, "5.2.1"), text
        assert "[fass.example]" in text.decode()
        body = f"From: <x@bücher.example>\r\nSubject: ü {m}\r\n\r\nbody\r\n".encode()
        assert s.data(body)[0] == 250
    _, res = ours(sink, m)
    # The local part is not ASCII: only the domain is written, in A-labels.
    assert res["spf"] == [("pass", {"smtp.mailfrom": f"xn--bcher-kva.{HOSTILE}"})]


def test_quoted_local_part_with_semicolon_parenthesis_and_quote(
    postfix: PostfixInstance, sink: Sink, main_milter: MilterRunner
) -> None:
    m = mark()
    with session(postfix.port("main"), GOOD_IP, "mail.example.com") as s:
        assert s.mail('"a;dkim=pass (x) \\"y\\""@example.com')[0] == 250
        assert s.rcpt("rcpt@example.com")[0] == 250
        assert s.data(plain("sender@example.com", extra=[f"X-Mark: {m}".encode()]))[0] == 250
    raw, res = ours(sink, m)
    assert res["spf"] == [("pass", {"smtp.mailfrom": "example.com"})]
    assert res["dkim"] == [("none", {})]
    assert b"dkim=pass (x)" not in raw.split(b"Received:")[0]


def test_odd_folding_8bit_and_no_body(
    postfix: PostfixInstance, sink: Sink, main_milter: MilterRunner
) -> None:
    m = mark()
    head = (f"X-Mark: {m}\r\nSubject:\r\n \r\n\tfolded\r\nX-Empty:\r\n"
            "X-8bit: caf\xe9 \xff\r\nX-\xe9t\xe9: a Latin-1 name\r\n").encode("latin-1")
    with session(postfix.port("main"), GOOD_IP, "mail.example.com") as s:
        assert s.mail("sender@example.com", ["BODY=8BITMIME"])[0] == 250
        assert s.rcpt("rcpt@example.com")[0] == 250
        assert s.data(head)[0] == 250  # headers only: no body at all
    raw, res = ours(sink, m)
    assert res["spf"][0][0] == "pass"
    # Postfix takes a line with an 8-bit field name for the start of the body.
    assert b"a Latin-1 name" in raw


def test_bare_lf_line_ends(postfix: PostfixInstance, sink: Sink, main_milter: MilterRunner) -> None:
    """Sent over a raw socket: smtplib would make every line end CRLF."""
    m = mark()
    signed = sign(plain(extra=[f"X-Mark: {m}".encode()], body=b"one\r\ntwo\r\n"))
    data = signed.replace(b"\r\n", b"\n")
    with socket.create_connection(("127.0.0.1", postfix.port("main")), timeout=30) as sock:
        f = sock.makefile("rwb")

        def cmd(line: bytes) -> bytes:
            f.write(line + b"\r\n")
            f.flush()
            reply = f.readline()
            while reply[3:4] == b"-":
                reply = f.readline()
            return reply

        assert f.readline().startswith(b"220")
        assert cmd(b"EHLO client.test").startswith(b"250")
        assert cmd(f"XCLIENT ADDR=IPV6:{GOOD_IP}".encode()).startswith(b"220")
        assert cmd(b"EHLO mail.example.com").startswith(b"250")
        assert cmd(b"MAIL FROM:<someone@spffail.test>").startswith(b"250")
        assert cmd(b"RCPT TO:<rcpt@example.com>").startswith(b"250")
        assert cmd(b"DATA").startswith(b"354")
        reply = cmd(data + b".")
        assert reply.startswith(b"250"), reply
        cmd(b"QUIT")
    _, res = ours(sink, m)
    assert res["spf"][0][0] == "fail"
    assert [r for r, _ in res["dkim"]] == ["pass"]  # the signature survives LF -> CRLF


def test_a_100_kb_header(postfix: PostfixInstance, sink: Sink, main_milter: MilterRunner) -> None:
    m = mark()
    msg = f"X-Mark: {m}\r\nX-Long: {'y' * 100_000}\r\nSubject: long\r\n\r\nbody\r\n".encode()
    with session(postfix.port("main"), GOOD_IP, "mail.example.com") as s:
        assert s.mail("sender@example.com")[0] == 250
        assert s.rcpt("rcpt@example.com")[0] == 250
        assert s.data(msg)[0] == 250
    ours(sink, m)


# -- forged Authentication-Results ----------------------------------------------------------

# (header line(s) as sent, kept?)  ARC-Authentication-Results is never touched.
FORGED: list[tuple[str, bool]] = [
    (f"Authentication-Results: {AUTHSERV_ID}; spf=pass smtp.mailfrom=forged1", False),
    (f"Authentication-Results: {AUTHSERV_ID.upper()}; dkim=pass header.d=forged2", False),
    ("Authentication-Results: other.example; spf=pass smtp.mailfrom=kept1@example.com", True),
    (f"Authentication-Results: {AUTHSERV_ID}\r\n\t; dkim=pass header.d=forged3", False),
    (f"ARC-Authentication-Results: i=1; {AUTHSERV_ID}; spf=pass smtp.mailfrom=arc1", True),
    (f"Authentication-Results: (a comment) {AUTHSERV_ID} 1; spf=pass smtp.mailfrom=forged4",
     False),
    (f'Authentication-Results: "{AUTHSERV_ID}"; spf=pass smtp.mailfrom=forged5', False),
    (f"Authentication-Results: third.example; dkim=pass header.d={AUTHSERV_ID}", True),
    (f"Authentication-Results: {AUTHSERV_ID}.evil; spf=pass smtp.mailfrom=kept2", True),
    (f"Authentication-Results:{AUTHSERV_ID};spf=pass smtp.mailfrom=forged6", False),
    (f"authentication-results: {AUTHSERV_ID}; spf=pass smtp.mailfrom=forged7", False),
    ("Authentication-Results: Mx.Test.Example;\r\n  spf=pass\r\n    smtp.mailfrom=forged8;\r\n"
     "\tdkim=pass header.d=forged8", False),
    (f"ARC-Authentication-Results: i=2; {AUTHSERV_ID.upper()}; dkim=pass header.d=arc2", True),
    *[(f"Authentication-Results: {AUTHSERV_ID}; spf=pass smtp.mailfrom=forged{n}", False)
      for n in range(9, 25)],
    ("Authentication-Results: last.example; none", True),
]


@pytest.mark.parametrize("client", [GOOD_IP, "192.0.2.10"], ids=["ipv6-stamped", "ipv4-not"])
def test_forged_results_removed_others_kept_in_order(
    postfix: PostfixInstance, sink: Sink, main_milter: MilterRunner, client: str
) -> None:
    """Ours in any case, folded, with a comment or a version, quoted, with no
    space, 24 of them: all gone, on IPv4 (out of scope) mail too.  Foreign
    ones and ARC-Authentication-Results: kept, unchanged, in order."""
    m = mark()
    extra = [line.encode() for line, _ in FORGED]
    msg = plain("sender@example.com", extra=[*extra, f"X-Mark: {m}".encode()])
    with smtplib.SMTP("127.0.0.1", postfix.port("main"), timeout=30) as s:
        s.ehlo("client.test")
        v6 = ":" in client
        assert s.docmd("XCLIENT", f"ADDR={'IPV6:' if v6 else ''}{client}")[0] == 220
        s.ehlo("mail.example.com")
        assert s.mail("sender@example.com")[0] == 250
        assert s.rcpt("rcpt@example.com")[0] == 250
        assert s.data(msg)[0] == 250
    if v6:
        raw, _ = ours(sink, m)
    else:
        raw = sink.wait_for(m).data
        assert header_fields(raw)[0][0] == "Received"  # nothing stamped
    assert b"forged" not in raw, [v for v in auth_results(raw) if "forged" in v]
    fields = header_fields(raw)[1 if v6 else 0 :]  # ours, first, checked above
    kept = [unfold(v).strip() for n, v in fields
            if n.lower() in ("authentication-results", "arc-authentication-results")]
    want = [unfold(line.split(":", 1)[1]).strip() for line, keep in FORGED if keep]
    assert kept == want
