"""Servers the reliability tests stop, restart and slow down on purpose.

The integration harness starts each server once for a session; here Knot
and the milter must be killed and brought back on the same port, and DNS
answers delayed.  The servers come from tests/lab.py (shared with the
integration tests and the benchmark); this file adds:

* ``Knot``: knotd on a fixed port of 127.0.0.1, zones given by the test,
  stop/start (tests.lab.Knot);
* ``DnsProxy``: a UDP and TCP relay of our own in front of Knot, whose
  answers can be delayed, or whose ports can be closed;
* ``MilterRunner``: ``ipv6milter -c FILE`` on a fixed port, SIGKILL and
  restart, its peak and current RSS from /proc (tests.lab.MilterRunner).

Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Mapping
from pathlib import Path

from tests import lab
from tests.lab import (  # noqa: F401  (re-exported: tests import them from here)
    Knot,
    Started,
    free_port,
    kib,
    log_tail,
    milter_command,
    proc_status,
    tcp_open,
    wait_until,
    zone_file,
    zone_ready,
)
from tests.lab import LabError as HarnessError  # noqa: F401

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


class MilterRunner(lab.MilterRunner):
    """``ipv6milter -c FILE`` on 127.0.0.1:``port``, restartable on that port."""

    def __init__(self, workdir: Path, name: str, settings: Mapping[str, str], **kw: object):
        super().__init__(workdir, name, settings, comment="ipv6milter for the reliability tests",
                         **kw)  # type: ignore[arg-type]

    # With Workers the parent only supervises: memory is measured where mail
    # is judged, in the largest worker (a message lands in one of them).
    def _judging(self) -> list[int]:
        return self.pids()[1:] or [self.pid]

    def _largest(self, key: str) -> int:
        values = []
        for p in self._judging():
            try:
                values.append(kib(proc_status(p)[key]))
            except (OSError, KeyError):
                # A child that exited between the listing and the read (the
                # start's check as UserID, a replaced worker; a zombie has no
                # memory lines): not one that judges mail.
                continue
        return max(values) if values else kib(proc_status(self.pid)[key])

    def rss_kib(self) -> int:
        return self._largest("VmRSS")

    def hwm_kib(self) -> int:
        return self._largest("VmHWM")
