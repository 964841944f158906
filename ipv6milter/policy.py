"""The policy: every reply of SPEC §1 is decided here, and only here.

Pure functions from facts to a ``Verdict``; no DNS, no milter, no clock.
The adapter and ``ipv6milter-check`` apply what these return.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import re
from collections.abc import Sequence

from .config import Config, normalise_domain
from .model import (
    ACCEPT,
    Aligned,
    Alignment,
    DkimResult,
    IPAddress,
    Iprev,
    IprevResult,
    Reply,
    Scope,
    SpfResult,
    Verdict,
)

# libmilter's smfi_setreply refuses a text longer than this (MAXREPLYLEN in
# libmilter/smfi.c) and the reply would become an internal error: a reply
# keeps its code, so a text that would be longer is shortened (SPEC §1).
MAX_REPLY_TEXT = 980
_ELLIPSIS = "..."


def _shortened(value: str, room: int) -> str:
    """``value`` cut to ``room`` characters, its start and end kept around "..."."""
    if len(value) <= room:
        return value
    keep = max(room - len(_ELLIPSIS), 2)
    head = keep - keep // 3
    return value[:head] + _ELLIPSIS + value[len(value) - (keep - head):]


def not_opted_in(domain: str) -> Reply:
    before, after = "Service unavailable, [", "] does not accept email over IPv6."
    domain = _shortened(domain, MAX_REPLY_TEXT - len(before) - len(after))
    return Reply("550", "5.2.1", f"{before}{domain}{after}")


def no_reverse_dns(addr: IPAddress) -> Reply:
    return Reply(
        "450",
        "4.7.25",
        f"Service unavailable, sending IPv6 address [{addr}] must have reverse DNS record.",
    )


def not_authenticated(addr: IPAddress) -> Reply:
    return Reply(
        "450",
        "4.7.26",
        f"Service unavailable, message sent over IPv6 [{addr}] must pass either SPF "
        "or DKIM validation.",
    )


def not_aligned(addr: IPAddress) -> Reply:
    # From-aligned mode keeps the code and the enhanced code and names the
    # rule; the From domain is the sender's text and is not echoed (SPEC §1).
    return Reply(
        "450",
        "4.7.26",
        f"Service unavailable, message sent over IPv6 [{addr}] must pass either SPF "
        "or DKIM validation aligned with the From domain.",
    )


def dns_tempfail(what: str, addr: IPAddress) -> Reply:
    # RFC 3463 4.4.3 "directory server failure": one code for every temporary
    # DNS failure, so that it always reads "DNS trouble, retry".
    return Reply(
        "451", "4.4.3", f"Temporary DNS failure checking {what} of [{addr}], try again later"
    )


INTERNAL_ERROR = Reply("451", "4.3.0", "Internal error in the IPv6 policy filter, try again later")


# -- scope ------------------------------------------------------------------------


def parse_address(raw: str | None) -> IPAddress | None:
    """An address as an MTA hands it over: ``IPv6:`` prefixes, brackets, zone ids."""
    if not raw:
        return None
    a = raw.strip().strip("[]")
    if a[:5].lower() == "ipv6:":
        a = a[5:]
    a = a.split("%", 1)[0]
    try:
        # ip_address() tries IPv4 first and raises for every IPv6 address.
        return ipaddress.IPv6Address(a) if ":" in a else ipaddress.IPv4Address(a)
    except ValueError:
        return None


def classify(cfg: Config, addr: IPAddress | None, authenticated: bool = False) -> Scope:
    """SPEC §1: in scope means IPv6 (not mapped IPv4), not trusted, not authenticated."""
    if addr is None:
        return Scope.LOCAL
    effective = addr.ipv4_mapped if addr.version == 6 and addr.ipv4_mapped else addr
    if cfg.is_trusted(effective):
        return Scope.TRUSTED
    if authenticated and cfg.skip_authenticated:
        return Scope.AUTHENTICATED
    if addr.version == 4:
        return Scope.IPV4
    if addr.ipv4_mapped:
        return Scope.MAPPED
    return Scope.IPV6


@functools.lru_cache(maxsize=4096)
def address_text(addr: IPAddress) -> str:
    """``str(addr)``, written once per client address (the compressed
    IPv6 form is computed in Python)."""
    return str(addr)


def effective_address(addr: IPAddress) -> IPAddress:
    """An IPv4-mapped address is the IPv4 address it carries."""
    if addr.version == 6 and addr.ipv4_mapped:
        return addr.ipv4_mapped
    return addr


# -- recipient stage -------------------------------------------------------------------


def _address(rcpt: str) -> str:
    """RCPT TO's address without brackets and source route."""
    a = rcpt.strip()
    if a.startswith("<") and a.endswith(">"):
        a = a[1:-1]
    if a.startswith("@") and ":" in a:
        a = a.split(":", 1)[1]
    return a.strip()


def is_postmaster(rcpt: str) -> bool:
    """``<postmaster>`` without a domain, any case (RFC 5321 §4.5.1)."""
    return _address(rcpt).lower() == "postmaster"


def judged(cfg: Config, rcpt: str) -> bool:
    """Whether a recipient brings the policy to bear (SPEC §1): an opted-in
    domain, or no domain at all except ``<postmaster>``.  A recipient without
    a domain belongs to the receiving MTA itself: the milter cannot know
    whether it opted in, but it is no way around the PTR and SPF/DKIM checks."""
    domain = recipient_domain(rcpt)
    if not domain:
        return not is_postmaster(rcpt)
    return cfg.accept_domains.matches(domain)


def recipient_domain(rcpt: str) -> str:
    """The domain of RCPT TO's address, lower case, trailing dot removed."""
    a = _address(rcpt)
    if "@" not in a:
        return ""
    return a.rpartition("@")[2].strip().rstrip(".").lower()


def _reply_domain(domain: str) -> str:
    """The domain as it appears in a reply: ASCII (A-labels), printable, no '%'."""
    d = normalise_domain(domain) if not domain.isascii() else domain
    return re.sub(r"[^\x21-\x7e]|%", "?", d)


def ptr_valid(cfg: Config, iprev: IprevResult) -> bool | None:
    """True/False for ``ReverseDNS``; None when a temporary failure leaves it open."""
    if cfg.reverse_dns == "fcrdns":
        if iprev.result is Iprev.PASS:
            return True
        return None if iprev.result is Iprev.TEMPERROR else False
    if iprev.ptr_temperror:
        return None
    return bool(iprev.names)


def decide_rcpt(cfg: Config, addr: IPAddress, domain: str, iprev: IprevResult | None,
                *, postmaster: bool = False) -> Verdict:
    """One recipient of an in-scope client.

    The opt-in check comes first and wins over any PTR problem (SPEC §1).
    ``<postmaster>`` (``postmaster``, no domain) is never refused; any other
    recipient without a domain never gets the 550 but is judged like an
    opted-in one.  ``iprev`` is only needed for a judged recipient; None
    stands for a lookup that did not finish in time.
    """
    if not domain and postmaster:
        return ACCEPT
    if domain and not cfg.accept_domains.matches(domain):
        return _verdict(cfg, addr, not_opted_in(_reply_domain(domain)), "domain not opted in")
    valid = ptr_valid(cfg, iprev) if iprev is not None else None
    if valid:
        return ACCEPT
    if valid is None:
        return _verdict(
            cfg, addr, dns_tempfail("reverse DNS", addr), "PTR lookup failed temporarily"
        )
    return _verdict(cfg, addr, no_reverse_dns(addr), f"reverse DNS ({cfg.reverse_dns}) not valid")


# -- end of message ---------------------------------------------------------------------


def decide_eom(
    cfg: Config, addr: IPAddress, spf: SpfResult | None, dkim: Sequence[DkimResult],
    alignment: Alignment | None = None,
) -> Verdict:
    """SPF pass or one verified DKIM signature; a temporary error that decides is 4.4.3.

    ``spf`` None stands for an SPF check that did not finish in time.
    ``alignment``: the facts of From-aligned mode (None: ``Alignment off``).
    """
    spf_result = spf.result if spf is not None else "temperror"
    if alignment is not None:
        return _decide_aligned(cfg, addr, spf_result, dkim, alignment)
    if spf_result == "pass" or any(r.result == "pass" for r in dkim):
        return ACCEPT
    if spf_result == "temperror" or any(r.result == "temperror" for r in dkim):
        return _verdict(
            cfg, addr, dns_tempfail("SPF and DKIM", addr),
            "SPF or DKIM key lookup failed temporarily",
        )
    return _verdict(cfg, addr, not_authenticated(addr), "neither SPF nor DKIM passed")


def _aligned_pass(spf_result: str, dkim: Sequence[DkimResult],
                  alignment: Alignment) -> tuple[bool, bool]:
    """Whether SPF, and whether some DKIM signature, passes aligned."""
    spf_ok = spf_result == "pass" and alignment.spf is Aligned.YES
    dkim_ok = any(r.result == "pass" and alignment.of_dkim(i) is Aligned.YES
                  for i, r in enumerate(dkim))
    return spf_ok, dkim_ok


def _open_by_dns(spf_result: str, dkim: Sequence[DkimResult], alignment: Alignment) -> str:
    """What a temporary DNS failure leaves open, when no pass is known to be
    aligned (SPEC §1): a pass whose alignment is unknown, or an SPF or DKIM
    key temperror on a domain aligned or of unknown alignment.  A temporary
    failure on a domain known not to be aligned decides nothing.  "" when
    nothing is open."""
    if spf_result == "pass" and alignment.spf is Aligned.UNKNOWN:
        return "alignment"
    if any(r.result == "pass" and alignment.of_dkim(i) is Aligned.UNKNOWN
           for i, r in enumerate(dkim)):
        return "alignment"
    if spf_result == "temperror" and alignment.spf is not Aligned.NO:
        return "SPF"
    if any(r.result == "temperror" and alignment.of_dkim(i) is not Aligned.NO
           for i, r in enumerate(dkim)):
        return "DKIM"
    return ""


def aligned_summary(spf: SpfResult | None, dkim: Sequence[DkimResult],
                    alignment: Alignment) -> str:
    """The decision log's ``aligned=`` (SPEC §4): ``spf``, ``dkim``,
    ``spf,dkim``, ``none``, or ``unknown`` when a temporary DNS failure
    leaves the outcome open."""
    spf_result = spf.result if spf is not None else "temperror"
    spf_ok, dkim_ok = _aligned_pass(spf_result, dkim, alignment)
    words = [w for w, ok in (("spf", spf_ok), ("dkim", dkim_ok)) if ok]
    if words:
        return ",".join(words)
    return "unknown" if _open_by_dns(spf_result, dkim, alignment) else "none"


def _decide_aligned(cfg: Config, addr: IPAddress, spf_result: str, dkim: Sequence[DkimResult],
                    alignment: Alignment) -> Verdict:
    """From-aligned mode (SPEC §1): a pass counts only when its domain is
    aligned with the From domain (RFC 9989 identifier alignment)."""
    if any(_aligned_pass(spf_result, dkim, alignment)):
        return ACCEPT
    cause = _open_by_dns(spf_result, dkim, alignment)
    if cause == "alignment":
        return _verdict(cfg, addr, dns_tempfail("alignment with the From domain", addr),
                        "_dmarc lookup failed temporarily: alignment of a pass unknown")
    if cause:
        return _verdict(cfg, addr, dns_tempfail("SPF and DKIM", addr),
                        f"{cause} failed temporarily on a domain not known to be unaligned")
    if alignment.from_domain is None:
        why = f"no single From domain ({alignment.from_problem})"
    else:
        why = f"no SPF or DKIM pass aligned with the From domain ({alignment.mode})"
    return _verdict(cfg, addr, not_aligned(addr), why)


# -- staged enforcement -----------------------------------------------------------------


def share_bucket(addr: IPAddress) -> int:
    """0..99 for the client's network: its /64 (an IPv4 client: its /24).

    A digest of the packed prefix, not Python's ``hash()`` (salted per
    process): every worker, every restart and ``ipv6milter-check`` put one
    network in the same bucket, so a sender that retries gets the same
    answer, and raising ``EnforceShare`` only adds networks.
    """
    packed = addr.packed[:8] if addr.version == 6 else addr.packed[:3]
    return int.from_bytes(hashlib.sha256(packed).digest()[:8], "big") % 100


def enforced_for(cfg: Config, addr: IPAddress) -> bool:
    """``Mode enforce`` and the client's network inside ``EnforceShare``."""
    if cfg.monitor:
        return False
    return cfg.enforce_share >= 100 or share_bucket(addr) < cfg.enforce_share


def _verdict(cfg: Config, addr: IPAddress, reply: Reply, reason: str) -> Verdict:
    # Monitor mode, and a client outside EnforceShare: the reply enforce mode
    # would give, recorded, not sent; mode says which handling the client got.
    if enforced_for(cfg, addr):
        return Verdict(reply=reply, enforced=True, reasons=(reason,), mode="enforce")
    if not cfg.monitor:
        reason += f"; not enforced: network outside EnforceShare {cfg.enforce_share}%"
    return Verdict(reply=reply, enforced=False, reasons=(reason,), mode="monitor")
