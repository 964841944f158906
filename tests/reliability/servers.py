"""Servers the reliability tests stop, restart and slow down on purpose.

The integration harness starts each server once for a session; here Knot
and the milter must be killed and brought back on the same port, and DNS
answers delayed.  What is reused comes from ``tests.integration.harness``
(not edited here); the rest is small and lives in this file:

* ``Knot``: knotd on fixed ports, zones given by the test, stop/start;
* ``DnsProxy``: a UDP and TCP relay of our own in front of Knot, whose
  answers can be delayed, or whose ports can be closed;
* ``MilterRunner``: ``ipv6milter -c FILE`` on a fixed port, SIGKILL and
  restart, its peak and current RSS from /proc.

Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from tests.integration.harness import (
    HarnessError,
    free_port,
    log_tail,
    milter_command,
    tcp_open,
    wait_until,
    zone_file,
    zone_ready,
)

# -- Knot ------------------------------------------------------------------------------


class Knot:
    """knotd, authoritative for ``zones``, on 127.0.0.1:``port``; stop() and
    start() again keep the port and the zones."""

    def __init__(self, workdir: Path, zones: dict[str, list[str]]):
        self.workdir = workdir
        self.zones = zones
        self.port = free_port()
        self.log = workdir / "knot.log"
        self.proc: subprocess.Popen[bytes] | None = None
        zonedir = workdir / "zones"
        zonedir.mkdir(parents=True)
        conf = []
        for origin, records in zones.items():
            (zonedir / f"{origin}.zone").write_text(zone_file(origin, records))
            conf.append(f"  - domain: {origin}\n    file: {origin}.zone\n")
        self.conf = workdir / "knot.conf"
        self.conf.write_text(
            f"server:\n"
            f"    rundir: {workdir}\n"
            f"    listen: [ 127.0.0.1@{self.port} ]\n"
            f"database:\n"
            f"    storage: {workdir}/db\n"
            f"control:\n"
            f"    listen: {workdir}/knot.sock\n"
            f"log:\n"
            f"  - target: stderr\n"
            f"    any: notice\n"
            f"template:\n"
            f"  - id: default\n"
            f"    storage: {zonedir}\n"
            f"    zonefile-sync: -1\n"
            f"    zonefile-load: whole\n"
            f"    journal-content: none\n"
            f"    semantic-checks: off\n"
            f"zone:\n" + "".join(conf)
        )

    def start(self) -> None:
        knotd = shutil.which("knotd") or "/usr/sbin/knotd"
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(
                [knotd, "-c", str(self.conf)], stdout=fh, stderr=subprocess.STDOUT
            )
        proc = self.proc

        def gone() -> str | None:
            if proc.poll() is None:
                return None
            return f"knotd exited with {proc.returncode}:\n{log_tail(self.log)}"

        here = ("127.0.0.1",)
        wait_until("knotd", lambda: all(zone_ready(self.port, z, here) for z in self.zones),
                   30, gone)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    @property
    def nameserver(self) -> str:
        return f"127.0.0.1:{self.port}"


# -- a DNS relay that can be slowed down or switched off ---------------------------------


class DnsProxy:
    """Relays DNS over UDP and TCP from 127.0.0.1:``port`` to ``upstream``.

    ``delay`` holds every answer back that many seconds; ``close()`` shuts
    the ports (the kernel then refuses: ICMP port unreachable, TCP RST) and
    ``open()`` brings them back.  When the upstream does not answer, neither
    does the relay (a stateless relay cannot pass on an ICMP error).
    Every query gets its own short-lived thread; the test bounds their count.
    """

    def __init__(self, upstream_port: int):
        self.upstream = ("127.0.0.1", upstream_port)
        self.port = free_port()
        self.delay = 0.0
        self.queries = 0
        self._lock = threading.Lock()
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None
        self._threads: list[threading.Thread] = []

    @property
    def nameserver(self) -> str:
        return f"127.0.0.1:{self.port}"

    def open(self) -> DnsProxy:
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        udp.bind(("127.0.0.1", self.port))
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tcp.bind(("127.0.0.1", self.port))
        tcp.listen(64)
        self._udp, self._tcp = udp, tcp
        self._threads = [
            threading.Thread(target=self._serve_udp, args=(udp,), daemon=True),
            threading.Thread(target=self._serve_tcp, args=(tcp,), daemon=True),
        ]
        for t in self._threads:
            t.start()
        return self

    def close(self) -> None:
        for s in (self._udp, self._tcp):
            if s is not None:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
        self._udp = self._tcp = None
        for t in self._threads:
            t.join(5)

    def _count(self) -> float:
        with self._lock:
            self.queries += 1
            return self.delay

    # UDP: one datagram in, one out
    def _serve_udp(self, sock: socket.socket) -> None:
        while True:
            try:
                data, peer = sock.recvfrom(65535)
            except OSError:
                return
            delay = self._count()
            threading.Thread(
                target=self._relay_udp, args=(sock, data, peer, delay), daemon=True
            ).start()

    def _relay_udp(self, sock: socket.socket, data: bytes, peer: object, delay: float) -> None:
        start = time.monotonic()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as up:
            up.settimeout(3)
            try:
                up.connect(self.upstream)
                up.send(data)
                answer = up.recv(65535)
            except OSError:
                return  # upstream down or silent: say nothing
        left = delay - (time.monotonic() - start)
        if left > 0:
            time.sleep(left)
        with contextlib.suppress(OSError):
            sock.sendto(answer, peer)

    # TCP: two-byte length prefixed messages (RFC 1035 §4.2.2)
    def _serve_tcp(self, sock: socket.socket) -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            threading.Thread(target=self._relay_tcp, args=(conn,), daemon=True).start()

    def _relay_tcp(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        with conn:
            while True:
                try:
                    query = _read_tcp_message(conn)
                except OSError:
                    return
                if query is None:
                    return
                delay = self._count()
                start = time.monotonic()
                try:
                    with socket.create_connection(self.upstream, timeout=3) as up:
                        up.sendall(struct.pack("!H", len(query)) + query)
                        answer = _read_tcp_message(up)
                except OSError:
                    return
                if answer is None:
                    return
                left = delay - (time.monotonic() - start)
                if left > 0:
                    time.sleep(left)
                try:
                    conn.sendall(struct.pack("!H", len(answer)) + answer)
                except OSError:
                    return


def _read_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        part = sock.recv(n - len(buf))
        if not part:
            return None
        buf += part
    return bytes(buf)


def _read_tcp_message(sock: socket.socket) -> bytes | None:
    head = _read_exact(sock, 2)
    if head is None:
        return None
    return _read_exact(sock, struct.unpack("!H", head)[0])


# -- the milter, on a port that survives a restart ---------------------------------------


def proc_status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def kib(value: str) -> int:
    """``12345 kB`` -> 12345."""
    return int(value.split()[0])


@dataclass
class Started:
    """When a (re)start began and when the socket first accepted."""

    spawned: float
    listening: float


class MilterRunner:
    """``ipv6milter -c FILE`` on 127.0.0.1:``port``, restartable on that port."""

    def __init__(self, workdir: Path, name: str, settings: dict[str, str]):
        self.port = free_port()
        self.name = name
        self.config = workdir / f"{name}.conf"
        self.log = workdir / f"{name}.log"
        self.config.write_text(
            f"# ipv6milter for the reliability tests ({name})\n"
            + "".join(
                f"{k} {v}\n"
                for k, v in {"Socket": f"inet:{self.port}@127.0.0.1", **settings}.items()
            )
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts: list[Started] = []

    @property
    def socket_spec(self) -> str:
        return f"inet:127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> Started:
        spawned = time.monotonic()
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(
                [milter_command(), "-c", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
            )
        proc = self.proc

        def gone() -> str | None:
            if proc.poll() is None:
                return None
            return f"exited with status {proc.returncode}; log:\n{log_tail(self.log)}"

        deadline = time.monotonic() + 20
        while not tcp_open("127.0.0.1", self.port):
            reason = gone()
            if reason:
                raise HarnessError(f"ipv6milter ({self.name}): {reason}")
            if time.monotonic() > deadline:
                raise HarnessError(f"ipv6milter ({self.name}) not listening after 20 s")
            time.sleep(0.005)
        started = Started(spawned, time.monotonic())
        self.starts.append(started)
        return started

    def kill(self) -> None:
        """SIGKILL: no clean-up, no goodbye to the MTA."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 20) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                return None
        return self.proc.returncode

    def status(self) -> dict[str, str]:
        return proc_status(self.pid)

    def _processes(self) -> list[int]:
        """The processes that judge mail: with Workers, the workers (the parent only
        supervises); a message is judged inside one of them."""
        children = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split()
        return [int(c) for c in children] or [self.pid]

    def rss_kib(self) -> int:
        """The largest worker's RSS."""
        return max(kib(proc_status(p)["VmRSS"]) for p in self._processes())

    def hwm_kib(self) -> int:
        return max(kib(proc_status(p)["VmHWM"]) for p in self._processes())

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")
