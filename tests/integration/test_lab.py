"""The lab itself (network namespace, Sendmail's private resolver): if these
fail, the MTA matrix says nothing."""

from __future__ import annotations

import errno
import ipaddress
import socket
import subprocess
from pathlib import Path

import pytest
from dns import message, query, rdatatype, reversename

from .harness import DnsWorld
from .netlab import NetLab
from .sendmail import SendmailInstance

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("outside", ["2001:db8:ffff::1", "203.0.113.1", "::ffff:203.0.113.1"])
def test_lab_clients_reach_nothing_but_the_lab(netlab: NetLab, outside: str) -> None:
    routes = subprocess.run(
        ["ip", "-n", netlab.netns, "route", "show", "table", "all"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "default" not in routes, routes
    with pytest.raises(OSError) as raised:
        netlab.connect(outside, 25, timeout=2).close()
    assert raised.value.errno == errno.ENETUNREACH, raised.value


def test_each_lab_address_is_the_peer_the_host_sees(netlab: NetLab) -> None:
    for host, sources in (
        (netlab.host6, netlab.clients.ipv6_clients()),
        (netlab.host4, [netlab.clients.ipv4]),
    ):
        assert ipaddress.ip_address(host) in (
            netlab.clients.link6 if ":" in host else netlab.clients.link4
        )
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family) as server:
            server.bind((host, 0))
            server.listen()
            server.settimeout(5)
            for source in sources:
                with netlab.connect(host, server.getsockname()[1], source=source, timeout=5):
                    conn, peer = server.accept()
                    conn.close()
                assert peer[0] == source


def test_knot_answers_the_lab_ptrs_on_port_53(dns: DnsWorld, netlab: NetLab) -> None:
    assert dns.port53 is not None
    q = message.make_query(reversename.from_address(netlab.clients.good), rdatatype.PTR)
    r = query.udp(q, dns.port53, port=53, timeout=2)
    assert [rr.target.to_text() for rrset in r.answer for rr in rrset] == ["lab.example.com."]


def test_sendmail_sees_only_the_test_resolver(lab_sendmail: SendmailInstance) -> None:
    """/proc/PID/root shows the files as the daemon's mount namespace does."""
    root = Path(f"/proc/{lab_sendmail.pid}/root")
    ours = lab_sendmail.run_dir / "etc"
    for name in ("resolv.conf", "hosts", "nsswitch.conf"):
        assert (root / "etc" / name).read_text() == (ours / name).read_text()
    assert Path("/etc/resolv.conf").read_text() != (ours / "resolv.conf").read_text()
    assert (root / "dev" / "log").is_socket()


def test_sendmail_mapped_listener_is_an_ipv6_socket(
    lab_sendmail: SendmailInstance, netlab: NetLab
) -> None:
    """The dual-stack listener: AF_INET6, bound to ::ffff:198.18.0.1."""
    port = lab_sendmail.listeners["MTA-mapped"].port
    want = ipaddress.ip_address(f"::ffff:{netlab.host4}")
    found = False
    for line in Path("/proc/net/tcp6").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        addr_hex, port_hex = local.split(":")
        # /proc/net/tcp6: four 32-bit words, each in host (little-endian) order.
        raw = b"".join(bytes.fromhex(addr_hex[i : i + 8])[::-1] for i in range(0, 32, 8))
        if state == "0A" and int(port_hex, 16) == port and ipaddress.IPv6Address(raw) == want:
            found = True
    assert found
