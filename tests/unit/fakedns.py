"""A dict zone behind the real Resolver interface, for the unit layers.

Names map to record texts in zone-file syntax (TXT values are given bare and
quoted here, split into 255-byte strings as a DNS server would); ``TEMP`` makes
a lookup fail temporarily.  ``asked`` records every query, so tests can assert
that no unexpected name was looked up.
"""

from __future__ import annotations

from typing import Any

import dns.rdata
import dns.rdataclass
import dns.rdatatype

from ipv6milter.resolver import Budget, Resolver, TempFail

TEMP = "TEMP"


def _txt(value: str) -> str:
    chunks = [value[i : i + 255] for i in range(0, len(value), 255)] or [""]
    return " ".join('"' + c.replace("\\", "\\\\").replace('"', '\\"') + '"' for c in chunks)


class FakeResolver(Resolver):
    def __init__(self, zone: dict[tuple[str, str], Any] | None = None, timeout: float = 5.0):
        super().__init__(nameservers=(("127.0.0.1", 9),), timeout=timeout)
        self.zone: dict[tuple[str, str], Any] = {}
        self.asked: list[tuple[str, str]] = []
        for (name, rdtype), value in (zone or {}).items():
            self.add(name, rdtype, value)

    def add(self, name: str, rdtype: str, value: Any) -> None:
        key = (name.lower().rstrip("."), rdtype)
        if value == TEMP:
            self.zone[key] = TEMP
            return
        values = [value] if isinstance(value, str) else list(value)
        self.zone.setdefault(key, []).extend(values)

    def query(self, name: Any, rdtype: str, budget: Budget) -> list[Any]:
        n = str(name).lower().rstrip(".")
        self.asked.append((n, rdtype))
        if budget.remaining() <= 0:
            raise TempFail("budget spent")
        value = self.zone.get((n, rdtype), [])
        if value == TEMP:
            budget.note(f"{n} {rdtype}: temporary failure")
            raise TempFail(f"{n} {rdtype}: timeout")
        out = []
        for text in value:
            if rdtype in ("TXT", "SPF"):
                text = _txt(text)
            rdt = dns.rdatatype.from_text(rdtype)
            out.append(dns.rdata.from_text(dns.rdataclass.IN, rdt, text))
        budget.note(f"{n} {rdtype}: {len(out)} record(s)")
        return out
