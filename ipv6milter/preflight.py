"""Before and after dropping privileges: load what loads lazily, then judge once.

Several libraries import code only when they first need it: dnspython the
module of each record type it meets in an answer, dkimpy its crypto, the
``idna`` codec, prometheus-client its exposition.  Installed where the
``UserID`` user cannot read the package (a checkout in a 0700 directory, a
virtualenv under /root), such an import fails after the switch, and it fails
per message: an AAAA answer parsed without its module is ``GenericRdata``
and every message gets ``451 4.3.0``.  So everything is loaded while the
milter can still read it (``preload``), and after the switch a complete
judgement runs once on an in-memory DNS (``judge``): PTR and its
forward-confirming AAAA, SPF over TXT, an include and MX, one DKIM signature
verified, the policy and our header built and parsed back.  If that cannot
work the milter exits at start, with the reason, instead of deferring mail.
"""

from __future__ import annotations

import dataclasses
import importlib
import ipaddress
from typing import Any

from .config import Config
from .resolver import Budget, Resolver

# Record types our checks ask for or meet in answers (CNAME chains, SOA in
# negative answers, SPF's mx/a/ptr/exists mechanisms).
_MODULES = (
    "dns.rdtypes.ANY.PTR", "dns.rdtypes.ANY.CNAME", "dns.rdtypes.ANY.DNAME",
    "dns.rdtypes.ANY.TXT", "dns.rdtypes.ANY.SPF", "dns.rdtypes.ANY.MX",
    "dns.rdtypes.ANY.SOA", "dns.rdtypes.ANY.NS", "dns.rdtypes.ANY.OPT",
    "dns.rdtypes.IN.A", "dns.rdtypes.IN.AAAA",
    "dns.rdtypes.txtbase", "dns.rdtypes.mxbase", "dns.rdtypes.nsbase",
    "dns.message", "dns.query", "dns.resolver", "dns.reversename", "dns.edns",
    "dns.rdtypes.dnskeybase", "dns.name", "dns.ipv4", "dns.ipv6",
    "encodings.idna", "encodings.punycode", "idna", "idna.uts46data",
    "dkim", "dkim.crypto", "dkim.asn1", "dkim.util", "dkim.canonicalization",
    "spf", "authres", "authres.core",
    "email.parser", "email.feedparser", "email.message", "email.utils",
    "prometheus_client", "prometheus_client.exposition", "prometheus_client.multiprocess",
    "prometheus_client.mmap_dict", "prometheus_client.openmetrics.exposition",
    "http.server", "socketserver", "logging.handlers", "selectors", "hashlib", "hmac",
)
# Only present where their extras are installed: ed25519 keys (PyNaCl),
# dkimpy's optional pieces, OpenSSL through pyca/cryptography.
_OPTIONAL = (
    "nacl.signing", "nacl.encoding", "nacl.bindings", "dkim.dnsplug",
    "cryptography.hazmat.primitives.hashes", "cryptography.hazmat.primitives.serialization",
    "cryptography.hazmat.primitives.asymmetric.rsa",
    "cryptography.hazmat.primitives.asymmetric.padding",
    "cryptography.hazmat.primitives.asymmetric.utils",
    "cryptography.hazmat.primitives.asymmetric.ed25519",
)

_DOMAIN = "preflight.invalid"
_CLIENT = ipaddress.ip_address("2001:db8::25")
_HOST = f"mail.{_DOMAIN}"
# A throwaway 1024-bit key made for this check, and a message signed with it.
_KEY = (
    "MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQC8e0xNkANnoUHW9csn+Cf3F2ow7DJGFCLwEe3+dif4qjKp8p2A5TTK"
    "DpQ7dKz7X8+KKziI5EZyV1bPPLCXwwouxzNOAg9RGWYXfFD9bu2dTHKVSafmfY3POlAgdD+7/BLJbwQJ9q8BuClg/Ss0"
    "KwRvHCePZAF9NxIvmotHVR1yuQIDAQAB"
)
_MESSAGE = (
    b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/simple; d=preflight.invalid;\r\n"
    b" i=@preflight.invalid; q=dns/txt; s=s; t=1796138019; h=from : to :\r\n"
    b" subject; bh=Q/nqrG76D1yCJ6MiEowivjquN9vyx+XnI/ttRpsQS1k=;\r\n"
    b" b=Ncx0lBK/rfHme277/gOlwhiATYK8k7RhySNoV2hog4YokDxowciWE2D2jrarpMyNJqkhN\r\n"
    b" fiYXhLCcAUZFbo7spFrel/47MqrhJBP/OJc9HHsLbHZBPgdU2aZOAbkS2BSHFNc0Y/5ClUM\r\n"
    b" wvndIDlVsS21/eQtPDf/iJjakHz8wBE=\r\n"
    b"From: check@preflight.invalid\r\nTo: postmaster@preflight.invalid\r\n"
    b"Subject: preflight\r\n\r\nThe milter checks itself after switching users.\r\n"
)
_ZONE = {
    ("5.2.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa", "PTR"):
        [f"{_HOST}."],
    (_HOST, "AAAA"): [str(_CLIENT)],
    (_HOST, "A"): ["192.0.2.25"],
    (_DOMAIN, "TXT"): [f'"v=spf1 include:_spf.{_DOMAIN} mx -all"'],
    (f"_spf.{_DOMAIN}", "TXT"): ['"v=spf1 ip4:192.0.2.0/24 -all"'],
    (_DOMAIN, "MX"): [f"10 {_HOST}."],
    (f"s._domainkey.{_DOMAIN}", "TXT"): [f'"v=DKIM1; k=rsa; p={_KEY}"'],
}


class PreflightError(Exception):
    """The milter could not judge a message: the reason, for the admin."""


def preload() -> list[str]:
    """Import everything that is imported lazily; returns what is not installed."""
    for name in _MODULES:
        importlib.import_module(name)
    missing = []
    for name in _OPTIONAL:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


class _WireZone(Resolver):
    """Answers from memory, parsed from DNS wire format exactly as real answers are.

    The wire form is made while the zone is built (before the switch);
    ``query`` only parses, so it needs the same modules a real answer does.
    """

    def __init__(self) -> None:
        super().__init__(nameservers=(("127.0.0.1", 9),), timeout=1.0)
        import dns.message
        import dns.rdata
        import dns.rdataclass
        import dns.rdatatype

        self._wire: dict[tuple[str, str], bytes] = {}
        for (name, rdtype), texts in _ZONE.items():
            q = dns.message.make_query(name, rdtype)
            resp = dns.message.make_response(q)
            rrset = resp.find_rrset(resp.answer, q.question[0].name, dns.rdataclass.IN,
                                    dns.rdatatype.from_text(rdtype), create=True)
            for text in texts:
                rrset.add(dns.rdata.from_text(dns.rdataclass.IN, rdtype, text), 300)
            self._wire[(name, rdtype)] = resp.to_wire()

    def query(self, name: Any, rdtype: str, budget: Budget) -> list[Any]:
        import dns.message

        wire = self._wire.get((str(name).lower().rstrip("."), rdtype))
        if wire is None:
            return []
        msg = dns.message.from_wire(wire)
        return [r for rrset in msg.answer for r in rrset]


class Preflight:
    """Built before the switch (``preload`` included), run after it."""

    def __init__(self) -> None:
        try:
            self.missing = preload()
            self.zone = _WireZone()
        except Exception as e:  # anything at all: the milter cannot work
            raise PreflightError(f"{type(e).__name__}: {e}") from e

    def judge(self, cfg: Config) -> str:
        """Judge the synthetic message; the header on success, PreflightError otherwise."""
        from . import authresults, policy
        from .engine import Engine
        from .metrics import Metrics

        cfg = dataclasses.replace(cfg, reverse_dns="fcrdns", max_signatures=1,
                                  stage_timeout=5.0, dns_timeout=1.0)
        engine = Engine(cfg, resolver=self.zone, workers=1, metrics=Metrics())
        try:
            iprev = engine.iprev(_CLIENT)
            spf = engine.spf(_CLIENT, f"check@{_DOMAIN}", _HOST)
            dkim = engine.dkim(_MESSAGE)
            verdict = policy.decide_eom(cfg, _CLIENT, spf, dkim)
            header = authresults.build("preflight.invalid", _CLIENT, iprev, spf, dkim)
            parsed = authresults.parse(header)
        except Exception as e:  # any failure here is the answer asked for
            raise PreflightError(f"{type(e).__name__}: {e}") from e
        finally:
            engine.shutdown()
        found = {r.method: r.result for r in parsed.results}
        want = {"iprev": "pass", "spf": "pass", "dkim": "pass"}
        if found != want or verdict.refuses or not policy.ptr_valid(cfg, iprev):
            raise PreflightError(
                f"expected {want}, got {found} ({iprev.detail}; spf {spf.result}; "
                f"dkim {', '.join(f'{r.result} {r.detail}' for r in dkim)})")
        return header
