"""The pymilter adapter: gathers facts from the MTA, asks the engine and the
policy, applies the verdict.  No decision is taken here.

One instance per SMTP connection (libmilter runs each in its own thread).
Per-message state is reset at MAIL FROM and on abort.
"""

from __future__ import annotations

import functools
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

import Milter

from . import alignment, authresults, limits, logfmt, policy, spfcheck
from .engine import IPREV_UNFINISHED, SPF_UNFINISHED, Check, Engine, Message
from .model import ACCEPT, DkimResult, IPAddress, IprevResult, Reply, Scope, SpfResult, Verdict

log = logging.getLogger(__name__)

__all__ = ["SPF_UNFINISHED", "Ipv6Milter"]


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


# -- the SMTP arguments, bounded before any parser sees them (RFC 5321 §4.5.3.1) ------------

# What an over-long HELO/EHLO argument reads as: not a domain name (SPF for
# the null sender "none", %{h} "unknown", no smtp.helo in our header).
HELO_TOO_LONG = "[too long]"


def bounded_helo(helo: str) -> str:
    return helo if len(helo) <= limits.SMTP_DOMAIN else HELO_TOO_LONG


def sender_too_long(mail_from: str) -> SpfResult | None:
    """SPF's answer for a MAIL FROM past the path bound, without a lookup
    (RFC 7208 §4.3: no usable domain); None for one within it."""
    if len(mail_from) <= limits.SMTP_PATH:
        return None
    return SpfResult("none", "", "mailfrom",
                     f"MAIL FROM longer than {limits.SMTP_PATH} characters (RFC 5321 §4.5.3.1.3)")


def bounded_recipient(rcpt: str) -> str:
    """RCPT TO's argument as the parsers read it.

    Past the path bound: the first ``SMTP_LOCAL_PART`` characters of the local
    part and the last ``SMTP_DOMAIN`` of the domain (the labels nearest the
    root are what the opt-in match reads).  Neither can be longer in an
    address that can be delivered.
    """
    if len(rcpt) <= limits.SMTP_PATH:
        return rcpt
    close = ">" if rcpt.endswith(">") else ""
    body = rcpt[: len(rcpt) - len(close)]
    local, at, domain = body.rpartition("@")
    if not at:
        return body[: limits.SMTP_LOCAL_PART + 1] + close  # "+ 1": the "<"
    # The last 255 characters: longer than any AcceptDomains entry (253), so
    # an exact entry never matches, while a parent entry still can.
    return local[: limits.SMTP_LOCAL_PART + 1] + "@" + domain[-limits.SMTP_DOMAIN :] + close


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
        # The checks of this connection: bounded and cancelled as they are
        # abandoned, so that no client occupies the shared pool (engine.py).
        self.session = engine.session()
        self.iprev_chk: Check[IprevResult] | None = None
        # The SPF check of an aborted transaction (RSET), kept until the next
        # MAIL FROM: reused if that asks the same, else cancelled.
        self.parked_spf: Check[SpfResult] | None = None
        self.spf_chk: Check[SpfResult] | None = None
        self.connected = False
        self.conn_failed = False  # connect failed: every transaction tempfails
        self._reset_message()

    def _reset_message(self) -> None:
        self.mail_from: str | None = None
        self.scope = self.conn_scope
        if self.spf_chk is not None:
            self.session.cancel(self.parked_spf)
            self.parked_spf, self.spf_chk = self.spf_chk, None
        self.opted_in = 0
        self.rcpts: list[str] = []
        self.msg: Message | None = None
        self.failed = False  # a callback without a reply failed: tempfail at eom

    # -- facts ---------------------------------------------------------------

    def _checks_wanted(self) -> bool:
        return self.addr is not None and (self.scope.in_scope or self.cfg.stamp_all)

    def _start_iprev(self) -> None:
        if self.iprev_chk is None and self._checks_wanted():
            assert self.addr is not None
            addr = policy.effective_address(self.addr)
            self.iprev_chk = self.session.start(
                functools.partial(self.engine.iprev, addr, None),
                cached=self.engine.resolver.ptr_cached(addr))

    def _start_spf(self, mail_from: str) -> None:
        assert self.addr is not None
        addr = policy.effective_address(self.addr)
        prev, self.parked_spf = self.parked_spf, None
        # The same question after RSET keeps its answer, unless that was a
        # temporary error (asking again may well succeed).
        self.spf_chk = self.session.reuse_or_start(
            prev, functools.partial(self.engine.spf, addr, mail_from, self.helo, None),
            key=(addr, mail_from, self.helo, id(self.engine.resolver)),
            stale=lambda r: r.result == "temperror",
            cached=self.engine.resolver.cached(spfcheck.first_name(mail_from, self.helo), "TXT"))

    def _new_message(self) -> Message:
        return Message(
            self.cfg.max_message_size, self.cfg.max_signatures,
            self.cfg.default_authserv_id(self.j or self.getsymval("j")),
            leading_space=bool(self._protocol & Milter.P_HDR_LEADSPC),
            read_id=self.engine.authserv_ids(),
        )

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
        self.client = (policy.address_text(policy.effective_address(self.addr)) if self.addr
                       else "local")
        self.j = self.getsymval("j")
        self.conn_scope = policy.classify(self.cfg, self.addr)
        if not self.connected:
            self.connected = True
            self.engine.metrics.in_flight.inc()
        self.session.cancel(self.iprev_chk)
        self.iprev_chk = None
        self._reset_message()
        self.session.cancel(self.parked_spf)
        self.parked_spf = None
        self._start_iprev()

    @Milter.noreply
    def hello(self, hostname: str) -> int:
        self.helo = bounded_helo(hostname)
        return Milter.CONTINUE

    @_no_reply
    def envfrom(self, mail_from: str, *params: str) -> None:
        self._reset_message()
        self.cfg = self.engine.cfg  # a reloaded configuration applies from here on
        too_long = sender_too_long(mail_from)
        self.mail_from = mail_from[: limits.SMTP_PATH]  # for the log only, past the bound
        authenticated = bool(self.getsymval("{auth_authen}"))
        self.scope = policy.classify(self.cfg, self.addr, authenticated)
        self.engine.metrics.transactions.labels(self.scope.value).inc()
        self.msg = self._new_message()
        if self._checks_wanted():
            self._start_iprev()
            if too_long is None:
                self._start_spf(mail_from)
            else:
                self.session.cancel(self.parked_spf)
                self.parked_spf = None
                self.spf_chk = Check(lambda _budget: too_long, None, self.cfg.stage_timeout)
                self.spf_chk.run()
        else:
            self.session.cancel(self.parked_spf)
            self.parked_spf = None

    @_guarded
    def envrcpt(self, rcpt: str, *params: str) -> int:
        rcpt = bounded_recipient(rcpt)
        if self.conn_failed or self.failed:
            return self._internal_error("rcpt")
        if not self.scope.in_scope:
            self.rcpts.append(rcpt)
            return Milter.CONTINUE
        assert self.addr is not None
        domain = policy.recipient_domain(rcpt)
        judged = policy.judged(self.cfg, rcpt)
        start = time.monotonic()
        iprev = self.session.wait(self.iprev_chk, IPREV_UNFINISHED) if judged else None
        verdict = policy.decide_rcpt(self.cfg, self.addr, domain, iprev,
                                     postmaster=policy.is_postmaster(rcpt))
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
        if judged and verdict.reply is None:
            # Only a recipient enforce mode would take brings the message to
            # the end-of-message decision (in monitor mode too).
            self.opted_in += 1
        return Milter.CONTINUE

    @_no_reply
    @Milter.decode("bytes")
    def header(self, name: str, value: bytes) -> None:
        # Memory stays bounded: past the limits only the topmost signatures
        # and the indexes of forged headers are kept (engine.Message).
        if self.msg is None:
            self.msg = self._new_message()
        self.msg.header(name, value)

    @_guarded
    def body(self, chunk: bytes) -> int:
        if not self._checks_wanted() and self._protocol & Milter.P_SKIP:
            return Milter.SKIP  # only the headers matter: no DKIM to run
        if self.msg is None:
            self.msg = self._new_message()
        self.msg.body(chunk)
        return Milter.CONTINUE

    @_guarded
    def eom(self) -> int:
        cfg = self.cfg
        metrics = self.engine.metrics
        if self.conn_failed or self.failed:
            return self._internal_error("eom")
        start = time.monotonic()
        msg = self.msg if self.msg is not None else self._new_message()
        authserv_id = msg.authserv_id
        stamp = self._checks_wanted()
        iprev = spf = aligned = None
        dkim: tuple[DkimResult, ...] = ()
        verdict = ACCEPT
        if stamp:
            assert self.addr is not None
            with metrics.timed("message"):
                budget = self.engine.budget()
                iprev, spf, dkim = self.engine.end_of_message(
                    self.session, self.iprev_chk, self.spf_chk, msg, budget=budget)
                if cfg.alignment != "off":  # the _dmarc walks spend the same deadline
                    aligned = self.engine.alignment(cfg.alignment, msg.from_values, spf,
                                                    dkim, budget)
            metrics.results.labels("iprev", iprev.result.value).inc()
            metrics.results.labels("spf", spf.result).inc()
            for r in dkim or (DkimResult("none"),):
                metrics.results.labels("dkim", r.result).inc()
            if self.scope.in_scope and self.opted_in:
                verdict = policy.decide_eom(cfg, self.addr, spf, dkim, aligned)
                metrics.decision("eom", verdict)
        dkim_log = (",".join(r.result for r in dkim) or "none") if stamp else None
        self._log("eom", verdict, start, rcpt_domain=self._rcpt_domains(),
                  iprev=iprev.result if iprev else None, ptr=_ptr(iprev),
                  spf=spf.result if spf else None, dkim=dkim_log,
                  **alignment.log_fields(cfg.alignment, aligned, spf, dkim))
        if verdict.refuses:
            return self._refuse(verdict.reply)
        if self.scope is not Scope.TRUSTED:
            # RFC 8601 §5: remove what claims to be ours; highest index first.
            for idx in msg.forged_indexes():
                self.chgheader(authresults.FIELD, idx, "")
        if stamp:
            addr = policy.effective_address(self.addr) if self.addr else None
            value = authresults.build(authserv_id, addr, iprev, spf, dkim, aligned)
            if self._protocol & Milter.P_HDR_LEADSPC:
                value = " " + value  # with leading-space mode we supply the space
            self.addheader(authresults.FIELD, value, 0)
        return Milter.CONTINUE

    def abort(self) -> int:
        self._reset_message()
        return Milter.CONTINUE

    def close(self) -> int:
        # Nothing of this connection goes on running for nobody.
        for check in (self.iprev_chk, self.spf_chk, self.parked_spf):
            self.session.cancel(check)
        if self.connected:
            self.connected = False
            # Counted at the end, by the last scope: after XCLIENT the first
            # connect event was only the proxy.  Before in_flight drops, so
            # that a scrape seeing none in flight sees every one counted.
            self.engine.metrics.connections.labels(self.conn_scope.value).inc()
            self.engine.metrics.in_flight.dec()
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
        if verdict.reply is not None:
            fields["mode"] = verdict.mode
        elif self.scope.in_scope and self.addr is not None:
            # How this client's refusals are handled, accepted or not (a
            # client outside EnforceShare is handled as in monitor mode).
            enforced = policy.enforced_for(self.cfg, policy.effective_address(self.addr))
            fields["mode"] = "enforce" if enforced else "monitor"
        else:
            fields["mode"] = self.cfg.mode
        fields["elapsed_ms"] = round((time.monotonic() - start) * 1000)
        log.log(level, "%s%s", logfmt.PREFIX, logfmt.format_fields(fields))


def _ptr(iprev: IprevResult | None) -> str | None:
    """The first PTR name for the log; ``-`` when unknown or absent."""
    return iprev.names[0] if iprev is not None and iprev.names else None
