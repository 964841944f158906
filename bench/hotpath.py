"""CPU per message on the milter's hot path, in one process, no MTA, no Knot.

    python -m bench.hotpath [--messages N] [--rounds R]

A tiny DNS responder on 127.0.0.1 (dnspython, a thread of this process)
serves the benchmark's zone (bench/servers.py's ``build_zones``); the real
``Engine`` and ``Ipv6Milter`` callbacks (bench/micro.py's fake context) take
a 4 KB DKIM-signed message N times after a warm-up, so that every answer
comes from the resolver's cache as under load.  Prints the median over R
rounds of the process CPU time (every thread: the check pool included) and
of the wall time per message, in microseconds.
"""

from __future__ import annotations

import argparse
import logging
import socket
import statistics
import tempfile
import threading
import time

import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import dns.zone

from ipv6milter import config
from ipv6milter.engine import Engine

from .load import make_message
from .micro import negotiated_protocol, one_message, split_message
from .servers import build_zones, make_key


class Responder:
    """Answers from dnspython zones, over UDP on 127.0.0.1 (a free port)."""

    def __init__(self, zones: dict[str, list[str]]):
        self.zones = [
            dns.zone.from_text("$TTL 3600\n@ SOA ns. h. 1 3600 600 86400 300\n@ NS ns.\n"
                               + "\n".join(lines) + "\n", origin=origin, relativize=True)
            for origin, lines in zones.items()
        ]
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            wire, peer = self.sock.recvfrom(65535)
            q = dns.message.from_wire(wire)
            r = dns.message.make_response(q)
            qname, rdtype = q.question[0].name, q.question[0].rdtype
            for z in self.zones:
                if qname.is_subdomain(z.origin):
                    node = z.get_node(qname)
                    rds = node.get_rdataset(dns.rdataclass.IN, rdtype) if node else None
                    if rds is not None:
                        r.answer.append(dns.rrset.from_rdata_list(qname, rds.ttl, list(rds)))
                    else:
                        if node is None:
                            r.set_rcode(dns.rcode.NXDOMAIN)
                        soa = z.get_rdataset("@", "SOA")
                        r.authority.append(dns.rrset.from_rdata_list(z.origin, 300, list(soa)))
                    break
            else:
                r.set_rcode(dns.rcode.REFUSED)
            self.sock.sendto(r.to_wire(), peer)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.hotpath")
    p.add_argument("--messages", type=int, default=400)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    private, record = make_key(2048)
    responder = Responder(build_zones(record))
    with tempfile.NamedTemporaryFile("w", suffix=".conf", delete=False) as fh:
        fh.write(f"AcceptDomains bench.example\nTrustedHosts 127.0.0.2\n"
                 f"Nameservers 127.0.0.1:{responder.port}\n")
    cfg = config.load(fh.name)
    # The daemon logs every decision at info; so do we, to nowhere.
    handler = logging.StreamHandler(open("/dev/null", "w"))  # noqa: SIM115
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)
    engine = Engine(cfg)
    protocol = negotiated_protocol()
    headers, chunks = split_message(make_message(4096, private))
    for _ in range(20):
        one_message(engine, headers, chunks, protocol)
    cpu, wall = [], []
    for _ in range(args.rounds):
        c, w = time.process_time(), time.perf_counter()
        for _ in range(args.messages):
            one_message(engine, headers, chunks, protocol)
        cpu.append((time.process_time() - c) / args.messages * 1e6)
        wall.append((time.perf_counter() - w) / args.messages * 1e6)
    print(f"4 KB DKIM-signed message, {args.messages} x {args.rounds} rounds: "
          f"CPU {statistics.median(cpu):.0f} us/msg (rounds {', '.join(f'{x:.0f}' for x in cpu)}),"
          f" wall {statistics.median(wall):.0f} us/msg")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
