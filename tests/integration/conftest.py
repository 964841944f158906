"""Session fixtures: Knot DNS, the SMTP sink, the milters and a private
Postfix, all started here and stopped again, on loopback only.

    dns      Knot, authoritative for the zones of harness.build_zones
    sink     SMTP server that keeps what Postfix relays to it
    milter   ipv6milter -c FILE, the main configuration (DNS at Knot)
    milters  the factory; the blackhole/monitor milters come from it too
    postfix  Postfix with one smtpd port per milter; relayhost = the sink

The real-client lab (test_mta_matrix.py):

    netlab         a network namespace with 2001:db8:6::/64 and 198.18.0.0/30
                   client addresses (or the next free slot), joined to this one
                   by a veth pair
    lab_milter     ipv6milter for both lab MTAs (one lab address trusted)
    lab_postfix    a second private Postfix, also listening on the lab link
    lab_sendmail   Sendmail, unpacked from Debian's packages, in a mount
                   namespace whose resolv.conf names Knot on port 53
    lab_mta        each of them in turn, as the clients see it (smtpclient.LabMta)

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
    free_port,
    log_offsets,
    log_sections,
    port53_address,
    run_knot,
    run_postfix,
    run_sink,
)
from .netlab import NetLab, run_netlab
from .sendmail import Listener, SendmailInstance, ensure_sendmail, run_sendmail
from .smtpclient import LabMta

# name -> log file, for the failure report
_LOGS: dict[str, Path] = {}
_OFFSETS = pytest.StashKey[dict[str, int]]()


def _need(*commands: str) -> None:
    missing = [c for c in commands if not (shutil.which(c) or Path("/usr/sbin", c).exists())]
    if missing:
        pytest.fail(f"integration tests need {', '.join(missing)} (make deps-test)")


@pytest.fixture(scope="session")
def dns(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DnsWorld]:
    _need("knotd", "openssl")
    # Also on port 53 of a loopback address, for Sendmail's glibc resolver.
    with run_knot(tmp_path_factory.mktemp("knot"), port53=port53_address()) as world:
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
        pytest.fail("a private Postfix instance needs root (postfix -c DIR start)")
    services = {m.name: m.socket_spec for m in (milter, blackhole_milter, monitor_milter)}
    with run_postfix(tmp_path_factory.mktemp("postfix"), sink.port, services) as instance:
        _LOGS["postfix"] = instance.log
        yield instance
    _LOGS.pop("postfix", None)


# -- the lab: real IPv6 clients, Postfix and Sendmail -----------------------------------


@pytest.fixture(scope="session")
def netlab() -> Iterator[NetLab]:
    _need("ip")
    if os.geteuid() != 0:
        pytest.fail("the lab network namespace needs root (ip netns add)")
    with run_netlab() as lab:
        yield lab


@pytest.fixture(scope="session")
def lab_milter(milters: MilterFactory, netlab: NetLab) -> MilterProcess:
    return _started(milters, "lab", TrustedHosts=f"127.0.0.1, ::1, {netlab.clients.trusted}")


@pytest.fixture(scope="session")
def lab_postfix(
    tmp_path_factory: pytest.TempPathFactory,
    sink: Sink,
    netlab: NetLab,
    lab_milter: MilterProcess,
) -> Iterator[PostfixInstance]:
    """Postfix listening on loopback and on the lab link, milter "lab"."""
    _need("postfix")
    with run_postfix(
        tmp_path_factory.mktemp("postfix-lab"),
        sink.port,
        {"lab": lab_milter.socket_spec},
        interfaces=("127.0.0.1", "[::1]", f"[{netlab.host6}]", netlab.host4),
        networks=(str(netlab.clients.link4),),
        xclient_hosts=(f"[{netlab.clients.authenticated}]/128",),
    ) as instance:
        _LOGS["postfix-lab"] = instance.log
        yield instance
    _LOGS.pop("postfix-lab", None)


@pytest.fixture(scope="session")
def lab_sendmail(
    tmp_path_factory: pytest.TempPathFactory,
    dns: DnsWorld,
    sink: Sink,
    netlab: NetLab,
    lab_milter: MilterProcess,
) -> Iterator[SendmailInstance]:
    """Sendmail listening on loopback and on the lab link, milter "lab"."""
    _need("m4", "unshare", "apt-get", "dpkg-deb")
    if dns.port53 is None:
        pytest.fail("no loopback address with a free port 53 for Sendmail's resolver")
    dist = ensure_sendmail()
    port = mapped_port = free_port()
    while mapped_port == port:  # 198.18.0.1:P and ::ffff:198.18.0.1:P would collide
        mapped_port = free_port()
    listeners = [
        Listener("MTA-lab6", "inet6", netlab.host6, port),
        Listener("MTA-lab4", "inet", netlab.host4, port),
        # Dual stack: an IPv6 socket that IPv4 clients reach as ::ffff:a.b.c.d.
        Listener("MTA-mapped", "inet6", f"::ffff:{netlab.host4}", mapped_port),
        Listener("MTA-lo4", "inet", "127.0.0.1", port),
        Listener("MTA-lo6", "inet6", "::1", port),
    ]
    with run_sendmail(
        tmp_path_factory.mktemp("sendmail"),
        dist,
        listeners=listeners,
        milter_socket=f"inet:{lab_milter.port}@127.0.0.1",
        relay_port=sink.port,
        nameserver=dns.port53,
        authenticated=[netlab.clients.authenticated],
    ) as instance:
        _LOGS["sendmail"] = instance.log
        _LOGS["sendmail smtp trace"] = instance.trace
        yield instance
    _LOGS.pop("sendmail", None)
    _LOGS.pop("sendmail smtp trace", None)


@pytest.fixture(scope="session")
def postfix_lab(netlab: NetLab, lab_postfix: PostfixInstance) -> LabMta:
    port = lab_postfix.port("lab")
    return LabMta(
        "postfix",
        netlab,
        {
            "v6": (netlab.host6, port),
            "v4": (netlab.host4, port),
            # Postfix cannot listen on an IPv4-mapped address: its dual-stack
            # service is two sockets, and an IPv4 peer reaches the IPv4 one.
            "mapped": (netlab.host4, port),
            "lo6": ("::1", port),
        },
        echoes_rcpt=False,
        xclient_login=True,
    )


@pytest.fixture(scope="session")
def sendmail_lab(netlab: NetLab, lab_sendmail: SendmailInstance) -> LabMta:
    sm = lab_sendmail.listeners
    return LabMta(
        "sendmail",
        netlab,
        {
            "v6": (netlab.host6, sm["MTA-lab6"].port),
            "v4": (netlab.host4, sm["MTA-lab4"].port),
            "mapped": (netlab.host4, sm["MTA-mapped"].port),
            "lo6": ("::1", sm["MTA-lo6"].port),
        },
        echoes_rcpt=True,
        xclient_login=False,
    )


@pytest.fixture(params=["postfix", "sendmail"])
def lab_mta(request: pytest.FixtureRequest) -> LabMta:
    """Each MTA in turn, as the lab's clients see it."""
    return request.getfixturevalue(f"{request.param}_lab")


# -- failure reports: what each log gained during the failed test ---------------------


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    item.stash[_OFFSETS] = log_offsets(_LOGS)
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        report.sections.extend(log_sections(_LOGS, item.stash.get(_OFFSETS, {})))
