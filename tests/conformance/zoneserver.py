"""A small DNS server on 127.0.0.1 that serves one openspf scenario's zone data.

The openspf suite (rfc7208-tests.yml) gives each scenario a ``zonedata`` map:
name -> list of ``{TYPE: value}`` entries, plus the markers pyspf's own driver
(test/testspf.py) understands.  This server gives them the meaning that
driver gives them, but over the wire (UDP, and TCP after truncation), so that
the product's resolver, its pyspf bridge and dnspython all run for real:

* ``TIMEOUT`` as an entry: a query for a type with no record listed before
  it fails temporarily; ``TYPE: TIMEOUT`` makes queries of that type fail.
  The failure is answered as SERVFAIL, not by silence: both resolvers under
  test turn either into the same temporary error (the product's handling of
  real timeouts is tested in tests/unit and tests/reliability), and the
  suite does not wait out a timeout per case;
* ``SPF`` records are also served as TXT when the name has no TXT entry (the
  driver's "auto-magic duplication"), ``NONE`` is served as such (a TXT of
  the text NONE, as the driver does) and not as a type-99 record;
* a name that is not in the zone is NXDOMAIN, except ``error.*`` names, which
  fail temporarily; CNAMEs are followed inside the zone, as a recursive server would.

``load`` swaps the zone between scenarios; the server answers from whichever
zone is current.
"""

from __future__ import annotations

import socket
import socketserver
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

TIMEOUT = "TIMEOUT"


class Zone:
    """One scenario's records: name -> list of (type, value) or TIMEOUT."""

    def __init__(self, zonedata: dict[str, list[Any]] | None = None):
        # dns.name.Name compares case-insensitively, and as the wire carries
        # it: a zone name with spaces or '%' matches the query for it.
        self.names: dict[dns.name.Name, list[Any]] = {}
        for name, entries in (zonedata or {}).items():
            self.names[dns.name.from_text(name)] = list(_entries(entries))

    def lookup(self, name: dns.name.Name, rdtype: str) -> tuple[str, list[dns.rrset.RRset]]:
        """``("timeout" | "nxdomain" | "noerror", answer rrsets)`` for a query."""
        answer: list[dns.rrset.RRset] = []
        current = name
        for _ in range(10):
            entries = self.names.get(current)
            if entries is None:
                if current.labels[0].lower() == b"error":
                    return "timeout", []
                return ("noerror" if answer else "nxdomain"), answer
            records: list[str] = []
            cname: str | None = None
            for entry in entries:
                if entry == TIMEOUT:
                    if not records:
                        return "timeout", []
                    break
                t, v = entry
                if t == rdtype:
                    if v == TIMEOUT:
                        return "timeout", []
                    records.append(v)
                elif t == "CNAME" and v != TIMEOUT:
                    cname = v
            if records:
                answer.append(_rrset(current, rdtype, records))
                return "noerror", answer
            if cname is not None and rdtype != "CNAME":
                answer.append(_rrset(current, "CNAME", [cname]))
                current = dns.name.from_text(cname)
                continue
            return "noerror", answer
        return "timeout", []  # a CNAME loop: what a resolver would SERVFAIL or drop


def _entries(entries: list[Any]) -> Iterator[Any]:
    have_txt = any(isinstance(e, dict) and "TXT" in e for e in entries)
    generated = []
    for e in entries:
        if e == TIMEOUT:
            yield TIMEOUT
            continue
        for t, v in e.items():
            if t == "SPF":
                if not have_txt:
                    generated.append(("TXT", _text(v)))
                if v != "NONE":
                    yield ("SPF", _text(v))
            elif t == "TXT":
                if v != "NONE":  # "TXT: NONE": no TXT record (and none generated)
                    yield ("TXT", TIMEOUT if v == TIMEOUT else _text(v))
            elif t == "MX":
                yield ("MX", TIMEOUT if v == TIMEOUT else f"{v[0]} {_absolute(v[1])}")
            elif t in ("PTR", "CNAME"):
                yield (t, TIMEOUT if v == TIMEOUT else _absolute(v))
            else:
                yield (t, v)
    yield from generated


def _absolute(name: str) -> str:
    return name if name.endswith(".") else name + "."


def _text(value: str | list[str]) -> str:
    """TXT rdata in zone-file syntax: each string UTF-8, cut into 255-byte pieces."""
    # "SPF: [ ]" (no strings at all) cannot be sent: TXT rdata holds at least
    # one string, so it goes out as one empty string.
    strings = [value] if isinstance(value, str) else list(value) or [""]
    out = []
    for s in strings:
        raw = s.encode("utf-8")
        pieces = [raw[i : i + 255] for i in range(0, len(raw), 255)] or [b""]
        for piece in pieces:
            out.append('"' + "".join(_escape(b) for b in piece) + '"')
    return " ".join(out)


def _escape(byte: int) -> str:
    c = chr(byte)
    if c in '"\\':
        return "\\" + c
    if 0x20 <= byte < 0x7F:
        return c
    return f"\\{byte:03d}"


def _rrset(name: dns.name.Name, rdtype: str, values: list[str]) -> dns.rrset.RRset:
    rrset = dns.rrset.RRset(name, dns.rdataclass.IN,
                            dns.rdatatype.from_text(rdtype))
    for v in values:
        rrset.add(dns.rdata.from_text(dns.rdataclass.IN, rrset.rdtype, v), ttl=0)
    return rrset


class ZoneServer:
    """UDP and TCP on one 127.0.0.1 port, answering from ``self.zone``."""

    def __init__(self) -> None:
        self.zone = Zone()
        server = self

        class Udp(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                data, sock = self.request
                reply = server.answer(data, tcp=False)
                if reply is not None:
                    sock.sendto(reply, self.client_address)

        class Tcp(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                head = self.request.recv(2)
                if len(head) < 2:
                    return
                (length,) = struct.unpack("!H", head)
                data = b""
                while len(data) < length:
                    chunk = self.request.recv(length - len(data))
                    if not chunk:
                        return
                    data += chunk
                reply = server.answer(data, tcp=True)
                if reply is not None:
                    self.request.sendall(struct.pack("!H", len(reply)) + reply)

        for _ in range(20):  # one port number free for both UDP and TCP
            self._udp = socketserver.ThreadingUDPServer(("127.0.0.1", 0), Udp)
            self.port = self._udp.server_address[1]
            try:
                self._tcp = socketserver.ThreadingTCPServer(("127.0.0.1", self.port), Tcp)
                break
            except OSError:
                self._udp.server_close()
        else:
            raise OSError("no port free for both UDP and TCP on 127.0.0.1")
        self._udp.daemon_threads = self._tcp.daemon_threads = True
        self._threads = [threading.Thread(target=s.serve_forever, daemon=True)
                         for s in (self._udp, self._tcp)]

    def load(self, zonedata: dict[str, list[Any]]) -> None:
        self.zone = Zone(zonedata)

    def answer(self, data: bytes, tcp: bool) -> bytes | None:
        try:
            query = dns.message.from_wire(data)
        except dns.exception.DNSException:
            return None
        question = query.question[0]
        status, rrsets = self.zone.lookup(question.name, dns.rdatatype.to_text(question.rdtype))
        response = dns.message.make_response(query)
        response.flags |= dns.flags.RA
        if status == "timeout":
            response.set_rcode(dns.rcode.SERVFAIL)
        elif status == "nxdomain":
            response.set_rcode(dns.rcode.NXDOMAIN)
        response.answer = rrsets
        limit = 65535 if tcp else max(512, query.payload if query.edns >= 0 else 512)
        try:
            return response.to_wire(max_size=limit)
        except dns.exception.TooBig:
            response.answer = []
            response.flags |= dns.flags.TC
            return response.to_wire()

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        for s in (self._udp, self._tcp):
            s.shutdown()
            s.server_close()


@contextmanager
def running() -> Iterator[ZoneServer]:
    server = ZoneServer()
    server.start()
    try:
        # Ready when it answers (it is bound already; this proves the loops run).
        q = dns.message.make_query("ready.invalid", "A")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(5)
            s.sendto(q.to_wire(), ("127.0.0.1", server.port))
            s.recvfrom(512)
        yield server
    finally:
        server.stop()
