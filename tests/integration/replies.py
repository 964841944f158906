"""SPEC §1's reply texts, written out here on their own (not taken from
ipv6milter.policy), so that the tests hold the code to the specification."""

from __future__ import annotations

import re

TEMPFAIL_DNS = re.compile(r"451 4\.4\.3 \S")


def not_opted_in(domain: str) -> str:
    return f"550 5.2.1 Service unavailable, [{domain}] does not accept email over IPv6."


def no_ptr(addr: str) -> str:
    return (
        f"450 4.7.25 Service unavailable, sending IPv6 address [{addr}] must have reverse DNS"
        " record."
    )


def not_authenticated(addr: str) -> str:
    return (
        f"450 4.7.26 Service unavailable, message sent over IPv6 [{addr}] must pass either SPF"
        " or DKIM validation."
    )
