"""SPF (RFC 7208) with pyspf, its DNS routed through our resolver."""

from __future__ import annotations

import re

import spf

from .config import a_labels
from .model import IPAddress, SpfResult
from .resolver import Budget, Resolver

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


def ascii_domain(domain: str) -> str | None:
    """The A-label form of a domain fit for DNS, or None."""
    try:
        d = a_labels(domain)
    except UnicodeError:
        return None
    return d if _DOMAIN.match(d) else None


def check_spf(
    resolver: Resolver, addr: IPAddress, mail_from: str, helo: str, budget: Budget
) -> SpfResult:
    """SPF for MAIL FROM, or for the HELO identity with the null sender (RFC 7208 §2.3, §2.4)."""
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
        q = spf.query(
            i=str(addr),
            s=identity,
            h=d if scope == "helo" else (ascii_domain(helo) or "unknown"),
            timeout=resolver.timeout,
            querytime=max(budget.remaining(), 0.001),
        )
        result, _code, explanation = q.check()
    result = str(result).lower()
    if result not in RESULTS:
        result = "permerror"
    return SpfResult(result, identity or d, scope, str(explanation))
