"""Hostile and malformed input: each has a defined outcome (hostile.py), and
nothing leaks: no traceback, no reply outside SPEC §1's set, no header that
does not parse or that says something the milter did not find.

Each case goes to the main milter (enforce: the replies) and to the same
configuration in monitor mode (every message stamped: the results of
refused messages too), straight over the milter protocol, DNS from Knot.
"""

from __future__ import annotations

import time

import pytest

from tests.integration.harness import GOOD_IP

from .conftest import report
from .hostile import KNOWN_REPLIES, Case, Outcome, cases, parse_message, plain, run
from .milterclient import MilterConnection
from .servers import MilterRunner

CASES = cases()
SEEN: dict[str, tuple[Outcome, Outcome]] = {}


def _run(m: MilterRunner, case: Case) -> Outcome:
    with MilterConnection("127.0.0.1", m.port, timeout=30) as conn:
        return run(conn, case)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_input_has_its_defined_outcome(
    case: Case, main_milter: MilterRunner, monitor_milter: MilterRunner
) -> None:
    enforced = _run(main_milter, case)
    monitored = _run(monitor_milter, case)
    SEEN[case.name] = (enforced, monitored)
    assert not enforced.problems and not monitored.problems, (
        enforced.problems + monitored.problems
    )
    got = {**monitored.observed(), "rcpt": enforced.observed()["rcpt"],
           "eom": enforced.observed()["eom"]}
    want = dict(p.split("=", 1) for p in case.expect.split())
    assert {k: got.get(k) for k in want} == want, (enforced.summary, monitored.summary)
    # Monitor mode never refuses: every reply there is a 250.
    assert all(r == "250" for r in monitored.rcpt) and monitored.eom in (None, "250"), monitored


@pytest.mark.timeout(60)
def test_header_name_not_utf8_gets_no_reply_and_the_milter_goes_on(
    main_milter: MilterRunner,
) -> None:
    """A header field name in Latin-1 never reaches our code: pymilter's C glue
    cannot decode it and sends no reply, so the MTA's own timeout applies
    (milter_command_timeout, then milter_default_action = tempfail).  Postfix
    never sends such a name (it takes the line for the start of the body; see
    test_hostile_mta.py).  Other connections must not notice."""
    heads, body = parse_message(plain("sender@example.com"))
    stuck = MilterConnection("127.0.0.1", main_milter.port, timeout=3)
    try:
        stuck.connect(GOOD_IP)
        stuck.helo("mail.example.com")
        try:
            _, eom = stuck.message("sender@example.com", ["rcpt@example.com"],
                                   [*heads, ("X-\xe9t\xe9".encode("latin-1"), b" v")], body)
        except TimeoutError:
            outcome = "no reply"
        else:
            outcome = eom.smtp if eom is not None else "none"
            assert KNOWN_REPLIES.match(outcome), outcome
        start = time.monotonic()
        with MilterConnection("127.0.0.1", main_milter.port, timeout=10) as other:
            other.connect(GOOD_IP)
            other.helo("mail.example.com")
            _, eom = other.message("sender@example.com", ["rcpt@example.com"], heads, body)
        assert eom is not None and eom.ok
        assert time.monotonic() - start < 2
    finally:
        stuck.quit()
    SEEN["header name in Latin-1 (8-bit, not UTF-8)"] = (
        Outcome([], outcome, None, [], []), Outcome([], None, None, [], []))


def test_the_milters_logged_no_traceback(
    main_milter: MilterRunner, monitor_milter: MilterRunner
) -> None:
    """Runs after the cases above (file order): nothing was an internal error."""
    for m in (main_milter, monitor_milter):
        text = m.log_text()
        assert "Traceback" not in text, text[-5000:]
        assert "internal error" not in text, text[-5000:]
    lines = [f"{'input':<62} enforce: replies / monitor: results"]
    for name, (enforced, monitored) in SEEN.items():
        results = " ".join(p for p in monitored.summary.split()
                           if not p.startswith(("rcpt=", "eom=")))
        eom = enforced.eom.split(" Service")[0].split(" Temporary")[0] if enforced.eom else "-"
        rcpt = ",".join(r.split(" Service")[0] for r in enforced.rcpt) or "-"
        lines.append(f"{name[:62]:<62} rcpt={rcpt} eom={eom} | {results}")
    report(f"hostile input: {len(SEEN)} cases, outcome of each", lines)
