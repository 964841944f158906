"""The DNS layer: the only module that talks to dnspython.

One ``Resolver`` serves the PTR/FCrDNS lookups, pyspf and dkimpy, so they share
one TTL-respecting cache and one notion of failure:

* NXDOMAIN, an empty answer or a name that cannot exist (not valid IDNA,
  8-bit bytes that are not UTF-8, a label or name too long) is *no data*
  (an empty list), never a ``TempFail``: asking again cannot help;
* a timeout, SERVFAIL, REFUSED or no reachable server is ``TempFail``.

Every answer is bounded before a check reads it (``limits``, "DNS answers"):
an answer with more records or more record data than a real one holds is no
data; a TXT record too long or in too many strings is left out (and for
pyspf, an SPF record so is ``permerror``).  The answer cache is bounded in
bytes (``DNS_CACHE_BYTES``), each answer's size estimated when it is put.

Time is bounded twice (SPEC §1): each lookup by ``DNSTimeout``, and all
lookups of one SMTP stage by a ``Budget`` of ``StageTimeout`` seconds.  A
spent budget is a ``TempFail`` too.

pyspf has no resolver argument: it calls the module-level ``spf.DNSLookup``.
``pyspf_bridge`` installs our function there once, and ``Budget`` objects
reach it through a thread-local, so concurrent milter threads never share
state through pyspf's globals.
"""

from __future__ import annotations

import functools
import ipaddress
import itertools
import logging
import math
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Generic, TypeVar

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdatatype
import dns.resolver
import dns.reversename
import spf

from . import limits
from .config import a_labels
from .model import IPAddress

log = logging.getLogger(__name__)


class TempFail(Exception):
    """A temporary DNS failure: try again later."""


class Budget:
    """The time left for the DNS work of one SMTP stage.

    ``trace``, when a list, receives one line per query and answer (for
    ``ipv6milter-check --explain``).
    """

    def __init__(self, seconds: float, trace: list[str] | None = None):
        self.deadline = time.monotonic() + seconds
        self.trace = trace
        self.dns_bytes = 0  # DNS messages parsed for this stage (limits.DNS_STAGE_BYTES)
        # When the soonest of the answers used expires (time.time()); 0 when
        # one of them was not an answer that is kept (a failure, an
        # impossible name, a lookup left out): a result computed from them
        # holds until then, and no longer (Engine's SPF results).
        self.expires = math.inf

    def used(self, expiry: float | None) -> None:
        """An answer used, valid until ``expiry`` (None: not to be remembered)."""
        if expiry is None:
            self.expires = 0.0
        elif expiry < self.expires:
            self.expires = expiry

    def over_dns_bytes(self) -> bool:
        return self.dns_bytes > limits.DNS_STAGE_BYTES

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def note(self, line: str) -> None:
        if self.trace is not None:
            self.trace.append(line)


def _to_text(rdata: Any) -> str:
    return rdata.to_text()


_GENERATIONS = itertools.count(1)
V = TypeVar("V")


class Resolver:
    """A stub resolver over dnspython with a shared cache.

    ``nameservers`` are ``(address, port)`` pairs; empty means the system's
    resolv.conf.  Configure it once, before threads start; ``query`` is then
    safe from any thread (the answer cache is locked).
    """

    def __init__(
        self,
        nameservers: tuple[tuple[str, int], ...] = (),
        timeout: float = 5.0,
        cache_size: int = limits.DNS_CACHE_ENTRIES,
        on_cache: Callable[[bool], None] | None = None,
        cache_bytes: int = limits.DNS_CACHE_BYTES,
    ):
        self.timeout = timeout
        if nameservers:
            r = dns.resolver.Resolver(configure=False)
            _set_nameservers(r, nameservers)
        else:
            r = dns.resolver.Resolver()
        r.timeout = timeout
        r.lifetime = timeout
        # One cache, ours (_AnswerCache, in front of resolve()): dnspython's
        # own would only hold the same answers a second time.
        r.cache = None
        self._r = r
        self._on_cache = on_cache
        self._answers = _AnswerCache(cache_size, cache_bytes)
        # Copies of this cache's answers (a check helper's) are of this one
        # resolver: a new one (new name servers) starts them anew.
        self.generation = next(_GENERATIONS)

    # -- the one query primitive ------------------------------------------

    def query(self, name: str | dns.name.Name, rdtype: str, budget: Budget) -> list[Any]:
        """Return the rdata of ``name``/``rdtype``; [] for no data; raise TempFail."""
        if isinstance(name, str) and not name.isascii():
            # IDNA 2008 (config.a_labels), not dnspython's IDNA 2003; a name
            # that is not valid IDNA cannot exist: no data, not an outage.
            try:
                name = a_labels(name)
            except UnicodeError:
                budget.note(f"{name!r} {rdtype}: impossible name (not valid IDNA)")
                budget.used(None)
                return []
        lifetime = min(self.timeout, budget.remaining())
        if lifetime <= 0:
            budget.note(f"{name} {rdtype}: stage time budget spent")
            budget.used(None)  # a result despite it is not kept
            raise TempFail(f"DNS time budget for this stage spent before {name} {rdtype}")
        key = (_cache_name(name), rdtype)
        cached = self._answers.answer(key)
        if self._on_cache is not None:
            self._on_cache(cached is not None)
        if cached is not None:
            # Served here, before dnspython's resolve(), which costs tens of
            # microseconds even for a name it has seen (name parsing, a
            # _Resolution object).
            nxdomain, items, expiry = cached
            budget.used(expiry)
            if nxdomain:
                budget.note(f"{name} {rdtype}: NXDOMAIN")
                return []
            return self._answered(name, rdtype, items, budget)
        if budget.over_dns_bytes():
            # Each response costs its parsing whatever we keep of it: past the
            # stage's share nothing more is asked (no data, never a TempFail).
            budget.note(f"{name} {rdtype}: not asked (this stage's DNS answers passed "
                        f"{limits.DNS_STAGE_BYTES} bytes)")
            budget.used(None)
            return []
        try:
            answer = self._r.resolve(
                name, rdtype, search=False, lifetime=lifetime, raise_on_no_answer=False
            )
        except dns.resolver.NXDOMAIN as e:
            budget.note(f"{name} {rdtype}: NXDOMAIN")
            budget.dns_bytes += _nxdomain_bytes(e)
            expiry = _nxdomain_expiry(e)
            budget.used(expiry)
            self._answers.keep(key, True, (), expiry)
            return []
        except (dns.exception.Timeout, dns.resolver.NoNameservers) as e:
            budget.note(f"{name} {rdtype}: temporary failure ({type(e).__name__})")
            budget.used(None)  # a result despite it is not kept
            raise TempFail(f"{name} {rdtype}: {type(e).__name__}") from None
        except (
            dns.name.NameTooLong,
            dns.name.LabelTooLong,
            dns.name.EmptyLabel,
            dns.name.BadEscape,  # "a\" from a HELO expanded by SPF's %{h}
            # dnspython 2.3 (Debian 12's) packs a decimal escape over 255
            # ("x\999") without checking it: struct.error, not BadEscape.
            struct.error,
            dns.name.IDNAException,
            dns.resolver.YXDOMAIN,
            dns.resolver.NoRootSOA,
        ) as e:
            # A name that cannot exist has no data; that is not a DNS outage.
            budget.note(f"{name} {rdtype}: impossible name ({type(e).__name__})")
            budget.used(None)
            return []
        except dns.exception.DNSException as e:
            # Anything else from the wire (malformed answers...) is temporary:
            # a retry may well succeed, and nothing is turned into a pass.
            budget.note(f"{name} {rdtype}: error ({type(e).__name__})")
            budget.used(None)  # a result despite it is not kept
            raise TempFail(f"{name} {rdtype}: {type(e).__name__}: {e}") from None
        budget.dns_bytes += _response_bytes(getattr(answer, "response", None))
        rrset = answer.rrset
        items = tuple(rrset) if rrset is not None else ()
        over = over_answer_bounds(items)
        if over:
            # Kept as what it is to a check: no data (cheap to keep, and asking
            # again would give the same answer).
            budget.note(f"{name} {rdtype}: answer ignored ({over})")
            items = ()
        # Answer.expiration: the smallest TTL of the answer, or for no data
        # the SOA's negative TTL (RFC 2308).
        expiry = getattr(answer, "expiration", None)
        budget.used(expiry)
        self._answers.keep(key, False, items, expiry)
        if over:
            return []
        return self._answered(name, rdtype, items, budget)

    def cached(self, name: str, rdtype: str) -> bool:
        """Whether ``name``/``rdtype`` would be answered from the cache now (not
        counted as a look-up, nor moved in the LRU order)."""
        return self._answers.peek((_cache_name(name), rdtype))

    def expiry(self, name: str, rdtype: str) -> float | None:
        """When the cached answer to ``name``/``rdtype`` expires (``time.time()``),
        None when none is kept."""
        return self._answers.expiry((_cache_name(name), rdtype))

    def count_hits(self, n: int) -> None:
        """``n`` questions answered from copies of this cache's answers (a
        check helper's): counted as the hits they are."""
        if self._on_cache is not None:
            for _ in range(n):
                self._on_cache(True)

    def ptr_cached(self, addr: IPAddress) -> bool:
        return self.cached(_reverse_name(addr), "PTR")

    @staticmethod
    def _answered(
        name: str | dns.name.Name, rdtype: str, items: tuple[Any, ...], budget: Budget
    ) -> list[Any]:
        if budget.trace is not None:  # only --explain wants the text
            budget.note(f"{name} {rdtype}: " + (", ".join(map(_to_text, items)) or "no data"))
        return list(items)

    # -- typed helpers ----------------------------------------------------

    def ptr(self, addr: IPAddress, budget: Budget) -> list[str]:
        """PTR names of ``addr``, lower case, without the final dot."""
        rev = _reverse_name(addr)
        return [
            r.target.to_text(omit_final_dot=True).lower() for r in self.query(rev, "PTR", budget)
        ]

    def addresses(self, name: str, version: int, budget: Budget) -> list[IPAddress]:
        rdtype, parse = ("AAAA", ipaddress.IPv6Address) if version == 6 else (
            "A", ipaddress.IPv4Address)
        out: list[IPAddress] = []
        for r in self.query(name, rdtype, budget):
            try:
                out.append(parse(r.address))
            except ValueError:
                continue
        return out

    def txt(self, name: str, budget: Budget) -> list[bytes]:
        """TXT records, each one's character-strings joined (RFC 7208 §3.3);
        a record over the TXT bounds is left out (it cannot be a valid key or
        policy record)."""
        out = []
        for r in self.query(name, "TXT", budget):
            joined = txt_record(r.strings)
            if joined is None:
                budget.note(f"{name} TXT: a record over {limits.TXT_RECORD_BYTES} bytes "
                            f"or {limits.TXT_RECORD_STRINGS} strings left out")
            else:
                out.append(joined)
        return out

    # -- front ends for the libraries ---------------------------------------

    def dkim_dnsfunc(self, budget: Budget) -> Callable[..., bytes | None]:
        """A ``dnsfunc`` for dkimpy: TXT of a key name, or None.

        ``TempFail`` is deliberately not a DKIMException: dkimpy lets it
        through, so a DNS outage is told apart from a bad signature.
        """

        def dnsfunc(name: bytes | str, timeout: float = 5) -> bytes | None:
            if isinstance(name, bytes):
                try:
                    qname = name.decode("utf-8")  # a U-label d= (RFC 8616 §4)
                except UnicodeDecodeError:
                    budget.note(f"{name!r} TXT: impossible name (not UTF-8)")
                    return None  # 8-bit garbage cannot be a DNS name
            else:
                qname = name
            records = self.txt(qname, budget)
            return records[0] if records else None

        return dnsfunc

    @contextmanager
    def for_pyspf(self, budget: Budget) -> Iterator[None]:
        """Route the calling thread's pyspf lookups through this resolver."""
        pyspf_bridge.install()
        previous = getattr(_local, "ctx", None)
        _local.ctx = (self, budget)
        try:
            yield
        finally:
            _local.ctx = previous


@functools.lru_cache(maxsize=4096)
def _reverse_name(addr: IPAddress) -> str:
    """The PTR name of ``addr`` as text (``...ip6.arpa.``), made once per
    address: a client sends many messages, and dnspython's name building is
    not free."""
    return dns.reversename.from_address(str(addr)).to_text()


def _cache_name(name: str | dns.name.Name) -> str:
    """The answer cache's spelling of ``name``: lower case, without a final dot
    (every query is absolute: ``search=False``)."""
    text = name if isinstance(name, str) else name.to_text()
    return (text[:-1] if text.endswith(".") else text).lower()


def txt_record(strings: Sequence[bytes]) -> bytes | None:
    """A TXT record's strings joined, or None past ``TXT_RECORD_STRINGS`` or
    ``TXT_RECORD_BYTES``."""
    if len(strings) > limits.TXT_RECORD_STRINGS:
        return None
    joined = b"".join(strings)
    return joined if len(joined) <= limits.TXT_RECORD_BYTES else None


def _pieces(r: Any) -> tuple[int, int]:
    """(pieces, bytes) of one record's data: a TXT record's strings, a
    name's labels (PTR, CNAME, MX), or one address (its text)."""
    strings = getattr(r, "strings", None)
    if strings is not None:
        return len(strings), sum(map(len, strings))
    target = getattr(r, "target", None) or getattr(r, "exchange", None)
    if target is not None:
        labels = target.labels
        return len(labels), sum(map(len, labels))
    address = getattr(r, "address", None)
    return 1, len(address) if isinstance(address, str) else 255


def _response_bytes(response: Any) -> int:
    """The size of a parsed DNS message: its wire length where dnspython keeps
    it (2.6 and later), else the same counted from its records (12 bytes of
    header each, and their data)."""
    if response is None:
        return 0
    wire = getattr(response, "wire", None)
    if isinstance(wire, bytes):
        return len(wire)
    size = 12
    for section in (response.answer, response.authority, response.additional):
        for rrset in section:
            size += 12 * len(rrset)
            for r in rrset:
                pieces, data = _pieces(r)
                size += pieces + data
    return size


def _nxdomain_bytes(e: dns.resolver.NXDOMAIN) -> int:
    try:
        responses = e.responses()
    except (AttributeError, KeyError, TypeError):
        return 0
    return sum(_response_bytes(r) for r in responses.values())


def over_answer_bounds(items: Sequence[Any]) -> str | None:
    """Why an answer is beyond what a real one holds, or None."""
    if len(items) > limits.DNS_ANSWER_RECORDS:
        return f"more than {limits.DNS_ANSWER_RECORDS} records"
    size = 0
    for r in items:
        pieces, data = _pieces(r)
        size += pieces + data  # each string or label with its length octet
    if size > limits.DNS_ANSWER_BYTES:
        return f"more than {limits.DNS_ANSWER_BYTES} bytes of record data"
    return None


# What the answer cache's entries cost in Python objects, as measured with
# tracemalloc on dnspython 2.3 and 2.9 (tests/unit/test_checks.py holds the
# estimate above the measure): per entry its key, the dict's node and the
# tuples; per record the rdata object (an A/AAAA rdata with its address text
# measures ~135 bytes); per piece (a TXT string, a name's label) a bytes object
# and its slot, then the bytes themselves.
_ENTRY_BYTES = 640
_RECORD_BYTES = 200
_PIECE_BYTES = 80


def estimated_bytes(name: str, items: Sequence[Any]) -> int:
    """A cheap upper estimate of the memory one cache entry holds."""
    size = _ENTRY_BYTES + len(name) + 8 * len(items)
    for r in items:
        pieces, data = _pieces(r)
        size += _RECORD_BYTES + _PIECE_BYTES * pieces + data
    return size


def _nxdomain_expiry(e: dns.resolver.NXDOMAIN) -> float | None:
    """When an NXDOMAIN stops being true: the SOA's negative TTL (RFC 2308 §5,
    the smaller of its TTL and MINIMUM); None (not kept) without a SOA."""
    try:
        responses = e.responses()
    except (AttributeError, KeyError, TypeError):
        return None
    ttls = [min(rrset.ttl, rrset[0].minimum)
            for response in responses.values() for rrset in response.authority
            if rrset.rdtype == dns.rdatatype.SOA and len(rrset)]
    return time.time() + min(ttls) if ttls else None


class ExpiringLRU(Generic[V]):
    """key -> value until its expiry (``clock()``'s time: ``time.time`` by
    default, as dnspython's expiration times are); the least recently used
    entry goes first past ``size`` entries (or past ``_over()``); locked.
    Subclasses count what they keep through ``_added`` and ``_dropped``."""

    def __init__(self, size: int, clock: Callable[[], float] = time.time):
        self.size = max(1, size)
        self.clock = clock
        self._lock = threading.Lock()
        self._data: OrderedDict[Hashable, tuple[float, V]] = OrderedDict()

    def get(self, key: Hashable) -> tuple[float, V] | None:
        """``(expiry, value)``, or None when absent or expired."""
        with self._lock:
            entry = self._data.get(key)
            if entry is None:
                return None
            if entry[0] <= self.clock():
                del self._data[key]
                self._dropped(entry[1])
                return None
            self._data.move_to_end(key)
            return entry

    def peek(self, key: Hashable) -> bool:
        """Whether ``get`` would find it, without moving it in the LRU order."""
        entry = self._data.get(key)  # one dict read: atomic, no lock needed
        return entry is not None and entry[0] > self.clock()

    def expiry(self, key: Hashable) -> float | None:
        entry = self._data.get(key)
        return entry[0] if entry is not None else None

    def put(self, key: Hashable, value: V, expiry: float | None) -> None:
        if expiry is None or expiry <= self.clock():
            return
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self._dropped(old[1])
            self._data[key] = (expiry, value)
            self._added(value)
            while len(self._data) > self.size or self._over():
                self._dropped(self._data.popitem(last=False)[1][1])

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    def __len__(self) -> int:
        return len(self._data)

    def _added(self, value: V) -> None:
        pass

    def _dropped(self, value: V) -> None:
        pass

    def _over(self) -> bool:
        return False


# An answer as the cache keeps it: NXDOMAIN?, the rdata, its estimated bytes.
_Answer = tuple[bool, tuple[Any, ...], int]


class _AnswerCache(ExpiringLRU[_Answer]):
    """(name, rdtype) -> (NXDOMAIN?, rdata) until its expiry; bounded in
    entries and in estimated bytes (``estimated_bytes``).

    In front of dnspython: a hit costs a dict lookup.  Only answers are kept
    (records, no data, NXDOMAIN), never a failure.  An answer estimated over
    ``entry_bytes`` is not kept at all: one sender's large answers would
    otherwise push out everyone's small ones.
    """

    def __init__(self, size: int, max_bytes: int = limits.DNS_CACHE_BYTES,
                 clock: Callable[[], float] = time.time,
                 entry_bytes: int = limits.DNS_CACHE_ENTRY_BYTES):
        super().__init__(size, clock)
        self.max_bytes = max_bytes
        self.entry_bytes = min(entry_bytes, max_bytes)
        self.bytes = 0  # the estimate of what is kept now

    def answer(self, key: tuple[str, str]) -> tuple[bool, tuple[Any, ...], float] | None:
        """``(nxdomain, items, expiry)``, or None when absent or expired."""
        entry = self.get(key)
        if entry is None:
            return None
        expiry, (nxdomain, items, _size) = entry
        return nxdomain, items, expiry

    def keep(self, key: tuple[str, str], nxdomain: bool, items: tuple[Any, ...],
             expiry: float | None) -> None:
        size = estimated_bytes(key[0], items)
        if size <= self.entry_bytes:
            self.put(key, (nxdomain, items, size), expiry)

    def _added(self, value: _Answer) -> None:
        self.bytes += value[2]

    def _dropped(self, value: _Answer) -> None:
        self.bytes -= value[2]

    def _over(self) -> bool:
        return self.bytes > self.max_bytes


def probe_nameservers(
    nameservers: tuple[tuple[str, int], ...], timeout: float
) -> list[tuple[str, bool, str]]:
    """Ask each resolver for the root SOA: (server, answered, detail).

    Any DNS response counts as an answer (an authoritative-only server says
    REFUSED, and that is still a server that answers); a timeout or an
    unreachable port does not.  Empty ``nameservers``: resolv.conf's.
    """
    if not nameservers:
        nameservers = tuple((ns, 53) for ns in dns.resolver.Resolver().nameservers
                            if isinstance(ns, str))
    out = []
    for host, port in nameservers:
        label = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        query = dns.message.make_query(".", "SOA", flags=dns.flags.RD)
        start = time.monotonic()
        try:
            response = dns.query.udp(query, host, port=port, timeout=timeout)
        except (dns.exception.DNSException, OSError) as e:
            out.append((label, False, f"no answer ({type(e).__name__}: {e})"))
            continue
        ms = (time.monotonic() - start) * 1000
        out.append((label, True, f"answered {dns.rcode.to_text(response.rcode())} "
                    f"in {ms:.0f} ms"))
    return out


def _set_nameservers(r: dns.resolver.Resolver, servers: tuple[tuple[str, int], ...]) -> None:
    try:
        import dns.nameserver  # dnspython >= 2.4
    except ImportError:
        # dnspython 2.3 (Debian 12): per-address ports in nameserver_ports.
        r.nameservers = [h for h, _ in servers]
        r.nameserver_ports = {h: p for h, p in servers}
        return
    r.nameservers = [dns.nameserver.Do53Nameserver(h, p) for h, p in servers]


# -- pyspf ---------------------------------------------------------------------

_local = threading.local()


def _pyspf_lookup(
    name: str, qtype: str, strict: Any = True, timeout: float = 20, *args: Any, **kwargs: Any
) -> list[tuple[tuple[str, str], Any]]:
    """pyspf's ``DNSLookup`` contract: ``[((name, qtype), value), ...]``.

    TXT values are sequences of bytes; a temporary failure is ``spf.TempError``.
    """
    ctx = getattr(_local, "ctx", None)
    if ctx is None:
        raise spf.TempError("DNS lookup outside an ipv6milter SPF check")
    resolver, budget = ctx
    if budget.over_dns_bytes():
        # RFC 7208 §4.6.4: a verifier may limit its processing; past a limit, permerror.
        raise spf.PermError(f"DNS answers of this evaluation over {limits.DNS_STAGE_BYTES} bytes")
    try:
        items = resolver.query(name, qtype, budget)
    except TempFail as e:
        raise spf.TempError(f"DNS {e}") from None
    out: list[tuple[tuple[str, str], Any]] = []
    for r in items:
        if qtype in ("A", "AAAA"):
            value: Any = r.address
        elif qtype == "MX":
            value = (r.preference, r.exchange.to_text(omit_final_dot=True))
        elif qtype == "PTR":
            value = r.target.to_text(omit_final_dot=True)
        elif qtype in ("TXT", "SPF"):
            if txt_record(r.strings) is None:
                if _is_spf_record(r.strings):
                    # RFC 7208 §4.6: a malformed record is permerror.
                    raise spf.PermError(
                        f"SPF record of {name} over {limits.TXT_RECORD_BYTES} bytes or "
                        f"{limits.TXT_RECORD_STRINGS} strings")
                budget.note(f"{name} {qtype}: a record over {limits.TXT_RECORD_BYTES} bytes "
                            f"or {limits.TXT_RECORD_STRINGS} strings left out")
                continue
            value = tuple(r.strings)
        else:
            continue
        out.append(((name, qtype), value))
    return out


def _is_spf_record(strings: Sequence[bytes]) -> bool:
    """Does this TXT record start "v=spf1" (RFC 7208 §4.5), whatever its
    splitting into strings?"""
    head = b""
    for piece in strings:
        head += piece[:7]
        if len(head) >= 7:
            break
    head = head[:7].lower()
    return head == b"v=spf1" or head == b"v=spf1 "


class _PyspfBridge:
    """Installs ``_pyspf_lookup`` as ``spf.DNSLookup``, once per process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.original: Callable[..., Any] | None = None

    def install(self) -> None:
        if spf.DNSLookup is _pyspf_lookup:
            return
        with self._lock:
            if spf.DNSLookup is not _pyspf_lookup:
                self.original = spf.DNSLookup
                spf.DNSLookup = _pyspf_lookup

    def uninstall(self) -> None:
        with self._lock:
            if self.original is not None:
                spf.DNSLookup = self.original
                self.original = None


pyspf_bridge = _PyspfBridge()
