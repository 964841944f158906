"""ipv6milter's parts timed in isolation: evidence for where its time goes.

    python -m bench.micro --nameserver 127.0.0.1:PORT --message-4k F --message-100k F --out J

Drives the real ``Ipv6Milter`` callbacks with a fake milter context (no MTA,
no libmilter), against the benchmark's Knot, after a warm-up so that every
DNS answer comes from the resolver's cache, as it does under load.  Nothing
of ipv6milter is changed; only the fake context and, for the single-thread
cProfile pass, an engine whose ``start`` runs the check at once.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import ipaddress
import json
import logging
import pstats
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import dkim
import Milter
from dkim import crypto

from ipv6milter import authresults, config
from ipv6milter.dkimcheck import check_dkim
from ipv6milter.engine import Engine, Message
from ipv6milter.iprev import check_iprev
from ipv6milter.milter import Ipv6Milter
from ipv6milter.model import ACCEPT
from ipv6milter.spfcheck import check_spf

CLIENT = ipaddress.ip_address("::1")
HELO = "mail.bench.example"
SENDER = "<sender@bench.example>"
RCPT = "<load@bench.example>"
# What Postfix 3.7 offers with milter_protocol = 6 (every step and no-reply bit).
POSTFIX_PROTOCOL = 0x1FFFFF


class FakeCtx:
    """The few libmilter context calls Ipv6Milter makes."""

    def __init__(self) -> None:
        self.priv: Any = None
        self.headers_added: list[tuple[str, str, int]] = []
        self.macros = {"j": "mx.bench.example", "i": "4XyZ1k2"}

    def getpriv(self) -> Any:
        return self.priv

    def setpriv(self, priv: Any) -> None:
        self.priv = priv

    def getsymval(self, name: str) -> str | None:
        return self.macros.get(name)

    def setsymlist(self, stage: int, macros: str) -> None:
        pass

    def setreply(self, *args: Any) -> None:
        pass

    def addheader(self, field: str, value: str, idx: int) -> None:
        self.headers_added.append((field, value, idx))

    def chgheader(self, field: str, idx: int, value: str) -> None:
        pass


def split_message(msg: bytes) -> tuple[list[tuple[str, bytes]], list[bytes]]:
    """Headers as Postfix hands them over with P_HDR_LEADSPC (value with its
    leading space and LF-folded continuation lines), body in 64 KiB chunks."""
    head, _, body = msg.partition(b"\r\n\r\n")
    headers: list[tuple[str, bytes]] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and headers:
            name, value = headers[-1]
            headers[-1] = (name, value + b"\n" + line)
        else:
            name, _, value = line.partition(b":")
            headers.append((name.decode(), value))
    chunks = [body[i : i + 65535] for i in range(0, len(body), 65535)] or [b""]
    return headers, chunks


def negotiated_protocol() -> int:
    m = Ipv6Milter.__new__(Ipv6Milter)
    ctx = FakeCtx()
    Milter.Base._setctx(m, ctx)
    opts = [Milter.CURR_ACTS, POSTFIX_PROTOCOL, 0, 0]
    m.negotiate(opts)
    return opts[1]


def one_message(engine: Engine, headers: list[tuple[str, bytes]], chunks: list[bytes],
                protocol: int) -> FakeCtx:
    ctx = FakeCtx()
    m = Ipv6Milter(engine)
    m._setctx(ctx)
    m._protocol = protocol
    ctx.priv = m
    m.connect("mail.bench.example", socket.AF_INET6, ("::1", 25, 0, 0))
    m.hello(HELO)
    m.envfrom(SENDER)
    m.envrcpt(RCPT)
    for name, value in headers:
        m.header(name, value)
    for chunk in chunks:
        m.body(chunk)
    rc = m.eom()
    if rc != Milter.CONTINUE or not ctx.headers_added:
        raise SystemExit(f"the message was not accepted and stamped: rc={rc}")
    m.close()
    return ctx


def timeit(fn: Callable[[], object], n: int, time_limit: float = 10.0) -> float:
    """Median microseconds per call over up to ``n`` calls (bounded in time)."""
    fn()
    times = []
    deadline = time.monotonic() + time_limit
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        if time.monotonic() > deadline:
            break
    return statistics.median(times) * 1e6


class InlineEngine(Engine):
    """``submit`` runs the check in the calling thread: one thread to profile."""

    def submit(self, fn: Callable[..., Any], *args: object) -> Future[Any]:
        f: Future[Any] = Future()
        f.set_result(fn(*args))
        return f


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.micro")
    p.add_argument("--nameserver", required=True)
    p.add_argument("--message-4k", required=True)
    p.add_argument("--message-100k", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    msgs = {
        "4 KB": Path(args.message_4k).read_bytes().replace(b"\n", b"\r\n"),
        "100 KB": Path(args.message_100k).read_bytes().replace(b"\n", b"\r\n"),
    }
    with tempfile.NamedTemporaryFile("w", suffix=".conf", delete=False) as fh:
        fh.write(f"AcceptDomains bench.example\nTrustedHosts 127.0.0.2\n"
                 f"Nameservers {args.nameserver}\n")
        conf_path = fh.name
    cfg = config.load(conf_path)
    # The daemon logs every decision at info to stderr; so do we, to a file.
    logfile = tempfile.NamedTemporaryFile("w", suffix=".log", delete=False)  # noqa: SIM115
    handler = logging.StreamHandler(logfile)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)

    engine = Engine(cfg)
    protocol = negotiated_protocol()
    timings: list[tuple[str, float]] = []
    resolver = engine.resolver

    parts = {k: split_message(v) for k, v in msgs.items()}
    for _ in range(3):  # warm the DNS cache and the imports
        for headers, chunks in parts.values():
            one_message(engine, headers, chunks, protocol)

    for label, (headers, chunks) in parts.items():
        n = 300 if label == "4 KB" else 100
        timings.append((f"whole message through the callbacks, {label} (pool threads, like the"
                        " daemon)", timeit(lambda h=headers, c=chunks: one_message(
                            engine, h, c, protocol), n)))
    budget = engine.budget
    timings.append(("check_iprev (PTR + AAAA, cached)",
                    timeit(lambda: check_iprev(resolver, CLIENT, budget()), 500)))
    timings.append(("check_spf (pyspf, include, cached)",
                    timeit(lambda: check_spf(resolver, CLIENT, SENDER, HELO, budget()), 500)))
    for label, msg in msgs.items():
        timings.append((f"check_dkim {label} (ours: 1 signature, cached key)",
                        timeit(lambda m=msg: check_dkim(resolver, m, budget(), 5), 200)))
    key_txt = resolver.txt("bench._domainkey.bench.example", budget())[0]

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes:
        return key_txt

    for label, msg in msgs.items():
        timings.append((f"dkimpy alone: DKIM(msg).verify() {label} (static key)",
                        timeit(lambda m=msg: dkim.DKIM(m).verify(dnsfunc=dnsfunc), 200)))
    timings.append(("dkimpy: parse the key record (evaluate_pk; ours runs it a 2nd time)",
                    timeit(lambda: dkim.evaluate_pk(b"bench._domainkey.bench.example.", key_txt),
                           1000)))
    d = dkim.DKIM(msgs["4 KB"])
    d.verify(dnsfunc=dnsfunc)
    pk = d.pk
    sig = dkim.util.parse_tag_value(
        next(v for n, v in d.headers if n.lower() == b"dkim-signature"))
    import base64
    import hashlib
    import re

    signature = base64.b64decode(re.sub(rb"\s+", b"", sig[b"b"]))
    h = hashlib.sha256(b"x")
    timings.append(("dkimpy: RSA-2048 verify in pure Python (RSASSA_PKCS1_v1_5_verify)",
                    timeit(lambda: crypto.RSASSA_PKCS1_v1_5_verify(h, signature, pk), 1000)))
    policy = dkim.CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
    for label, msg in msgs.items():
        body = msg.partition(b"\r\n\r\n")[2]
        timings.append((f"dkimpy: relaxed body canonicalization {label}",
                        timeit(lambda b=body: policy.canonicalize_body(b), 300)))
        timings.append((f"sha256 of the body {label}",
                        timeit(lambda b=body: hashlib.sha256(b).digest(), 300)))
        timings.append((f"dkim.DKIM(msg) parse only {label}",
                        timeit(lambda m=msg: dkim.DKIM(m), 300)))

    # The adapter's own pieces, on a milter that has just accepted a message.
    for label, (headers, chunks) in parts.items():
        ctx = one_message(engine, headers, chunks, protocol)
        m = ctx.priv
        collected = Message(2**40, 5, "mx.bench.example",
                            leading_space=bool(m._protocol & Milter.P_HDR_LEADSPC))

        def rebuild(h: Any = headers, c: Any = chunks, msg: Message = collected) -> bytes:
            msg.headers, msg.chunks = list(h), list(c)
            return msg.message()

        timings.append((f"engine.Message.message(): rebuild the message bytes, {label}",
                        timeit(rebuild, 300)))
    iprev = check_iprev(resolver, CLIENT, budget())
    spf_r = check_spf(resolver, CLIENT, SENDER, HELO, budget())
    dk = check_dkim(resolver, msgs["4 KB"], budget(), 5)
    timings.append(("authresults.build (the header, with authres)",
                    timeit(lambda: authresults.build("mx.bench.example", CLIENT, iprev, spf_r, dk),
                           1000)))
    timings.append(("decision log line (_log, one info line to a file)",
                    timeit(lambda: m._log("eom", ACCEPT, time.monotonic(),
                                          rcpt_domain="bench.example", iprev="pass",
                                          spf="pass", dkim="pass"), 1000)))
    session = engine.session()
    timings.append(("thread pool round trip (session.start + session.wait, no-op)",
                    timeit(lambda: session.wait(session.start(lambda budget: 1), 0), 2000)))
    timings.append(("metrics: results.labels(...).inc()",
                    timeit(lambda: engine.metrics.results.labels("spf", "pass").inc(), 2000)))

    def timed() -> None:
        with engine.metrics.timed("dkim"):
            pass

    timings.append(("metrics: one latency histogram observation (timed)", timeit(timed, 2000)))
    timings.append(("Resolver.query, one cached answer",
                    timeit(lambda: resolver.query("bench.example", "TXT", budget()), 2000)))

    # cProfile of whole messages in one thread.
    inline = InlineEngine(cfg)
    headers, chunks = parts["4 KB"]
    for _ in range(3):
        one_message(inline, headers, chunks, protocol)
    prof = cProfile.Profile()
    n = 300
    prof.enable()
    t = time.perf_counter()
    for _ in range(n):
        one_message(inline, headers, chunks, protocol)
    elapsed = time.perf_counter() - t
    prof.disable()
    lines = [f"{n} messages, 4 KB, one thread: {1e6 * elapsed / n:,.0f} µs/message under"
             " cProfile"]
    for key in ("tottime", "cumulative"):
        s = io.StringIO()
        pstats.Stats(prof, stream=s).strip_dirs().sort_stats(key).print_stats(18)
        body = s.getvalue().splitlines()
        start = next(i for i, ln in enumerate(body) if "ncalls" in ln)
        lines += ["", f"sorted by {key}:", *body[start : start + 19]]
    s = io.StringIO()
    st = pstats.Stats(prof, stream=s)
    st.strip_dirs().sort_stats("tottime").print_callers(r"__init__.py:\d+\(sub\)$")
    lines += ["", "who calls re.sub() (callers of the module function, per 300 messages):",
              *[ln for ln in s.getvalue().splitlines() if "(" in ln][:20]]
    # The same DKIM checks with bench/prototype.py's "dkimfast" patches applied.
    from bench.prototype import _dkimfast

    body_100k = msgs["100 KB"].partition(b"\r\n\r\n")[2]
    # The message handed over in parts, as the milter holds it: no re-parse.
    headers_100k = [[n.encode(), v.replace(b"\n", b"\r\n") + b"\r\n"]
                    for n, v in parts["100 KB"][0]]

    def prebuilt() -> object:
        d = dkim.DKIM()
        d.headers, d.body = [list(h) for h in headers_100k], body_100k
        return d

    timings.append(("dkim.DKIM() given headers and body (no re-parse), 100 KB",
                    timeit(prebuilt, 300)))
    import random

    rnd = random.Random(5)
    pieces = [b"a", b" ", b"\t", b"\r\n", b"  ", b"x", b".", b"\r\n\r\n", b" \r\n", b"\t\r\n"]
    bodies = [b"".join(rnd.choice(pieces) for _ in range(rnd.randint(0, 40)))
              for _ in range(2000)]
    wanted = [(policy.canonicalize_body(b), dkim.rfc822_parse(b"A: b\r\n c\r\n\r\n" + b))
              for b in bodies]
    _dkimfast()
    same = all((policy.canonicalize_body(b), dkim.rfc822_parse(b"A: b\r\n c\r\n\r\n" + b))
               == w for b, w in zip(bodies, wanted, strict=True))
    if not same:
        raise SystemExit("prototype dkimfast is not equivalent to dkimpy")
    timings.append((f"(prototype dkimfast equals dkimpy on {len(bodies)} random bodies)", 0.0))
    for label, msg in msgs.items():
        timings.append((f"prototype dkimfast: check_dkim {label}",
                        timeit(lambda m=msg: check_dkim(resolver, m, budget(), 5), 200)))
        body = msg.partition(b"\r\n\r\n")[2]
        timings.append((f"prototype dkimfast: relaxed body canonicalization {label}",
                        timeit(lambda b=body: policy.canonicalize_body(b), 300)))
    timings.append(("prototype dkimfast: RSA-2048 verify (int.to_bytes)",
                    timeit(lambda: crypto.RSASSA_PKCS1_v1_5_verify(h, signature, pk), 1000)))

    inline.shutdown()
    engine.shutdown()
    Path(args.out).write_text(json.dumps({"timings": timings, "cprofile": lines,
                                          "protocol": hex(protocol)}, indent=1))
    for name, us in timings:
        print(f"{us:12,.1f} µs  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
