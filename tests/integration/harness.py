"""The servers of the integration tests: Knot DNS, an SMTP sink, a private
Postfix and the milter, each started for real and stopped again.

The servers themselves are started by tests/lab.py, which the reliability
tests, the operations tests and the benchmark share; this module holds what
the integration tests serve with them (the zones, the XCLIENT client
addresses, the Postfix settings) and keeps every name the tests import from
here.

Everything listens on loopback only (127.0.0.1 and ::1); the 2001:db8::/32,
3fff::/20 and 192.0.2.0/24 client addresses exist only as XCLIENT claims,
except the lab's 2001:db8:6::/64 and 198.18.0.0/30 (or its next free slot,
see LabAddresses): real clients in the network namespace of netlab.py, whose
MTAs also listen on the lab link.
Readiness is always polled for, never assumed after a fixed sleep.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import dkim
import dns.reversename
import nacl.signing

from tests import lab
from tests.dkimkeys import make_key
from tests.lab import (  # noqa: F401  (re-exported: the tests import them from here)
    LOOPBACKS,
    MASTER_CF,
    Sink,
    SinkMessage,
    _kill_leftover_master,
    _path,
    _SinkHandler,
    _SinkServer,
    free_port,
    log_offsets,
    log_sections,
    log_tail,
    milter_command,
    run_sink,
    tcp_open,
    wait_until,
    zone_file,
    zone_ready,
)
from tests.lab import LabError as HarnessError
from tests.lab import MilterRunner as MilterProcess
from tests.lab import Postfix as PostfixInstance
from tests.lab import postfix_command as _postfix  # noqa: F401
from tests.lab import process_gone as _process_gone  # noqa: F401
from tests.lab import smtp_greets as _smtp_greets  # noqa: F401
from tests.lab import stop_process as _stop_process  # noqa: F401
from tests.lab import txt as _txt

AUTHSERV_ID = "mx.test.example"


def _bindable(port: int) -> bool:
    return all(lab.bindable(h, port) for h in LOOPBACKS)


# -- DNS: Knot, authoritative for zones generated here ------------------------------

# The client addresses the tests claim with XCLIENT, and what DNS says about them.
GOOD_IP = "2001:db8::25"  # PTR mail.example.com, which has AAAA 2001:db8::25 (FCrDNS)
UNCONFIRMED_IP = "2001:db8::26"  # PTR mail.example.net, which has no AAAA
NOPTR_IP = "2001:db8::dead"  # no PTR (NXDOMAIN inside Knot's reverse zone)
REFUSED_IP = "3fff::25"  # reverse name outside Knot's zones: REFUSED, a temporary failure
IPV4_IP = "192.0.2.10"


# -- the lab network (netlab.py): real clients on a veth link -------------------------


@dataclass(frozen=True)
class LabAddresses:
    """The addresses of one lab link, and what the test DNS says about each.

    Slot 0 is 2001:db8:6::/64 and 198.18.0.0/30 (RFC 2544's benchmarking
    range); a test session that finds a slot taken (another session's lab,
    or this machine's own network) takes the next free one.
    """

    slot: int
    link6: ipaddress.IPv6Network
    link4: ipaddress.IPv4Network
    host6: str  # the MTAs listen here, in the main namespace
    host4: str
    good: str  # PTR lab.example.com, which has AAAA back (FCrDNS); SPF pass
    unconfirmed: str  # PTR lab.example.net, which has no AAAA; SPF pass
    noptr: str  # no PTR
    authenticated: str  # no PTR; the MTAs treat it as SASL-authenticated
    trusted: str  # in the lab milter's TrustedHosts
    ipv4: str

    @classmethod
    def for_slot(cls, slot: int) -> LabAddresses:
        link6 = ipaddress.IPv6Network(f"2001:db8:6:{slot:x}::/64")
        link4 = ipaddress.IPv4Network(f"198.18.0.{4 * slot}/30")

        def v6(host: int) -> str:
            return str(link6.network_address + host)

        return cls(
            slot=slot,
            link6=link6,
            link4=link4,
            host6=v6(0x1),
            host4=str(link4.network_address + 1),
            good=v6(0x25),
            unconfirmed=v6(0x26),
            noptr=v6(0xDEAD),
            authenticated=v6(0xA),
            trusted=v6(0x7),
            ipv4=str(link4.network_address + 2),
        )

    def ipv6_clients(self) -> list[str]:
        return [self.good, self.unconfirmed, self.noptr, self.authenticated, self.trusted]


LAB_SLOTS = 4
LAB_SPF = "lab.example.com"  # the lab clients' sender domain and HELO name

REVERSE_ZONE = "8.b.d.0.1.0.0.2.ip6.arpa"
OPTED_IN = ("example.com", "example.net")
NOT_OPTED_IN = "example.org"
SELECTOR = "sel1"
UNSERVED = "unserved.invalid"  # no zone at Knot: REFUSED
VOID_SPF = "voidspf.test"  # SPF passes for GOOD_IP only after three void lookups


@dataclass
class DnsWorld:
    """Knot's address and what it serves."""

    port: int
    zones: dict[str, list[str]]
    keys: dict[str, bytes]  # signing domain -> private key (PEM), selector SELECTOR
    log: Path
    good_ip: str = GOOD_IP
    unconfirmed_ip: str = UNCONFIRMED_IP
    noptr_ip: str = NOPTR_IP
    refused_ip: str = REFUSED_IP
    ipv4_ip: str = IPV4_IP
    selector: str = SELECTOR
    opted_in: tuple[str, ...] = OPTED_IN  # what the milters' AcceptDomains lists
    not_opted_in: str = NOT_OPTED_IN
    port53: str | None = None  # a loopback address where Knot also answers on port 53

    @property
    def nameserver(self) -> str:
        return f"127.0.0.1:{self.port}"

    def sign(
        self,
        message: bytes,
        domain: str,
        selector: str = SELECTOR,
        key_domain: str | None = None,
    ) -> bytes:
        """``message`` with a DKIM-Signature prepended (relaxed/simple).

        ``key_domain`` signs with another domain's key: a signature that fails.
        """
        key = self.keys[key_domain or domain]
        sig = dkim.sign(
            message,
            selector.encode(),
            domain.encode(),
            key,
            canonicalize=(b"relaxed", b"simple"),
            include_headers=[b"from", b"to", b"subject", b"date", b"message-id"],
        )
        return sig + message


SIGNING_DOMAINS = ("example.com", "spffail.test")
# spffail.test also publishes an ed25519 key (RFC 8463) under this selector.
ED25519_SELECTOR = "ed"
_ED25519_SEED = bytes(range(1, 33))  # a fixed test key: the zones are reproducible


def ed25519_key() -> tuple[bytes, str]:
    """The ed25519 test key: its seed in base64 (what dkimpy signs with) and its record."""
    key = nacl.signing.SigningKey(_ED25519_SEED)
    public = base64.b64encode(bytes(key.verify_key)).decode("ascii")
    return base64.b64encode(bytes(key)), f"v=DKIM1; k=ed25519; p={public}"


def build_zones() -> dict[str, list[str]]:
    """Zone name -> records (zone file lines, names relative to the zone)."""

    def key_record(domain: str) -> str:
        return _txt(make_key(1024, domain)[1])  # the same cached key signs

    def ptr(addr: str) -> str:
        name = dns.reversename.from_address(addr).to_text()
        return name.removesuffix(f".{REVERSE_ZONE}.")

    labs = [LabAddresses.for_slot(k) for k in range(LAB_SLOTS)]
    void_spf = (f"v=spf1 a:v4a.{VOID_SPF} a:v4b.{VOID_SPF} a:v4c.{VOID_SPF} "
                f"ip6:{GOOD_IP} -all")
    lab_spf = " ".join(f"ip6:{lab.good} ip6:{lab.unconfirmed}" for lab in labs)

    return {
        REVERSE_ZONE: [
            f"{ptr(GOOD_IP)} PTR mail.example.com.",
            f"{ptr(UNCONFIRMED_IP)} PTR mail.example.net.",
            *(f"{ptr(lab.good)} PTR {LAB_SPF}." for lab in labs),
            *(f"{ptr(lab.unconfirmed)} PTR lab.example.net." for lab in labs),
        ],
        "example.com": [
            f"@ TXT {_txt(f'v=spf1 ip6:{GOOD_IP} -all')}",
            f"mail AAAA {GOOD_IP}",
            f"mail TXT {_txt(f'v=spf1 ip6:{GOOD_IP} -all')}",  # the HELO identity
            f"{SELECTOR}._domainkey TXT {key_record('example.com')}",
            *(f"lab AAAA {lab.good}" for lab in labs),
            f"lab TXT {_txt(f'v=spf1 {lab_spf} -all')}",
        ],
        # SPF through an include; mail.example.net deliberately has no AAAA.
        "example.net": [f"@ TXT {_txt('v=spf1 include:_spf.example.org -all')}"],
        "example.org": [f"_spf TXT {_txt(f'v=spf1 ip6:{UNCONFIRMED_IP} -all')}"],
        # SPF fails for every test client; DKIM with its key is the only way in.
        "spffail.test": [
            f"@ TXT {_txt('v=spf1 ip6:2001:db8:ffff::1 -all')}",
            f"{SELECTOR}._domainkey TXT {key_record('spffail.test')}",
            f"{ED25519_SELECTOR}._domainkey TXT {_txt(ed25519_key()[1])}",
        ],
        # The include cannot be resolved (REFUSED): SPF temperror.
        "tempspf.test": [f"@ TXT {_txt(f'v=spf1 include:spf.{UNSERVED} -all')}"],
        # A record written for IPv4 senders: for an IPv6 client each a: host
        # costs a void AAAA lookup (RFC 7208 4.6.4) before ip6: is reached.
        VOID_SPF: [
            f"@ TXT {_txt(void_spf)}",
            "v4a A 192.0.2.1",
            "v4b A 192.0.2.2",
            "v4c A 192.0.2.3",
        ],
    }



def port53_address(
    candidates: tuple[str, ...] = ("127.0.53.1", "127.0.53.2", "127.0.53.3"),
) -> str | None:
    """A loopback address whose port 53 is free (TCP and UDP), for resolvers
    that can only speak to port 53 (glibc, so Sendmail); None if none is."""
    return lab.free_port53(candidates)


@contextlib.contextmanager
def run_knot(workdir: Path, port53: str | None = None) -> Iterator[DnsWorld]:
    """Knot on 127.0.0.1 and ::1 on a free port; also on ``port53``:53 if given."""
    keys = {d: make_key(1024, d)[0] for d in SIGNING_DOMAINS}
    knot = lab.Knot(workdir, build_zones(), hosts=LOOPBACKS, port53=port53, log_level="info")
    knot.start()
    try:
        yield DnsWorld(port=knot.port, zones=knot.zones, keys=keys, log=knot.log, port53=port53)
    finally:
        knot.stop()


@contextlib.contextmanager
def blackhole_dns() -> Iterator[int]:
    """A UDP port on 127.0.0.1 that takes queries and never answers (TCP closed)."""
    for _ in range(100):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
            try:  # nobody may listen on the TCP side
                t.bind(("127.0.0.1", port))
                break
            except OSError:
                s.close()
    else:
        raise HarnessError("no port for the black-hole DNS server")
    try:
        yield port
    finally:
        s.close()


# -- the SMTP sink (tests.lab.Sink) ------------------------------------------------------


# -- the milter, run as users run it ---------------------------------------------------


class MilterFactory:
    """Starts milters with ``ipv6milter -c FILE``; stops them all at the end."""

    def __init__(self, workdir: Path, base: dict[str, str]):
        self.workdir = workdir
        self.base = base
        self.running: list[MilterProcess] = []

    def start(self, name: str, **overrides: str) -> MilterProcess:
        m = MilterProcess(self.workdir, name, {**self.base, **overrides},
                          comment="ipv6milter for the integration tests")
        self.running.append(m)
        m.start(timeout=15, poll=None)
        return m

    def stop_all(self, timeout: float = 10.0) -> dict[str, int | None]:
        """SIGTERM to every milter at once (libmilter takes seconds to stop)."""
        for m in self.running:
            m.terminate()
        return {m.name: m.wait(timeout) for m in self.running}


# -- Postfix, a private instance (tests.lab.run_postfix) --------------------------------


@contextlib.contextmanager
def run_postfix(
    keep_dir: Path,
    relay_port: int,
    milters: dict[str, str],
    *,
    interfaces: tuple[str, ...] = ("127.0.0.1", "[::1]"),
    networks: tuple[str, ...] = (),
    xclient_hosts: tuple[str, ...] = (),
    service_options: Mapping[str, Mapping[str, str]] | None = None,
    main_cf: Mapping[str, str] | None = None,
    files: Mapping[str, str] | None = None,
    master_cf: str = "",
) -> Iterator[PostfixInstance]:
    """A Postfix of its own (config, queue and data directories of its own),
    relaying everything to the sink; one smtpd service per entry of
    ``milters`` (service name -> its smtpd_milters).  The system instance
    and /etc/postfix are not touched.

    ``interfaces`` are where every smtpd service listens (loopback first:
    readiness is checked there); ``networks`` are relayed for besides
    loopback and the XCLIENT test ranges; ``xclient_hosts`` may use
    XCLIENT besides loopback.  ``service_options`` adds ``-o`` options to a
    service, ``main_cf`` settings to main.cf, ``files`` files to its config
    directory (``cidr:{config_dir}/NAME`` lookup tables), ``master_cf``
    lines to master.cf.
    """
    settings = {
        **lab.base_main_cf(AUTHSERV_ID, "test.example"),
        "inet_interfaces": ", ".join(interfaces),
        # The XCLIENT client addresses are "ours": relay for them.
        "mynetworks": "127.0.0.0/8 [::1]/128 [2001:db8::]/32 [3fff::]/20 192.0.2.0/24"
        + "".join(f" {n}" for n in networks),
        "smtpd_authorized_xclient_hosts": "127.0.0.0/8 [::1]/128"
        + "".join(f" {h}" for h in xclient_hosts),
        "smtpd_soft_error_limit": "1000",
        "smtpd_hard_error_limit": "1000",
        # Each smtpd service of master.cf names its own milter.
        "smtpd_milters": milters.get("main", ""),
        # Every message goes to the sink, by SMTP: no delivery headers added.
        "relayhost": f"[127.0.0.1]:{relay_port}",
        **(main_cf or {}),
    }
    services = {
        name: {"smtpd_milters": spec, **(service_options or {}).get(name, {})}
        for name, spec in milters.items()
    }
    with lab.run_postfix(keep_dir, settings, services, files=files,
                         master_cf=master_cf) as instance:
        yield instance
