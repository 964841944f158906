"""Reload is one configuration for all (SPEC §3), through the real daemon under ``UserID``.

The supervisor (root) reads the file; the workers run as ``UserID``.  A new
configuration that user cannot read -- the file itself 0600, or the
``AcceptDomains`` file it names -- is refused and counted as failed, and
every worker keeps answering with the running configuration, a worker
started after the refusal too.  Made readable, the same reload reaches every
worker.  Each worker is asked on its own: the others are stopped (SIGSTOP)
while it takes the connections.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ipv6milter import config
from ipv6milter.metrics import config_hash
from tests.integration.harness import GOOD_IP, free_port, milter_command, wait_until

from .milterclient import MilterConnection
from .servers import Knot

pytestmark = pytest.mark.timeout(120)

RCPT = "rcpt@later.example"  # not opted in at first


def _workers(pid: int) -> list[int]:
    kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return sorted(int(c) for c in kids
                  if Path(f"/proc/{c}/comm").read_text().startswith("ipv6milter-w"))


def _rcpt_reply(port: int) -> str:
    with MilterConnection("127.0.0.1", port) as c:
        c.connect(GOOD_IP)
        c.helo("mail.example.com")
        c.mail("sender@example.com")
        r = c.rcpt(RCPT)
        assert r is not None
        return r.smtp


def _stopped(pid: int) -> bool:
    tasks = Path(f"/proc/{pid}/task").iterdir()
    return all((t / "stat").read_text().rsplit(")", 1)[1].split()[0] == "T" for t in tasks)


def _each_worker(pid: int, port: int) -> dict[int, list[str]]:
    """The RCPT replies of every worker, three connections each, each
    worker alone awake while it is asked."""
    out: dict[int, list[str]] = {}
    workers = _workers(pid)
    for w in workers:
        others = [o for o in workers if o != w]
        for o in others:
            os.kill(o, signal.SIGSTOP)
            # kill() returns before every thread has stopped: one could still accept.
            wait_until(f"{o} stopped", lambda o=o: _stopped(o), timeout=10)
        try:
            out[w] = [_rcpt_reply(port)[:9] for _ in range(3)]
        finally:
            for o in others:
                os.kill(o, signal.SIGCONT)
    return out


def _reloads(mport: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for f in text_string_to_metric_families(text):
        for s in f.samples:
            if s.name == "ipv6milter_config_reloads_total":
                out[s.labels["result"]] = s.value
            elif s.name == "ipv6milter_config_info":
                out["hash=" + s.labels["hash"]] = s.value
    return out


@pytest.fixture
def run_dir(request: pytest.FixtureRequest) -> Iterator[Path]:
    # Not under pytest's 0700 tree: UserID must be able to reach the files.
    d = Path(tempfile.mkdtemp(prefix="ipv6milter-reload-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("unreadable", ["config", "accept_domains_file"])
def test_a_reload_userid_cannot_read_is_refused_and_no_worker_takes_it(
        unreadable: str, run_dir: Path, knot: Knot) -> None:
    if os.geteuid() != 0:
        pytest.fail("needs root to run workers as another user")
    port, mport = free_port(), free_port()
    conf = run_dir / "ipv6milter.conf"
    domains = run_dir / "domains"
    domains.write_text("example.com\n")
    domains.chmod(0o644)
    conf.write_text(
        f"Socket inet:{port}@127.0.0.1\nUserID nobody:nogroup\nWorkers 2\n"
        f"Nameservers {knot.nameserver}\nAcceptDomains file:{domains}\nLogLevel info\n"
        f"MetricsListen 127.0.0.1:{mport}\n")
    conf.chmod(0o644)
    log = run_dir / "milter.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([milter_command(), "-c", str(conf)], stdin=subprocess.DEVNULL,
                                stdout=fh, stderr=subprocess.STDOUT)
    try:
        wait_until("two workers", lambda: len(_workers(proc.pid)) == 2, timeout=30)
        wait_until("the metrics", lambda: _reloads(mport) is not None, timeout=30)
        old = config_hash(config.load(str(conf)))
        before = _each_worker(proc.pid, port)
        assert all(r == ["550 5.2.1"] * 3 for r in before.values()), before

        # The new configuration opts later.example in; its user cannot read it.
        domains.write_text("example.com\nlater.example\n")
        if unreadable == "config":
            conf.write_text(conf.read_text() + "# edited\n")
            conf.chmod(0o600)
        else:
            domains.chmod(0o600)
        new = config_hash(config.load(str(conf)))  # as root reads it
        assert new != old
        proc.send_signal(signal.SIGHUP)
        wait_until("the refusal", lambda: "reload failed" in log.read_text())
        text = log.read_text()
        assert "as UserID nobody:nogroup" in text and "Permission denied" in text, text
        assert "configuration reloaded" not in text
        metrics = _reloads(mport)
        assert metrics.get("failed") == 1 and metrics.get("ok", 0) == 0, metrics
        assert metrics.get(f"hash={old}") == 1, metrics
        assert all(r == ["550 5.2.1"] * 3 for r in _each_worker(proc.pid, port).values())

        # A worker started now is started with what the others run.
        victim = _workers(proc.pid)[0]
        os.kill(victim, signal.SIGKILL)
        wait_until("the replacement", lambda: len(_workers(proc.pid)) == 2
                   and victim not in _workers(proc.pid), timeout=30)
        replies = _each_worker(proc.pid, port)
        assert victim not in replies and len(replies) == 2
        assert all(r == ["550 5.2.1"] * 3 for r in replies.values()), replies

        # Readable: the same reload reaches every worker, the new one included.
        conf.chmod(0o644)
        domains.chmod(0o644)
        proc.send_signal(signal.SIGHUP)
        wait_until("the reload", lambda: "configuration reloaded" in log.read_text())
        for pid in _workers(proc.pid):
            wait_until(f"worker {pid}", lambda pid=pid: (
                f"(pid {pid}) uses the new configuration {new}" in log.read_text()))
        after = _each_worker(proc.pid, port)
        assert all(r == ["250"] * 3 for r in after.values()), after
        metrics = _reloads(mport)
        assert metrics.get("failed") == 1 and metrics.get("ok") == 1, metrics
        assert metrics.get(f"hash={new}") == 1, metrics
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in log.read_text()
