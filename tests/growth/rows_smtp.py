"""Growth rows: the smtp inputs (see harness.py).

Each row hands the argument, as the MTA passes it, to what the milter does
with it: the bound of limits.py's SMTP section (milter.py), then every
parser behind it (the address and domain of MAIL FROM and RCPT TO, IDNA,
the opt-in match, pyspf's reading of the identity up to its first lookup).
Past the bound the cost stays flat: the parsers only ever see the bounded
argument.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from ipv6milter import config, limits, policy
from ipv6milter.milter import bounded_helo, bounded_recipient, sender_too_long
from ipv6milter.resolver import Budget
from ipv6milter.spfcheck import ascii_domain, check_spf
from tests.unit.fakedns import FakeResolver

from .harness import Row

_ADDR = ipaddress.ip_address("2001:db8::25")
_CFG = config.parse("AcceptDomains example.org, .example.net, !.x.example.net\n")
_EMPTY = FakeResolver()  # every lookup is "no data": the cost is the parsing


def _helo(arg: str) -> object:
    helo = bounded_helo(arg)
    return ascii_domain(helo), check_spf(_EMPTY, _ADDR, "<>", helo, Budget(5))


def _mail(arg: str) -> object:
    return sender_too_long(arg) or check_spf(_EMPTY, _ADDR, arg, "mail.example.com", Budget(5))


def _rcpt(arg: str) -> object:
    rcpt = bounded_recipient(arg)
    domain = policy.recipient_domain(rcpt)
    return (policy.judged(_CFG, rcpt),
            policy.decide_rcpt(_CFG, _ADDR, domain, None, postmaster=policy.is_postmaster(rcpt)))


def _row(name: str, shape: str, build: Any, run: Any) -> Row:
    return Row(name, shape, build, run, worst=0.02)


def _within(name: str, shape: str, build: Any, run: Any, bound: int) -> Row:
    """The parsers themselves, from 16 characters up to the bound: what they
    ever see (past it the rows above show the cost flat)."""
    return Row(name, f"{shape}, up to the bound", build, run, largest=bound, smallest=16,
               worst=0.02)


ROWS: list[Row] = [
    _row("HELO argument", "one long label", lambda n: "a" * n, _helo),
    _row("HELO argument", "many labels", lambda n: "a." * (n // 2) + "com", _helo),
    _row("HELO argument", "runs of spaces", lambda n: "mail" + " " * n + "x", _helo),
    _row("HELO argument", "address literal", lambda n: "[IPv6:" + "1:" * (n // 2) + "1]",
         _helo),
    _row("MAIL FROM argument", "long local part", lambda n: f"<{'a' * n}@example.com>", _mail),
    _row("MAIL FROM argument", "many labels", lambda n: f"<a@{'a.' * (n // 2)}com>", _mail),
    _row("MAIL FROM argument", "repeated separators", lambda n: "<" + "@" * n + "a@b.com>",
         _mail),
    _row("MAIL FROM argument", "source route",
         lambda n: "<" + "@r.example," * (n // 11) + "@r.example:a@example.com>", _mail),
    _row("MAIL FROM argument", "runs of spaces", lambda n: "<" + " " * n + "a@example.com>",
         _mail),
    _row("RCPT TO argument", "long local part", lambda n: f"<{'a' * n}@example.org>", _rcpt),
    _row("RCPT TO argument", "many labels",
         lambda n: f"<b@{'a.' * (n // 2)}example.net>", _rcpt),
    _row("RCPT TO argument", "one long label", lambda n: f"<b@{'a' * n}.example.org>", _rcpt),
    _row("RCPT TO argument", "repeated separators", lambda n: "<" + "@:" * (n // 2) + ">",
         _rcpt),
    _row("RCPT TO argument", "runs of spaces", lambda n: "<" + " " * n + "postmaster>", _rcpt),
    _within("HELO argument", "many labels", lambda n: ("a." * n)[: n - 3] + "com", _helo,
            limits.SMTP_DOMAIN),
    _within("MAIL FROM argument", "many labels",
            lambda n: "<a@" + ("a." * n)[: n - 8] + "com>", _mail, limits.SMTP_PATH),
    _within("MAIL FROM argument", "long local part",
            lambda n: "<" + "a" * (n - 14) + "@example.com>", _mail, limits.SMTP_PATH),
    _within("RCPT TO argument", "many labels",
            lambda n: "<b@" + ("a." * n)[: n - 15] + "example.net>", _rcpt, limits.SMTP_PATH),
]
