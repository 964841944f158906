"""Session fixtures: Knot DNS, the SMTP sink, the milters and a private
Postfix, all started here and stopped again, on loopback only.

    dns      Knot, authoritative for the zones of harness.build_zones
    sink     SMTP server that keeps what Postfix relays to it
    milter   ipv6milter -c FILE, the main configuration (DNS at Knot)
    milters  the factory; the blackhole/monitor milters come from it too
    postfix  Postfix with one smtpd port per milter; relayhost = the sink

On a failing test the lines each log gained during the test are shown.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from .harness import (
    AUTHSERV_ID,
    OPTED_IN,
    DnsWorld,
    MilterFactory,
    MilterProcess,
    PostfixInstance,
    Sink,
    blackhole_dns,
    run_knot,
    run_postfix,
    run_sink,
)

# name -> log file, for the failure report
_LOGS: dict[str, Path] = {}
_OFFSETS = pytest.StashKey[dict[str, int]]()


def _need(*commands: str) -> None:
    missing = [c for c in commands if not (shutil.which(c) or Path("/usr/sbin", c).exists())]
    if missing:
        pytest.skip(f"integration tests need {', '.join(missing)} (make deps-test)")


@pytest.fixture(scope="session")
def dns(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DnsWorld]:
    _need("knotd", "openssl")
    with run_knot(tmp_path_factory.mktemp("knot")) as world:
        _LOGS["knotd"] = world.log
        yield world


@pytest.fixture(scope="session")
def sink() -> Iterator[Sink]:
    with run_sink() as s:
        yield s


@pytest.fixture(scope="session")
def milters(tmp_path_factory: pytest.TempPathFactory, dns: DnsWorld) -> Iterator[MilterFactory]:
    factory = MilterFactory(
        tmp_path_factory.mktemp("milter"),
        {
            "Nameservers": dns.nameserver,
            "AcceptDomains": ", ".join(OPTED_IN),
            "AuthservID": AUTHSERV_ID,
            "TrustedHosts": "127.0.0.1, ::1",
            "DNSTimeout": "2",
            "StageTimeout": "4",
            "LogLevel": "debug",
        },
    )
    yield factory
    statuses = factory.stop_all()
    bad = {name: status for name, status in statuses.items() if status != 0}
    assert not bad, f"ipv6milter did not stop cleanly on SIGTERM (exit statuses {bad})"


def _started(factory: MilterFactory, name: str, **overrides: str) -> MilterProcess:
    m = factory.start(name, **overrides)
    _LOGS[f"ipv6milter {name}"] = m.log
    return m


@pytest.fixture(scope="session")
def milter(milters: MilterFactory) -> MilterProcess:
    """The milter as configured for most tests: DNS answered by Knot."""
    return _started(milters, "main")


@pytest.fixture(scope="session")
def blackhole_milter(milters: MilterFactory) -> Iterator[MilterProcess]:
    """A milter whose only nameserver never answers: every lookup times out."""
    with blackhole_dns() as port:
        yield _started(
            milters, "blackhole", Nameservers=f"127.0.0.1:{port}", DNSTimeout="1", StageTimeout="2"
        )


@pytest.fixture(scope="session")
def monitor_milter(milters: MilterFactory) -> MilterProcess:
    return _started(milters, "monitor", Mode="monitor")


@pytest.fixture(scope="session")
def postfix(
    tmp_path_factory: pytest.TempPathFactory,
    sink: Sink,
    milter: MilterProcess,
    blackhole_milter: MilterProcess,
    monitor_milter: MilterProcess,
) -> Iterator[PostfixInstance]:
    """Postfix with one smtpd port per milter: ``postfix.port("main")`` etc."""
    _need("postfix")
    if os.geteuid() != 0:
        pytest.skip("a private Postfix instance needs root (postfix -c DIR start)")
    services = {m.name: m.socket_spec for m in (milter, blackhole_milter, monitor_milter)}
    with run_postfix(tmp_path_factory.mktemp("postfix"), sink.port, services) as instance:
        _LOGS["postfix"] = instance.log
        yield instance
    _LOGS.pop("postfix", None)


# -- failure reports: what each log gained during the failed test ---------------------


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    item.stash[_OFFSETS] = {name: _size(path) for name, path in _LOGS.items()}
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.failed:
        return
    offsets = item.stash.get(_OFFSETS, {})
    for name, path in _LOGS.items():
        try:
            with open(path, "rb") as fh:
                fh.seek(offsets.get(name, 0))
                text = fh.read()[-20000:].decode("utf-8", "replace")
        except OSError:
            continue
        if text:
            report.sections.append((f"{name} log ({path})", text))
