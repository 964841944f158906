"""Reverse DNS of the client address (RFC 8601 §3 "iprev").

The PTR names are looked up, then each name's addresses (AAAA for an IPv6
client, A for IPv4) until one equals the client address: that is
forward-confirmed reverse DNS.  At most ``MAX_NAMES`` names are tried, as
RFC 8601 §3 advises against unbounded work for a hostile PTR set.
"""

from __future__ import annotations

import re

from .model import IPAddress, Iprev, IprevResult
from .resolver import Budget, Resolver, TempFail

MAX_NAMES = 10
_HOSTNAME = re.compile(r"^[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*$")


def safe_name(name: str) -> str | None:
    """A PTR name fit for logs and headers, or None (hostile or broken)."""
    name = name.lower().rstrip(".")
    if len(name) > 253 or not _HOSTNAME.match(name):
        return None
    return name


def check_iprev(resolver: Resolver, addr: IPAddress, budget: Budget) -> IprevResult:
    try:
        raw = resolver.ptr(addr, budget)
    except TempFail as e:
        return IprevResult(Iprev.TEMPERROR, ptr_temperror=True, detail=f"PTR lookup: {e}")
    # A PTR that is not a host name still "exists" for ReverseDNS ptr, but we
    # never echo it; a placeholder keeps the count honest.
    names = tuple(safe_name(n) or "invalid-name" for n in raw)
    if not names:
        return IprevResult(Iprev.PERMERROR, detail="no PTR record")
    temp = None
    for name in names[:MAX_NAMES]:
        if name == "invalid-name":
            continue
        try:
            forward = resolver.addresses(name, addr.version, budget)
        except TempFail as e:
            temp = f"forward lookup of {name}: {e}"
            continue
        if addr in forward:
            return IprevResult(Iprev.PASS, names, confirmed=name, detail=f"{name} resolves back")
    if temp:
        return IprevResult(Iprev.TEMPERROR, names, detail=temp)
    return IprevResult(Iprev.FAIL, names, detail="no PTR name resolves back to the address")
