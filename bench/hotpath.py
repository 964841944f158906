"""CPU per message on the milter's hot path, in one process, no MTA, no Knot.

    python -m bench.hotpath [--messages N] [--rounds R] [--components] [--isolate]

A tiny DNS responder on 127.0.0.1 (dnspython, a thread of this process)
serves the benchmark's zone (bench/servers.py's ``build_zones``); the real
``Engine`` and ``Ipv6Milter`` callbacks (bench/micro.py's fake context) take
a 4 KB DKIM-signed message N times after a warm-up, so that every answer
comes from the resolver's cache as under load.  Prints the median over R
rounds of the process CPU time (every thread: the check pool included) and
of the wall time per message, in microseconds.

``--isolate`` runs the checks as the daemon's workers do, in helper
processes (``Engine(cfg, isolate=True)``, isolation.py): the CPU is then
this process's and its helpers' (every descendant's, from /proc), and the
difference to a run without it is what the isolation costs.

``--components`` also ranks where that CPU goes: the same loop with the checks
run inline (bench/micro.py's ``InlineEngine``: one thread, every step in it;
the difference to the pooled run is the pool's round trip), sampled by py-spy
(500 Hz; a sampler, not cProfile, whose per-call cost inflates the parts made
of many small Python calls), each sample charged to a component (the library
or our module of its innermost frame; C code and the ``re``/``functools``
wrappers count for whoever called them), scaled to the inline run's CPU per
message measured without the sampler.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import dns.zone

from ipv6milter import config
from ipv6milter.engine import Engine
from ipv6milter.logfmt import lean_records

from .load import make_message
from .micro import InlineEngine, negotiated_protocol, one_message, split_message
from .servers import build_zones, make_key

# (component, path fragments of a function's file), first match wins; py files
# of ours by module, the libraries by package.
COMPONENTS: list[tuple[str, tuple[str, ...]]] = [
    ("dkimpy: message parse", ("dkim/__init__.py:rfc822_parse", "dkim/__init__.py:DKIM.__init__",
                               "dkim/__init__.py:DomainSigner.__init__",
                               "dkim/__init__.py:DomainSigner.set_message")),
    ("dkimpy: header selection, canonicalization, hashing", (
        "dkim/__init__.py:hash_headers", "dkim/__init__.py:select_headers",
        "dkim/canonicalization.py")),
    ("dkimpy: tag-value parse and signature field checks", (
        "dkim/util.py", "dkim/__init__.py:validate_signature_fields")),
    ("dkimpy: the rest of verify", ("dkim/",)),
    ("RSA verify (OpenSSL via cryptography; dkimrsa.py)", ("ipv6milter/dkimrsa.py",
                                                          "cryptography/", "RSAPublicKey")),
    ("ours: DKIM (dkimcheck, dkimaccept, dkimcanon)", ("ipv6milter/dkimcheck.py",
                                                       "ipv6milter/dkimaccept.py",
                                                       "ipv6milter/dkimcanon.py")),
    ("pyspf", ("spf.py",)),
    ("ours: SPF adapter (spfcheck)", ("ipv6milter/spfcheck.py",)),
    ("ours: iprev", ("ipv6milter/iprev.py",)),
    ("ours: resolver (answer cache)", ("ipv6milter/resolver.py",)),
    ("dnspython (names, rdata)", ("dns/",)),
    ("ipaddress", ("ipaddress.py",)),
    ("logging (stdlib) and logfmt", ("logging/", "ipv6milter/logfmt.py")),
    ("metrics (prometheus_client, metrics.py)", ("prometheus_client/", "ipv6milter/metrics.py")),
    ("authres and authresults.py (the header)", ("authres/", "ipv6milter/authresults.py")),
    ("ours: engine (per-message objects, budgets)", ("ipv6milter/engine.py",)),
    ("ours: milter adapter (callbacks)", ("ipv6milter/milter.py",)),
    ("ours: policy, model, config", ("ipv6milter/policy.py", "ipv6milter/model.py",
                                     "ipv6milter/config.py", "ipv6milter/limits.py")),
    ("ours: other modules", ("ipv6milter/",)),
    ("pymilter (Python side)", ("Milter/",)),
    ("threads, futures, locks (stdlib)", ("concurrent/", "threading.py", "queue.py")),
    ("bench harness (fake context, loop)", ("bench/",)),
]
# Charged to the caller: C built-ins (filename "~") and thin stdlib wrappers.
TRANSPARENT = ("~", "re/__init__.py", "re/_compiler.py", "re/_parser.py", "functools.py",
               "enum.py", "abc.py", "typing.py", "contextlib.py", "copy.py", "<frozen")


def component(func: tuple[str, int, str]) -> str | None:
    """The component of a function (file, line, name), None if it is transparent."""
    file, _, name = func
    key = f"{file}:{name}"
    if "RSAPublicKey" in name:
        return "RSA verify (OpenSSL via cryptography; dkimrsa.py)"
    if file == "~" or any(t in file for t in TRANSPARENT):
        return None
    for comp, frags in COMPONENTS:
        if any(f in key for f in frags):
            return comp
    return "other Python (stdlib)"


_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]*)(?::\d+)?\)$")


def components(raw: str, top: dict[str, dict[str, int]] | None = None) -> dict[str, int]:
    """Samples per component from py-spy's collapsed stacks (``--format raw``):
    each sample goes to the innermost frame that is not transparent (py-spy
    shows no frame for C code: a C built-in's time is already its caller's);
    only stacks inside ``one_message`` count (not the set-up, not the DNS
    responder's thread).  ``top``, if given, gets the samples per function
    within each component."""
    out: dict[str, int] = {}
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit() or "one_message" not in stack:
            continue
        comp, func, caller = "other Python (stdlib)", "?", ""
        for frame in reversed(stack.split(";")):
            m = _FRAME.match(frame)
            if not m:
                continue
            c = component((m["file"], 0, m["func"]))
            if c is None:
                continue
            if func == "?":
                comp, func = c, f"{m['func']} ({m['file'].rsplit('/', 1)[-1]})"
            elif c != comp:
                caller = c  # the first other component outwards: who called it
                break
        out[comp] = out.get(comp, 0) + int(count)
        if top is not None:
            funcs = top.setdefault(comp, {})
            funcs[func] = funcs.get(func, 0) + int(count)
            if caller:
                callers = top.setdefault(f"{comp}\0callers", {})
                callers[caller] = callers.get(caller, 0) + int(count)
    return out


class Responder:
    """Answers from dnspython zones, over UDP on 127.0.0.1 (a free port)."""

    def __init__(self, zones: dict[str, list[str]], start: bool = True):
        self.zones = [
            dns.zone.from_text("$TTL 3600\n@ SOA ns. h. 1 3600 600 86400 300\n@ NS ns.\n"
                               + "\n".join(lines) + "\n", origin=origin, relativize=True)
            for origin, lines in zones.items()
        ]
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        if start:
            self.start()

    def start(self) -> None:
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
    p.add_argument("--isolate", action="store_true",
                   help="checks in helper processes, as in the daemon's workers")
    p.add_argument("--components", action="store_true",
                   help="rank the CPU per message by component (py-spy, checks inline)")
    args = p.parse_args(argv)
    private, record = make_key(2048)
    # The helpers' zygote is forked before any thread exists (Engine's rule):
    # the responder's thread starts after the engine.
    responder = Responder(build_zones(record), start=False)
    with tempfile.NamedTemporaryFile("w", suffix=".conf", delete=False) as fh:
        fh.write(f"AcceptDomains bench.example\nTrustedHosts 127.0.0.2\n"
                 f"Nameservers 127.0.0.1:{responder.port}\n")
    cfg = config.load(fh.name)
    # The daemon logs every decision at info; so do we, to nowhere.
    handler = logging.StreamHandler(open("/dev/null", "w"))  # noqa: SIM115
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)
    lean_records()  # as the daemon's setup_logging does
    engine = Engine(cfg, isolate=args.isolate)
    responder.start()
    clock = tree_cpu if args.isolate else time.process_time
    protocol = negotiated_protocol()
    headers, chunks = split_message(make_message(4096, private))
    for _ in range(20):
        one_message(engine, headers, chunks, protocol)
    cpu, wall = [], []
    for _ in range(args.rounds):
        c, w = clock(), time.perf_counter()
        for _ in range(args.messages):
            one_message(engine, headers, chunks, protocol)
        cpu.append((clock() - c) / args.messages * 1e6)
        wall.append((time.perf_counter() - w) / args.messages * 1e6)
    where = " (checks in helpers: this process and its helpers)" if args.isolate else ""
    print(f"4 KB DKIM-signed message{where}, {args.messages} x {args.rounds} rounds: "
          f"CPU {statistics.median(cpu):.0f} us/msg (rounds {', '.join(f'{x:.0f}' for x in cpu)}),"
          f" wall {statistics.median(wall):.0f} us/msg")
    if args.components:
        rank_components(cfg, headers, chunks, protocol, args.messages, args.rounds,
                        statistics.median(cpu))
    return 0


_TICKS = os.sysconf("SC_CLK_TCK")


def tree_cpu() -> float:
    """CPU seconds (user + system) of this process and every live descendant
    (the helpers' zygote and the helpers), from /proc."""
    stats: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rpartition(b")")[2].split()
        except OSError:
            continue
        stats[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICKS)
    ours, total, grew = {os.getpid()}, 0.0, True
    while grew:
        grew = False
        for pid, (ppid, _) in stats.items():
            if ppid in ours and pid not in ours:
                ours.add(pid)
                grew = True
    for pid in ours:
        total += stats.get(pid, (0, 0.0))[1]
    return total


def rank_components(cfg: config.Config, headers: list[tuple[str, bytes]], chunks: list[bytes],
                    protocol: int, messages: int, rounds: int, pooled_us: float) -> None:
    """CPU per message with the checks inline, then py-spy on this process
    during as many messages again, its samples ranked by component and scaled
    to that CPU per message."""
    inline = InlineEngine(cfg)
    for _ in range(20):
        one_message(inline, headers, chunks, protocol)
    cpu = []
    for _ in range(rounds):
        c = time.process_time()
        for _ in range(messages):
            one_message(inline, headers, chunks, protocol)
        cpu.append((time.process_time() - c) / messages * 1e6)
    inline_us = statistics.median(cpu)
    pyspy = Path(sys.executable).parent / "py-spy"
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.txt"
        proc = subprocess.Popen(
            [str(pyspy if pyspy.exists() else "py-spy"), "record", "--pid", str(os.getpid()),
             "--rate", "500", "--format", "raw", "--output", str(raw), "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        time.sleep(1.5)  # py-spy attaches
        for _ in range(messages * rounds):
            one_message(inline, headers, chunks, protocol)
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
        funcs: dict[str, dict[str, int]] = {}
        own = components(raw.read_text(), funcs)
    total = sum(own.values())
    rounds_text = ", ".join(f"{x:.0f}" for x in cpu)
    print(f"\nchecks inline: CPU {inline_us:.0f} us/msg (rounds {rounds_text}); the pool's round"
          f" trip: {pooled_us - inline_us:.0f} us/msg; py-spy: {total} samples in"
          f" {messages * rounds} messages, scaled to {inline_us:.0f} us/msg\n")
    print("| component | share | µs per 4 KB message | where (share of the component) |"
          " called from |")
    print("|---|---:|---:|---|---|")
    for comp, n in sorted(own.items(), key=lambda kv: -kv[1]):
        where = sorted(funcs.get(comp, {}).items(), key=lambda kv: -kv[1])[:3]
        text = ", ".join(f"`{f}` {100 * k / n:.0f}%" for f, k in where)
        by = sorted(funcs.get(f"{comp}\0callers", {}).items(), key=lambda kv: -kv[1])[:3]
        by_text = ", ".join(f"{c} {100 * k / n:.0f}%" for c, k in by)
        print(f"| {comp} | {100 * n / total:.1f}% | {inline_us * n / total:.0f} | {text}"
              f" | {by_text} |")


if __name__ == "__main__":
    raise SystemExit(main())
