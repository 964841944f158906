"""Growth rows: the DNS answers a check reads, and the SPF records in them (see harness.py).

Each row runs a whole check (``check_spf``, ``check_iprev``, or the DKIM key
lookup of ``Resolver.dkim_dnsfunc``) on a real ``Resolver`` whose dnspython
``resolve()`` returns answers parsed from wire messages built here, as a
server would send them over TCP (up to 64 KiB): dnspython's parsing, our
answer bounds, the answer cache, the pyspf bridge and pyspf itself are all
on the measured path.  A new resolver is made for each call, so every call
pays for its lookups (no cache hit hides a cost).
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable
from typing import Any

import dns.message
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import dns.reversename
import dns.rrset
from dns.rdtypes.ANY.TXT import TXT

from ipv6milter.iprev import check_iprev
from ipv6milter.resolver import Budget, Resolver
from ipv6milter.spfcheck import check_spf

from .harness import KIB, Row

LARGEST = 63 * KIB  # what a 64 KiB TCP message holds with its headers
# Rows whose 63 KiB input is one full DNS message: dnspython parses it in
# 0.1-0.2 s of CPU whatever it holds (measured, linear); what ipv6milter does
# with it afterwards costs ~10 ms at most.
PARSE_WORST = 0.5

CLIENT = ipaddress.ip_address("2001:db8::25")
SENDER = "<someone@example.com>"
HELO = "mail.example.com"
WIRE_MAX = 65535  # a DNS message over TCP (RFC 1035 §4.2.2)

Records = list[dns.rdata.Rdata]
Zone = dict[tuple[str, str], Records]


def rdata(rdtype: str, text: str) -> dns.rdata.Rdata:
    return dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.from_text(rdtype), text)


def txt_rdata(*strings: bytes) -> dns.rdata.Rdata:
    return TXT(dns.rdataclass.IN, dns.rdatatype.TXT, strings)


def spf_txt(record: str) -> dns.rdata.Rdata:
    """``record`` in 255-byte strings, as zone files and servers split it."""
    data = record.encode("ascii")
    return txt_rdata(*(data[i:i + 255] for i in range(0, len(data), 255)))


def wire(name: str, rdtype: str, records: Records) -> bytes:
    q = dns.message.make_query(name, rdtype)
    response = dns.message.make_response(q)
    if records:
        rrset = dns.rrset.from_rdata_list(dns.name.from_text(name), 300, records)
        response.answer.append(rrset)
    return response.to_wire(max_size=WIRE_MAX)


class WireResolver(Resolver):
    """The real Resolver; resolve() parses the wire message of each name."""

    def __init__(self, wires: dict[tuple[str, str], Any], **kwargs: Any):
        super().__init__((("127.0.0.1", 9),), timeout=5.0, **kwargs)
        self._wires = wires
        self.resolved: list[tuple[str, str]] = []  # what reached dnspython (cache misses)

        def resolve(name: Any, rdtype: Any, **_kw: Any) -> dns.resolver.Answer:
            key = (str(name).lower().rstrip("."), str(rdtype))
            self.resolved.append(key)
            message = self._wires.get(key) or wire(key[0] + ".", key[1], [])
            if callable(message):  # rendered when first asked, then kept
                message = self._wires[key] = message()
            response = dns.message.from_wire(message)
            return dns.resolver.Answer(dns.name.from_text(key[0]),
                                       dns.rdatatype.from_text(key[1]),
                                       dns.rdataclass.IN, response)

        self._r.resolve = resolve  # type: ignore[method-assign]


def padded(name: str, rdtype: str, records: Records, pad: int) -> bytes:
    """A response whose additional section carries ``pad`` bytes of AAAA
    records of another name: parsed by dnspython, never used."""
    q = dns.message.make_query(name, rdtype)
    response = dns.message.make_response(q)
    if records:
        response.answer.append(dns.rrset.from_rdata_list(dns.name.from_text(name), 300, records))
    response.additional.append(_padding(pad))
    return response.to_wire(max_size=WIRE_MAX)


@functools.lru_cache(maxsize=16)
def _padding(pad: int) -> dns.rrset.RRset:
    base = ipaddress.ip_address("2001:db8:ffff::")
    extra = [rdata("AAAA", str(base + k)) for k in range(max(1, pad // 28))]
    return dns.rrset.from_rdata_list(dns.name.from_text("pad.example."), 300, extra)


def mx_fanout(pad: int) -> dict[tuple[str, str], Any]:
    """10 mx terms of 10 names each (RFC 7208's most lookups: 111), every
    address answer padded with ``pad`` bytes (rendered when first asked)."""
    terms = " ".join(f"mx:m{i}.example.com" for i in range(10))
    wires = {("example.com", "TXT"): wire("example.com.", "TXT", [spf_txt(f"v=spf1 {terms} -all")])}
    for i in range(10):
        names = [rdata("MX", f"{j} h{i}x{j}.example.com.") for j in range(10)]
        wires[(f"m{i}.example.com", "MX")] = wire(f"m{i}.example.com.", "MX", names)
        for j in range(10):
            wires[(f"h{i}x{j}.example.com", "AAAA")] = functools.partial(
                padded, f"h{i}x{j}.example.com.", "AAAA", [rdata("AAAA", "2001:db8:ffff::1")],
                pad)
    return wires


def zone(records: Zone) -> dict[tuple[str, str], bytes]:
    return {key: wire(key[0] + ".", key[1], rds) for key, rds in records.items()}


def spf(wires: dict[tuple[str, str], Any]) -> object:
    return check_spf(WireResolver(wires), CLIENT, SENDER, HELO, Budget(60)).result


def iprev(wires: dict[tuple[str, str], bytes]) -> object:
    return check_iprev(WireResolver(wires), CLIENT, Budget(60)).result


def dkim_key(wires: dict[tuple[str, str], bytes]) -> object:
    r = WireResolver(wires)
    return r.dkim_dnsfunc(Budget(60))(b"sel._domainkey.example.com")


def _record(n: int, prefix: str, term: Callable[[int], str], suffix: str = " -all") -> str:
    """An SPF record of about ``n`` bytes: ``prefix``, terms, ``suffix``."""
    parts = [prefix]
    size, k = len(prefix) + len(suffix), 0
    while size < n:
        t = " " + term(k)
        parts.append(t)
        size += len(t)
        k += 1
    return "".join(parts) + suffix


def _spf_row(shape: str, record: Callable[[int], str], extra: Zone | None = None,
             largest: int = LARGEST) -> Row:
    def build(n: int) -> dict[tuple[str, str], bytes]:
        return zone({("example.com", "TXT"): [spf_txt(record(n))], **(extra or {})})

    return Row("SPF record (TXT)", shape, build, spf, largest=largest)


def _long_label(n: int) -> str:
    # issue 16 item 1: pyspf's RE_TOPLAB backtracks over the long label
    return f"v=spf1 a:x.{'a' * max(1, n - 20)}.y -all"


def _reverse() -> str:
    return dns.reversename.from_address(str(CLIENT)).to_text(omit_final_dot=True)


def _ptr_names(n: int, length: int) -> Zone:
    """PTR records of ``length``-character names (labels of 63) filling ``n`` bytes."""
    labels = max(1, length // 64)
    out = []
    for k in range(max(1, n // (64 * labels + 13))):
        head = f"h{k}"
        name = ".".join([head + "a" * (63 - len(head))] + ["b" * 63] * (labels - 1)) + "."
        out.append(rdata("PTR", name))
    return {(_reverse(), "PTR"): out}


def _aaaa(n: int) -> Records:
    # 28 bytes a record on the wire; the client's own address last
    count = max(1, n // 29)
    return [rdata("AAAA", str(CLIENT + 1 + k)) for k in range(count - 1)] + [
        rdata("AAAA", str(CLIENT))]


def _iprev_row(shape: str, build_zone: Callable[[int], Zone], largest: int = LARGEST) -> Row:
    return Row("PTR and address answers (iprev)", shape, lambda n: zone(build_zone(n)), iprev,
               largest=largest, worst=PARSE_WORST)


ROWS: list[Row] = [
    _spf_row("one long label in a domain-spec", _long_label),
    _spf_row("labels of 63 letters in many domain-specs",
             lambda n: _record(n, "v=spf1", lambda k: f"?exists:x{k}.{'a' * 63}.{'b' * 63}.c")),
    _spf_row("many ip6 mechanisms",
             lambda n: _record(n, "v=spf1", lambda k: f"ip6:2001:db8:{k:x}::/48")),
    _spf_row("repeated separators (spaces)", lambda n: "v=spf1" + " " * max(1, n - 12) + "-all"),
    _spf_row("repeated dots in a domain-spec", lambda n: f"v=spf1 a:x{'.' * max(1, n - 16)}y -all"),
    _spf_row("macro-heavy domain-specs",
             lambda n: _record(n, "v=spf1",
                               lambda k: f"?exists:%{{l}}.%{{i}}.%{{d2}}.%{{h}}.k{k}.x")),
    _spf_row("unclosed macros in a domain-spec",
             lambda n: f"v=spf1 exists:{'%{.' * max(1, (n - 30) // 3)}x -all"),
    _spf_row("unknown modifier with many dots and a macro",
             lambda n: f"v=spf1 -all x-foo=%{{d}}{'.a' * max(1, (n - 30) // 2)}"),
    Row("SPF explanation (exp= TXT)", "dots and a macro",
        lambda n: zone({("example.com", "TXT"): [spf_txt("v=spf1 -all exp=exp.example.com")],
                        ("exp.example.com", "TXT"): [spf_txt("%{d}" + "." * max(1, n - 8))]}),
        spf, largest=LARGEST),
    Row("SPF record (TXT)", "one record of one-byte strings",
        lambda n: zone({("example.com", "TXT"): [
            txt_rdata(b"v=spf1 ", *([b" "] * max(1, n // 2 - 16)), b"-all")]}),
        spf, largest=LARGEST, worst=PARSE_WORST),
    Row("TXT answer (SPF)", "many short records beside the SPF record",
        lambda n: zone({("example.com", "TXT"): [spf_txt("v=spf1 -all")] + [
            txt_rdata(f"site-verification={k:08d}".encode()) for k in range(max(1, n // 40))]}),
        spf, largest=LARGEST, worst=PARSE_WORST),
    Row("address answer (SPF a)", "many AAAA records",
        lambda n: zone({("example.com", "TXT"): [spf_txt("v=spf1 a:big.example.com -all")],
                        ("big.example.com", "AAAA"): _aaaa(n)}),
        spf, largest=LARGEST, worst=PARSE_WORST),
    Row("MX answer (SPF mx)", "many MX records with long names",
        lambda n: zone({("example.com", "TXT"): [spf_txt("v=spf1 mx -all")],
                        ("example.com", "MX"): [
                            rdata("MX", f"{k} m{k:04d}{'a' * 58}.{'b' * 63}.{'c' * 63}.example.")
                            for k in range(max(1, n // 220))]}),
        spf, largest=LARGEST, worst=PARSE_WORST),
    Row("PTR answer (SPF ptr)", "many long PTR names",
        lambda n: zone({("example.com", "TXT"): [spf_txt("v=spf1 ptr -all")],
                        **_ptr_names(n, 3)}),
        spf, largest=LARGEST, worst=PARSE_WORST),
    _iprev_row("many long PTR names", lambda n: _ptr_names(n, 3)),
    _iprev_row("many short PTR names", lambda n: _ptr_names(n, 1)),
    _iprev_row("many AAAA records for the PTR name",
               lambda n: {(_reverse(), "PTR"): [rdata("PTR", "mail.example.com.")],
                          ("mail.example.com", "AAAA"): _aaaa(n)}),
    # RFC 7208's most lookups (111) cost ~0.25 s whatever their size; past
    # DNS_STAGE_BYTES no more is asked: at most ~3 padded responses parsed.
    Row("DNS messages of one stage (SPF)", "111 address answers padded in their additional section",
        mx_fanout, spf, largest=62 * KIB, worst=0.75),
    Row("DKIM key (TXT)", "one record of one-byte strings",
        lambda n: zone({("sel._domainkey.example.com", "TXT"): [
            txt_rdata(b"v=DKIM1; p=", *([b"A"] * max(1, n // 2 - 16)))]}),
        dkim_key, largest=LARGEST, worst=PARSE_WORST),
    Row("DKIM key (TXT)", "many records",
        lambda n: zone({("sel._domainkey.example.com", "TXT"): [
            txt_rdata(f"v=DKIM1; p=AAAA{k}".encode()) for k in range(max(1, n // 36))]}),
        dkim_key, largest=LARGEST, worst=PARSE_WORST),
]
