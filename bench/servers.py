"""The servers of the benchmark: Knot DNS, a private Postfix, the SMTP sink and
the milters under test, each started for real and stopped again.

They are the tests' servers (tests/lab.py: the same Knot, private Postfix,
sink and process runner as the integration and reliability tests), set up
for load:

* mail is sent from [::1] itself (no XCLIENT), so DNS describes ::1; the
  scoping runs send from 127.0.0.1 (an IPv4 client, out of scope);
* Postfix discards the load (``default_transport = discard``) and relays only
  the verification samples (recipient SAMPLE_RCPT) to the sink;
* every milter listens on a unix socket: over TCP each milter round trip can
  stall ~40 ms (small writes meeting delayed ACKs), which would measure the
  TCP stack, not the milter;
* Knot also listens on port 53 of a spare loopback address, so that milters
  without a resolver setting (dkimpy-milter, pyspf-milter) can be pointed at it
  through a resolv.conf bind-mounted in a private mount namespace.

Everything listens on loopback only.  Only processes started here are ever
signalled, by their pid.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import dns.reversename

from tests import lab
from tests.dkimkeys import make_key as _cached_key
from tests.lab import Daemon as Milter
from tests.lab import LabError as BenchError
from tests.lab import Postfix, Sink, free_port, run_sink, stop_process, txt, wait_until

__all__ = [
    "AUTHSERV_ID",
    "CLIENT",
    "CLIENT4",
    "DOMAIN",
    "HELO",
    "LOAD_RCPT",
    "SAMPLE_RCPT",
    "SELECTOR",
    "SENDER",
    "BenchError",
    "Milter",
    "Postfix",
    "Sink",
    "free_port",
    "make_key",
    "run_knot",
    "run_postfix",
    "run_sink",
    "start_milter",
    "stop_process",
    "wait_until",
]

DOMAIN = "bench.example"  # RFC 2606; not .test, which libunbound (OpenDKIM) answers itself
HELO = f"mail.{DOMAIN}"
SENDER = f"sender@{DOMAIN}"
LOAD_RCPT = f"load@{DOMAIN}"  # discarded by Postfix after the milters ran
SAMPLE_RCPT = f"sample@{DOMAIN}"  # relayed to the sink, to check the headers
SELECTOR = "bench"
AUTHSERV_ID = "mx.bench.example"  # Postfix's myhostname: the milters' authserv-id
CLIENT = "::1"
CLIENT4 = "127.0.0.1"  # the IPv4 client of the scoping runs
# Spare loopback addresses for a DNS server on port 53, first free one wins.
DNS53_CANDIDATES = ("127.0.53.53", "127.53.53.53", "127.0.153.53", "127.100.53.53")
# smtpd_milter_maps: only IPv6 clients go through the milters (IPv4, and
# IPv4-mapped IPv6 should an MTA ever present one, skip them).
IPV6_ONLY_MAP = "ipv6-only.cidr"
IPV6_ONLY_CIDR = "0.0.0.0/0 DISABLE\n::ffff:0:0/96 DISABLE\n"


def make_key(bits: int = 2048) -> tuple[bytes, str]:
    """A private key (PEM) and its DKIM key record text, made with openssl."""
    return _cached_key(bits, "bench")


# -- DNS ------------------------------------------------------------------------------


def build_zones(key_record: str) -> dict[str, list[str]]:
    """PTR ::1 -> mail.bench.example -> AAAA ::1 (FCrDNS); SPF through one include;
    the DKIM key; the HELO name's own SPF record (pyspf-milter checks HELO)."""
    reverse = dns.reversename.from_address(CLIENT).to_text().rstrip(".")
    return {
        reverse: [f"@ PTR {HELO}."],
        DOMAIN: [
            f"@ TXT {txt(f'v=spf1 include:_spf.{DOMAIN} -all')}",
            f"_spf TXT {txt(f'v=spf1 ip6:{CLIENT} -all')}",
            f"mail AAAA {CLIENT}",
            f"mail TXT {txt(f'v=spf1 ip6:{CLIENT} -all')}",
            f"{SELECTOR}._domainkey TXT {txt(key_record)}",
        ],
    }


@dataclass
class Dns:
    port: int  # on 127.0.0.1 and ::1
    addr53: str  # and on this address, port 53
    zones: dict[str, list[str]]
    key: bytes  # the DKIM private key (PEM)
    log: Path

    @property
    def nameserver(self) -> str:
        return f"127.0.0.1:{self.port}"


@contextlib.contextmanager
def run_knot(workdir: Path, key: bytes, key_record: str) -> Iterator[Dns]:
    addr53 = lab.free_port53(DNS53_CANDIDATES)
    if addr53 is None:
        raise BenchError(f"port 53 is taken on every candidate address {DNS53_CANDIDATES}")
    knot = lab.Knot(workdir, build_zones(key_record), hosts=lab.LOOPBACKS, port53=addr53,
                    ttl=3600, log_level="warning")
    knot.start()
    try:
        yield Dns(port=knot.port, addr53=addr53, zones=knot.zones, key=key, log=knot.log)
    finally:
        knot.stop()


# -- milters ---------------------------------------------------------------------------


def start_milter(
    name: str,
    argv: list[str],
    sock: Path,
    logdir: Path,
    resolv_conf: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 30.0,
    ready: Callable[[int], bool] | None = None,
) -> Milter:
    """Start ``argv`` (in the foreground) and wait for its unix socket.

    With ``resolv_conf``, it runs in a private mount namespace where that file
    is bind-mounted over /etc/resolv.conf; ``ready(pid)``, if given, must
    also hold (rspamd listens before its workers exist).  The umask is 0 so that Postfix's
    smtpd (user postfix) may connect to the socket.
    """
    def is_ready() -> bool:
        return lab.unix_listening(sock) and (ready is None or ready(m.pid))

    m = Milter(name, argv, logdir / f"{name}.log", is_ready,
               env=env, umask=0, resolv_conf=resolv_conf, socket_spec=f"unix:{sock}")
    m.start(timeout=timeout)
    return m


# -- Postfix, a private instance --------------------------------------------------------


@contextlib.contextmanager
def run_postfix(
    keep_dir: Path,
    sink_port: int,
    milters: Mapping[str, str],
    service_options: Mapping[str, Mapping[str, str]] | None = None,
) -> Iterator[Postfix]:
    """A Postfix of its own; ``milters`` maps each configuration name to its
    smtpd_milters value (empty for Postfix alone), one smtpd listener each;
    ``service_options`` adds ``-o`` options (``smtpd_milter_maps`` =
    ``cidr:$config_directory/`` + IPV6_ONLY_MAP for the scoping runs)."""
    settings = {
        **lab.base_main_cf(AUTHSERV_ID, DOMAIN),
        "smtpd_client_connection_count_limit": "0",
        "no_milters": "",
        "smtpd_milters": "",
        # A milter that hangs fails its run in seconds, not minutes.
        "milter_command_timeout": "15s",
        "milter_content_timeout": "20s",
        # The load is discarded once the milters have seen it; only the
        # samples travel on, to the sink, for their headers.
        "default_transport": "discard:bench-load",
        "transport_maps": f"inline:{{{SAMPLE_RCPT}=smtp:[127.0.0.1]:{sink_port}}}",
    }
    services = {
        name: {"smtpd_milters": spec or "$no_milters", **(service_options or {}).get(name, {})}
        for name, spec in milters.items()
    }
    with lab.run_postfix(keep_dir, settings, services, prefix="ipv6milter-bench-postfix-",
                         files={IPV6_ONLY_MAP: IPV6_ONLY_CIDR}) as pf:
        yield pf
