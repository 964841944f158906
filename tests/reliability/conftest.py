"""Session fixtures of the reliability suite, on loopback only.

    knot     Knot DNS with the zones of zones.py; tests may stop and restart it
    proxy    a DNS relay in front of Knot that can delay answers or go away
    sink     the SMTP server Postfix relays to (tests.integration.harness)
    main     ipv6milter asking Knot directly (hostile-input tests)
    faulty   ipv6milter asking through the proxy (the fault stream)
    postfix  a private Postfix, one smtpd port per milter ("main", "faulty")

Reports (the fault stream's reconciliation table, RSS figures) are printed in
pytest's terminal summary and written to reliability-report.txt in the
session's temporary directory.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.harness import (
    AUTHSERV_ID,
    OPTED_IN,
    PostfixInstance,
    Sink,
    log_offsets,
    log_sections,
    run_postfix,
    run_sink,
)

from .servers import DnsProxy, Knot, MilterRunner
from .zones import build_all_zones

REPORT: list[str] = []
_REPORT_FILE = pytest.StashKey[Path]()
_LOGS: dict[str, Path] = {}


def report(title: str, lines: list[str]) -> None:
    """Add a block to the end-of-run report (and to the report file)."""
    REPORT.append("\n".join([f"== {title}", *lines, ""]))


def _need(*commands: str) -> None:
    missing = [c for c in commands if not (shutil.which(c) or Path("/usr/sbin", c).exists())]
    if missing:
        pytest.fail(f"the reliability tests need {', '.join(missing)} (make deps-test)")


MILTER_BASE = {
    "AcceptDomains": ", ".join(OPTED_IN),
    "AuthservID": AUTHSERV_ID,
    "TrustedHosts": "127.0.0.1, ::1",
    "LogLevel": "warning",
}


@pytest.fixture(scope="session")
def knot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Knot]:
    _need("knotd", "openssl")
    k = Knot(tmp_path_factory.mktemp("knot"), build_all_zones())
    k.start()
    _LOGS["knotd"] = k.log
    try:
        yield k
    finally:
        k.stop()


@pytest.fixture(scope="session")
def proxy(knot: Knot) -> Iterator[DnsProxy]:
    p = DnsProxy(knot.port).open()
    try:
        yield p
    finally:
        p.close()


@pytest.fixture(scope="session")
def sink() -> Iterator[Sink]:
    with run_sink() as s:
        yield s


def _milter(workdir: Path, name: str, **settings: str) -> Iterator[MilterRunner]:
    m = MilterRunner(workdir, name, {**MILTER_BASE, **settings})
    m.start()
    _LOGS[f"ipv6milter {name}"] = m.log
    try:
        yield m
    finally:
        m.stop()


# The main milter also opts in IDN domains, in both forms (hostile.py).
MAIN_ACCEPT = f"{MILTER_BASE['AcceptDomains']}, Bücher.example, xn--fa-hia.example, .xn--p1ai"


@pytest.fixture(scope="session")
def main_milter(tmp_path_factory: pytest.TempPathFactory, knot: Knot) -> Iterator[MilterRunner]:
    yield from _milter(
        tmp_path_factory.mktemp("main"), "main", Nameservers=knot.nameserver,
        DNSTimeout="2", StageTimeout="4", AcceptDomains=MAIN_ACCEPT, LogLevel="info",
    )


@pytest.fixture(scope="session")
def monitor_milter(
    tmp_path_factory: pytest.TempPathFactory, knot: Knot
) -> Iterator[MilterRunner]:
    """The main configuration in monitor mode: every message stamped, so the
    results of refused ones can be read too."""
    yield from _milter(
        tmp_path_factory.mktemp("monitor"), "monitor", Nameservers=knot.nameserver,
        DNSTimeout="2", StageTimeout="4", AcceptDomains=MAIN_ACCEPT, Mode="monitor",
        LogLevel="info",
    )


@pytest.fixture(scope="session")
def faulty_milter(
    tmp_path_factory: pytest.TempPathFactory, proxy: DnsProxy
) -> Iterator[MilterRunner]:
    yield from _milter(
        tmp_path_factory.mktemp("faulty"), "faulty", Nameservers=proxy.nameserver,
        DNSTimeout="2", StageTimeout="4",
    )


class Stopper:
    """Stops milters with SIGTERM without waiting for each (libmilter takes
    seconds to wind down); the session's end checks every one stopped cleanly."""

    def __init__(self) -> None:
        self.pending: list[MilterRunner] = []

    def stop_later(self, m: MilterRunner) -> None:
        if m.proc is not None and m.proc.poll() is None:
            m.proc.send_signal(signal.SIGTERM)
        self.pending.append(m)

    def finish(self) -> dict[str, int | None]:
        return {f"{m.name} ({m.log})": m.stop(timeout=30) for m in self.pending}


@pytest.fixture(scope="session")
def stopper() -> Iterator[Stopper]:
    s = Stopper()
    yield s
    bad = {name: code for name, code in s.finish().items() if code != 0}
    assert not bad, f"ipv6milter did not stop cleanly on SIGTERM: {bad}"


# Raised from Postfix's defaults for the tests: a 100 MB message, no
# throttling of a fast client when the queue manager lags behind.
POSTFIX_EXTRA = {
    "message_size_limit": str(200 * 1024 * 1024),
    "in_flow_delay": "0s",
    "smtpd_client_connection_count_limit": "0",
}


@pytest.fixture(scope="session")
def postfix(
    tmp_path_factory: pytest.TempPathFactory,
    sink: Sink,
    main_milter: MilterRunner,
    faulty_milter: MilterRunner,
) -> Iterator[PostfixInstance]:
    _need("postfix", "postconf")
    if os.geteuid() != 0:
        pytest.fail("a private Postfix instance needs root (postfix -c DIR start)")
    services = {"main": main_milter.socket_spec, "faulty": faulty_milter.socket_spec}
    with run_postfix(tmp_path_factory.mktemp("postfix"), sink.port, services) as pf:
        postconf = shutil.which("postconf") or "/usr/sbin/postconf"
        postfix_cmd = shutil.which("postfix") or "/usr/sbin/postfix"
        subprocess.run(
            [postconf, "-c", str(pf.config_dir), "-e",
             *(f"{k}={v}" for k, v in POSTFIX_EXTRA.items())],
            check=True, capture_output=True, timeout=30,
        )
        subprocess.run(
            [postfix_cmd, "-c", str(pf.config_dir), "reload"],
            check=True, capture_output=True, timeout=30,
        )
        _LOGS["postfix"] = pf.log
        yield pf
    _LOGS.pop("postfix", None)


# -- reports ------------------------------------------------------------------------------


def pytest_sessionstart(session: pytest.Session) -> None:
    REPORT.clear()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not REPORT:
        return
    terminalreporter.section("reliability report")
    for block in REPORT:
        terminalreporter.write_line(block)
    try:
        base = terminalreporter.config._tmp_path_factory.getbasetemp()  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        return
    out = Path(base) / "reliability-report.txt"
    out.write_text("\n".join(REPORT))
    terminalreporter.write_line(f"(written to {out})")


# -- failure reports: what each log gained during the failed test ---------------------------

_OFFSETS = pytest.StashKey[dict[str, int]]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    item.stash[_OFFSETS] = log_offsets(_LOGS)
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "call" and rep.failed:
        rep.sections.extend(log_sections(_LOGS, item.stash.get(_OFFSETS, {})))
