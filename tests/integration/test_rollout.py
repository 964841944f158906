"""The roll-out tools through the real Postfix and Knot: AcceptDomains
exceptions, EnforceShare and its reload, and ipv6milter-report on the log
the milter itself wrote (SPEC §3, §4).

Three milters of their own, each with a log of its own, behind one private
Postfix:

    optout   AcceptDomains * !legacy.example
    staged   EnforceShare 100, rewritten to 0 and reloaded by SIGHUP
    report   AcceptDomains * !legacy.example, EnforceShare 50: the log
             ipv6milter-report reads
"""

from __future__ import annotations

import ipaddress
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipv6milter.policy import share_bucket

from .conftest import _LOGS, _started
from .harness import (
    AUTHSERV_ID,
    DnsWorld,
    LabAddresses,
    MilterFactory,
    MilterProcess,
    PostfixInstance,
    Sink,
    run_postfix,
)
from .replies import no_ptr, not_authenticated, not_opted_in
from .smtpclient import (
    Outcome,
    Session,
    by_method,
    header_fields,
    make_message,
    marker,
    parse_ar,
    transaction,
)

pytestmark = pytest.mark.timeout(120)

LEGACY = "legacy.example"
SHARE = 50
# HELO names that try to write fields of their own into the decision line.
FORGED_HELO = 'x" reply=accept spf=pass y="'
FORGED_HELO_2 = 'h decision stage=eom client=2001:db8:bad::1 scope=ipv6 reply="550 5.2.1"'
# Postfix quotes this one in its reject line (helo=<h?decision?…>).
FORGED_HELO_3 = "h decision stage=eom client=2001:db8:bad::1 scope=ipv6 reply=accept z="


@pytest.fixture(scope="module")
def rollout(
    tmp_path_factory: pytest.TempPathFactory, milters: MilterFactory, sink: Sink
) -> Iterator[tuple[dict[str, MilterProcess], PostfixInstance]]:
    ms = {
        "optout": _started(milters, "optout", AcceptDomains=f"* !{LEGACY}"),
        "staged": _started(milters, "staged", EnforceShare="100"),
        "report": _started(milters, "report", AcceptDomains=f"* !{LEGACY}",
                           EnforceShare=str(SHARE)),
    }
    with run_postfix(tmp_path_factory.mktemp("postfix-rollout"), sink.port,
                     {name: m.socket_spec for name, m in ms.items()}) as pf:
        _LOGS["postfix-rollout"] = pf.log
        yield ms, pf
    _LOGS.pop("postfix-rollout", None)


def send(pf: PostfixInstance, service: str, addr: str, mail_from: str, rcpts: list[str],
         helo: str = "mail.example.com", mark: str | None = None) -> Outcome:
    msg = make_message(mark or marker(), from_addr=mail_from, to=rcpts[0])
    return transaction(pf.port(service), addr=addr, helo=helo, mail_from=mail_from,
                       rcpts=rcpts, message=msg)


def stamped_results(sink: Sink, mark: str) -> dict[str, list[str]]:
    raw = sink.wait_for(mark).data
    name, value = header_fields(raw)[0]
    assert name == "Authentication-Results", raw[:300]  # ours, above every other field
    header = parse_ar(value)
    assert header.authserv_id == AUTHSERV_ID
    return {m: [r.result for r in by_method(header, m)] for m in ("iprev", "spf", "dkim")}


# -- AcceptDomains * !legacy.example -----------------------------------------------------


def test_excepted_domain_alone_gets_550(rollout: tuple, dns: DnsWorld, sink: Sink) -> None:
    ms, pf = rollout
    mark = marker()
    rcpts = [f"a@{LEGACY}", f"b@{LEGACY.upper()}.", "c@other.example", f"d@mail.{LEGACY}",
             "e@example.com"]
    out = send(pf, "optout", dns.good_ip, "sender@example.com", rcpts, mark=mark)
    assert [str(r) for r in out.rcpts[:2]] == [not_opted_in(LEGACY)] * 2
    # Any other domain is opted in by "*", a subdomain of the exception too.
    assert [r.code for r in out.rcpts[2:]] == [250, 250, 250], out.rcpts
    assert out.accepted, out
    assert sorted(sink.wait_for(mark).rcpts) == [
        "c@other.example", f"d@mail.{LEGACY}", "e@example.com"]
    assert stamped_results(sink, mark)["spf"] == ["pass"]
    # The startup line states the effective rule.
    assert f"AcceptDomains all domains except {LEGACY}" in ms["optout"].log_text()


# -- EnforceShare, and its reload -------------------------------------------------------


def test_share_0_accepts_and_stamps_what_100_refuses_and_a_reload_switches(
    rollout: tuple, dns: DnsWorld, sink: Sink
) -> None:
    ms, pf = rollout
    m = ms["staged"]
    original = m.config.read_text()
    assert "EnforceShare 100\n" in original
    rcpt = "rcpt@example.com"
    try:
        with Session(pf.port("staged"), addr=dns.good_ip, name="mail.example.com") as s:
            def spf_fail(mark: str) -> Outcome:
                return s.send("someone@spffail.test", [rcpt],
                              make_message(mark, from_addr="someone@spffail.test", to=rcpt))

            first = spf_fail(marker())
            assert first.data is not None and str(first.data) == not_authenticated(dns.good_ip)

            m.reload(original.replace("EnforceShare 100", "EnforceShare 0"))
            mark = marker()
            second = spf_fail(mark)  # same connection, next transaction
            assert second.accepted, second
            assert stamped_results(sink, mark) == {
                "iprev": ["pass"], "spf": ["fail"], "dkim": ["none"]}

            m.reload(original)
            third = spf_fail(marker())
            assert third.data is not None and str(third.data) == not_authenticated(dns.good_ip)
        log = m.log_text()
        assert log.count('reply=accept would_reply="450 4.7.26" mode=monitor') == 1
        assert log.count('reply="450 4.7.26" mode=enforce') == 2
    finally:
        if m.config.read_text() != original:
            m.reload(original)


# -- ipv6milter-report on the milter's own log ----------------------------------------------


def _noptr_client(inside: bool) -> str:
    """An address without PTR (NXDOMAIN in Knot's reverse zone) whose /64 is
    inside (or outside) EnforceShare 50."""
    for n in range(1, 500):
        a = f"2001:db8:{n:x}::dead"
        if (share_bucket(ipaddress.ip_address(a)) < SHARE) == inside:
            return a
    raise AssertionError("no such network")


def report_command() -> str:
    beside = Path(sys.executable).parent / "ipv6milter-report"
    assert beside.exists(), "pip install -e . installs ipv6milter-report"
    return str(beside)


def run_report(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([report_command(), *args], input=stdin, capture_output=True,
                          timeout=60, check=False)


def test_report_counts_what_the_milter_did_and_would_do(
    rollout: tuple, dns: DnsWorld, sink: Sink
) -> None:
    ms, pf = rollout
    lab = LabAddresses.for_slot(0).good  # PTR lab.example.com, forward-confirmed
    good_net = "2001:db8::/64"
    noptr_out = _noptr_client(inside=False)
    assert share_bucket(ipaddress.ip_address(dns.good_ip)) < SHARE
    assert share_bucket(ipaddress.ip_address(dns.noptr_ip)) < SHARE
    assert share_bucket(ipaddress.ip_address(lab)) >= SHARE
    r = "rcpt@example.com"

    def go(addr: str, mail_from: str, rcpts: list[str], helo: str = "mail.example.com") -> Outcome:
        return send(pf, "report", addr, mail_from, rcpts, helo=helo)

    # inside the share: enforced
    assert go(dns.good_ip, "sender@example.com", [r]).accepted
    t2 = go(dns.good_ip, "sender@example.com", [f"a@{LEGACY}", r])
    assert str(t2.rcpts[0]) == not_opted_in(LEGACY) and t2.accepted
    t3 = go(dns.noptr_ip, "sender@example.com", [r], helo=FORGED_HELO_3)
    assert str(t3.rcpt) == no_ptr(dns.noptr_ip)
    t5 = go(dns.good_ip, "someone@spffail.test", [r])
    assert t5.data is not None and str(t5.data) == not_authenticated(dns.good_ip)
    # hostile HELO names: counted as what happened, not as what they claim
    t6 = go(dns.good_ip, "someone@spffail.test", [r], helo=FORGED_HELO)
    assert t6.data is not None and str(t6.data) == not_authenticated(dns.good_ip)
    assert go(dns.good_ip, "sender@example.com", [r], helo=FORGED_HELO_2).accepted
    # outside the share: handled as in monitor mode
    assert go(noptr_out, "sender@example.com", [r]).accepted
    assert go(lab, "someone@spffail.test", [r], helo="lab.example.com").accepted
    t9 = go(lab, "x@lab.example.com", [f"a@{LEGACY}"], helo="lab.example.com")
    assert t9.accepted

    log = ms["report"].log
    text = log.read_text()
    assert FORGED_HELO.replace('"', '\\"') in text  # the forged HELO reached the log
    got = json.loads(run_report("--format", "json", str(log)).stdout)

    assert got["unparsed"] == 0
    assert got["messages"] == 8  # the RCPT-refused transaction never reached DATA
    assert got["accepted"] == 6
    assert got["accepted_would_refuse"] == 1
    assert {(x["status"], x["stage"], x["reply"]): x["count"] for x in got["replies"]} == {
        ("refused", "rcpt", "550 5.2.1"): 1,
        ("refused", "rcpt", "450 4.7.25"): 1,
        ("refused", "eom", "450 4.7.26"): 2,
        ("would refuse", "rcpt", "450 4.7.25"): 1,
        ("would refuse", "eom", "450 4.7.26"): 1,
        ("would refuse", "rcpt", "550 5.2.1"): 1,
    }
    lab_net = "2001:db8:6::/64"
    noptr_net = str(ipaddress.ip_network(f"{noptr_out}/64", strict=False))
    assert {(x["status"], x["reply"], x["from_domain"], x["network"], x["ptr"]): x["count"]
            for x in got["senders"]} == {
        ("refused", "550 5.2.1", "example.com", good_net, "-"): 1,
        ("refused", "450 4.7.25", "example.com", good_net, "no PTR"): 1,
        ("refused", "450 4.7.26", "spffail.test", good_net, "mail.example.com"): 2,
        ("would refuse", "450 4.7.25", "example.com", noptr_net, "no PTR"): 1,
        ("would refuse", "450 4.7.26", "spffail.test", lab_net, "lab.example.com"): 1,
        ("would refuse", "550 5.2.1", "lab.example.com", lab_net, "-"): 1,
    }
    assert {(x["iprev"], x["spf"], x["dkim"]): (x["messages"], x["would_refuse"])
            for x in got["accepted_mix"]} == {
        ("pass", "pass", "none"): (4, 0),
        ("permerror", "fail", "none"): (1, 0),
        ("pass", "fail", "none"): (1, 1),
    }

    # The milter's log and Postfix's together, as in one mail.log: Postfix's
    # reject lines quote the forged HELO names (with "?" for each space) and
    # change nothing.
    postfix_log = pf.log.read_text()
    assert "helo=<h?decision?stage=eom?" in postfix_log
    both = json.loads(run_report("--format", "json", str(log), str(pf.log)).stdout)
    assert both["unparsed"] == 0
    assert both["lines"] == got["lines"] + len(postfix_log.splitlines())
    for key in ("messages", "accepted", "replies", "senders", "accepted_mix"):
        assert both[key] == got[key], key

    # The same log as syslog would have it: the same counts, and the times.
    lines = [f"Dec  1 15:{i // 60:02d}:{i % 60:02d} mx ipv6milter[4242]: "
             + line.removeprefix("INFO ipv6milter.milter: ")
             for i, line in enumerate(text.splitlines())]
    out = run_report("--format", "json", "-", stdin="\n".join(lines).encode())
    assert out.returncode == 0, out.stderr
    again = json.loads(out.stdout)
    for key in ("messages", "accepted", "unparsed", "replies", "accepted_mix"):
        if key == "replies":
            assert [(x["status"], x["reply"], x["count"]) for x in again[key]] == \
                [(x["status"], x["reply"], x["count"]) for x in got[key]]
        else:
            assert again[key] == got[key], key
    assert all(x["first_seen"] and x["last_seen"] for x in again["senders"])

    # The text table an administrator reads (shown with pytest -s).
    shown = run_report(str(log))
    assert shown.returncode == 0, shown.stderr
    table = shown.stdout.decode()
    print(table)
    assert re.search(r"refused\s+eom\s+450 4\.7\.26\s+2\s", table), table
    assert re.search(rf"would refuse\s+450 4\.7\.25\s+1\s+example\.com\s+{re.escape(noptr_net)}"
                     r"\s+no PTR", table), table
    assert "could not be parsed" not in table
