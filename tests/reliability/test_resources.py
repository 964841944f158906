"""Bounded resources: memory, connections, no leak (issue #6).

Driven with a milter-protocol client of our own (milterclient.py) straight
at a fresh ``ipv6milter -c FILE`` each, so that its peak RSS (VmHWM in
/proc/PID/status) belongs to the test alone.  DNS is the real Knot.

The bounds asserted here are the ones docs/admin-guide.md states
("Reliability and limits"):

* at rest, after start: under 64 MiB;
* a message over MaxMessageSize: at most MaxMessageSize more, while it is
  received, and it is judged without DKIM;
* a message under MaxMessageSize: up to 3.5 times its size more while it is
  judged, 7 times if DKIM-signed (dkimpy's copies);
* 200 connections at once: under 64 MiB more than at rest.
"""

from __future__ import annotations

import random
import statistics
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.harness import AUTHSERV_ID, GOOD_IP, NOPTR_IP, NOT_OPTED_IN
from tests.integration.smtpclient import make_message

from .conftest import Stopper, report
from .milterclient import MilterConnection, Response, parse_message
from .servers import Knot, MilterRunner
from .zones import hostile_key

MIB = 1024
AT_REST_KIB = 64 * MIB
DEFAULT_MAX = 64 * 1024 * 1024  # MaxMessageSize's default


@pytest.fixture
def fresh_milter(tmp_path: Path, knot: Knot, stopper: Stopper) -> Iterator[MilterRunner]:
    m = MilterRunner(
        tmp_path,
        "fresh",
        {
            "Nameservers": knot.nameserver,
            "AcceptDomains": "example.com, example.net",
            "AuthservID": AUTHSERV_ID,
            "LogLevel": "info",  # the default: the decision log is written
        },
    )
    m.start()
    try:
        yield m
    finally:
        stopper.stop_later(m)
    assert "Traceback" not in m.log_text(), m.log_text()[-6000:]


def signed(message: bytes, domain: str = "hostile.test", selector: str = "good") -> bytes:
    import dkim

    return dkim.sign(message, selector.encode(), domain.encode(), hostile_key()[0],
                     canonicalize=(b"relaxed", b"simple"),
                     include_headers=[b"from", b"to", b"subject"]) + message


def body_of(size: int) -> bytes:
    """``size`` bytes of body in lines of 998 characters (RFC 5322's limit)."""
    line = b"0123456789" * 99 + b"abcdefgh\r\n"
    return line * (size // len(line))


def our_header(resp: Response) -> str:
    added = resp.added_headers()
    assert len(added) == 1 and added[0][:2] == (0, "Authentication-Results"), added
    return added[0][2]


# -- a 100 MB message ------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_message_over_max_message_size_keeps_memory_bounded(fresh_milter: MilterRunner) -> None:
    m = fresh_milter
    rest = m.hwm_kib()
    assert rest < AT_REST_KIB, f"{rest} KiB at rest"
    # Signed, and SPF fails: only DKIM could pass it, and DKIM is not run.
    head = signed(make_message("big", from_addr="someone@spffail.test", to="rcpt@example.com",
                               body=""))
    headers, _ = parse_message(head)
    body = body_of(100 * 1024 * 1024)
    start = time.monotonic()
    with MilterConnection("127.0.0.1", m.port, timeout=120) as c:
        c.connect(GOOD_IP)
        c.helo("mail.example.com")
        _, eom = c.message("someone@spffail.test", ["rcpt@example.com"], headers, body)
    elapsed = time.monotonic() - start
    assert eom is not None
    assert eom.smtp.startswith("450 4.7.26"), eom
    peak = m.hwm_kib()
    # The same with SPF passing: accepted, stamped, the signature "neutral".
    with MilterConnection("127.0.0.1", m.port, timeout=120) as c:
        c.connect(GOOD_IP)
        c.helo("mail.example.com")
        _, eom = c.message("sender@example.com", ["rcpt@example.com"], headers, body)
    assert eom is not None and eom.ok, eom
    value = our_header(eom)
    assert "spf=pass" in value and "dkim=neutral header.d=hostile.test" in value, value
    peak = max(peak, m.hwm_kib())
    report("resources: 100 MB message (MaxMessageSize 64 MiB)", [
        f"at rest {rest / MIB:.0f} MiB; peak {peak / MIB:.0f} MiB after two 100 MiB messages"
        f" ({elapsed:.1f} s each); bound: at rest + MaxMessageSize + 32 MiB",
    ])
    assert peak < rest + DEFAULT_MAX // 1024 + 32 * MIB, f"peak {peak} KiB"
    # And it keeps serving.
    with MilterConnection("127.0.0.1", m.port) as c:
        c.connect(GOOD_IP)
        c.helo("mail.example.com")
        small = make_message("after", from_addr="sender@example.com", to="rcpt@example.com")
        _, eom = c.message("sender@example.com", ["rcpt@example.com"], *parse_message(small))
    assert eom is not None and eom.ok


@pytest.mark.timeout(120)
def test_message_under_max_message_size_costs_a_bounded_multiple(
    fresh_milter: MilterRunner,
) -> None:
    """Unsigned first (the peak only grows), then DKIM-signed."""
    m = fresh_milter
    rest = m.hwm_kib()
    size = 48 * 1024 * 1024
    body = body_of(size).decode()
    factors = []
    for sign_it, bound in ((False, 3.5), (True, 7.0)):
        msg = make_message("under", from_addr="someone@spffail.test", to="rcpt@example.com",
                           body=body)
        if sign_it:
            msg = signed(msg)
        with MilterConnection("127.0.0.1", m.port, timeout=120) as c:
            c.connect(GOOD_IP)
            c.helo("mail.example.com")
            _, eom = c.message("someone@spffail.test", ["rcpt@example.com"],
                               *parse_message(msg))
        assert eom is not None
        if sign_it:
            assert eom.ok, eom
            assert "dkim=pass header.d=hostile.test" in our_header(eom)
        else:
            assert eom.smtp.startswith("450 4.7.26"), eom
        peak = m.hwm_kib()
        factors.append((peak - rest) / (size / 1024))
        assert peak < rest + bound * size / 1024, (sign_it, peak)
    report("resources: 48 MiB messages under MaxMessageSize", [
        f"at rest {rest / MIB:.0f} MiB; peak {peak / MIB:.0f} MiB: {factors[0]:.1f} x the"
        f" message unsigned (bound 3.5 x), {factors[1]:.1f} x DKIM-signed (bound 7 x)",
    ])


# -- 200 connections at once -------------------------------------------------------------------


def _open(m: MilterRunner) -> MilterConnection:
    c = MilterConnection("127.0.0.1", m.port, timeout=60)
    c.connect(GOOD_IP)
    c.helo("mail.example.com")
    return c


def _probe(m: MilterRunner) -> float:
    """Seconds for one whole transaction on a connection of its own."""
    start = time.monotonic()
    with MilterConnection("127.0.0.1", m.port, timeout=60) as c:
        c.connect(GOOD_IP)
        c.helo("mail.example.com")
        msg = make_message("probe", from_addr="sender@example.com", to="rcpt@example.com")
        _, eom = c.message("sender@example.com", ["rcpt@example.com"], *parse_message(msg))
    assert eom is not None and eom.ok, eom
    return time.monotonic() - start


@pytest.mark.timeout(120)
def test_200_idle_then_active_connections(fresh_milter: MilterRunner) -> None:
    m = fresh_milter
    count = 200
    rest = m.hwm_kib()
    conns = [_open(m) for _ in range(count)]
    try:
        idle_threads = int(m.status()["Threads"])
        idle_probe = _probe(m)
        body = body_of(64 * 1024)
        msg = make_message("burst", from_addr="sender@example.com", to="rcpt@example.com")
        headers, _ = parse_message(msg)
        barrier = threading.Barrier(count + 1)
        results: list[str] = []
        lock = threading.Lock()

        def active(c: MilterConnection) -> None:
            barrier.wait(30)
            outcome = "no answer"
            try:
                for _ in range(2):
                    _, eom = c.message("sender@example.com", ["rcpt@example.com"], headers, body)
                    outcome = eom.smtp if eom is not None else "none"
            except (OSError, Exception) as e:  # recorded, asserted below
                outcome = f"{type(e).__name__}: {e}"
            with lock:
                results.append(outcome)

        threads = [threading.Thread(target=active, args=(c,), daemon=True) for c in conns]
        for t in threads:
            t.start()
        barrier.wait(30)
        busy_start = time.monotonic()
        busy_probe = _probe(m)
        for t in threads:
            t.join(90)
        burst = time.monotonic() - busy_start
        peak = m.hwm_kib()
    finally:
        for c in conns:
            c.quit()
    report("resources: 200 connections, idle then active", [
        f"at rest {rest / MIB:.0f} MiB; peak {peak / MIB:.0f} MiB with {count} connections"
        f" ({idle_threads} threads while idle); bound: at rest + 64 MiB",
        f"another connection served in {idle_probe:.3f} s while they idled and in"
        f" {busy_probe:.3f} s during the burst of {2 * count} messages ({burst:.1f} s)",
    ])
    assert Counter(results) == {"250": count}, Counter(results)
    assert idle_probe < 1.0
    assert busy_probe < 15.0
    assert peak < rest + 64 * MIB


# -- 10,000 messages in a row: no leak -----------------------------------------------------------

ROUNDS = 10_000
PER_CONNECTION = 10
WARM_UP = 2_000
SAMPLE_EVERY = 1_000
LEAK_TOLERANCE_KIB = 4 * MIB


class Kinds:
    """Every path through the milter, in turn: accepted by SPF, by DKIM,
    refused at end of message, at RCPT (550, 4.7.25), forged headers
    removed, aborted mid-body, dropped mid-message, out of scope."""

    def __init__(self) -> None:
        ok = make_message("ok", from_addr="sender@example.com", to="rcpt@example.com")
        forged = make_message(
            "forged", from_addr="sender@example.com", to="rcpt@example.com",
            extra_headers=[f"Authentication-Results: {AUTHSERV_ID}; spf=pass",
                           "Authentication-Results: other.example; spf=pass"])
        dkim_msg = signed(make_message("dk", from_addr="someone@spffail.test",
                                       to="rcpt@example.com"))
        self.ok = parse_message(ok)
        self.forged = parse_message(forged)
        self.dkim = parse_message(dkim_msg)

    def run(self, c: MilterConnection, n: int) -> str:
        kind = n % 9
        if kind == 0:
            return _eom(c.message("sender@example.com", ["rcpt@example.com"], *self.ok))
        if kind == 1:
            return _eom(c.message("someone@spffail.test", ["rcpt@example.com"], *self.dkim))
        if kind == 2:
            return _eom(c.message("someone@spffail.test", ["rcpt@example.com"], *self.ok))
        if kind == 3:
            rcpts, _ = c.message("sender@example.com", [f"x@{NOT_OPTED_IN}"], *self.ok)
            return rcpts[0].smtp[:9] if rcpts[0] else "?"
        if kind == 4:
            return _eom(c.message("sender@example.com", ["rcpt@example.com"], *self.forged))
        if kind == 5:  # the MTA gives up mid-body
            c.mail("sender@example.com")
            c.rcpt("rcpt@example.com")
            for name, value in self.ok[0]:
                c.header(name, value)
            c.eoh()
            c.body(b"partial\r\n")
            c.abort()
            return "aborted"
        if kind == 6:
            return _eom(c.message(b"<>", ["rcpt@example.com"], *self.ok))
        if kind == 7:  # example.net's SPF does not list 2001:db8::25
            return _eom(c.message("sender@example.net", ["rcpt@example.net"], *self.ok))
        return _eom(c.message("sender@example.com", ["a@example.com", "b@example.net"],
                              *self.ok))


def expected(index: int, n: int) -> str:
    """What message ``n`` on connection ``index`` must get (see Kinds, _connection)."""
    shape, kind = index % 10, n % 9
    if kind == 5:
        return "aborted"
    if shape == 8:  # IPv4: out of scope, never refused
        return "250"
    if kind == 3:
        return "550 5.2.1"
    if shape == 7:  # no PTR: every opted-in recipient 450 4.7.25, no end of message
        return "none"
    return "450 4.7.2" if kind in (2, 7) else "250"


def _eom(result: tuple[list[Response | None], Response | None]) -> str:
    _, eom = result
    return eom.smtp[:9] if eom is not None else "none"


def _connection(m: MilterRunner, index: int) -> MilterConnection:
    c = MilterConnection("127.0.0.1", m.port, timeout=30)
    shape = index % 10
    if shape == 7:
        c.connect(NOPTR_IP)  # every RCPT: 450 4.7.25
    elif shape == 8:
        c.connect("192.0.2.10")  # IPv4: out of scope
    else:
        c.connect(GOOD_IP)
    c.helo("mail.example.com")
    return c


@pytest.mark.timeout(180)
def test_10000_messages_in_a_row_do_not_leak(fresh_milter: MilterRunner) -> None:
    m = fresh_milter
    kinds = Kinds()
    outcomes: Counter[str] = Counter()
    wrong: list[str] = []
    samples: list[tuple[int, int]] = []
    rng = random.Random(6)
    start = time.monotonic()
    n = 0
    for index in range(ROUNDS // PER_CONNECTION):
        c = _connection(m, index)
        for _ in range(PER_CONNECTION):
            got = kinds.run(c, n)
            outcomes[got] += 1
            if got != expected(index, n):
                wrong.append(f"message {n} on connection {index}: {got}")
            n += 1
            if n % SAMPLE_EVERY == 0:
                samples.append((n, m.rss_kib()))
        if rng.random() < 0.1:
            c.sock.close()  # the MTA vanishes without QUIT
        else:
            c.quit()
    elapsed = time.monotonic() - start
    warm = [rss for k, rss in samples if k >= WARM_UP]
    growth = max(warm) - warm[0]
    report("resources: 10,000 messages in a row", [
        f"{n} messages on {n // PER_CONNECTION} connections in {elapsed:.1f} s"
        f" ({n / elapsed:.0f}/s); outcomes {dict(sorted(outcomes.items()))}",
        "RSS (MiB) every 1,000: " + " ".join(f"{rss / MIB:.1f}" for _, rss in samples),
        f"growth after {WARM_UP} messages: {growth} KiB (tolerance {LEAK_TOLERANCE_KIB} KiB);"
        f" peak {m.hwm_kib() / MIB:.0f} MiB",
    ])
    assert n == ROUNDS
    assert not wrong, wrong[:20]
    assert growth <= LEAK_TOLERANCE_KIB, samples
    # No upward trend either: the last samples are not above the median of the warm ones.
    assert statistics.median(warm[-3:]) <= statistics.median(warm) + MIB, samples
