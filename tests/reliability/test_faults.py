"""Faults under load, with every message accounted for (issue #6).

A bounded stream of in-scope messages goes through the real Postfix to the
milter, which asks the real Knot through a relay of ours.  While it flows:

    dns-stopped     Knot is stopped, then started again on the same port
    dns-delayed     the relay holds every answer back beyond DNSTimeout
    milter-killed   the milter gets SIGKILL, then is started again
    resolver-gone   the relay's ports close (ICMP port unreachable, TCP RST)

Then each message must be either delivered with exactly one of our headers
(first, parseable), or refused with a 4xx; never a 5xx, never lost, never
delivered unstamped; and the restarted milter must serve within 1 s of
listening again.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest

from tests.integration.harness import PostfixInstance, Sink

from .conftest import report
from .servers import DnsProxy, Knot, MilterRunner
from .stream import COLUMNS, Sent, Stream, delivered, mark_of, reconcile, send

# 20 concurrent clients, as the issue asks; 2,000 messages take about a
# minute on 2 cores, the faults included (the report gives the rate).
TOTAL = 2000
CLIENTS = 20
DELAY_BEYOND_TIMEOUT = 2.6  # the faulty milter's DNSTimeout is 2 s
FAULT_SECONDS = 3.0
SERVED_AGAIN_WITHIN = 1.0

CLEAN = ("baseline", "recovered")
FAULTS = ("dns-stopped", "dns-delayed", "milter-killed", "resolver-gone")
PHASES = [CLEAN[0], *FAULTS, CLEAN[1]]


class Faults:
    """Runs the faults one after the other, each once enough of the stream
    has started, with clean traffic in between; records what it measured."""

    def __init__(self, stream: Stream, knot: Knot, proxy: DnsProxy, milter: MilterRunner,
                 port: int):
        self.stream = stream
        self.knot = knot
        self.proxy = proxy
        self.milter = milter
        self.port = port
        self.notes: list[str] = []
        self.probes: list[Sent] = []
        self.listening: float | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="faults", daemon=True)

    def _begin(self, name: str, index: int) -> None:
        # Fault k begins once k/6 of the stream has started.
        self.stream.wait_started(TOTAL * index // (len(FAULTS) + 2), timeout=120)
        self.stream.set_phase(name)
        self.notes.append(f"{name}: from message {self.stream.started}")

    def _run(self) -> None:
        try:
            self._begin("dns-stopped", 1)
            self.knot.stop()
            time.sleep(FAULT_SECONDS)
            self.knot.start()
            self.stream.set_phase("recovered")

            self._begin("dns-delayed", 2)
            self.proxy.delay = DELAY_BEYOND_TIMEOUT
            time.sleep(FAULT_SECONDS)
            self.proxy.delay = 0.0
            self.stream.set_phase("recovered")

            self._begin("milter-killed", 3)
            self.milter.kill()
            time.sleep(1.0)
            started = self.milter.start()
            self.stream.set_phase("recovered")
            self.listening = started.listening
            # A transaction of its own, started the moment the milter listens
            # (while the 20 clients rush back in too).
            probe = send(self.port, TOTAL + 1, "probe")
            self.probes.append(probe)
            self.notes.append(
                f"milter restart: listening {started.listening - started.spawned:.2f} s after"
                f" exec; a transaction started then got {probe.reply!r}"
                f" {probe.end - started.listening:.3f} s after"
            )

            self._begin("resolver-gone", 4)
            self.proxy.close()
            time.sleep(FAULT_SECONDS)
            self.proxy.open()
            self.stream.set_phase("recovered")
        except BaseException as e:  # reported by the test, not lost in a thread
            self.error = e


@pytest.mark.timeout(240)
def test_faults_under_load_every_message_accounted_for(
    postfix: PostfixInstance,
    sink: Sink,
    knot: Knot,
    proxy: DnsProxy,
    faulty_milter: MilterRunner,
) -> None:
    port = postfix.port("faulty")
    stream = Stream(port, TOTAL, CLIENTS, CLEAN)
    faults = Faults(stream, knot, proxy, faulty_milter, port)
    start = time.monotonic()
    stream.start()
    faults.thread.start()
    faults.thread.join(180)
    stream.join(120)
    elapsed = time.monotonic() - start
    # Whatever happened, the servers are back for the tests after this one.
    if knot.proc is None:
        knot.start()
    assert faults.error is None, f"the fault driver failed: {faults.error!r}"

    accepted = [s for s in stream.sent if s.accepted] + [p for p in faults.probes if p.accepted]
    wanted = {mark_of(s.n) for s in accepted}
    deadline = time.monotonic() + 90
    got = delivered(sink)
    while not wanted <= got.keys() and time.monotonic() < deadline:
        time.sleep(0.25)
        got = delivered(sink)

    for s in stream.sent:
        s.phase = stream.label(s)
    rec = reconcile(stream.sent, got)
    table = rec.table(PHASES, COLUMNS)
    # Served again: the first transaction begun after the restarted milter
    # listened that was accepted, stamped and delivered.
    back = faults.listening
    assert back is not None
    served = [s.end - back for s in [*stream.sent, *faults.probes]
              if s.start >= back and s.accepted and mark_of(s.n) in got]
    served_again = min(served) if served else float("inf")
    faults.notes.append(f"served again {served_again:.3f} s after the restarted milter listened")
    rate = len(stream.sent) / elapsed
    lines = [
        f"{len(stream.sent)} messages, {CLIENTS} concurrent clients, IPv6 via XCLIENT,"
        f" {elapsed:.1f} s ({rate:.0f} messages/s)",
        *table,
        *faults.notes,
    ]
    report("faults: reconciliation", lines)
    print("\n".join(lines))

    assert len(stream.sent) == TOTAL
    assert not rec.problems, "\n".join(rec.problems[:40])
    total: Counter[str] = Counter()
    for row in rec.rows.values():
        total.update(row)
    assert total["delivered"] + total["4xx"] == TOTAL
    assert total["5xx"] == 0
    # Each fault must have bitten (else this test proves nothing), and the
    # stream must have flowed before and after.
    for phase in ("dns-stopped", "dns-delayed", "resolver-gone"):
        assert rec.rows[phase]["4.4.3 dns"] > 0, f"{phase} caused no 451 4.4.3: {table}"
    assert rec.rows["milter-killed"]["4xx"] > 0
    # With DNS and the milter healthy, every message passes.
    for phase in CLEAN:
        assert rec.rows[phase]["delivered"] == rec.rows[phase]["sent"] > 0, table
    # The restarted milter serves at once.
    assert faults.probes and faults.probes[0].accepted, faults.probes
    assert served_again < SERVED_AGAIN_WITHIN
