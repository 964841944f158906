"""Plain facts and results shared by the checks, the policy and the adapter.

Everything here is a frozen value: the checks produce them, ``policy`` decides
from them, the adapter and ``ipv6milter-check`` only carry them around.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass, field

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Scope(enum.StrEnum):
    """Why a client is, or is not, judged by the policy (SPEC §1)."""

    IPV6 = "ipv6"  # in scope
    IPV4 = "ipv4"
    MAPPED = "mapped"  # IPv4-mapped IPv6 address: counts as IPv4
    TRUSTED = "trusted"
    AUTHENTICATED = "authenticated"
    LOCAL = "local"  # no IP peer at all (unix socket, pickup)

    @property
    def in_scope(self) -> bool:
        return self is Scope.IPV6


class Iprev(enum.StrEnum):
    """RFC 8601 §2.7.3 iprev results."""

    PASS = "pass"
    FAIL = "fail"
    PERMERROR = "permerror"
    TEMPERROR = "temperror"


@dataclass(frozen=True)
class IprevResult:
    """Reverse DNS of the client address.

    ``names`` are the PTR names found.  ``ptr_temperror`` says the PTR lookup
    itself failed temporarily; ``result`` is the forward-confirmed verdict
    that the header reports whatever ``ReverseDNS`` says.
    """

    result: Iprev
    names: tuple[str, ...] = ()
    confirmed: str | None = None  # the PTR name that resolved back, if any
    ptr_temperror: bool = False
    detail: str = ""


@dataclass(frozen=True)
class SpfResult:
    """pyspf's verdict for one identity (RFC 7208)."""

    result: str  # pass fail softfail neutral none temperror permerror
    identity: str  # the address or HELO name that was checked
    scope: str  # "mailfrom" or "helo"
    detail: str = ""


@dataclass(frozen=True)
class DkimResult:
    """The outcome of one DKIM-Signature header (RFC 6376)."""

    result: str  # pass fail neutral policy temperror permerror (RFC 8601 §2.7.1)
    domain: str = ""
    selector: str = ""
    b: str = ""  # first characters of b=, to tell signatures apart
    detail: str = ""


class Aligned(enum.StrEnum):
    """Whether one identifier's domain is aligned with the From domain (RFC 9989)."""

    YES = "aligned"
    NO = "not aligned"
    UNKNOWN = "unknown"  # a temporary DNS failure left it open


@dataclass(frozen=True)
class Alignment:
    """From-aligned mode's facts for one message (SPEC §1, ``Alignment``).

    ``from_domain`` is the From domain (A-label, lower case), or None when
    there is no single one (``from_problem`` says why).  ``spf`` is the
    alignment of SPF's domain, ``dkim`` that of each signature's ``d=``, in
    the order of the DKIM results; only passing and temporarily failed
    results are judged (the others stay ``NO``: they cannot pass anyway).
    """

    mode: str  # "relaxed" or "strict"
    from_domain: str | None
    from_problem: str = ""
    spf: Aligned = Aligned.NO
    dkim: tuple[Aligned, ...] = ()

    def of_dkim(self, i: int) -> Aligned:
        return self.dkim[i] if i < len(self.dkim) else Aligned.NO


@dataclass(frozen=True)
class Reply:
    """An SMTP reply, split as libmilter's setreply() wants it."""

    code: str
    xcode: str
    text: str

    @property
    def tempfail(self) -> bool:
        return self.code.startswith("4")

    def __str__(self) -> str:
        return f"{self.code} {self.xcode} {self.text}"


@dataclass(frozen=True)
class Verdict:
    """What the policy decided for one stage.

    ``reply`` is None for accept.  ``enforced`` is False in monitor mode:
    the reply is what enforce mode would have given, only logged.
    """

    reply: Reply | None = None
    enforced: bool = True
    reasons: tuple[str, ...] = field(default=())
    # "enforce" or "monitor": how this client's refusals are handled (a client
    # outside EnforceShare is handled as in monitor mode).
    mode: str = "enforce"

    @property
    def refuses(self) -> bool:
        return self.reply is not None and self.enforced

    @property
    def summary(self) -> str:
        if self.reply is None:
            return "accept"
        return f"{self.reply.code} {self.reply.xcode}"


ACCEPT = Verdict()
