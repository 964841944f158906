"""The DNS data of the reliability tests, served by a real Knot.

On top of the integration tests' zones (``harness.build_zones``):

* ``stream.test``: one client identity per message of the fault stream, so
  that every message asks DNS something not yet cached (a fault must bite):
  client ``2001:db8:1::N`` has PTR ``cN.stream.test``, which has that AAAA
  and an SPF record; ``*.fail.stream.test`` fails SPF; every selector under
  ``_domainkey.stream.test`` has the stream's DKIM key (a wildcard).
* ``hostile.test``: SPF records that break RFC 7208's limits, CNAME chains
  and loops, TXT strings split across 255-byte chunks, and DKIM key records
  that are weak, revoked or broken.
"""

from __future__ import annotations

import ipaddress

import dns.reversename

from tests.dkimkeys import make_key
from tests.integration.harness import REVERSE_ZONE, build_zones

STREAM = "stream.test"
STREAM_NET = ipaddress.ip_network("2001:db8:1::/48")
HOSTILE = "hostile.test"
HOSTILE_IP = "2001:db8:2::25"  # PTR mail.hostile.test, which confirms
MAX_STREAM = 4000  # client identities in stream.test


def stream_addr(n: int) -> str:
    return str(STREAM_NET[n + 1])


def stream_host(n: int) -> str:
    return f"c{n}.{STREAM}"


def txt(text: str) -> str:
    """A TXT rdata in zone-file syntax: strings of at most 255 characters."""
    parts = [text[i : i + 255] for i in range(0, len(text), 255)] or [""]
    return " ".join('"' + p.replace("\\", "\\\\").replace('"', '\\"') + '"' for p in parts)


def _rel_ptr(addr: str) -> str:
    return dns.reversename.from_address(addr).to_text().removesuffix(f".{REVERSE_ZONE}.")


def stream_key() -> tuple[bytes, str]:
    return make_key(1024, STREAM)


def weak_key() -> tuple[bytes, str]:
    return make_key(512, "weak")


def hostile_key() -> tuple[bytes, str]:
    return make_key(1024, HOSTILE)


def _long_spf() -> str:
    """An SPF record of ~900 characters: the mechanism that matches comes
    after three 255-byte chunk boundaries, one of which cuts a mechanism."""
    fillers = " ".join(f"ip6:2001:db8:ff{i:02x}::/48" for i in range(40))
    return f"v=spf1 {fillers} ip6:{HOSTILE_IP} -all"


def build_all_zones() -> dict[str, list[str]]:
    zones = build_zones()
    reverse = zones[REVERSE_ZONE]
    stream: list[str] = [
        f"*.fail TXT {txt('v=spf1 -all')}",
        f"*._domainkey TXT {txt(stream_key()[1])}",
    ]
    spf = txt(f"v=spf1 ip6:{STREAM_NET} -all")
    for n in range(MAX_STREAM):
        reverse.append(f"{_rel_ptr(stream_addr(n))} PTR {stream_host(n)}.")
        stream.append(f"c{n} AAAA {stream_addr(n)}")
        stream.append(f"c{n} TXT {spf}")
    zones[STREAM] = stream

    reverse.append(f"{_rel_ptr(HOSTILE_IP)} PTR mail.{HOSTILE}.")
    pass_spf = f"v=spf1 ip6:{HOSTILE_IP} -all"
    hostile = [
        f"mail AAAA {HOSTILE_IP}",
        f"mail TXT {txt(pass_spf)}",
        # RFC 7208 §4.6.4: more than 10 DNS-querying terms is permerror.
        "toomany TXT "
        + txt(f"v=spf1 {' '.join(f'a:n{i}.{HOSTILE}' for i in range(11))} ip6:{HOSTILE_IP} -all"),
        *(f"n{i} AAAA 2001:db8:ffff::{i + 1:x}" for i in range(11)),
        f"loop TXT {txt(f'v=spf1 include:loop.{HOSTILE} -all')}",
        f"loopa TXT {txt(f'v=spf1 include:loopb.{HOSTILE} -all')}",
        f"loopb TXT {txt(f'v=spf1 include:loopa.{HOSTILE} -all')}",
        # RFC 7208 §4.5: two SPF records is permerror.
        f"two TXT {txt(pass_spf)}",
        f"two TXT {txt('v=spf1 -all')}",
        # RFC 7208 §4.6.4: more than two void lookups is permerror.
        "void TXT "
        + txt(f"v=spf1 a:v1.{HOSTILE} a:v2.{HOSTILE} a:v3.{HOSTILE} ip6:{HOSTILE_IP} -all"),
        f"long TXT {txt(_long_spf())}",
        # CNAME chains inside the zone (Knot follows them in its answer).
        f"chain CNAME chain1.{HOSTILE}.",
        *(f"chain{i} CNAME chain{i + 1}.{HOSTILE}." for i in range(1, 5)),
        f"chain5 TXT {txt(pass_spf)}",
        f"cloop CNAME cloop2.{HOSTILE}.",
        f"cloop2 CNAME cloop.{HOSTILE}.",
        f"deep CNAME deep1.{HOSTILE}.",
        *(f"deep{i} CNAME deep{i + 1}.{HOSTILE}." for i in range(1, 24)),
        f"deep24 TXT {txt(pass_spf)}",
        # An include whose target is a CNAME loop.
        f"incloop TXT {txt(f'v=spf1 include:cloop.{HOSTILE} -all')}",
        # IDN senders: bücher, and faß, which IDNA 2003 would turn into fass.
        f"xn--bcher-kva TXT {txt(pass_spf)}",
        f"xn--fa-hia TXT {txt(pass_spf)}",
        f"fass TXT {txt('v=spf1 -all')}",
        # An explanation (exp=) trying to inject into replies and headers.
        f"exp TXT {txt(f'v=spf1 -all exp=why.{HOSTILE}')}",
        # \013\010: CR LF, as zone-file decimal escapes.
        'why TXT "evil; dkim=pass (x) \\013\\010X-Injected: %{s} 1"',
        # DKIM key records: good, 512-bit, revoked, broken.
        f"good._domainkey TXT {txt(hostile_key()[1])}",
        f"weak._domainkey TXT {txt(weak_key()[1])}",
        f"revoked._domainkey TXT {txt('v=DKIM1; k=rsa; p=')}",
        f"badb64._domainkey TXT {txt('v=DKIM1; k=rsa; p=!!!not*base64!!!')}",
        f"notakey._domainkey TXT {txt('v=DKIM1; k=rsa; p=' + 'QUFBQUFB' * 20)}",
        f"unknownk._domainkey TXT {txt('v=DKIM1; k=foo; ' + hostile_key()[1].split('; ', 1)[1])}",
        f"nop._domainkey TXT {txt('v=DKIM1; k=rsa')}",
        f"badv._domainkey TXT {txt('v=DKIM9; ' + hostile_key()[1].split('; ', 1)[1])}",
        f"garbage._domainkey TXT {txt(';;;=;=;==;' * 30)}",
        f"cname._domainkey CNAME good._domainkey.{HOSTILE}.",
        f"kloop._domainkey CNAME kloop2._domainkey.{HOSTILE}.",
        f"kloop2._domainkey CNAME kloop._domainkey.{HOSTILE}.",
    ]
    zones[HOSTILE] = hostile
    return zones
