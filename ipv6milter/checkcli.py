"""``ipv6milter-check``: the milter's checks and policy, offline, for one message.

Same configuration file, same engine and policy as the milter; prints the
verdict (the reply the milter would give, or ``accept``) and the
Authentication-Results header.  Exit status: 0 accept, 1 refusal, 2 usage or
configuration error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TextIO

from . import alignment, authresults, config, policy
from .config import Config, ConfigError
from .engine import Engine, Message, split_fields
from .model import ACCEPT, Alignment, DkimResult, SpfResult, Verdict
from .resolver import Resolver


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ipv6milter-check",
        description="Judge one message as ipv6milter would, without an MTA.",
    )
    p.add_argument(
        "-c", "--config", metavar="FILE", help=f"configuration file (default {config.DEFAULT_PATH})"
    )
    p.add_argument("--ip", required=True, help="the SMTP client's address")
    p.add_argument("--helo", default="", help="the HELO/EHLO name")
    p.add_argument("--mail-from", default="", help="the MAIL FROM address ('' for <>)")
    p.add_argument("--rcpt", action="append", default=[], help="a recipient (repeatable)")
    p.add_argument(
        "--authenticated", action="store_true", help="the client authenticated with SMTP AUTH"
    )
    p.add_argument(
        "--explain",
        action="store_true",
        help="show each DNS query with its answer and each check's reasoning",
    )
    p.add_argument(
        "message",
        nargs="?",
        help="the message file, '-' for standard input; none: judged without DKIM",
    )
    return p


def _read_message(name: str | None) -> bytes | None:
    if name is None:
        return None
    if name == "-":
        data = sys.stdin.buffer.read()
    else:
        with open(name, "rb") as fh:
            data = fh.read()
    # Messages on disk usually have LF line ends; SMTP carries CRLF.
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def printable(text: str) -> str:
    """Text from DNS and from the message, fit for a terminal: every
    non-printable character escaped (an SPF ``exp=`` may carry escape
    sequences)."""
    if text.isprintable():
        return text
    out = []
    for c in text:
        if c.isprintable():
            out.append(c)
        elif ord(c) < 0x100:
            out.append(f"\\x{ord(c):02x}")
        elif ord(c) < 0x10000:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(f"\\U{ord(c):08x}")
    return "".join(out)


def collect(cfg: Config, message: bytes) -> Message:
    """The message as the milter collects it from an MTA: the same fields,
    the same limits (MaxMessageSize included)."""
    msg = Message(cfg.max_message_size, cfg.max_signatures, cfg.default_authserv_id(None))
    fields, body = split_fields(message)
    for name, value in fields:
        msg.header(name, value)
    msg.body(body)
    return msg


def _alignment_lines(aligned: Alignment, spf: SpfResult | None,
                     dkim: Sequence[DkimResult]) -> list[str]:
    """--explain: the alignment of each passing or temporarily failed
    identifier, and what the policy makes of them."""
    out = []
    if spf is not None and spf.result in ("pass", "temperror"):
        out.append(f"spf={spf.result} {spf.identity or '-'}: "
                   f"{authresults.alignment_comment(aligned, aligned.spf)}")
    for i, r in enumerate(dkim):
        if r.result in ("pass", "temperror"):
            out.append(f"dkim={r.result} d={r.domain or '-'}: "
                       f"{authresults.alignment_comment(aligned, aligned.of_dkim(i))}")
    out.append(f"aligned={policy.aligned_summary(spf, dkim, aligned)}")
    return out


def run(args: argparse.Namespace, out: TextIO, resolver: Resolver | None = None) -> int:
    """Judge the message of ``args``; ``resolver`` replaces the configured one (tests)."""
    cfg = config.load(args.config, default_if_missing=args.config is None)
    addr = policy.parse_address(args.ip)
    if addr is None:
        raise ValueError(f"--ip: not an IP address: {args.ip!r}")
    message = _read_message(args.message)
    engine = Engine(cfg, resolver, workers=1)
    trace: list[str] | None = [] if args.explain else None

    def explain(line: str) -> None:
        if trace is not None:
            print(f"# {printable(line)}", file=out)

    def show_trace(title: str) -> None:
        if trace:
            explain(title)
            for t in trace:
                explain(f"  {t}")
            trace.clear()

    scope = policy.classify(cfg, addr, args.authenticated)
    explain(
        f"client {addr}: scope {scope.value}" + ("" if scope.in_scope else " (no policy applies)")
    )
    eff = policy.effective_address(addr)
    checks = scope.in_scope or cfg.stamp_all
    verdict: Verdict = ACCEPT
    iprev = spf = None
    dkim: tuple[DkimResult, ...] = ()
    aligned: Alignment | None = None
    if checks:
        iprev = engine.iprev(eff, trace)
        show_trace("reverse DNS lookups")
        explain(f"iprev={iprev.result.value}: {iprev.detail}")
    opted_in = 0
    refusals: list[tuple[str, Verdict]] = []
    if scope.in_scope:
        if not args.rcpt:
            explain("RCPT (none): no recipient given")
        for rcpt in args.rcpt:
            domain = policy.recipient_domain(rcpt)
            v = policy.decide_rcpt(cfg, addr, domain, iprev, postmaster=policy.is_postmaster(rcpt))
            explain(
                f"RCPT {rcpt}: {v.summary}"
                + (f" ({'; '.join(v.reasons)})" if v.reasons else "")
            )
            if v.reply is not None:
                refusals.append((rcpt, v))
            elif policy.judged(cfg, rcpt):
                opted_in += 1
        if refusals and not opted_in:
            verdict = refusals[0][1]
    if checks:
        # One deadline for SPF and DKIM together, as at the milter's end of message.
        budget = engine.budget(trace)
        spf = engine.spf(eff, args.mail_from, args.helo, budget=budget)
        show_trace("SPF lookups")
        explain(f"spf={spf.result}: {spf.detail}")
        from_values: list[bytes] = []
        if message is not None:
            msg = collect(cfg, message)
            from_values = msg.from_values
            if msg.too_big:
                explain(f"message: {msg.too_big}: signatures reported, not verified")
            dkim = engine.dkim_of(msg, budget)
            show_trace("DKIM key lookups")
            for r in dkim:
                explain(f"dkim={r.result} d={r.domain or '-'} s={r.selector or '-'}: {r.detail}")
        else:
            explain("no message given: judged without DKIM")
        if cfg.alignment != "off":
            # The same deadline as SPF and DKIM, as at the milter's end of message.
            aligned = alignment.evaluate(engine.resolver, cfg.alignment, from_values, spf,
                                         dkim, budget)
            show_trace(f"From alignment ({cfg.alignment}): From domain and _dmarc lookups")
            for line in _alignment_lines(aligned, spf, dkim):
                explain(line)
    if scope.in_scope and opted_in:
        verdict = policy.decide_eom(cfg, addr, spf, dkim, aligned)
        explain(
            f"end of message: {verdict.summary}"
            + (f" ({'; '.join(verdict.reasons)})" if verdict.reasons else "")
        )
    engine.shutdown()

    if opted_in:
        for rcpt, v in refusals:
            print(f"RCPT {rcpt}: {v.reply}", file=out)
    if verdict.reply is None:
        print("accept", file=out)
    elif verdict.enforced:
        print(str(verdict.reply), file=out)
    else:
        why = "monitor mode" if cfg.monitor else "outside EnforceShare"
        print(f"accept ({why}; enforce would reply: {verdict.reply})", file=out)
    if checks and not verdict.refuses:
        authserv_id = cfg.default_authserv_id(None)
        value = authresults.build(authserv_id, eff, iprev, spf, dkim, aligned)
        print(f"{authresults.FIELD}: {value}", file=out)
    return 1 if verdict.refuses else 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return run(args, sys.stdout)
    except ConfigError as e:
        for line in e.errors:
            print(line, file=sys.stderr)
        return 2
    except (OSError, ValueError) as e:
        print(f"ipv6milter-check: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
