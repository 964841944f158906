"""The pymilter adapter: gathers facts from the MTA, asks the engine and the
policy, applies the verdict.  No decision is taken here.

One instance per SMTP connection (libmilter runs each in its own thread).
Per-message state is reset at MAIL FROM and on abort.
"""

from __future__ import annotations

import functools
import logging
import re
import socket
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import Milter

from . import authresults, logfmt, policy, spfcheck
from .dkimcheck import unverified
from .engine import IPREV_UNFINISHED, Engine
from .model import ACCEPT, DkimResult, IPAddress, IprevResult, Reply, Scope, SpfResult, Verdict

log = logging.getLogger(__name__)

SPF_UNFINISHED = SpfResult("temperror", "", "mailfrom", "did not finish in time")
_FIELD_OVERHEAD = 256  # bytes charged per header field on top of its length


def _guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """An internal error tempfails this message, is logged once with its
    traceback, and the milter keeps serving (SPEC §1)."""

    @functools.wraps(fn)
    def wrapper(self: Ipv6Milter, *args: Any) -> Any:
        try:
            return fn(self, *args)
        except Exception:
            log.exception("internal error in %s callback, client=%s", fn.__name__, self.client)
            stage = {"envrcpt": "rcpt", "envfrom": "mail"}.get(fn.__name__, fn.__name__)
            self.engine.metrics.decisions.labels(stage, "internal-error", self.cfg.mode).inc()
            reply = policy.INTERNAL_ERROR
            try:
                self.setreply(reply.code, reply.xcode, reply.text)
            except Exception:  # no context left to reply on (connection gone)
                log.debug("could not set the internal-error reply", exc_info=True)
            return Milter.TEMPFAIL

    return wrapper


def _no_reply(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Negotiated without a reply, so the MTA does not wait for one.  A
    failure is logged once, remembered, and answered by the next callback
    that does reply (RCPT, end of message) with a tempfail."""

    @functools.wraps(fn)
    def wrapper(self: Ipv6Milter, *args: Any) -> int:
        try:
            fn(self, *args)
        except Exception:
            log.exception("internal error in %s callback, client=%s", fn.__name__, self.client)
            if fn.__name__ == "connect":
                self.conn_failed = True
            else:
                self.failed = True
        return Milter.CONTINUE

    return Milter.noreply(wrapper)


@Milter.header_leading_space
class Ipv6Milter(Milter.Base):
    def __init__(self, engine: Engine):
        self.engine = engine
        self.cfg = engine.cfg
        self.addr: IPAddress | None = None
        self.client = "-"
        self.conn_scope = Scope.LOCAL
        self.helo = ""
        self.j: str | None = None
        self.iprev_fut: Future[IprevResult] | None = None
        self.connected = False
        self.conn_failed = False  # connect failed: every transaction tempfails
        self._reset_message()

    def _reset_message(self) -> None:
        self.mail_from: str | None = None
        self.scope = self.conn_scope
        self.spf_fut: Future[SpfResult] | None = None
        self.opted_in = 0
        self.rcpts: list[str] = []
        self.headers: list[tuple[str, bytes]] = []
        self.ar_ids: list[str] = []  # authserv-id of each Authentication-Results
        self.signed = False  # a DKIM-Signature field was seen
        self.chunks: list[bytes] = []
        self.size = 0
        self.too_big = False
        self.failed = False  # a callback without a reply failed: tempfail at eom

    # -- facts ---------------------------------------------------------------

    def _checks_wanted(self) -> bool:
        return self.addr is not None and (self.scope.in_scope or self.cfg.stamp_all)

    def _start_iprev(self) -> None:
        if self.iprev_fut is None and self._checks_wanted():
            assert self.addr is not None
            addr = policy.effective_address(self.addr)
            self.iprev_fut = self.engine.start(self.engine.iprev, addr)

    @_no_reply
    def connect(self, hostname: str, family: int, hostaddr: Any) -> None:
        # Postfix calls connect a second time after XCLIENT, with the new
        # client: every connection fact is taken anew, the latest one wins.
        self.conn_failed = False
        self.cfg = self.engine.cfg
        raw = hostaddr[0] if isinstance(hostaddr, tuple) else hostaddr
        self.addr = (
            policy.parse_address(raw) if family in (socket.AF_INET, socket.AF_INET6) else None
        )
        # The log names a mapped client by the IPv4 address it carries.
        self.client = str(policy.effective_address(self.addr)) if self.addr else "local"
        self.j = self.getsymval("j")
        self.conn_scope = policy.classify(self.cfg, self.addr)
        if not self.connected:
            self.connected = True
            self.engine.metrics.in_flight.inc()
        self.iprev_fut = None
        self._reset_message()
        self._start_iprev()

    @Milter.noreply
    def hello(self, hostname: str) -> int:
        self.helo = hostname
        return Milter.CONTINUE

    @_no_reply
    def envfrom(self, mail_from: str, *params: str) -> None:
        self._reset_message()
        self.cfg = self.engine.cfg  # a reloaded configuration applies from here on
        self.mail_from = mail_from
        authenticated = bool(self.getsymval("{auth_authen}"))
        self.scope = policy.classify(self.cfg, self.addr, authenticated)
        self.engine.metrics.transactions.labels(self.scope.value).inc()
        if self._checks_wanted():
            assert self.addr is not None
            self._start_iprev()
            addr = policy.effective_address(self.addr)
            self.spf_fut = self.engine.start(self.engine.spf, addr, mail_from, self.helo)

    @_guarded
    def envrcpt(self, rcpt: str, *params: str) -> int:
        if self.conn_failed or self.failed:
            return self._internal_error("rcpt")
        if not self.scope.in_scope:
            self.rcpts.append(rcpt)
            return Milter.CONTINUE
        assert self.addr is not None
        domain = policy.recipient_domain(rcpt)
        opted_in = bool(domain) and self.cfg.accept_domains.matches(domain)
        start = time.monotonic()
        iprev = self.engine.wait(self.iprev_fut, IPREV_UNFINISHED) if opted_in else None
        verdict = policy.decide_rcpt(self.cfg, self.addr, domain, iprev)
        self.engine.metrics.decision("rcpt", verdict)
        # An accepted recipient is logged at debug level only: the message's
        # own line (stage=eom) records the accept with every recipient domain.
        self._log("rcpt", verdict, start, rcpt_domain=domain,
                  iprev=iprev.result if iprev else None, ptr=_ptr(iprev),
                  level=logging.INFO if verdict.reply else logging.DEBUG)
        if verdict.refuses:
            return self._refuse(verdict.reply)
        # The message's line lists the recipients it was accepted for.
        self.rcpts.append(rcpt)
        if opted_in and verdict.reply is None:
            # Only a recipient enforce mode would take brings the message to
            # the end-of-message decision (in monitor mode too).
            self.opted_in += 1
        return Milter.CONTINUE

    @_no_reply
    @Milter.decode("bytes")
    def header(self, name: str, value: bytes) -> None:
        lname = name.lower()
        if lname == "authentication-results":
            self.ar_ids.append(authresults.authserv_id_of(value.decode("utf-8", "replace")))
        elif lname == "dkim-signature":
            self.signed = True
        # Past MaxMessageSize only the signatures are kept, to be reported.
        if not self.too_big or lname == "dkim-signature":
            self.headers.append((name, value))
        # Each field costs more than its bytes: charge for the overhead too, so
        # that half a million tiny fields also reach the limit.
        self._count(len(name) + len(value) + _FIELD_OVERHEAD)

    @_guarded
    def body(self, chunk: bytes) -> int:
        if not self._checks_wanted() and self._protocol & Milter.P_SKIP:
            return Milter.SKIP  # only the headers matter: no DKIM to run
        if not self.too_big:
            self.chunks.append(chunk)
        self._count(len(chunk))
        return Milter.CONTINUE

    def _count(self, n: int) -> None:
        # Memory stays bounded: past MaxMessageSize nothing more is kept and
        # the message is judged without DKIM.
        self.size += n
        if self.size > self.cfg.max_message_size and not self.too_big:
            self.too_big = True
            self.chunks = []
            self.headers = [(n, v) for n, v in self.headers if n.lower() == "dkim-signature"]

    @_guarded
    def eom(self) -> int:
        cfg = self.cfg
        metrics = self.engine.metrics
        if self.conn_failed or self.failed:
            return self._internal_error("eom")
        start = time.monotonic()
        authserv_id = cfg.default_authserv_id(self.j or self.getsymval("j"))
        stamp = self._checks_wanted()
        iprev = spf = None
        dkim: tuple[DkimResult, ...] = ()
        verdict = ACCEPT
        if stamp:
            assert self.addr is not None
            with metrics.timed("message"):
                iprev = self.engine.wait(self.iprev_fut, IPREV_UNFINISHED)
                spf = self.engine.wait(self.spf_fut, SPF_UNFINISHED)
                dkim = self._dkim()
            metrics.results.labels("iprev", iprev.result.value).inc()
            metrics.results.labels("spf", spf.result).inc()
            for r in dkim or (DkimResult("none"),):
                metrics.results.labels("dkim", r.result).inc()
            if self.scope.in_scope and self.opted_in:
                verdict = policy.decide_eom(cfg, self.addr, spf, dkim)
                metrics.decision("eom", verdict)
        dkim_log = (",".join(r.result for r in dkim) or "none") if stamp else None
        self._log("eom", verdict, start, rcpt_domain=self._rcpt_domains(),
                  iprev=iprev.result if iprev else None, ptr=_ptr(iprev),
                  spf=spf.result if spf else None, dkim=dkim_log)
        if verdict.refuses:
            return self._refuse(verdict.reply)
        if self.scope is not Scope.TRUSTED:
            # RFC 8601 §5: remove what claims to be ours; highest index first.
            for idx in authresults.matching_indexes(self.ar_ids, authserv_id):
                self.chgheader(authresults.FIELD, idx, "")
        if stamp:
            addr = policy.effective_address(self.addr) if self.addr else None
            value = authresults.build(authserv_id, addr, iprev, spf, dkim)
            if self._protocol & Milter.P_HDR_LEADSPC:
                value = " " + value  # with leading-space mode we supply the space
            self.addheader(authresults.FIELD, value, 0)
        return Milter.CONTINUE

    def _dkim(self) -> tuple[DkimResult, ...]:
        if not self.signed:
            return ()
        if self.too_big:
            sigs = [v for n, v in self.headers if n.lower() == "dkim-signature"]
            return unverified(sigs, "message too large", self.cfg.max_signatures)
        return self.engine.dkim(self._message())

    def _message(self) -> bytes:
        """The message as received, rebuilt byte for byte (c=simple needs it)."""
        sep = b":" if self._protocol & Milter.P_HDR_LEADSPC else b": "
        lines = [name.encode("ascii", "replace") + sep + value for name, value in self.headers]
        head = re.sub(rb"\r?\n", b"\r\n", b"\r\n".join(lines))
        message = b"".join([head, b"\r\n\r\n", *self.chunks])
        self.chunks = []  # one copy of the body is enough
        return message

    def abort(self) -> int:
        self._reset_message()
        return Milter.CONTINUE

    def close(self) -> int:
        if self.connected:
            self.connected = False
            self.engine.metrics.in_flight.dec()
            # Counted at the end, by the last scope: after XCLIENT the first
            # connect event was only the proxy.
            self.engine.metrics.connections.labels(self.conn_scope.value).inc()
        return Milter.CONTINUE

    # -- replies and the decision log ----------------------------------------

    def _internal_error(self, stage: str) -> int:
        self.engine.metrics.decisions.labels(stage, "internal-error", self.cfg.mode).inc()
        return self._refuse(policy.INTERNAL_ERROR)

    def _refuse(self, reply: Reply | None) -> int:
        assert reply is not None
        self.setreply(reply.code, reply.xcode, reply.text)
        return Milter.REJECT if reply.code.startswith("5") else Milter.TEMPFAIL

    def _rcpt_domains(self) -> str:
        domains = dict.fromkeys(policy.recipient_domain(r) or "-" for r in self.rcpts)
        return ",".join(domains)

    def _log(self, stage: str, verdict: Verdict, start: float, level: int = logging.INFO,
             **facts: object) -> None:
        """The decision log: one logfmt line per decision (SPEC §4, docs/operations.md)."""
        if not log.isEnabledFor(level):
            return
        sender = spfcheck.envelope_address(self.mail_from or "")
        fields = {
            "stage": stage,
            "qid": self.getsymval("i"),
            "client": self.client,
            "scope": self.scope.value,
            "helo": self.helo,
            "from_domain": sender.rpartition("@")[2] if sender else "<>",
            **facts,
        }
        if verdict.reply is None:
            fields["reply"] = "accept"
        elif verdict.enforced:
            fields["reply"] = verdict.summary
        else:
            fields["reply"] = "accept"
            fields["would_reply"] = verdict.summary
        fields["mode"] = verdict.mode if verdict.reply is not None else self.cfg.mode
        fields["elapsed_ms"] = round((time.monotonic() - start) * 1000)
        log.log(level, "%s%s", logfmt.PREFIX, logfmt.format_fields(fields))


def _ptr(iprev: IprevResult | None) -> str | None:
    """The first PTR name for the log; ``-`` when unknown or absent."""
    return iprev.names[0] if iprev is not None and iprev.names else None
