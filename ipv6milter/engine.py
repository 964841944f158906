"""Runs the checks: what the milter adapter and ipv6milter-check share.

An ``Engine`` owns the live configuration, the resolver and a small thread
pool.  Lookups that can start early do (PTR at connect, SPF at MAIL FROM),
in the pool, so that RCPT and end of message wait as little as possible;
a check whose first answer is already cached has nothing to wait for and
runs where its result is wanted instead (the hand-off costs more than it).
SPF and iprev results are kept while every answer they were computed from
is still cached: the same question then asks nothing.

One sender never harms another's mail (SPEC §1), so the pool is only a way
to start early, never a queue anyone waits in:

* each connection has a ``Session``; at most ``MAX_POOLED`` of its checks are
  in the pool at a time (queued or running).  A check over that cap is not
  queued at all: it runs in the connection's own thread when its result is
  wanted (or never, if the transaction is abandoned first);
* a check still queued when its result is wanted is taken back from the
  pool and run by the thread that waits for it: one client's queued work
  can never push another client's check past its deadline, whatever the
  pool's backlog;
* a check abandoned by RSET or a new MAIL FROM is cancelled: a queued one
  never runs, a running one finds its ``Budget`` spent at its next lookup
  and stops; an SPF check for the very same identities is reused instead.

``Message`` collects one message as the MTA hands it over, within the
limits (``MaxMessageSize``, ``MAX_HEADER_FIELDS``, ``MaxSignatures``), for
the milter and for ``ipv6milter-check`` alike.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import threading
import time
from array import array
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

from . import dkimaccept, dkimcanon, isolation, limits
from .config import Config
from .dkimcheck import unverified
from .iprev import check_iprev
from .metrics import Metrics
from .model import Aligned, Alignment, DkimResult, IPAddress, Iprev, IprevResult, SpfResult
from .resolver import Budget, ExpiringLRU, Resolver
from .spfcheck import envelope_address

log = logging.getLogger(__name__)

T = TypeVar("T")

# Grace on top of StageTimeout when waiting at RCPT for a check that runs in
# the pool: the check enforces its budget itself; this only absorbs the
# scheduling of a loaded machine.
_WAIT_GRACE = 2.0

# Checks of one connection in the shared pool at a time, queued or running:
# its PTR check and one SPF check.  An abandoned check still counts until it
# has stopped (at most one DNSTimeout after it was cancelled), so RSET floods
# get no more pool threads than a well-behaved client.
MAX_POOLED = 2

# Header fields kept per message: the number DKIM verification accepts
# (dkimaccept.MAX_HEADER_FIELDS; real mail has tens, a long mailing-list path
# a few hundred).  Past it the signatures are permerror without being
# verified, so nothing more is kept: a flood of tiny fields cannot hold more
# than a few hundred KiB, whatever MaxMessageSize says.
MAX_HEADER_FIELDS = dkimaccept.MAX_HEADER_FIELDS


class CancellableBudget(Budget):
    """A ``Budget`` that can be spent at once from another thread: a check
    that is no longer wanted stops at its next lookup."""

    def __init__(self, seconds: float, trace: list[str] | None = None):
        super().__init__(seconds, trace)
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def remaining(self) -> float:
        return -1.0 if self.cancelled else super().remaining()


class Check(Generic[T]):
    """One check of one connection: run in the pool, in the waiting thread,
    or not at all."""

    def __init__(self, fn: Callable[[Budget], T], key: Hashable | None, stage_timeout: float):
        self.fn = fn
        self.key = key  # equal keys: the same check (reused, not run twice)
        self.stage_timeout = stage_timeout
        self.future: Future[T] | None = None
        self.budget: CancellableBudget | None = None
        self.cancelled = False
        self.done = False
        self.result: T | None = None
        self._lock = threading.Lock()

    def run(self, seconds: float | None = None) -> T:
        """Run the check here, with ``seconds`` (default StageTimeout) of DNS time."""
        budget = CancellableBudget(self.stage_timeout if seconds is None else seconds)
        with self._lock:
            self.budget = budget
            if self.cancelled:
                budget.cancel()
        result = self.fn(budget)
        with self._lock:
            self.result, self.done = result, True
        return result

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            if self.budget is not None:
                self.budget.cancel()
        if self.future is not None:
            self.future.cancel()


class Session:
    """The checks of one connection (one libmilter thread calls it)."""

    def __init__(self, engine: Engine):
        self._engine = engine
        self._pooled = 0  # checks of ours in the pool, not finished
        self._lock = threading.Lock()

    @property
    def pooled(self) -> int:
        with self._lock:
            return self._pooled

    def start(self, fn: Callable[[Budget], T], key: Hashable | None = None,
              cached: bool = False) -> Check[T]:
        """Start ``fn(budget)`` in the pool if this connection is under its cap;
        otherwise it runs when it is waited for.

        ``cached``: its first answer is in the cache, so it has (most likely) no
        DNS wait to hide behind the SMTP dialogue: it runs when it is waited
        for, in the connection's own thread.  A hand-off to a pool thread and
        back (a future, two wake-ups, the GIL passed twice) costs more CPU
        than such a check, and a check nobody waits for (a refused recipient,
        RSET) is not run at all.
        """
        check: Check[T] = Check(fn, key, self._engine.cfg.stage_timeout)
        if cached:
            return check
        with self._lock:
            if self._pooled >= MAX_POOLED:
                return check
            self._pooled += 1
        try:
            check.future = self._engine.submit(check.run)
        except RuntimeError:  # the pool is shut down: run it when waited for
            self._finished(None)
            return check
        check.future.add_done_callback(self._finished)
        return check

    def _finished(self, _fut: object) -> None:
        with self._lock:
            self._pooled -= 1

    def wait(self, check: Check[T] | None, fallback: T, deadline: float | None = None) -> T:
        """The result of ``check``; ``fallback`` if it did not finish in time.

        ``deadline`` (monotonic) bounds the wait, and the DNS time of a check
        that has to run here; without one, StageTimeout (plus a grace for a
        check already running) does.
        """
        if check is None:
            return fallback
        if check.done:  # already waited for (a reused check)
            return check.result  # type: ignore[return-value]
        now = time.monotonic()
        left = check.stage_timeout if deadline is None else deadline - now
        fut = check.future
        if fut is None or fut.cancel():
            # Never queued, or still queued: run it here, in this
            # connection's own thread, instead of waiting behind others.
            return check.run(min(check.stage_timeout, left))
        try:
            return fut.result(timeout=max(0.0, left + (_WAIT_GRACE if deadline is None else 0)))
        except concurrent.futures.TimeoutError:
            log.warning("a DNS check did not finish within StageTimeout; counted as temporary")
            check.cancel()
            return fallback
        except concurrent.futures.CancelledError:
            return fallback

    def reuse_or_start(self, prev: Check[T] | None, fn: Callable[[Budget], T], key: Hashable,
                       stale: Callable[[T], bool], cached: bool = False) -> Check[T]:
        """``prev`` when it asked the same question (``key``), was not cancelled
        and its answer, if there is one, is not ``stale``; otherwise ``prev``
        is cancelled and ``fn`` started."""
        if prev is not None and prev.key == key and not prev.cancelled and not (
                prev.done and prev.result is not None and stale(prev.result)):
            return prev
        self.cancel(prev)
        return self.start(fn, key, cached)

    def cancel(self, check: Check[T] | None) -> None:
        if check is not None:
            check.cancel()


class Engine:
    """The checks, with their pool.

    ``isolate``: the checks that parse a sender's data (SPF, DKIM, the
    authserv-id of Authentication-Results fields, the From field of
    From-aligned mode) run in helper processes
    under a CPU bound (isolation.py).  The daemon's workers turn it on, and
    must construct the engine before any thread exists (the helpers' zygote
    is forked here); unit tests, the start's preflight and ipv6milter-check
    run the same checks in-process.
    """

    def __init__(self, cfg: Config, resolver: Resolver | None = None, workers: int = 16,
                 metrics: Metrics | None = None, isolate: bool = False):
        self._lock = threading.Lock()
        self.metrics = metrics or Metrics()
        self._cfg = cfg
        self._resolver = resolver or self._new_resolver(cfg)
        self._helpers = isolation.Helpers() if isolate else None
        # Results that depend only on their arguments and the DNS answers they
        # used, kept until the soonest of those expires (Budget.expires): what
        # the check would compute again from the cache.
        self._spf_results: ExpiringLRU[SpfResult] = ExpiringLRU(limits.SPF_RESULTS)
        self._iprev_results: ExpiringLRU[IprevResult] = ExpiringLRU(limits.IPREV_RESULTS)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dns")
        self.metrics.loaded(cfg)
        dkimcanon.install()

    def _new_resolver(self, cfg: Config) -> Resolver:
        return Resolver(cfg.nameservers, cfg.dns_timeout, on_cache=self.metrics.cache)

    @property
    def cfg(self) -> Config:
        return self._cfg

    @property
    def resolver(self) -> Resolver:
        return self._resolver

    def reload(self, cfg: Config) -> None:
        """Swap in a new configuration; checks already started keep the old one."""
        with self._lock:
            if (cfg.nameservers, cfg.dns_timeout) != (self._cfg.nameservers, self._cfg.dns_timeout):
                self._resolver = self._new_resolver(cfg)
            self._cfg = cfg
        self._spf_results.clear()
        self._iprev_results.clear()
        self.metrics.loaded(cfg)

    @property
    def isolated(self) -> bool:
        return self._helpers is not None

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        helpers, self._helpers = self._helpers, None
        if helpers is not None:
            helpers.close()

    def budget(self, trace: list[str] | None = None) -> Budget:
        return Budget(self._cfg.stage_timeout, trace)

    def session(self) -> Session:
        return Session(self)

    def submit(self, fn: Callable[..., T], *args: object) -> Future[T]:
        return self._pool.submit(fn, *args)

    # -- the checks; ``budget`` None: a fresh one of StageTimeout ------------------------

    def iprev(self, addr: IPAddress, trace: list[str] | None = None,
              budget: Budget | None = None) -> IprevResult:
        with self.metrics.timed("ptr"):
            budget = budget or self.budget(trace)
            key = (addr, self._resolver.generation)
            if budget.trace is None:
                kept = self._iprev_results.get(key)
                if kept is not None:
                    self.metrics.reused_ptr.inc()
                    return kept[1]
            result = check_iprev(self._resolver, addr, budget)
            if (result.result is not Iprev.TEMPERROR and budget.trace is None
                    and len(result.names) <= limits.IPREV_RESULT_NAMES):
                self._iprev_results.put(key, result, budget.expires)
            return result

    def spf(self, addr: IPAddress, mail_from: str, helo: str, trace: list[str] | None = None,
            budget: Budget | None = None) -> SpfResult:
        with self.metrics.timed("spf"):
            budget = budget or self.budget(trace)
            void_limit = self._cfg.spf_void_lookup_limit
            # The same question over the same answers has the same answer;
            # --explain (a trace) always asks.
            key = (addr, mail_from, helo, void_limit, self._resolver.generation)
            if budget.trace is None:
                kept = self._spf_results.get(key)
                if kept is not None:
                    self.metrics.reused_spf.inc()
                    return kept[1]
            try:
                result: SpfResult = self._check("spf", budget, (addr, mail_from, helo,
                                                                void_limit))[0]  # type: ignore[assignment]
            except isolation.Stopped as e:
                sender = envelope_address(mail_from)
                return SpfResult(e.result, sender or helo, "mailfrom" if sender else "helo",
                                 e.detail)
            if (result.result != "temperror" and budget.trace is None
                    and len(result.detail) <= limits.SPF_RESULT_DETAIL):
                self._spf_results.put(key, result, budget.expires)
            return result

    def dkim(self, message: bytes, trace: list[str] | None = None,
             budget: Budget | None = None,
             signatures: list[bytes] | None = None) -> tuple[DkimResult, ...]:
        """Every signature's result; ``signatures`` (the message's DKIM-Signature
        values, topmost first) are what a stopped check reports."""
        max_sigs = self._cfg.max_signatures
        cpu = limits.CHECK_CPU_SECONDS + limits.DKIM_CPU_SECONDS_PER_MIB * len(message) / 2**20
        with self.metrics.timed("dkim"):
            budget = budget or self.budget(trace)
            try:
                return self._check("dkim", budget, (max_sigs,), message, cpu)[0]  # type: ignore[no-any-return]
            except isolation.Stopped as e:
                if signatures is None:
                    signatures = [v for n, v in split_fields(message)[0]
                                  if n.strip().lower() == _SIGNATURE]
                return unverified(signatures, e.detail, max_sigs, e.result)

    def alignment(self, mode: str, from_values: list[bytes], spf: SpfResult | None,
                  dkim: tuple[DkimResult, ...], budget: Budget) -> Alignment:
        """From-aligned mode's facts (alignment.evaluate); a stopped check
        has no From domain (the sender's data: nothing is aligned) or, for
        any other cause, leaves every identifier that could decide unknown."""
        try:
            return self._check("from", budget, (mode, from_values, spf, dkim))[0]  # type: ignore[return-value]
        except isolation.Stopped as e:
            if e.result == "permerror":
                return Alignment(mode, None, e.detail, Aligned.NO,
                                 tuple(Aligned.NO for _ in dkim))

            def open_(result: str) -> Aligned:
                return Aligned.UNKNOWN if result in ("pass", "temperror") else Aligned.NO

            return Alignment(mode, None, e.detail, open_(spf.result if spf else "temperror"),
                             tuple(open_(r.result) for r in dkim))

    def authserv_ids(self) -> Callable[[bytes], str | None]:
        """For one message: the authserv-id of an Authentication-Results field
        value, or None when it could not be read within the CPU bound that
        all of the message's fields share (such a field counts as ours:
        deleted, RFC 8601 §5)."""
        left = limits.HEADER_CPU_SECONDS

        def read(value: bytes) -> str | None:
            nonlocal left
            if self._helpers is None:
                return isolation.authserv_id(None, None, value)
            plain = isolation.plain_authserv_id(value)
            if plain is not None:
                return plain
            if left < _LEAST_CPU:
                return None
            try:
                ident, used = self._check("header", Budget(0.0), (value,), cpu=left)
            except isolation.Stopped:
                left = 0.0
                return None
            left -= used
            return ident  # type: ignore[no-any-return]

        return read

    def _check(self, kind: str, budget: Budget, args: tuple[object, ...],
               payload: bytes | None = None, cpu: float | None = None) -> tuple[object, float]:
        """``isolation.CHECKS[kind]``: in a helper when isolated, else here.
        Raises ``isolation.Stopped`` (logged and counted here)."""
        helpers = self._helpers
        if helpers is not None:
            try:
                return helpers.call(kind, args, self._resolver, budget, payload, cpu)
            except isolation.Stopped as e:
                self.metrics.stopped.labels(kind, e.cause).inc()
                if e.cause != isolation.CANCELLED:
                    log.warning("%s check stopped (%s): %s; counted as %s", kind, e.cause,
                                e.detail, e.result)
                raise
            except isolation.Unavailable as e:
                # Not expected (the zygote is killed only with the worker):
                # the check runs here, unprotected, rather than mail waiting.
                log.error("%s check run in the worker itself: %s", kind, e)
        full = args if payload is None else (payload, *args)
        return isolation.CHECKS[kind](self._resolver, budget, *full), 0.0

    def dkim_of(self, msg: Message, budget: Budget) -> tuple[DkimResult, ...]:
        """DKIM for a collected message: verified, or only reported when too large."""
        if not msg.signed:
            return ()
        if msg.too_big:
            # Too many fields is the signatures' own fault (permerror, as
            # check_dkim says); a large message is only not verified (neutral).
            result = "permerror" if msg.too_many_fields else "neutral"
            return unverified(msg.signatures(), msg.too_big, self._cfg.max_signatures, result)
        return self.dkim(msg.message(), budget=budget, signatures=msg.signatures())

    def end_of_message(
        self, session: Session, iprev: Check[IprevResult] | None, spf: Check[SpfResult] | None,
        msg: Message, trace: list[str] | None = None, budget: Budget | None = None,
    ) -> tuple[IprevResult, SpfResult, tuple[DkimResult, ...]]:
        """The end-of-message stage under one deadline (SPEC §1): DKIM is
        verified here while SPF may still run in the pool, then the waits for
        SPF and the PTR check share what is left of one StageTimeout.
        ``budget``: that deadline, when the caller spends the rest of it
        (From-aligned mode's _dmarc lookups)."""
        budget = budget or Budget(self._cfg.stage_timeout, trace)
        dkim = self.dkim_of(msg, budget)
        spf_result = session.wait(spf, SPF_UNFINISHED, budget.deadline)
        iprev_result = session.wait(iprev, IPREV_UNFINISHED, budget.deadline)
        return iprev_result, spf_result, dkim


IPREV_UNFINISHED = IprevResult(Iprev.TEMPERROR, ptr_temperror=True, detail="did not finish in time")
SPF_UNFINISHED = SpfResult("temperror", "", "mailfrom", "did not finish in time")

# Less CPU than this left for a message's Authentication-Results fields: the
# rest are not read (a helper's round trip alone costs about this much).
_LEAST_CPU = 0.001


# -- the message, within the limits -----------------------------------------------------------

_SIGNATURE = "dkim-signature"


class Message:
    """One message's header fields and body as the MTA hands them over.

    ``MaxMessageSize`` counts the message's bytes (each field as
    ``name: value`` and its line end, the blank line, the body).  Past it, or
    past ``MAX_HEADER_FIELDS`` fields, nothing more is kept but the topmost
    ``max_signatures`` DKIM-Signature fields (to be reported) and the
    indexes of the Authentication-Results fields that claim ``authserv_id``
    (to be deleted): memory stays bounded whatever follows.

    ``leading_space``: values arrive with the space after the colon (libmilter's
    ``P_HDR_LEADSPC``, and ``ipv6milter-check``), so ``name:value`` rebuilds the
    field byte for byte.

    ``read_id`` reads the authserv-id of an Authentication-Results value
    (``Engine.authserv_ids``: in a helper, under a CPU bound); None stands for
    a field it could not read, which counts as ours and is deleted.
    """

    def __init__(self, max_size: int, max_signatures: int, authserv_id: str,
                 leading_space: bool = True,
                 read_id: Callable[[bytes], str | None] | None = None):
        self.max_size = max_size
        self._read_id = read_id or functools.partial(isolation.authserv_id, None, None)
        self.max_signatures = max_signatures
        self.authserv_id = authserv_id
        self._our_id = authserv_id.lower()
        self._sep = b":" if leading_space else b": "
        self.headers: list[tuple[str, bytes]] = []
        self.chunks: list[bytes] = []
        self._sigs: list[bytes] = []  # the topmost signatures, kept past the limits
        self.signed = False  # a DKIM-Signature field was seen
        # From fields for From-aligned mode, kept past the limits like the
        # signatures: two at most (a second one already means "no From
        # domain"), each cut just past the length the parser reads.
        self.from_values: list[bytes] = []
        self.ar_count = 0  # Authentication-Results fields seen
        self._ours = array("I")  # 1-based indexes of those claiming our authserv-id
        self.fields = 0
        self.size = 2  # the blank line after the header
        self.too_big = ""  # why the message is judged without DKIM, once it is
        self.too_many_fields = False

    def header(self, name: str, value: bytes) -> None:
        # A name may end in white space before its colon (RFC 5322 §4.5.8
        # obs-optional): "DKIM-Signature :" is a signature, "Authentication-
        # Results :" a field to delete (Postfix counts it as one too).
        lname = name.rstrip(" \t").lower()
        if lname == "authentication-results":
            self.ar_count += 1
            ident = self._read_id(value)
            if ident is None or ident == self._our_id:
                self._ours.append(self.ar_count)
        elif lname == _SIGNATURE:
            self.signed = True
            if len(self._sigs) < self.max_signatures:
                self._sigs.append(value)
        if lname.rstrip(" \t") == "from" and len(self.from_values) < limits.FROM_FIELDS_KEPT:
            self.from_values.append(value[: limits.FROM_FIELD_MAX + 1])
        self.fields += 1
        n = len(name) + len(self._sep) + len(value) + 2
        if b"\n" in value:  # folded: counted with CRLF line ends, as rebuilt
            n += value.count(b"\n") - value.count(b"\r\n")
        self._count(n)
        if not self.too_big and self.fields > MAX_HEADER_FIELDS:
            self.too_many_fields = True
            self._drop(f"more than {MAX_HEADER_FIELDS} header fields")
        if not self.too_big:
            self.headers.append((name, value))

    def body(self, chunk: bytes) -> None:
        self._count(len(chunk))
        if not self.too_big:
            self.chunks.append(chunk)

    def _count(self, n: int) -> None:
        self.size += n
        if self.size > self.max_size and not self.too_big:
            self._drop("message too large")

    def _drop(self, why: str) -> None:
        self.too_big = why
        self.headers = []
        self.chunks = []

    def forged_indexes(self) -> list[int]:
        """Indexes (1-based, among Authentication-Results) of the fields that
        claim our authserv-id, highest first (RFC 8601 §5)."""
        return sorted(self._ours, reverse=True)

    def signatures(self) -> list[bytes]:
        return list(self._sigs)

    def message(self) -> bytes:
        """The message as received, rebuilt byte for byte (c=simple needs it).

        The body is handed over once: one copy of it is enough.
        """
        lines = [name.encode("ascii", "replace") + self._sep + value
                 for name, value in self.headers]
        head = b"\r\n".join(lines)
        if head.count(b"\n") != head.count(b"\r\n"):
            # Every line end CRLF (what re.sub(rb"\r?\n", b"\r\n", head)
            # gives), in two C passes: the regex tries the optional CR at every
            # byte of the header.
            head = head.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        message = b"".join([head, b"\r\n\r\n", *self.chunks])
        self.chunks = []
        return message


def split_fields(message: bytes) -> tuple[list[tuple[str, bytes]], bytes]:
    """Header fields (values with the space after the colon, folding kept)
    and body of a message file, as an MTA hands them to a milter."""
    head, sep, body = message.partition(b"\r\n\r\n")
    if not sep:
        head, body = message, b""
    if message.startswith(b"\r\n"):
        head, body = b"", message[2:]
    fields: list[tuple[str, bytes]] = []
    lines = head.split(b"\r\n") if head else []
    for i, line in enumerate(lines):
        if line[:1] in (b" ", b"\t") and fields:
            name, value = fields[-1]
            fields[-1] = (name, value + b"\r\n" + line)
            continue
        name, colon, value = line.partition(b":")
        if not colon:
            # Not a header field: the body begins here, as an MTA would take it.
            rest = b"\r\n".join(lines[i:])
            body = rest + (b"\r\n\r\n" + body if sep else b"")
            break
        fields.append((name.decode("utf-8", "replace"), value))
    return fields, body
