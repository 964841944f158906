"""The last line of defence (SPEC §1): a check on one sender's data never holds
the other connections of its worker, whatever that data contains.

One ``re`` call inside a library (pyspf, dkimpy, authres, ``email``) runs
for its whole length holding the GIL: a super-linear step nobody has found
yet would stop every thread of the worker (libmilter's connections, the DNS
pool).  The bounds of ``limits.py`` and linear parsers keep the known inputs
cheap; this module makes the unknown ones harmless.  The checks that parse a
sender's data (SPF evaluation, DKIM verification, reading the authserv-id of
an Authentication-Results field, From-aligned mode's reading of the From
field and its _dmarc walk) run in *helper processes*:

* a helper runs one check at a time, under a CPU bound set with
  ``setitimer(ITIMER_PROF)`` before the check and cleared after it.  SIGPROF
  keeps its default action, so the kernel ends the helper when the bound is
  reached, even inside one C call that never returns to Python;
* the worker sees the helper's pipe close, asks why (the exit status), and
  the check gets its result by cause: over the CPU bound is the sender's own
  data (asking again gives the same), so ``permerror``; any other death, or
  no answer in time, is ``temperror``.  The helper is replaced;
* DNS stays in the worker: a helper asks the worker for each lookup over its
  pipe (``_ProxyResolver``), so the one resolver, its cache, the stage's
  ``Budget`` and the metrics stay where they are, and a helper only computes;
* helpers are forked from a *zygote*, a single-threaded process forked by
  the worker before any thread exists (``fork`` in a threaded process copies
  locks held by threads that do not exist in the child).  A few are kept
  idle; more start on demand, up to ``MAX_HELPERS``: checks wait on DNS, so
  many are in flight at once and none may wait behind another sender's.

The message goes to the helper once, as raw bytes; a check costs one round
trip plus one per DNS lookup.  ``Engine`` uses this in the daemon's workers;
where a fake resolver is injected (unit tests, the start's preflight) and in
``ipv6milter-check`` (one check, one process, ``--explain``'s trace) the
same functions run in-process.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import ctypes.util
import functools
import gc
import itertools
import logging
import os
import pickle
import re
import select
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import alignment, authresults, limits
from .dkimcheck import check_dkim
from .model import Alignment, DkimResult, IPAddress, SpfResult
from .resolver import Budget, Resolver, TempFail
from .spfcheck import VOID_LOOKUP_LIMIT, check_spf

log = logging.getLogger(__name__)

# Helpers of one worker at most, busy or idle.  A check waits on DNS far
# longer than it computes, so this is about checks in flight, not CPUs; each
# helper is a copy-on-write fork of the worker (a few MiB of its own).
MAX_HELPERS = 32
# Helpers kept idle, started before the first check and after each death.
IDLE_HELPERS = 2
# A helper beyond those, started for checks that overlapped, stays idle this
# long after its last check before it is ended: under steady concurrent load
# (c=8: a few checks in flight at any time) ending it at once made nearly
# every check fork a helper and reap it again, a fork of the worker and its
# page faults costing milliseconds of CPU, several times the check itself.
IDLE_SECONDS = 60.0
# Helpers kept idle at most: each holds a few MiB of its own; a burst past
# this many overlapping checks still forks (and ends) the rest.
MAX_IDLE_HELPERS = 8
# With every helper busy, a check waits this long for one to be free before
# it starts another (SPAWN_AFTER seconds: a few checks' worth of CPU, more on a
# loaded host, where a check waits for a core too).
SPAWN_AFTER = 0.02
# Checks one helper runs before it is replaced (whatever it accumulated:
# fragmented memory, caches of dkimpy's and pyspf's).
CHECKS_PER_HELPER = 10_000
# The wall-clock time a check without DNS time (a header field) may take
# before its helper is killed: a loaded machine may give a helper a fraction
# of a core, so the CPU bound alone sets no wall time.
_WALL_FACTOR = 4.0
_WALL_GRACE = 2.0
# How often a waiting worker thread looks whether its check was cancelled
# (RSET, a new MAIL FROM): a cancelled check's helper is killed, not left to
# burn its CPU bound for nobody.
_POLL = 0.1
# A check that has used this much CPU is no ordinary one (real checks cost
# milliseconds): its helper drops to the lowest priority (nice 19), so that
# on a busy host it takes only CPU nobody else wants while it runs to its
# bound; it is replaced after the check (its priority cannot be raised again).
_DEMOTE_CPU = 0.2
_NICEST = 19

# The results by cause (SPEC §1: "a temporary or permanent error, as its cause says").
CPU = "cpu"  # over the CPU bound: the sender's data; permanent
CRASH = "crash"  # died otherwise (a signal, an exit): not known to be the sender's
TIMEOUT = "timeout"  # no answer within the wall-clock bound
CANCELLED = "cancelled"  # abandoned by the connection (RSET, new MAIL FROM)
BUSY = "busy"  # every helper busy until the stage's time ran out
CAUSES = (CPU, CRASH, TIMEOUT, CANCELLED, BUSY)


class Stopped(Exception):
    """A check that was stopped; ``result`` is what it counts as."""

    def __init__(self, cause: str, detail: str):
        super().__init__(detail)
        self.cause = cause
        self.detail = detail

    @property
    def result(self) -> str:
        return "permerror" if self.cause == CPU else "temperror"


class Unavailable(Exception):
    """No helper can be started (the zygote is gone)."""


class HelperError(Exception):
    """A check raised in its helper: an internal error, with the helper's traceback."""


# -- the checks, as run in a helper or in-process ---------------------------------------------


def spf(resolver: Resolver, budget: Budget, addr: IPAddress, mail_from: str,
        helo: str, void_limit: int = VOID_LOOKUP_LIMIT) -> SpfResult:
    _planted("spf", mail_from, helo)
    return check_spf(resolver, addr, mail_from, helo, budget, void_limit=void_limit)


def dkim(resolver: Resolver, budget: Budget, message: bytes,
         max_signatures: int) -> tuple[DkimResult, ...]:
    _planted("dkim", message)
    return check_dkim(resolver, message, budget, max_signatures)


def authserv_id(resolver: Resolver | None, budget: Budget | None, value: bytes) -> str:
    text = value.decode("utf-8", "replace")
    _planted("header", text)
    return authresults.authserv_id_of(text)


# The first character that ends a plain authserv-id, or makes it not plain.
_FIRST_STOP = re.compile(r'[\s;("\\]')


def plain_authserv_id(value: bytes) -> str | None:
    """The authserv-id of a field that begins with it plainly (no comment,
    quote or escape before its end), as ``authresults.authserv_id_of`` reads
    it; None for any other field.  One pass of a character class over the
    value: safe in the worker, and most fields (``mx.example.org; ...``, with
    comments after the id or none) need no helper at all."""
    text = value.decode("utf-8", "replace").lstrip()
    m = _FIRST_STOP.search(text)
    if m is None:
        return text.lower()
    if m.group() in '("\\':
        return None
    return text[: m.start()].lower()


def aligned(resolver: Resolver, budget: Budget, mode: str, from_values: list[bytes],
            spf_result: SpfResult | None, dkim_results: tuple[DkimResult, ...]) -> Alignment:
    _planted("from", *from_values)
    return alignment.evaluate(resolver, mode, from_values, spf_result, dkim_results, budget)


CHECKS: dict[str, Callable[..., Any]] = {
    "spf": spf, "dkim": dkim, "header": authserv_id, "from": aligned}


# -- the test hook: a planted super-linear step -----------------------------------------------

# For the tests only (tests/reliability/test_isolation.py): with this set to
# a marker M, a check whose sender input contains M followed by the path's
# name ("spf", "dkim", "header", "from") burns BURN_SECONDS of CPU in one call that
# holds the GIL, as an unknown quadratic regex would.  Unset, nothing happens.
BURN_ENV = "IPV6MILTER_TEST_BURN"
BURN_SECONDS = 30.0


@functools.cache
def _burn_marker() -> str | None:
    return os.environ.get(BURN_ENV) or None


def _planted(path: str, *inputs: str | bytes) -> None:
    marker = _burn_marker()
    if marker is None:
        return
    text = marker + path
    for value in inputs:
        if (text.encode() if isinstance(value, bytes) else text) in value:
            burn(BURN_SECONDS)
            return


@functools.cache
def _seconds_per_step() -> float:
    n = 20_000_000
    start = time.process_time()
    _steps(n)
    return max((time.process_time() - start) / n, 1e-10)


def _steps(n: int) -> None:
    # One C call: deque(maxlen=0) drains the iterator in C, never returning to
    # the interpreter loop, so the GIL is never offered to another thread.
    collections.deque(itertools.repeat(None, n), maxlen=0)


def burn(seconds: float) -> None:
    """About ``seconds`` of CPU in one call that holds the GIL throughout."""
    _steps(int(seconds / _seconds_per_step()))


# -- the pipe between a worker and a helper ---------------------------------------------------


class _Pipe:
    """Framed pickles over a stream socket: an 8-byte length, then the bytes.

    Lighter than ``multiprocessing.connection`` where it counts (a check is a
    few round trips): a ``poll`` object made once, not a selector per wait,
    and plain ``pickle``.  Raw bytes (the message) go without a pickle.
    """

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._poller = select.poll()
        self._poller.register(sock.fileno(), select.POLLIN)

    def send(self, obj: Any, raw: bytes | None = None) -> None:
        """``obj`` pickled; then ``raw``, if given, as a frame of its own
        (``recv_bytes``), in the same write: the helper reads a check's
        request and its message without waking up twice."""
        data = pickle.dumps(obj, pickle.HIGHEST_PROTOCOL)
        if raw is None:
            self.send_bytes(data)
            return
        head = len(data).to_bytes(8, "little") + data + len(raw).to_bytes(8, "little")
        if len(raw) < 65536:
            self.sock.sendall(head + raw)
        else:  # no copy of a large message for the sake of one write
            self.sock.sendall(head)
            self.sock.sendall(raw)

    def send_bytes(self, data: bytes) -> None:
        head = len(data).to_bytes(8, "little")
        if len(data) < 65536:
            self.sock.sendall(head + data)
        else:  # no copy of a large message for the sake of one write
            self.sock.sendall(head)
            self.sock.sendall(data)

    def recv(self) -> Any:
        return pickle.loads(self.recv_bytes())

    def recv_bytes(self) -> bytes:
        return self._exact(int.from_bytes(self._exact(8), "little"))

    def _exact(self, n: int) -> bytes:
        # MSG_WAITALL: one call, one bytes object of the final size (a
        # signal may still cut it short: then the rest is read on).
        data = self.sock.recv(n, socket.MSG_WAITALL)
        if len(data) == n:
            return data
        parts, got = [data], len(data)
        while data and got < n:
            data = self.sock.recv(n - got, socket.MSG_WAITALL)
            parts.append(data)
            got += len(data)
        if got < n:
            raise EOFError("the other end closed the pipe")
        return b"".join(parts)

    def poll(self, timeout: float) -> bool:
        return bool(self._poller.poll(max(0, int(timeout * 1000))))

    def close(self) -> None:
        self.sock.close()


# -- DNS answers across the pipe --------------------------------------------------------------
#
# A dnspython rdata pickles slowly (~35 us each way for one TXT record: its
# state, its names, their labels), and an SPF check reads several.  The
# record types the checks read go across as plain tuples and come out as
# small objects with the attributes the checks use; any other type goes
# across as it is.

_TXT, _ADDRESS, _MX, _TARGET = 0, 1, 2, 3


class _Name:
    """A domain name as the checks read it: ``to_text`` with or without the dot."""

    __slots__ = ("_bare", "_text")

    def __init__(self, text: str, bare: str):
        self._text, self._bare = text, bare

    def to_text(self, omit_final_dot: bool = False) -> str:
        return self._bare if omit_final_dot else self._text


class _Record:
    __slots__ = ("address", "exchange", "preference", "strings", "target")


def _portable(items: list[Any]) -> list[Any]:
    out: list[Any] = []
    for r in items:
        rdtype = getattr(r, "rdtype", None)
        if rdtype in (16, 99):  # TXT, SPF
            out.append((_TXT, tuple(r.strings)))
        elif rdtype in (1, 28):  # A, AAAA
            out.append((_ADDRESS, r.address))
        elif rdtype == 15:  # MX
            out.append((_MX, r.preference, r.exchange.to_text(),
                        r.exchange.to_text(omit_final_dot=True)))
        elif rdtype in (12, 5):  # PTR, CNAME
            out.append((_TARGET, r.target.to_text(), r.target.to_text(omit_final_dot=True)))
        else:
            out.append(r)
    return out


def _restored(items: list[Any]) -> list[Any]:
    out: list[Any] = []
    for item in items:
        if not isinstance(item, tuple):
            out.append(item)
            continue
        r = _Record()
        if item[0] == _TXT:
            r.strings = item[1]
        elif item[0] == _ADDRESS:
            r.address = item[1]
        elif item[0] == _MX:
            r.preference, r.exchange = item[1], _Name(item[2], item[3])
        else:
            r.target = _Name(item[1], item[2])
        out.append(r)
    return out


def _small(items: list[Any]) -> bool:
    """An answer a helper may keep a copy of: few records, little text."""
    if len(items) > limits.HELPER_ANSWER_RECORDS:
        return False
    size = 0
    for item in items:
        if not isinstance(item, tuple):
            return False  # a type the checks do not read: not kept
        if item[0] == _TXT:
            size += sum(map(len, item[1]))
    return size <= limits.HELPER_ANSWER_TEXT


# -- the helper side --------------------------------------------------------------------------


class _ProxyResolver:
    """In a helper: the worker's ``Resolver``, asked over the helper's pipe.

    Only ``query`` crosses the pipe; the typed helpers are ``Resolver``'s own,
    on top of it, so the checks see the resolver they see in-process.

    The helper keeps a copy of small answers until the worker's cache entry
    expires (``limits.HELPER_ANSWERS``): the next check in this helper that asks
    the same (the sender's SPF record, its include, the DKIM key) is
    answered here, a round trip to the worker less each.  A copy is used as
    the worker's cache is: the stage's time still bounds it, and it counts
    as a hit in the worker's metrics (``hits``, sent with the result).
    """

    def __init__(self, conn: _Pipe):
        self._conn = conn
        self.timeout = 5.0
        self.generation = 0  # the worker resolver's (Resolver.generation)
        self.answers: dict[tuple[str, str], tuple[float, list[Any]]] = {}
        self.hits = 0

    def query(self, name: Any, rdtype: str, budget: Budget) -> list[Any]:
        key = None
        if budget.trace is None and isinstance(name, str) and name.isascii():
            key = (name[:-1] if name.endswith(".") else name).lower(), rdtype
            entry = self.answers.get(key)
            if entry is not None:
                if entry[0] > time.time():
                    if budget.remaining() <= 0:  # as the worker's Resolver.query
                        budget.used(None)
                        raise TempFail(f"DNS time budget for this stage spent before "
                                       f"{name} {rdtype}")
                    self.hits += 1
                    budget.used(entry[0])
                    return list(entry[1])
                del self.answers[key]
        self._conn.send(("q", name, rdtype))
        tag, value, dns_bytes, expiry = self._conn.recv()
        # What the worker's budget counted (DNS_STAGE_BYTES), seen here too.
        budget.dns_bytes = dns_bytes
        if tag == "t":
            raise TempFail(value)
        records = _restored(value)
        if key is not None and expiry is not None and _small(value):
            if len(self.answers) >= limits.HELPER_ANSWERS:
                self.answers.clear()
            self.answers[key] = (expiry, records)
        return records

    ptr = Resolver.ptr
    addresses = Resolver.addresses
    txt = Resolver.txt
    dkim_dnsfunc = Resolver.dkim_dnsfunc
    for_pyspf = Resolver.for_pyspf


class _HelperBudget(Budget):
    """The worker's budget, seen from a helper: the same deadline (the
    monotonic clock is the system's, shared by processes), the DNS bytes it
    has counted (updated with each answer), and each note sent to the
    worker's trace at once, in order with the lookups."""

    def __init__(self, deadline: float, dns_bytes: int, conn: _Pipe, tracing: bool):
        super().__init__(max(0.0, deadline - time.monotonic()), [] if tracing else None)
        self.deadline = deadline
        self.dns_bytes = dns_bytes
        self._conn = conn

    def note(self, line: str) -> None:
        if self.trace is not None:
            self._conn.send(("n", line))


def _serve(conn: _Pipe) -> None:
    """A helper's loop: one check at a time, until the worker closes the pipe."""
    proxy = _ProxyResolver(conn)
    while True:
        try:
            (kind, args, deadline, dns_bytes, timeout, generation, cpu, payload,
             tracing) = conn.recv()
            if payload:
                args = (conn.recv_bytes(), *args)
        except (EOFError, OSError):
            return
        proxy.timeout = timeout
        if generation != proxy.generation:  # another resolver: its own answers
            proxy.generation = generation
            proxy.answers.clear()
        hits = proxy.hits
        budget = _HelperBudget(deadline, dns_bytes, conn, tracing)
        start = time.process_time()
        signal.setitimer(signal.ITIMER_PROF, cpu)
        try:
            reply: tuple[str, Any] = ("r", CHECKS[kind](proxy, budget, *args))
        except Exception:
            reply = ("e", traceback.format_exc())
        finally:
            signal.setitimer(signal.ITIMER_PROF, 0)
        end = time.process_time()
        try:
            conn.send((*reply, end - start, end, proxy.hits - hits, budget.expires))
        except OSError:  # the worker is gone (stopped, or killed): so is the question
            return


def _helper_main(fd: int, zygote: int) -> None:
    code = 70
    try:
        _die_with_parent(zygote, b"ipv6milter-chk")
        # The kernel's own way to end a helper at its CPU bound: no handler
        # to run (a C call that never returns could not run one).
        signal.signal(signal.SIGPROF, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGPROF})
        _serve(_Pipe(socket.socket(fileno=fd)))
        code = 0
    except BaseException:
        log.exception("check helper failed")
    finally:
        os._exit(code)


def _zygote_main(ctl: socket.socket, worker: int) -> None:
    """Fork a helper for each b"S" (the pipe's end comes with it); reap one for
    each b"W" + pid and answer its wait status.  Single-threaded for good."""
    _die_with_parent(worker, b"ipv6milter-zyg")
    gc.freeze()  # the helpers share this heap: no collection dirties it
    me = os.getpid()
    while True:
        try:
            msg, fds, _flags, _addr = socket.recv_fds(ctl, 16, 1)
        except OSError:
            return
        if not msg:
            return
        if msg[:1] == b"S" and fds:
            pid = os.fork()
            if pid == 0:
                ctl.close()
                _helper_main(fds[0], me)
            os.close(fds[0])
            ctl.send(pid.to_bytes(4, "little", signed=True))
        elif msg[:1] == b"W":
            for fd in fds:
                os.close(fd)
            try:
                _, status = os.waitpid(int.from_bytes(msg[1:5], "little", signed=True), 0)
            except ChildProcessError:
                status = -1
            ctl.send(status.to_bytes(4, "little", signed=True))


_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15


def _die_with_parent(parent: int, name: bytes) -> None:
    """SIGKILL when the parent goes (it forked from its only thread, which
    lives as long as the process: PR_SET_PDEATHSIG follows the thread), and
    a name of its own in ps and top."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        libc.prctl(_PR_SET_NAME, ctypes.c_char_p(name), 0, 0, 0)
    except (OSError, AttributeError):
        log.debug("prctl() not available")
    if os.getppid() != parent:
        os._exit(0)  # the parent is already gone


# -- the worker side --------------------------------------------------------------------------


class _Zygote:
    """The worker's handle on its zygote; one request at a time."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        worker = os.getpid()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                ours.close()
                _zygote_main(theirs, worker)
            except BaseException:
                code = 70
                log.exception("check helper zygote failed")
            finally:
                os._exit(code)
        theirs.close()
        self.pid = pid
        self._sock = ours
        self._lock = threading.Lock()

    def _ask(self, msg: bytes, fds: list[int]) -> int:
        with self._lock:
            try:
                socket.send_fds(self._sock, [msg], fds)
                data = self._sock.recv(8)
            except OSError as e:
                raise Unavailable(f"check helper zygote: {e}") from None
        if len(data) != 4:
            raise Unavailable("check helper zygote is gone")
        return int.from_bytes(data, "little", signed=True)

    def spawn(self) -> tuple[int, _Pipe]:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            pid = self._ask(b"S", [theirs.fileno()])
        except Unavailable:
            ours.close()
            raise
        finally:
            theirs.close()
        return pid, _Pipe(ours)

    def reap(self, pid: int) -> int:
        """The helper's wait status (-1: unknown); it must have ended or be ending."""
        try:
            return self._ask(b"W" + pid.to_bytes(4, "little", signed=True), [])
        except Unavailable:
            return -1

    def close(self) -> None:
        self._sock.close()
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)


@dataclass
class _Helper:
    pid: int
    conn: _Pipe
    checks: int = 0
    cpu_base: float = 0.0  # the helper's CPU seconds when its last check ended
    demoted: bool = False
    idle_since: float = 0.0  # time.monotonic() when it last became idle


class Helpers:
    """A worker's check helpers.  Construct before any thread exists."""

    def __init__(self, cpu_seconds: float = limits.CHECK_CPU_SECONDS,
                 most: int = MAX_HELPERS, idle: int = IDLE_HELPERS,
                 idle_seconds: float = IDLE_SECONDS):
        if _burn_marker() is not None:  # read once, before the fork
            _seconds_per_step()
        self.cpu_seconds = cpu_seconds
        self.most = most
        self.keep_idle = idle
        self.idle_seconds = idle_seconds
        self._zygote = _Zygote()
        self._cond = threading.Condition()
        self._idle: list[_Helper] = []
        self._live = 0
        self._closed = False
        for _ in range(idle):
            self._live += 1
            self._idle.append(self._spawn())

    def call(self, kind: str, args: tuple[Any, ...], resolver: Resolver, budget: Budget,
             payload: bytes | None = None, cpu: float | None = None) -> tuple[Any, float]:
        """Run ``CHECKS[kind](resolver, budget, [payload,] *args)`` in a helper;
        its result and the CPU seconds it used.  Raises ``Stopped``, or
        ``HelperError`` for an exception in the check."""
        cpu = self.cpu_seconds if cpu is None else cpu
        # A check with DNS time ends with its stage (SPEC §1: the end of
        # message within one StageTimeout); one without (a header field)
        # gets the wall-clock room its CPU bound needs on a loaded host.
        now = time.monotonic()
        limit = budget.deadline if budget.deadline > now else now + cpu * _WALL_FACTOR + _WALL_GRACE
        helper = self._acquire(limit)
        healthy = False
        try:
            result = self._exchange(helper, kind, args, resolver, budget, payload, cpu, limit)
            healthy = True
            return result
        except HelperError:
            healthy = True
            raise
        finally:
            self._release(helper, healthy)

    def _exchange(self, helper: _Helper, kind: str, args: tuple[Any, ...], resolver: Resolver,
                  budget: Budget, payload: bytes | None, cpu: float,
                  limit: float) -> tuple[Any, float]:
        conn = helper.conn
        helper.checks += 1
        try:
            conn.send((kind, args, budget.deadline, budget.dns_bytes, resolver.timeout,
                       resolver.generation, cpu, payload is not None, budget.trace is not None),
                      payload)
            while True:
                wait = limit - time.monotonic()
                if getattr(budget, "cancelled", False):
                    self._kill(helper)
                    raise Stopped(CANCELLED, "check abandoned by the connection")
                if wait <= 0:
                    self._kill(helper)
                    if helper.demoted:
                        # Still computing after a hundred times what a real
                        # check costs: its cause is its CPU, not the clock.
                        raise Stopped(CPU, f"check stopped at its CPU bound: over "
                                           f"{_DEMOTE_CPU:g} s when its time ran out")
                    raise Stopped(TIMEOUT, "check did not finish in time")
                if not conn.poll(min(wait, _POLL)):
                    self._demote_if_long(helper)
                    continue
                msg = conn.recv()
                tag = msg[0]
                if tag == "q":
                    try:
                        items = _portable(resolver.query(msg[1], msg[2], budget))
                        name = msg[1]
                        expiry = (resolver.expiry(name, msg[2])
                                  if isinstance(name, str) and name.isascii() else None)
                        conn.send(("a", items, budget.dns_bytes, expiry))
                    except TempFail as e:
                        conn.send(("t", str(e), budget.dns_bytes, None))
                elif tag == "n":
                    budget.note(msg[1])
                elif tag == "r":
                    helper.cpu_base = msg[3]
                    if msg[4]:
                        resolver.count_hits(msg[4])
                    budget.used(msg[5])  # the answers it used from its own copies
                    return msg[1], msg[2]
                else:
                    helper.cpu_base = msg[3]
                    raise HelperError(f"{kind} check failed in its helper:\n{msg[1]}")
        except (EOFError, OSError):
            status = self._zygote.reap(helper.pid)
            helper.pid = 0  # reaped
            if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGPROF:
                raise Stopped(CPU, f"check stopped at its CPU bound: {cpu:.3g} s") from None
            raise Stopped(CRASH, f"check helper died ({_status_text(status)})") from None

    def _acquire(self, limit: float) -> _Helper:
        with self._cond:
            if not self._idle and self._live >= self.keep_idle:
                # Under load a helper is usually free again within a check's
                # few milliseconds: a fork of the worker costs more than that.
                # Past this short wait (a helper held by a slow zone's DNS)
                # a new one is started, so no check waits behind another's.
                self._cond.wait(min(SPAWN_AFTER, max(0.0, limit - time.monotonic())))
            while not self._idle and self._live >= self.most:
                if not self._cond.wait(limit - time.monotonic()):
                    raise Stopped(BUSY, f"all {self.most} check helpers busy")
            if self._idle:
                return self._idle.pop()
            self._live += 1
        try:
            return self._spawn()
        except BaseException:
            with self._cond:
                self._live -= 1
                self._cond.notify()
            raise

    def _demote_if_long(self, helper: _Helper) -> None:
        if helper.demoted or not helper.pid:
            return
        used = _cpu_seconds(helper.pid) - helper.cpu_base
        if used >= _DEMOTE_CPU:
            helper.demoted = True
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, helper.pid, _NICEST)

    def _release(self, helper: _Helper, healthy: bool) -> None:
        if healthy and helper.checks < CHECKS_PER_HELPER and not helper.demoted:
            stale: list[_Helper] = []
            with self._cond:
                kept = not self._closed and len(self._idle) < max(self.keep_idle,
                                                                  MAX_IDLE_HELPERS)
                if kept:
                    now = time.monotonic()
                    helper.idle_since = now
                    self._idle.append(helper)
                    self._cond.notify()
                    # Checks take the most recently idle (the list's end); past
                    # the helpers always kept, the longest idle end once they
                    # have been idle for idle_seconds.
                    while (len(self._idle) - len(stale) > self.keep_idle
                           and now - self._idle[len(stale)].idle_since > self.idle_seconds):
                        stale.append(self._idle[len(stale)])
                    del self._idle[: len(stale)]
                    self._live -= len(stale)
            if kept:
                for old in stale:
                    self._end(old)
                return
        self._end(helper)
        with self._cond:
            self._live -= 1
            self._cond.notify()
            replace = (not healthy or helper.demoted) and not self._closed and (
                len(self._idle) < self.keep_idle and self._live < self.most)
            if replace:
                self._live += 1
        if replace:  # the next check finds a helper ready
            try:
                spare = self._spawn()
            except Unavailable:
                with self._cond:
                    self._live -= 1
                return
            self._release(spare, True)

    def _spawn(self) -> _Helper:
        pid, conn = self._zygote.spawn()
        return _Helper(pid, conn)

    def _kill(self, helper: _Helper) -> None:
        if helper.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(helper.pid, signal.SIGKILL)  # not reaped yet: still ours

    def _end(self, helper: _Helper) -> None:
        helper.conn.close()
        if helper.pid:
            self._kill(helper)
            self._zygote.reap(helper.pid)
            helper.pid = 0

    def close(self) -> None:
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._live -= len(idle)
        for helper in idle:
            self._end(helper)
        self._zygote.close()


_TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc (0 when it cannot be read)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rpartition(b")")[2].split()
        return (int(fields[11]) + int(fields[12])) / _TICKS
    except (OSError, IndexError, ValueError):
        return 0.0


def _status_text(status: int) -> str:
    if status < 0:
        return "status unknown"
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"
