"""``ipv6milter --self-test``: passes on a working set-up whether the milter
runs or not, and fails for what it exists to find (a dead resolver, a
socket that cannot be had, one held by something that is not a milter, a
bad authserv-id)."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.harness import blackhole_dns, free_port, milter_command
from tests.lab import MilterRunner
from tests.operations.conftest import Ops

pytestmark = pytest.mark.timeout(60)


def self_test(tmp_path: Path, env: dict[str, str] | None = None,
              **keys: str) -> subprocess.CompletedProcess[str]:
    conf = tmp_path / "self-test.conf"
    conf.write_text("".join(f"{k} {v}\n" for k, v in keys.items()))
    return subprocess.run([milter_command(), "--self-test", "-c", str(conf)],
                          capture_output=True, text=True, timeout=30,
                          env={**os.environ, **(env or {})})


@contextlib.contextmanager
def not_a_milter(sock: socket.socket) -> Iterator[None]:
    """A listener that greets like an SMTP server: what a wrong Socket may find."""
    sock.listen(4)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            with conn:
                conn.sendall(b"220 mx.example.org ESMTP\r\n")
                with contextlib.suppress(OSError):
                    conn.recv(100)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        # shutdown() wakes the accept() of the other thread (close() alone
        # would leave the socket listening until accept returns).
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()
        t.join(5)
        assert not t.is_alive()


def test_all_good(ops: Ops, tmp_path: Path) -> None:
    p = self_test(tmp_path, Nameservers=ops.dns.nameserver, AuthservID="mx.example.org",
                  Socket=f"inet:{free_port()}@127.0.0.1")
    assert p.returncode == 0, p.stdout + p.stderr
    lines = p.stdout.splitlines()
    assert len(lines) == 4 and all(line.startswith("ok ") for line in lines), lines
    assert f"resolver {ops.dns.nameserver}: answered" in lines[0]
    assert lines[3] == "ok   ed25519 verification: available (RFC 8463's example verifies)"


def test_dead_resolver_fails(tmp_path: Path) -> None:
    with blackhole_dns() as port:
        p = self_test(tmp_path, Nameservers=f"127.0.0.1:{port}", DNSTimeout="1",
                      AuthservID="mx.example.org", Socket=f"inet:{free_port()}@127.0.0.1")
    assert p.returncode == 1
    assert p.stdout.startswith(f"FAIL resolver 127.0.0.1:{port}: no answer")


def test_inet_socket_of_the_running_milter_passes_bad_authserv_id_fails(
    ops: Ops, tmp_path: Path
) -> None:
    """The milter is running: its socket answers the milter protocol."""
    running = ops.milters["enforce"]
    p = self_test(tmp_path, Nameservers=ops.dns.nameserver, AuthservID="mx",
                  Socket=f"inet:{running.port}@127.0.0.1")
    assert p.returncode == 1
    assert (f"ok   socket inet:{running.port}@127.0.0.1: in use by a running milter, "
            "which answers (milter protocol version 6)") in p.stdout, p.stdout
    assert "FAIL authserv-id 'mx' (AuthservID): not a fully qualified host name; " \
           "set AuthservID" in p.stdout, p.stdout


def test_inet_socket_held_by_something_else_fails(ops: Ops, tmp_path: Path) -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    with not_a_milter(s):
        p = self_test(tmp_path, Nameservers=ops.dns.nameserver, AuthservID="mx.example.org",
                      Socket=f"inet:{port}@127.0.0.1")
    assert p.returncode == 1
    assert f"FAIL socket inet:{port}@127.0.0.1: in use by something else: no milter " \
           "negotiation reply" in p.stdout, p.stdout


def test_unix_socket_of_the_running_milter_names_its_process(ops: Ops, tmp_path: Path) -> None:
    milter = MilterRunner(tmp_path, "selftest", {"Nameservers": ops.dns.nameserver,
                                                  "AuthservID": "mx.example.org"}, unix=True)
    milter.start()
    try:
        p = self_test(tmp_path, Nameservers=ops.dns.nameserver, AuthservID="mx.example.org",
                      Socket=f"unix:{milter.path}")
    finally:
        assert milter.stop() == 0
    assert p.returncode == 0, p.stdout
    assert re.search(rf"^ok   socket unix:{re.escape(str(milter.path))}: in use by a running "
                     rf"milter \(pid {milter.pid}: \S+ .*-c {re.escape(str(milter.config))}\), "
                     r"which answers \(milter protocol version 6\)$", p.stdout, re.M), p.stdout
    # Stopped, it removed its socket: free again.
    p = self_test(tmp_path, Nameservers=ops.dns.nameserver, AuthservID="mx.example.org",
                  Socket=f"unix:{milter.path}")
    assert p.returncode == 0 and f"socket unix:{milter.path}: can be bound" in p.stdout, p.stdout


def test_unix_socket_held_by_something_else_fails_a_stale_one_passes(
    ops: Ops, tmp_path: Path
) -> None:
    path = tmp_path / "other.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    with not_a_milter(s):
        p = self_test(tmp_path, Nameservers=ops.dns.nameserver, AuthservID="mx.example.org",
                      Socket=f"unix:{path}")
    assert p.returncode == 1
    assert re.search(rf"^FAIL socket unix:{re.escape(str(path))}: in use \(pid {os.getpid()}: "
                     r".*\) by something else: no milter negotiation reply", p.stdout, re.M), \
        p.stdout
    # Closed, the file stays and nobody listens: the milter replaces it.
    assert path.is_socket()
    p = self_test(tmp_path, Nameservers=ops.dns.nameserver, AuthservID="mx.example.org",
                  Socket=f"unix:{path}")
    assert p.returncode == 0 and "stale socket file will be replaced" in p.stdout, p.stdout
    path.unlink()
    path.write_text("not a socket")
    p = self_test(tmp_path, Nameservers=ops.dns.nameserver, AuthservID="mx.example.org",
                  Socket=f"unix:{path}")
    assert p.returncode == 1 and "exists and is not a socket" in p.stdout, p.stdout


def test_unix_socket_directory_checked(ops: Ops, tmp_path: Path) -> None:
    p = self_test(tmp_path, Nameservers=ops.dns.nameserver, AuthservID="mx.example.org",
                  Socket=f"unix:{tmp_path}/missing/milter.sock")
    assert p.returncode == 1 and "does not exist" in p.stdout
    p = self_test(tmp_path, Nameservers=ops.dns.nameserver, AuthservID="mx.example.org",
                  Socket=f"unix:{tmp_path}/milter.sock")
    assert p.returncode == 0, p.stdout


def test_runtime_directory_of_the_unit_is_not_a_failure(ops: Ops, tmp_path: Path) -> None:
    """A stopped service: systemd removed /run/NAME, and creates it again at
    start because the unit says RuntimeDirectory=NAME.  Without that line
    (or with a drop-in that empties it) the missing directory is a failure."""
    name = f"ipv6milter-selftest-{uuid.uuid4().hex[:8]}"
    socket_spec = f"unix:/run/{name}/ipv6milter.sock"
    assert not Path(f"/run/{name}").exists()
    units = tmp_path / "units"
    units.mkdir()
    unit = units / "ipv6milter.service"
    unit.write_text("[Unit]\nDescription=test\n\n[Service]\nExecStart=/bin/true\n"
                    f"RuntimeDirectory=other {name}\n")
    env = {"SYSTEMD_UNIT_PATH": str(units)}
    keys = {"Nameservers": ops.dns.nameserver, "AuthservID": "mx.example.org",
            "Socket": socket_spec}
    p = self_test(tmp_path, env=env, **keys)
    assert p.returncode == 0, p.stdout
    assert (f"ok   socket {socket_spec}: directory /run/{name} is created by systemd at start "
            f"(RuntimeDirectory={name} in {unit})") in p.stdout, p.stdout

    dropin = units / "ipv6milter.service.d"
    dropin.mkdir()
    (dropin / "override.conf").write_text("[Service]\nRuntimeDirectory=\n")
    p = self_test(tmp_path, env=env, **keys)
    assert p.returncode == 1 and f"directory /run/{name} does not exist" in p.stdout, p.stdout

    (dropin / "override.conf").unlink()
    unit.write_text("[Service]\nExecStart=/bin/true\n# RuntimeDirectory=" + name + "\n")
    p = self_test(tmp_path, env=env, **keys)
    assert p.returncode == 1 and f"directory /run/{name} does not exist" in p.stdout, p.stdout
