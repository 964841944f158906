"""The servers of the benchmark: Knot DNS, a private Postfix, smtp-sink and the
milters under test, each started for real and stopped again.

Adapted from tests/integration/harness.py (copied, not imported, so that the
benchmark does not depend on the tests' private helpers): the same Knot and
private-Postfix set-up, with these differences for load:

* mail is sent from [::1] itself (no XCLIENT), so DNS describes ::1;
* Postfix discards the load (``default_transport = discard``) and relays only
  the verification samples (recipient SAMPLE_RCPT) to smtp-sink;
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

import base64
import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.reversename

from tests.integration.harness import MASTER_CF, zone_file, zone_ready

DOMAIN = "bench.example"  # RFC 2606; not .test, which libunbound (OpenDKIM) answers itself
HELO = f"mail.{DOMAIN}"
SENDER = f"sender@{DOMAIN}"
LOAD_RCPT = f"load@{DOMAIN}"  # discarded by Postfix after the milters ran
SAMPLE_RCPT = f"sample@{DOMAIN}"  # relayed to smtp-sink, to check the headers
SELECTOR = "bench"
AUTHSERV_ID = "mx.bench.example"  # Postfix's myhostname: the milters' authserv-id
CLIENT = "::1"
# Spare loopback addresses for a DNS server on port 53, first free one wins.
DNS53_CANDIDATES = ("127.0.53.53", "127.53.53.53", "127.0.153.53", "127.100.53.53")


class BenchError(RuntimeError):
    """A server of the benchmark did not come up."""


def wait_until(
    what: str,
    ready: Callable[[], bool],
    timeout: float = 20.0,
    alive: Callable[[], str | None] | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        if ready():
            return
        if alive is not None:
            reason = alive()
            if reason:
                raise BenchError(f"{what}: {reason}")
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: not ready after {timeout} s")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def _bindable(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
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
        if _bindable("127.0.0.1", port) and _bindable("::1", port):
            return port
    raise BenchError("no free loopback port")


def dns53_address() -> str:
    """A loopback address whose port 53 (UDP and TCP) nobody uses."""
    for host in DNS53_CANDIDATES:
        if _bindable(host, 53):
            return host
    raise BenchError(f"port 53 is taken on every candidate address {DNS53_CANDIDATES}")


def log_tail(path: Path, limit: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError as e:
        return f"({path}: {e})"


def _gone(proc: subprocess.Popen[bytes], log: Path) -> Callable[[], str | None]:
    def check() -> str | None:
        if proc.poll() is None:
            return None
        return f"exited with status {proc.returncode}; log:\n{log_tail(log)}"

    return check


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- DNS ------------------------------------------------------------------------------


def make_key(bits: int = 2048) -> tuple[bytes, str]:
    """A private key (PEM) and its DKIM key record text, made with openssl."""
    private = subprocess.run(
        ["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", f"rsa_keygen_bits:{bits}"],
        check=True, capture_output=True,
    ).stdout
    public_der = subprocess.run(
        ["openssl", "pkey", "-pubout", "-outform", "DER"],
        input=private, check=True, capture_output=True,
    ).stdout
    return private, "v=DKIM1; k=rsa; p=" + base64.b64encode(public_der).decode()


def _txt(text: str) -> str:
    parts = [text[i : i + 255] for i in range(0, len(text), 255)] or [""]
    return " ".join('"' + p.replace("\\", "\\\\").replace('"', '\\"') + '"' for p in parts)


def build_zones(key_record: str) -> dict[str, list[str]]:
    """PTR ::1 -> mail.bench.example -> AAAA ::1 (FCrDNS); SPF through one include;
    the DKIM key; the HELO name's own SPF record (pyspf-milter checks HELO)."""
    reverse = dns.reversename.from_address(CLIENT).to_text().rstrip(".")
    return {
        reverse: [f"@ PTR {HELO}."],
        DOMAIN: [
            f"@ TXT {_txt(f'v=spf1 include:_spf.{DOMAIN} -all')}",
            f"_spf TXT {_txt(f'v=spf1 ip6:{CLIENT} -all')}",
            f"mail AAAA {CLIENT}",
            f"mail TXT {_txt(f'v=spf1 ip6:{CLIENT} -all')}",
            f"{SELECTOR}._domainkey TXT {_txt(key_record)}",
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
    zones = build_zones(key_record)
    port = free_port()
    addr53 = dns53_address()
    zonedir = workdir / "zones"
    zonedir.mkdir(parents=True)
    zone_conf = []
    for origin, records in zones.items():
        (zonedir / f"{origin}.zone").write_text(zone_file(origin, records, ttl=3600))
        zone_conf.append(f"  - domain: {origin}\n    file: {origin}.zone\n")
    conf = workdir / "knot.conf"
    conf.write_text(
        f"server:\n"
        f"    rundir: {workdir}\n"
        f"    listen: [ 127.0.0.1@{port}, ::1@{port}, {addr53}@53 ]\n"
        f"database:\n"
        f"    storage: {workdir}/db\n"
        f"control:\n"
        f"    listen: {workdir}/knot.sock\n"
        f"log:\n"
        f"  - target: stderr\n"
        f"    any: warning\n"
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
            lambda: all(zone_ready(port, z) and zone_ready(53, z, (addr53,)) for z in zones),
            alive=_gone(proc, log),
        )
        yield Dns(port=port, addr53=addr53, zones=zones, key=key, log=log)
    finally:
        stop_process(proc)


# -- smtp-sink: where the verification samples land ------------------------------------


@dataclass
class SmtpSink:
    port: int
    dumpdir: Path
    proc: subprocess.Popen[bytes]

    def files(self) -> set[Path]:
        return {p for p in self.dumpdir.rglob("*") if p.is_file()}


@contextlib.contextmanager
def run_smtp_sink(workdir: Path) -> Iterator[SmtpSink]:
    port = free_port()
    dumpdir = workdir / "sink"
    dumpdir.mkdir()
    pw = pwd.getpwnam("postfix")
    os.chown(dumpdir, pw.pw_uid, pw.pw_gid)
    log = workdir / "smtp-sink.log"
    sink = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [sink, "-u", "postfix", "-d", f"{dumpdir}/%H%M%S.", f"127.0.0.1:{port}", "16"],
            stdout=fh, stderr=subprocess.STDOUT,
        )
    try:
        wait_until("smtp-sink", lambda: _tcp_open("127.0.0.1", port), alive=_gone(proc, log))
        yield SmtpSink(port, dumpdir, proc)
    finally:
        stop_process(proc)


def _tcp_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


# -- milters ---------------------------------------------------------------------------


@dataclass
class Milter:
    """One milter daemon of the benchmark, on a unix socket."""

    name: str
    socket: Path
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def spec(self) -> str:
        """What Postfix's smtpd_milters names."""
        return f"unix:{self.socket}"


def _unix_listening(path: Path) -> bool:
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
            return True
        except OSError:
            return False


def start_milter(
    name: str,
    argv: list[str],
    sock: Path,
    logdir: Path,
    resolv_conf: Path | None = None,
    env: dict[str, str] | None = None,
) -> Milter:
    """Start ``argv`` (in the foreground) and wait for its socket.

    With ``resolv_conf``, it runs in a private mount namespace where that file
    is bind-mounted over /etc/resolv.conf (``unshare -m`` execs, so the pid
    is the milter's own).  The umask is 0 so that Postfix's smtpd (user
    postfix) may connect to the socket.
    """
    if resolv_conf is not None:
        argv = [
            "unshare", "-m", "--propagation", "private", "sh", "-c",
            f'mount --bind "{resolv_conf}" /etc/resolv.conf && exec "$@"', "sh", *argv,
        ]
    log = logdir / f"{name}.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})}, preexec_fn=lambda: os.umask(0),
        )
    m = Milter(name, sock, proc, log)
    try:
        wait_until(name, lambda: _unix_listening(sock), timeout=30, alive=_gone(proc, log))
    except BenchError:
        stop_process(proc)
        raise
    return m


# -- Postfix, a private instance --------------------------------------------------------



@dataclass
class Postfix:
    base: Path
    config_dir: Path
    queue_dir: Path
    ports: dict[str, int]  # configuration name -> smtpd port on [::1]
    log: Path
    milters: dict[str, str] = field(default_factory=dict)

    def queued(self) -> int:
        """Messages on their way (deferred ones wait apart, and do not count)."""
        n = 0
        for sub in ("maildrop", "incoming", "active"):
            d = self.queue_dir / sub
            if d.is_dir():
                n += sum(len(files) for _, _, files in os.walk(d))
        return n

    def drain(self, timeout: float = 30.0) -> None:
        wait_until("postfix queue to drain", lambda: self.queued() == 0, timeout=timeout)


def _postfix(config_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    postfix = shutil.which("postfix") or "/usr/sbin/postfix"
    return subprocess.run(
        [postfix, "-c", str(config_dir), *args], capture_output=True, text=True, timeout=60
    )


def _smtp_greets(port: int) -> bool:
    try:
        with socket.create_connection(("::1", port), timeout=2) as s:
            if not s.recv(512).startswith(b"220 "):
                return False
            s.sendall(b"QUIT\r\n")
    except OSError:
        return False
    return True


@contextlib.contextmanager
def run_postfix(keep_dir: Path, sink_port: int, milters: dict[str, str]) -> Iterator[Postfix]:
    """A Postfix of its own; ``milters`` maps each configuration name to its
    smtpd_milters value (empty for Postfix alone), one smtpd listener each."""
    if os.geteuid() != 0:
        raise BenchError("the benchmark needs root (postfix start, unshare, mount)")
    base = Path(tempfile.mkdtemp(prefix="ipv6milter-bench-postfix-"))
    try:
        base.chmod(0o711)
        etc, queue, data = base / "etc", base / "queue", base / "data"
        for d in (etc, queue, data):
            d.mkdir()
        pw = pwd.getpwnam("postfix")
        os.chown(data, pw.pw_uid, pw.pw_gid)
        log = base / "postfix.log"
        ports = {name: free_port() for name in milters}
        services = "\n".join(
            f"{ports[name]} inet n - n - - smtpd"
            f" -o smtpd_milters={spec or '$no_milters'} -o syslog_name=postfix/{name}"
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
                    "mydomain = bench.example",
                    "myorigin = $myhostname",
                    "mydestination =",
                    "local_recipient_maps =",
                    "alias_maps =",
                    "alias_database =",
                    "inet_protocols = all",
                    "inet_interfaces = 127.0.0.1, [::1]",
                    "mynetworks = 127.0.0.0/8 [::1]/128",
                    "smtpd_relay_restrictions = permit_mynetworks, reject",
                    "smtpd_recipient_restrictions =",
                    "smtpd_peername_lookup = no",
                    "smtpd_error_sleep_time = 0",
                    "smtpd_client_connection_rate_limit = 0",
                    "smtpd_client_connection_count_limit = 0",
                    "no_milters =",
                    "smtpd_milters =",
                    "milter_default_action = tempfail",
                    # A milter that hangs fails its run in seconds, not minutes.
                    "milter_command_timeout = 15s",
                    "milter_content_timeout = 20s",
                    "milter_protocol = 6",
                    # The load is discarded once the milters have seen it; only
                    # the samples travel on, to smtp-sink, for their headers.
                    "default_transport = discard:bench-load",
                    f"transport_maps = inline:{{{SAMPLE_RCPT}=smtp:[127.0.0.1]:{sink_port}}}",
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
                raise BenchError(
                    f"postfix start failed ({started.returncode}):"
                    f" {started.stdout}{started.stderr}\n{log_tail(log)}"
                )
            for port in ports.values():
                wait_until("postfix smtpd", lambda p=port: _smtp_greets(p))
            yield Postfix(base, etc, queue, ports, log, dict(milters))
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
    file and its working directory, never any other process."""
    try:
        pid = int(pid_file.read_text().split()[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
    except (OSError, ValueError, IndexError):
        return
    if cmdline.split(b"\0")[0].endswith(b"/master") and cwd == pid_file.parent.parent:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
