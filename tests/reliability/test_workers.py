"""``Workers``: one socket, several processes, through the real Postfix (issue #12).

* SIGKILL of one worker under load loses nothing: every message gets a
  reply; the few in flight on the killed worker get Postfix's
  ``milter_default_action = tempfail`` (a 4xx, retried by the sender), every
  other message is accepted, the other worker keeps its pid, and the killed
  one is replaced;
* SIGHUP reaches every worker: each logs the new configuration's digest,
  and every answer given afterwards follows the new configuration;
* the metrics are one view: after N messages the scraped counts went up by N.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import smtplib
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ipv6milter import config
from ipv6milter.metrics import config_hash
from tests.integration.harness import (
    GOOD_IP,
    PostfixInstance,
    Sink,
    free_port,
    run_postfix,
    wait_until,
)
from tests.integration.smtpclient import make_message

from .conftest import MILTER_BASE, POSTFIX_EXTRA
from .servers import Knot, MilterRunner
from .stream import Sent, send

pytestmark = pytest.mark.timeout(180)


@dataclass
class Lab:
    milter: MilterRunner
    postfix: PostfixInstance
    metrics_port: int

    @property
    def port(self) -> int:
        return self.postfix.port("workers")

    def workers(self) -> list[int]:
        pids = Path(f"/proc/{self.milter.pid}/task/{self.milter.pid}/children").read_text()
        return sorted(int(p) for p in pids.split()
                      if Path(f"/proc/{p}/comm").read_text().startswith("ipv6milter-w"))

    def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as r:
            text = r.read().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for f in text_string_to_metric_families(text) for s in f.samples}


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, knot: Knot, sink: Sink) -> Iterator[Lab]:
    mport = free_port()
    m = MilterRunner(tmp_path_factory.mktemp("workers"), "workers", {
        **MILTER_BASE, "Nameservers": knot.nameserver, "DNSTimeout": "2", "StageTimeout": "4",
        "Workers": "2", "MetricsListen": f"127.0.0.1:{mport}", "LogLevel": "info",
    })
    m.start()
    try:
        with run_postfix(tmp_path_factory.mktemp("postfix-workers"), sink.port,
                         {"workers": m.socket_spec}) as pf:
            subprocess.run(["postconf", "-c", str(pf.config_dir), "-e",
                            *(f"{k}={v}" for k, v in POSTFIX_EXTRA.items())],
                           check=True, capture_output=True, timeout=30)
            subprocess.run(["postfix", "-c", str(pf.config_dir), "reload"],
                           check=True, capture_output=True, timeout=30)
            lab = Lab(m, pf, mport)
            wait_until("two workers", lambda: len(lab.workers()) == 2)
            yield lab
    finally:
        assert m.stop() == 0, m.log_text()[-3000:]


def good(port: int, rcpt: str, n: int) -> tuple[int, str]:
    """One message from the well-configured client; the reply to RCPT, or to DATA."""
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as s:
        s.ehlo("client.test")
        code, text = s.docmd("XCLIENT", f"ADDR=IPV6:{GOOD_IP} NAME=[UNAVAILABLE]")
        assert code == 220, (code, text)
        s.ehlo("mail.example.com")
        assert s.mail("sender@example.com")[0] == 250
        code, text = s.rcpt(rcpt)
        if code != 250:
            return code, text.decode()
        msg = make_message(f"workers{n}", from_addr="sender@example.com", to=rcpt)
        code, text = s.data(msg)
        return code, text.decode()


def test_sigkill_of_one_worker_under_load_loses_nothing(lab: Lab) -> None:
    before = lab.workers()
    results: list[Sent] = []
    lock = threading.Lock()
    counter = iter(range(3800, 3880))  # identities of zones.stream_*, unused elsewhere
    killed_at: list[float] = []

    def client() -> None:
        for n in counter:
            r = send(lab.port, n, "load")
            with lock:
                results.append(r)
                if len(results) == 20 and not killed_at:
                    killed_at.append(time.monotonic())
                    os.kill(before[0], signal.SIGKILL)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(150)
    assert killed_at, "the worker was never killed"
    assert len(results) == 80
    # Every message got an answer; none was refused for good, none lost.
    assert all(not r.disconnected and r.code for r in results), [
        r for r in results if r.disconnected or not r.code]
    tempfailed = [r for r in results if not r.accepted]
    assert all(400 <= r.code < 500 for r in tempfailed), tempfailed
    # Only what was in flight on the killed worker (at most one a client).
    assert len(tempfailed) <= 4, tempfailed
    assert sum(r.accepted for r in results) >= 76
    # Replaced; the other one untouched.
    wait_until("the worker replaced", lambda: len(lab.workers()) == 2)
    after = lab.workers()
    assert before[1] in after and before[0] not in after, (before, after)
    log = lab.milter.log_text()
    assert f"(pid {before[0]}) killed by SIGKILL" in log and "starting another" in log
    # And the pair serves again, the replacement included.
    with ThreadPoolExecutor(4) as pool:
        late = list(pool.map(lambda n: send(lab.port, n, "after"), range(3880, 3896)))
    assert all(r.accepted for r in late), [r for r in late if not r.accepted]
    print(f"\nworkers: 80 messages, worker {before[0]} SIGKILLed after 20: "
          f"{len(tempfailed)} tempfailed (retried), {80 - len(tempfailed)} accepted, 0 lost")


def test_sighup_reaches_every_worker(lab: Lab) -> None:
    m = lab.milter
    original = m.config.read_text()
    rcpt = "someone@later.example"
    assert good(lab.port, rcpt, 0)[0] == 550  # not opted in yet
    workers = lab.workers()
    try:
        m.config.write_text(original.replace(
            f"AcceptDomains {MILTER_BASE['AcceptDomains']}",
            f"AcceptDomains {MILTER_BASE['AcceptDomains']}, later.example"))
        assert m.config.read_text() != original
        digest = config_hash(config.load(str(m.config)))
        m.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        for pid in workers:
            wait_until(f"worker {pid} reloaded", lambda pid=pid: (
                f"(pid {pid}) uses the new configuration {digest}" in m.log_text()))
        # Whichever worker takes a connection, it answers with the new configuration.
        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda n: good(lab.port, rcpt, n), range(1, 17)))
        assert all(code == 250 for code, _ in replies), replies
    finally:
        m.config.write_text(original)
        m.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        wait_until("back to the original", lambda: m.log_text().count(
            "configuration reloaded") >= 2)


def test_metrics_are_one_view_over_all_workers(lab: Lab) -> None:
    before = lab.scrape()
    n = 12
    with ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(lambda i: good(lab.port, "rcpt@example.com", 1000 + i),
                                range(n)))
    assert all(code == 250 for code, _ in replies), replies
    wait_until("connections closed", lambda: lab.scrape().get(
        ("ipv6milter_connections_in_flight", ()), 1) == 0)
    after = lab.scrape()

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("ipv6milter_decisions_total", stage="eom", reply="accept", mode="enforce") == n
    assert delta("ipv6milter_decisions_total", stage="rcpt", reply="accept", mode="enforce") == n
    assert delta("ipv6milter_connections_total", scope="ipv6") == n
    assert delta("ipv6milter_check_duration_seconds_count", check="message") == n
    # One target, not one series per process: no sample carries a pid.
    assert not [k for k in after if any(name == "pid" for name, _ in k[1])]
    assert after[("ipv6milter_enforce_share_percent", ())] == 100
    assert after[("ipv6milter_connections_in_flight", ())] == 0


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_sighup_bursts_while_workers_start_and_serve_stop_no_worker(lab: Lab) -> None:
    """A reload that arrives while a worker starts must not stop it (libmilter's
    own signal thread stops the milter on any SIGHUP it takes), nor may a burst
    aimed at the parent, or straight at a worker, under load.  Workers are
    killed one after the other; while each replacement starts, SIGHUP goes in
    bursts to the parent and to every child.  The only workers that end are
    the ones killed."""
    m = lab.milter
    offset = len(m.log_text())
    results: list[Sent] = []
    lock = threading.Lock()
    done = threading.Event()
    counter = iter(range(3900, 4000))  # identities of zones.stream_*, unused elsewhere

    def client() -> None:
        for n in counter:
            if done.is_set():
                return
            r = send(lab.port, n, "burst")
            with lock:
                results.append(r)

    def burst(seconds: float) -> int:
        """SIGHUP to the parent and to every child, as fast as it goes."""
        sent = 0
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            m.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
            for pid in _children(m.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGHUP)
                    sent += 1
            time.sleep(0.001)
        return sent

    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    killed: list[int] = []
    signals = 0
    try:
        for round_ in range(8):
            wait_until("two workers", lambda: len(lab.workers()) == 2, timeout=30)
            victim = lab.workers()[round_ % 2]
            os.kill(victim, signal.SIGKILL)
            killed.append(victim)
            # The replacement is forked within milliseconds: the burst covers its start.
            signals += burst(1.0)
        wait_until("two workers", lambda: len(lab.workers()) == 2, timeout=30)
        signals += burst(1.0)  # and at two running workers
    finally:
        done.set()
        for t in threads:
            t.join(120)
    wait_until("two workers", lambda: len(lab.workers()) == 2, timeout=30)
    log = m.log_text()[offset:]
    ended = [int(pid) for pid in re.findall(
        r"worker \d+ \(pid (\d+)\) (?:killed by|exited with)", log)]
    assert sorted(ended) == sorted(killed), (
        f"workers that stopped without being killed: {sorted(set(ended) - set(killed))}\n"
        + log[-3000:])
    assert m.proc.poll() is None  # type: ignore[union-attr]
    # Every message got an answer; only what was in flight on a killed worker was deferred.
    assert results and all(not r.disconnected and r.code for r in results), [
        r for r in results if r.disconnected or not r.code]
    deferred = [r for r in results if not r.accepted]
    assert all(400 <= r.code < 500 for r in deferred), deferred
    assert len(deferred) <= 3 * len(killed), deferred
    print(f"\nsighup bursts: {len(killed)} workers killed and replaced under "
          f"{signals} SIGHUPs to the workers (and bursts to the parent); "
          f"{len(results)} messages, {len(deferred)} deferred, 0 workers stopped by a signal")
