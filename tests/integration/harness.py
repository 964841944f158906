"""The servers of the integration tests: Knot DNS, an SMTP sink, a private
Postfix and the milter, each started for real and stopped again.

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
import os
import pwd
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import dkim
import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.reversename
import nacl.signing

from tests.dkimkeys import make_key

AUTHSERV_ID = "mx.test.example"
LOOPBACKS = ("127.0.0.1", "::1")


class HarnessError(RuntimeError):
    """A server of the harness did not come up (not a milter test failure)."""


def wait_until(
    what: str,
    ready: Callable[[], bool],
    timeout: float = 15.0,
    alive: Callable[[], str | None] | None = None,
) -> None:
    """Poll ``ready`` until it holds; ``alive`` returns a reason when the
    thing waited for has died, so a crash fails at once, with its log."""
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        if ready():
            return
        if alive is not None:
            reason = alive()
            if reason:
                raise HarnessError(f"{what}: {reason}")
        if time.monotonic() > deadline:
            raise HarnessError(f"{what}: not ready after {timeout} s")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def _bindable(port: int) -> bool:
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
            with socket.socket(family, kind) as s:
                try:
                    s.bind((host, port))
                except OSError:
                    return False
    return True


def free_port() -> int:
    """A port free for TCP and UDP on both 127.0.0.1 and ::1."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if _bindable(port):
            return port
    raise HarnessError("no free loopback port")


def tcp_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def log_offsets(logs: dict[str, Path]) -> dict[str, int]:
    """The current size of each log, to see later what a test added."""
    out = {}
    for name, path in logs.items():
        try:
            out[name] = path.stat().st_size
        except OSError:
            out[name] = 0
    return out


def log_sections(logs: dict[str, Path], offsets: dict[str, int]) -> list[tuple[str, str]]:
    """(title, text) of what each log gained since ``offsets``: a failure report."""
    sections = []
    for name, path in logs.items():
        try:
            with open(path, "rb") as fh:
                fh.seek(offsets.get(name, 0))
                text = fh.read()[-20000:].decode("utf-8", "replace")
        except OSError:
            continue
        if text:
            sections.append((f"{name} log ({path})", text))
    return sections


def log_tail(path: Path, limit: int = 6000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        return f"({path}: {e})"
    return text[-limit:]


def _process_gone(proc: subprocess.Popen[bytes], log: Path) -> Callable[[], str | None]:
    def check() -> str | None:
        if proc.poll() is None:
            return None
        return f"exited with status {proc.returncode}; log:\n{log_tail(log)}"

    return check


def _stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


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


def _txt(text: str) -> str:
    """A TXT rdata: quoted strings of at most 255 characters."""
    parts = [text[i : i + 255] for i in range(0, len(text), 255)] or [""]
    return " ".join('"' + p.replace("\\", "\\\\").replace('"', '\\"') + '"' for p in parts)


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
    }


def zone_file(origin: str, records: list[str], ttl: int = 300) -> str:
    head = [
        f"$ORIGIN {origin}.",
        f"$TTL {ttl}",
        "@ SOA ns.example.com. hostmaster.example.com. 1 3600 600 86400 300",
        "@ NS ns.example.com.",
    ]
    return "\n".join(head + records) + "\n"


def zone_ready(port: int, zone: str, hosts: tuple[str, ...] = LOOPBACKS) -> bool:
    for host in hosts:
        q = dns.message.make_query(zone, "SOA")
        try:
            r = dns.query.udp(q, host, port=port, timeout=0.5)
        except (OSError, dns.exception.Timeout):
            return False
        if r.rcode() != dns.rcode.NOERROR or not r.flags & dns.flags.AA or not r.answer:
            return False
    return True


def port53_address(
    candidates: tuple[str, ...] = ("127.0.53.1", "127.0.53.2", "127.0.53.3"),
) -> str | None:
    """A loopback address whose port 53 is free (TCP and UDP), for resolvers
    that can only speak to port 53 (glibc, so Sendmail); None if none is."""
    for host in candidates:
        free = True
        for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
            with socket.socket(socket.AF_INET, kind) as s:
                try:
                    s.bind((host, 53))
                except OSError:
                    free = False
        if free:
            return host
    return None


@contextlib.contextmanager
def run_knot(workdir: Path, port53: str | None = None) -> Iterator[DnsWorld]:
    """Knot on 127.0.0.1 and ::1 on a free port; also on ``port53``:53 if given."""
    keys = {d: make_key(1024, d)[0] for d in SIGNING_DOMAINS}
    zones = build_zones()
    port = free_port()
    listen = [f"127.0.0.1@{port}", f"::1@{port}"] + ([f"{port53}@53"] if port53 else [])
    zonedir = workdir / "zones"
    zonedir.mkdir(parents=True)
    zone_conf = []
    for origin, records in zones.items():
        (zonedir / f"{origin}.zone").write_text(zone_file(origin, records))
        zone_conf.append(f"  - domain: {origin}\n    file: {origin}.zone\n")
    conf = workdir / "knot.conf"
    conf.write_text(
        f"server:\n"
        f"    rundir: {workdir}\n"
        f"    listen: [ {', '.join(listen)} ]\n"
        f"database:\n"
        f"    storage: {workdir}/db\n"
        f"control:\n"
        f"    listen: {workdir}/knot.sock\n"
        f"log:\n"
        f"  - target: stderr\n"
        f"    any: info\n"
        f"template:\n"
        f"  - id: default\n"
        f"    storage: {zonedir}\n"
        f"    zonefile-sync: -1\n"
        f"    zonefile-load: whole\n"
        f"    journal-content: none\n"
        f"    semantic-checks: off\n"
        f"zone:\n" + "".join(zone_conf)
    )
    log = workdir / "knot.log"
    knotd = shutil.which("knotd") or "/usr/sbin/knotd"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([knotd, "-c", str(conf)], stdout=fh, stderr=subprocess.STDOUT)
    try:
        wait_until(
            "knotd",
            lambda: (
                all(zone_ready(port, z) for z in zones)
                and (port53 is None or zone_ready(53, REVERSE_ZONE, (port53,)))
            ),
            alive=_process_gone(proc, log),
        )
        yield DnsWorld(port=port, zones=zones, keys=keys, log=log, port53=port53)
    finally:
        _stop_process(proc)


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


# -- the SMTP sink ------------------------------------------------------------------


@dataclass(frozen=True)
class SinkMessage:
    mail_from: str
    rcpts: tuple[str, ...]
    data: bytes  # as received, dot-unstuffed, CRLF line ends


class _SinkHandler(socketserver.StreamRequestHandler):
    server: _SinkServer

    def _reply(self, line: str) -> None:
        self.wfile.write(line.encode() + b"\r\n")
        self.wfile.flush()

    def handle(self) -> None:
        self._reply("220 sink.test ESMTP test sink")
        mail_from: str | None = None
        rcpts: list[str] = []
        while True:
            line = self.rfile.readline(65536)
            if not line:
                return
            cmd = line.decode("utf-8", "replace").rstrip("\r\n")
            verb = cmd.split(" ", 1)[0].upper()
            arg = cmd[len(verb) :].strip()
            if verb == "EHLO":
                self._reply("250-sink.test")
                self._reply("250-8BITMIME")
                self._reply("250 SMTPUTF8")
            elif verb == "HELO":
                self._reply("250 sink.test")
            elif verb == "MAIL":
                mail_from, rcpts = _path(arg), []
                self._reply("250 2.1.0 Ok")
            elif verb == "RCPT":
                rcpts.append(_path(arg))
                self._reply("250 2.1.5 Ok")
            elif verb == "DATA":
                if mail_from is None or not rcpts:
                    self._reply("503 5.5.1 Error: need MAIL and RCPT")
                    continue
                self._reply("354 End data with <CR><LF>.<CR><LF>")
                data = self._read_data()
                if data is None:
                    return
                self.server.store(SinkMessage(mail_from, tuple(rcpts), data))
                self._reply("250 2.0.0 Ok: stored")
                mail_from, rcpts = None, []
            elif verb == "RSET":
                mail_from, rcpts = None, []
                self._reply("250 2.0.0 Ok")
            elif verb == "NOOP":
                self._reply("250 2.0.0 Ok")
            elif verb == "QUIT":
                self._reply("221 2.0.0 Bye")
                return
            else:
                self._reply("502 5.5.2 Error: command not recognized")

    def _read_data(self) -> bytes | None:
        lines: list[bytes] = []
        while True:
            line = self.rfile.readline()
            if not line:
                return None
            if line in (b".\r\n", b".\n"):
                return b"".join(lines)
            lines.append(line[1:] if line.startswith(b".") else line)


def _path(arg: str) -> str:
    """The address of ``FROM:<a@b> SIZE=1`` / ``TO:<a@b>``."""
    _, _, rest = arg.partition(":")
    rest = rest.strip()
    return rest[1 : rest.index(">")] if rest.startswith("<") and ">" in rest else rest.split()[0]


class _SinkServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _SinkHandler)
        self.messages: list[SinkMessage] = []
        self.cond = threading.Condition()

    def store(self, msg: SinkMessage) -> None:
        with self.cond:
            self.messages.append(msg)
            self.cond.notify_all()


class Sink:
    """An SMTP server on 127.0.0.1 that keeps every message it receives."""

    def __init__(self) -> None:
        self._server = _SinkServer()  # bound and listening once constructed
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        )

    def start(self) -> Sink:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    @property
    def messages(self) -> list[SinkMessage]:
        with self._server.cond:
            return list(self._server.messages)

    def find(self, marker: str) -> list[SinkMessage]:
        m = marker.encode()
        return [msg for msg in self.messages if m in msg.data]

    def wait_for(self, marker: str, timeout: float = 15.0) -> SinkMessage:
        """The message whose data contains ``marker``, as soon as it arrives."""
        m = marker.encode()
        deadline = time.monotonic() + timeout
        with self._server.cond:
            while True:
                for msg in self._server.messages:
                    if m in msg.data:
                        return msg
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"no message with {marker!r} reached the sink in {timeout} s"
                    )
                self._server.cond.wait(left)


@contextlib.contextmanager
def run_sink() -> Iterator[Sink]:
    sink = Sink().start()
    try:
        yield sink
    finally:
        sink.stop()


# -- the milter, run as users run it ---------------------------------------------------


def milter_command() -> str:
    """``ipv6milter`` of this virtualenv (next to the running Python), else on PATH."""
    beside = Path(sys.executable).parent / "ipv6milter"
    if beside.exists():
        return str(beside)
    found = shutil.which("ipv6milter")
    if not found:
        raise HarnessError("the ipv6milter command is not installed (pip install -e .)")
    return found


@dataclass
class MilterProcess:
    name: str
    port: int
    config: Path
    log: Path
    proc: subprocess.Popen[bytes]
    exit_status: int | None = None

    @property
    def socket_spec(self) -> str:
        """What Postfix's smtpd_milters names."""
        return f"inet:127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def terminate(self) -> None:
        """SIGTERM, as systemd stops it."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = 10.0) -> int | None:
        """The exit status; None if it had to be killed after ``timeout``."""
        try:
            self.exit_status = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            self.exit_status = None
        return self.exit_status

    def stop(self, timeout: float = 10.0) -> int | None:
        self.terminate()
        return self.wait(timeout)


class MilterFactory:
    """Starts milters with ``ipv6milter -c FILE``; stops them all at the end."""

    def __init__(self, workdir: Path, base: dict[str, str]):
        self.workdir = workdir
        self.base = base
        self.running: list[MilterProcess] = []

    def start(self, name: str, **overrides: str) -> MilterProcess:
        port = free_port()
        settings = {"Socket": f"inet:{port}@127.0.0.1", **self.base, **overrides}
        conf = self.workdir / f"{name}.conf"
        conf.write_text(
            f"# ipv6milter for the integration tests ({name})\n"
            + "".join(f"{k} {v}\n" for k, v in settings.items())
        )
        log = self.workdir / f"{name}.log"
        with open(log, "wb") as fh:
            proc = subprocess.Popen(
                [milter_command(), "-c", str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
            )
        m = MilterProcess(name, port, conf, log, proc)
        self.running.append(m)
        wait_until(
            f"ipv6milter ({name})",
            lambda: tcp_open("127.0.0.1", port),
            alive=_process_gone(proc, log),
        )
        return m

    def stop_all(self, timeout: float = 10.0) -> dict[str, int | None]:
        """SIGTERM to every milter at once (libmilter takes seconds to stop)."""
        for m in self.running:
            m.terminate()
        return {m.name: m.wait(timeout) for m in self.running}


# -- Postfix, a private instance ------------------------------------------------------

MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command
{smtpd_services}
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


@dataclass
class PostfixInstance:
    config_dir: Path
    ports: dict[str, int]  # smtpd service name -> port; "main" uses the main milter
    log: Path
    milters: dict[str, str] = field(default_factory=dict)

    def port(self, service: str = "main") -> int:
        return self.ports[service]


def _postfix(config_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    postfix = shutil.which("postfix") or "/usr/sbin/postfix"
    return subprocess.run(
        [postfix, "-c", str(config_dir), *args], capture_output=True, text=True, timeout=60
    )


def _smtp_greets(port: int) -> bool:
    for host in LOOPBACKS:
        try:
            with socket.create_connection((host, port), timeout=2) as s:
                if not s.recv(512).startswith(b"220 "):
                    return False
                s.sendall(b"QUIT\r\n")
        except OSError:
            return False
    return True


@contextlib.contextmanager
def run_postfix(
    keep_dir: Path,
    relay_port: int,
    milters: dict[str, str],
    *,
    interfaces: tuple[str, ...] = ("127.0.0.1", "[::1]"),
    networks: tuple[str, ...] = (),
    xclient_hosts: tuple[str, ...] = (),
) -> Iterator[PostfixInstance]:
    """A Postfix of its own (config, queue and data directories of its own),
    relaying everything to the sink.  The system instance and /etc/postfix
    are not touched.

    ``interfaces`` are where every smtpd service listens (loopback first:
    readiness is checked there); ``networks`` are relayed for besides
    loopback and the XCLIENT test ranges; ``xclient_hosts`` may use
    XCLIENT besides loopback.

    The instance lives in a directory of its own under /tmp, not under
    pytest's: Postfix opens data_directory files as its mail_owner, so the
    whole path must be searchable for that user, and pytest resets its
    temp root to 0700 whenever a pytest session starts.  The directory is
    removed at the end; the log is copied to ``keep_dir`` first.
    """
    if os.geteuid() != 0:
        raise HarnessError("the Postfix tests need root (postfix start)")
    base = Path(tempfile.mkdtemp(prefix="ipv6milter-postfix-"))
    try:
        base.chmod(0o711)  # searchable, not readable
        etc, queue, data = base / "etc", base / "queue", base / "data"
        for d in (etc, queue, data):
            d.mkdir()
        pw = pwd.getpwnam("postfix")
        os.chown(data, pw.pw_uid, pw.pw_gid)  # master.lock, owned by the mail_owner
        log = base / "postfix.log"
        ports = {name: free_port() for name in milters}
        services = "\n".join(
            f"{ports[name]} inet n - n - - smtpd"
            f" -o smtpd_milters={spec} -o syslog_name=postfix/{name}"
            for name, spec in milters.items()
        )
        (etc / "master.cf").write_text(MASTER_CF.format(smtpd_services=services))
        (etc / "main.cf").write_text(
            "\n".join(
                [
                    "compatibility_level = 3.6",
                    f"queue_directory = {queue}",
                    f"data_directory = {data}",
                    f"maillog_file = {log}",
                    f"maillog_file_prefixes = {base}",
                    f"myhostname = {AUTHSERV_ID}",
                    "mydomain = test.example",
                    "myorigin = $myhostname",
                    "mydestination =",
                    "local_recipient_maps =",
                    "alias_maps =",
                    "alias_database =",
                    "inet_protocols = all",
                    f"inet_interfaces = {', '.join(interfaces)}",
                    # The XCLIENT client addresses are "ours": relay for them.
                    "mynetworks = 127.0.0.0/8 [::1]/128 [2001:db8::]/32 [3fff::]/20 192.0.2.0/24"
                    + "".join(f" {n}" for n in networks),
                    "smtpd_relay_restrictions = permit_mynetworks, reject",
                    "smtpd_recipient_restrictions =",
                    "smtpd_authorized_xclient_hosts = 127.0.0.0/8 [::1]/128"
                    + "".join(f" {h}" for h in xclient_hosts),
                    "smtpd_peername_lookup = no",
                    "smtpd_error_sleep_time = 0",
                    "smtpd_soft_error_limit = 1000",
                    "smtpd_hard_error_limit = 1000",
                    "smtpd_client_connection_rate_limit = 0",
                    # Each smtpd service of master.cf names its own milter.
                    f"smtpd_milters = {milters.get('main', '')}",
                    "milter_default_action = tempfail",
                    "milter_protocol = 6",
                    # Every message goes to the sink, by SMTP: no delivery headers added.
                    f"relayhost = [127.0.0.1]:{relay_port}",
                    "smtp_host_lookup = native",
                    "smtp_dns_support_level = disabled",
                    "smtp_tls_security_level = none",
                    "smtpd_tls_security_level = none",
                    "address_verify_map =",
                    "notify_classes =",
                    "biff = no",
                    "queue_run_delay = 1s",
                    "minimal_backoff_time = 1s",
                    "maximal_backoff_time = 2s",
                    "",
                ]
            )
        )
        try:
            started = _postfix(etc, "start")
            if started.returncode != 0:
                raise HarnessError(
                    f"postfix start failed ({started.returncode}):"
                    f" {started.stdout}{started.stderr}\n{log_tail(log)}"
                )
            for port in ports.values():
                wait_until("postfix smtpd", lambda p=port: _smtp_greets(p))
            yield PostfixInstance(etc, ports, log, dict(milters))
        finally:
            if _postfix(etc, "stop").returncode != 0:
                _postfix(etc, "abort")
            _kill_leftover_master(queue / "pid" / "master.pid")
    finally:
        with contextlib.suppress(OSError):
            shutil.copy(base / "postfix.log", keep_dir / "postfix.log")
        shutil.rmtree(base, ignore_errors=True)


def _kill_leftover_master(pid_file: Path) -> None:
    """Last resort after a failed stop: our own master, checked by its pid
    file and its command line, never any other process."""
    try:
        pid = int(pid_file.read_text().split()[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
    except (OSError, ValueError, IndexError):
        return
    if cmdline.split(b"\0")[0].endswith(b"/master") and cwd == pid_file.parent.parent:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
