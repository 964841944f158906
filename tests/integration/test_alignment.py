"""From-aligned mode through the real Postfix and Knot (SPEC §1, §2, §4):
what the client is told, what is delivered, what the log says.

A Knot of its own serves one zone, ``aligntest``, standing in for a top-level
domain (the tree walk asks up to it, so it must answer there):

    corp.aligntest          _dmarc record (p=reject): an organization
    bounce.corp.aligntest   SPF pass: relaxed-aligned with corp.aligntest
    other.aligntest         SPF pass: another organization
    nodmarc.aligntest       no DMARC record anywhere, and its subdomain
    mail.nodmarc.aligntest  with SPF pass: relaxed behaves as strict
    sel1._domainkey.corp    the DKIM key of corp.aligntest

The client claims 2001:db8:a11::25 with XCLIENT; its PTR and AAAA confirm.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import dkim
import dns.reversename
import pytest

from tests import lab
from tests.dkimkeys import make_key

from .conftest import _LOGS, _started
from .harness import AUTHSERV_ID, MilterFactory, MilterProcess, PostfixInstance, Sink, run_postfix
from .smtpclient import (
    Outcome,
    by_method,
    header_fields,
    make_message,
    marker,
    parse_ar,
    transaction,
)

pytestmark = pytest.mark.timeout(120)

CLIENT = "2001:db8:a11::25"
REVERSE = "1.1.a.0.8.b.d.0.1.0.0.2.ip6.arpa"
ORG = "corp.aligntest"
ALIGNED_REFUSAL = (f"450 4.7.26 Service unavailable, message sent over IPv6 [{CLIENT}] must "
                   "pass either SPF or DKIM validation aligned with the From domain.")
SPF_PASS = lab.txt(f"v=spf1 ip6:{CLIENT} -all")


def _zones() -> dict[str, list[str]]:
    ptr = dns.reversename.from_address(CLIENT).to_text().removesuffix(f".{REVERSE}.")
    return {
        REVERSE: [f"{ptr} PTR mail.corp.aligntest."],
        "aligntest": [
            f"mail.corp AAAA {CLIENT}",
            f"_dmarc.corp TXT {lab.txt('v=DMARC1; p=reject')}",
            f"corp TXT {SPF_PASS}",
            f"bounce.corp TXT {SPF_PASS}",
            f"sel1._domainkey.corp TXT {lab.txt(make_key(1024, ORG)[1])}",
            f"other TXT {SPF_PASS}",
            f"nospf TXT {lab.txt('v=spf1 -all')}",
            f"nodmarc TXT {SPF_PASS}",
            f"mail.nodmarc TXT {SPF_PASS}",
        ],
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, milters: MilterFactory,
          sink: Sink) -> Iterator[tuple[MilterProcess, PostfixInstance]]:
    workdir: Path = tmp_path_factory.mktemp("knot-align")
    knot = lab.Knot(workdir, _zones(), hosts=("127.0.0.1",))
    with lab.running(knot):
        _LOGS["knotd align"] = knot.log
        m = _started(milters, "align", Nameservers=knot.nameserver, Alignment="relaxed",
                     AcceptDomains="aligntest, .aligntest")
        with run_postfix(tmp_path_factory.mktemp("postfix-align"), sink.port,
                         {"align": m.socket_spec}) as pf:
            _LOGS["postfix-align"] = pf.log
            yield m, pf
        _LOGS.pop("postfix-align", None)
    _LOGS.pop("knotd align", None)


def send(pf: PostfixInstance, mail_from: str, from_field: str, mark: str,
         sign: str | None = None) -> Outcome:
    msg = make_message(mark, from_addr=from_field, to="rcpt@corp.aligntest")
    if sign:
        msg = dkim.sign(msg, b"sel1", sign.encode(), make_key(1024, sign)[0],
                        canonicalize=(b"relaxed", b"simple"),
                        include_headers=[b"from", b"to", b"subject", b"message-id"]) + msg
    return transaction(pf.port("align"), addr=CLIENT, name="mail.corp.aligntest",
                       helo="mail.corp.aligntest", mail_from=mail_from,
                       rcpts=["rcpt@corp.aligntest"], message=msg)


def delivered_header(sink: Sink, mark: str) -> tuple[str, dict[str, list[str]]]:
    raw = sink.wait_for(mark).data
    name, value = header_fields(raw)[0]
    assert name == "Authentication-Results", raw[:300]
    header = parse_ar(value)
    assert header.authserv_id == AUTHSERV_ID
    return value, {m: [r.result for r in by_method(header, m)] for m in ("spf", "dkim")}


def decision(m: MilterProcess, mark_from: str) -> str:
    lines = [ln for ln in m.log_text().splitlines()
             if "stage=eom" in ln and f"from_domain={mark_from}" in ln]
    assert lines, m.log_text()[-2000:]
    return lines[-1]


def test_an_aligned_spf_pass_is_accepted(world: tuple, sink: Sink) -> None:
    m, pf = world
    mark = marker()
    out = send(pf, "b@bounce.corp.aligntest", "boss@corp.aligntest", mark)
    assert out.accepted, out
    value, results = delivered_header(sink, mark)
    assert results == {"spf": ["pass"], "dkim": ["none"]}
    assert "spf=pass (aligned with corp.aligntest) smtp.mailfrom=b@bounce.corp.aligntest" in (
        " ".join(value.split()))
    assert "dmarc" not in value
    line = decision(m, "bounce.corp.aligntest")
    assert "alignment=relaxed aligned=spf header_from=corp.aligntest" in line
    assert "reply=accept" in line


def test_an_unaligned_spf_pass_without_dkim_is_refused(world: tuple) -> None:
    m, pf = world
    out = send(pf, "b@other.aligntest", "boss@corp.aligntest", marker())
    assert out.data is not None and str(out.data) == ALIGNED_REFUSAL
    line = decision(m, "other.aligntest")
    assert 'alignment=relaxed aligned=none header_from=corp.aligntest reply="450 4.7.26"' in line


def test_an_aligned_dkim_pass_is_accepted(world: tuple, sink: Sink) -> None:
    m, pf = world
    mark = marker()
    out = send(pf, "b@nospf.aligntest", "boss@corp.aligntest", mark, sign=ORG)
    assert out.accepted, out
    value, results = delivered_header(sink, mark)
    assert results == {"spf": ["fail"], "dkim": ["pass"]}
    flat = " ".join(value.split())
    assert "dkim=pass (aligned with corp.aligntest) header.d=corp.aligntest" in flat
    assert "spf=fail smtp.mailfrom" in flat  # only passing results carry the comment
    assert "aligned=dkim" in decision(m, "nospf.aligntest")


def test_the_header_says_which_pass_is_aligned(world: tuple, sink: Sink) -> None:
    _, pf = world
    mark = marker()
    out = send(pf, "b@other.aligntest", "boss@corp.aligntest", mark, sign=ORG)
    assert out.accepted, out
    value, results = delivered_header(sink, mark)
    assert results == {"spf": ["pass"], "dkim": ["pass"]}
    flat = " ".join(value.split())
    assert "spf=pass (not aligned with corp.aligntest) smtp.mailfrom=b@other.aligntest" in flat
    assert "dkim=pass (aligned with corp.aligntest)" in flat


def test_two_from_domains_align_nothing(world: tuple, sink: Sink) -> None:
    m, pf = world
    out = send(pf, "b@corp.aligntest", "boss@corp.aligntest>, <x@other.aligntest", marker())
    assert out.data is not None and str(out.data) == ALIGNED_REFUSAL
    assert "aligned=none header_from=-" in decision(m, "corp.aligntest")


def test_without_any_dmarc_record_relaxed_is_strict(world: tuple) -> None:
    _, pf = world
    out = send(pf, "b@mail.nodmarc.aligntest", "boss@nodmarc.aligntest", marker())
    assert out.data is not None and str(out.data) == ALIGNED_REFUSAL
    out = send(pf, "b@nodmarc.aligntest", "boss@nodmarc.aligntest", marker())
    assert out.accepted, out


def test_the_report_counts_the_aligned_refusal_as_its_own_reply(world: tuple) -> None:
    m, pf = world
    out = send(pf, "b@other.aligntest", "boss@corp.aligntest", marker())
    assert out.data is not None and str(out.data) == ALIGNED_REFUSAL
    report = Path(sys.executable).parent / "ipv6milter-report"
    got = json.loads(subprocess.run([str(report), "--format", "json", str(m.log)],
                                    capture_output=True, check=True).stdout)
    replies = {(r["status"], r["stage"], r["reply"]) for r in got["replies"]}
    assert ("refused", "eom", "450 4.7.26 aligned") in replies
    assert not any(r[2] == "450 4.7.26" for r in replies)  # none counted as the unaligned rule
