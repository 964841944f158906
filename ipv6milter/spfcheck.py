"""SPF (RFC 7208) with pyspf, its DNS routed through our resolver.

pyspf is used through ``_Query``, a subclass of its ``query``: the void
lookup limit is an attribute of each evaluation (``SPFVoidLookupLimit``),
never pyspf's module constant, which every thread shares; the record's
text reaches pyspf's regular expressions only within ``limits``; and the
``ptr`` mechanism skips a name whose address lookup fails (RFC 7208 §5.5).
"""

from __future__ import annotations

import re
from typing import Any

import spf

from . import limits
from .config import a_labels
from .model import IPAddress, SpfResult
from .resolver import Budget, Resolver, TempFail

# RFC 7208 §4.6.4: "SHOULD be limited to two" void lookups; SPEC §4 makes the
# limit configurable, 2-20 (SPFVoidLookupLimit).
VOID_LOOKUP_LIMIT = 2
_VOID_EXCEEDED = "Void lookup limit of"

RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")
_DOMAIN = re.compile(
    r"^[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?(\.[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?)+\.?$"
)


def envelope_address(mail_from: str) -> str:
    """The address inside MAIL FROM's brackets, without a source route."""
    a = mail_from.strip()
    if a.startswith("<") and a.endswith(">"):
        a = a[1:-1]
    if a.startswith("@") and ":" in a:  # RFC 5321 §4.1.2 source route
        a = a.split(":", 1)[1]
    return a.strip()


def first_name(mail_from: str, helo: str) -> str:
    """The name whose TXT record an SPF check asks first (the MAIL FROM
    domain, or the HELO for the null sender), as written: for a guess
    whether the check's answers are cached."""
    return envelope_address(mail_from).rpartition("@")[2] or helo


def ascii_domain(domain: str) -> str | None:
    """The A-label form of a domain fit for DNS, or None."""
    try:
        d = a_labels(domain)
    except UnicodeError:
        return None
    return d if _DOMAIN.match(d) else None


def _lookup_name(name: str) -> bool:
    """Would pyspf send ``name`` to DNS?  Its ``query.dns`` answers an empty
    or too long label itself, without a lookup (and so without a void one)."""
    labels = name.removesuffix(".").split(".")
    return all(0 < len(label) <= limits.DNS_LABEL_CHARS for label in labels)


class _Query(spf.query):  # type: ignore[misc]
    """pyspf's query with ipv6milter's bounds and RFC 7208 edges."""

    def __init__(self, *args: Any, void_limit: int, budget: Budget, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.void_limit = void_limit
        self.budget = budget
        self.voids: list[tuple[str, str]] = []  # (name, type) of each void lookup

    def dns(self, name: str, qtype: str, cnames: Any = None, ignore_void: bool = False) -> Any:
        # pyspf compares its count with the module constant MAX_VOID_LOOKUPS,
        # shared by every thread; counted here against this evaluation's limit.
        result = super().dns(name, qtype, cnames=cnames, ignore_void=True)
        if not result and not ignore_void and name and _lookup_name(str(name)):
            self.void_lookups += 1
            self.voids.append((str(name).removesuffix("."), qtype))
            if self.void_lookups > self.void_limit:
                raise spf.PermError(f"{_VOID_EXCEEDED} {self.void_limit} exceeded")
        return result

    def validated_ptrs(self) -> list[str]:
        # RFC 7208 §5.5: "If a DNS error occurs while doing the PTR RR lookup,
        # then this mechanism fails to match.  If a DNS error occurs while
        # doing an A RR lookup, then that domain name is skipped and the
        # search continues" -- a timeout or a CNAME loop on one PTR name is
        # not a temperror.  A spent stage budget is: nothing after it could
        # be asked either.
        try:
            names = self.dns_ptr(self.i)
        except spf.TempError:
            if self.budget.remaining() <= 0:
                raise
            return []
        out = []
        for name in names[: spf.MAX_PTR]:
            try:
                addrs = self.dns_a(name, self.A)
            except spf.TempError:
                if self.budget.remaining() <= 0:
                    raise
                continue
            if self.cidrmatch(addrs, self.cidrmax):
                out.append(name)
        return out

    def expand_domain(self, arg: str) -> str:
        # pyspf's domain-spec check (RE_TOPLAB) backtracks quadratically over
        # a long label: held to RFC 1035's lengths first.  RFC 7208 §4.6: a
        # malformed record is permerror.
        if len(arg) > limits.DNS_NAME_CHARS or any(
            len(label) > limits.DNS_LABEL_CHARS for label in arg.split(".")
        ):
            raise spf.PermError(
                f"Invalid domain found (a label over {limits.DNS_LABEL_CHARS} or a name over "
                f"{limits.DNS_NAME_CHARS} characters)", arg[:64] + "...")
        return str(super().expand_domain(arg))

    def expand(self, s: str, stripdot: bool = True) -> str:
        # pyspf's macro syntax check searches the whole text once per dot.
        # For exp= text a PermError means "no explanation" (RFC 7208 §6.2).
        if len(s) > limits.SPF_MACRO_STRING_CHARS:
            raise spf.PermError(
                f"macro-string over {limits.SPF_MACRO_STRING_CHARS} characters", s[:64] + "...")
        return str(super().expand(s, stripdot))


def _why_void(resolver: Resolver, q: _Query, addr: IPAddress, budget: Budget,
              exceeded: bool) -> str:
    """The void lookups of ``q``, counted; when they failed SPF, whether they
    were AAAA lookups of hosts that have IPv4 addresses only (SPEC §1): one A
    lookup for each."""
    names = ", ".join(f"{name} {qtype}" for name, qtype in q.voids)
    text = f"{len(q.voids)} void lookup(s), limit {q.void_limit}: {names}"
    if not exceeded or addr.version != 6:
        return text
    v4only = []
    for name, qtype in q.voids:
        if qtype != "AAAA":
            continue
        try:
            if resolver.addresses(name, 4, budget):
                v4only.append(name)
        except TempFail:
            continue
    if v4only:
        text += (f"; AAAA lookups for IPv4-only hosts ({', '.join(v4only)}): the record was "
                 "written for IPv4 senders (SPFVoidLookupLimit raises the limit)")
    return text


def check_spf(
    resolver: Resolver, addr: IPAddress, mail_from: str, helo: str, budget: Budget,
    *, void_limit: int = VOID_LOOKUP_LIMIT,
) -> SpfResult:
    """SPF for MAIL FROM, or for the HELO identity with the null sender (RFC 7208 §2.3, §2.4).

    ``void_limit``: void lookups allowed (RFC 7208 §4.6.4, SPFVoidLookupLimit).
    """
    sender = envelope_address(mail_from)
    if sender:
        scope = "mailfrom"
        local, at, domain = sender.rpartition("@")
        d = ascii_domain(domain) if at else None
        if not local:
            # RFC 7208 §4.3: a sender without a local part is postmaster
            # (<@example.net>, as pyspf itself reads it).
            local = "postmaster"
        if d is None:
            # RFC 7208 §4.3: a malformed domain is "none", with no lookups.
            return SpfResult("none", sender, scope, "no usable domain in MAIL FROM")
        identity = f"{local}@{d}"
    else:
        scope = "helo"
        d = ascii_domain(helo)
        if d is None:
            # An address literal or a bare word cannot carry an SPF record.
            return SpfResult("none", helo, scope, "HELO is not a domain name")
        identity = ""
    with resolver.for_pyspf(budget):
        q = _Query(
            i=str(addr),
            s=identity,
            # RFC 7208 §7.3: %{h} is the HELO/EHLO domain as the client gave
            # it, a bare host name or an address literal too (SPEC §1).
            h=d if scope == "helo" else helo,
            timeout=resolver.timeout,
            querytime=max(budget.remaining(), 0.001),
            void_limit=void_limit,
            budget=budget,
        )
        result, _code, explanation = q.check()
        detail = str(explanation)
        exceeded = result == "permerror" and _VOID_EXCEEDED in detail
        # Only for --explain (a trace is kept): the milter's detail stays
        # pyspf's explanation.
        if budget.trace is not None and q.voids and (result != "permerror" or exceeded):
            detail += f" ({_why_void(resolver, q, addr, budget, exceeded)})"
    result = str(result).lower()
    if result not in RESULTS:
        result = "permerror"
    return SpfResult(result, identity or d, scope, detail)
