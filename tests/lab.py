"""The servers every layer starts for real: one copy for the integration tests,
the reliability tests, the operations tests and the benchmark (bench/).

* readiness: ``wait_until`` (poll with a deadline, never a fixed sleep),
  free loopback ports, ``tcp_open`` / ``unix_listening``;
* processes: ``Daemon`` (any server we start, stopped by its own pid only) and
  ``MilterRunner`` (``ipv6milter -c FILE`` on an inet or unix socket,
  restartable on the same socket); /proc figures over a process and its
  children (``tree_pids``, ``cpu_seconds``, ``peak_rss_kib``, ``pss_kib``);
* DNS: ``Knot`` (authoritative for the zones given, restartable on its port),
  ``zone_file``, ``zone_ready``, ``txt``;
* Postfix: ``run_postfix``, a private instance (its own config, queue and data
  directories; the system instance is never touched) with one smtpd listener
  per service, from ``MASTER_CF`` and ``base_main_cf``;
* ``Sink``: an SMTP server that keeps what Postfix relays to it.

What each layer serves (zones, milter settings, main.cf additions) stays with
that layer: tests/integration/harness.py, tests/reliability/servers.py,
bench/servers.py.  Everything listens on loopback only.
"""

from __future__ import annotations

import contextlib
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
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode

LOOPBACKS = ("127.0.0.1", "::1")
CLK_TCK = os.sysconf("SC_CLK_TCK")


class LabError(RuntimeError):
    """A server did not come up (not a failure of what is under test)."""


# -- readiness --------------------------------------------------------------------------


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
                raise LabError(f"{what}: {reason}")
        if time.monotonic() > deadline:
            raise LabError(f"{what}: not ready after {timeout} s")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def bindable(host: str, port: int) -> bool:
    """Nobody uses ``port`` on ``host``, for TCP or UDP."""
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
        if all(bindable(h, port) for h in LOOPBACKS):
            return port
    raise LabError("no free loopback port")


def free_port53(candidates: tuple[str, ...]) -> str | None:
    """The first of ``candidates`` (loopback addresses) whose port 53 is free."""
    for host in candidates:
        if bindable(host, 53):
            return host
    return None


def tcp_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def unix_listening(path: Path) -> bool:
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
            return True
        except OSError:
            return False


def smtp_greets(port: int, hosts: tuple[str, ...] = LOOPBACKS) -> bool:
    """An SMTP server on ``port`` of every host in ``hosts`` says 220."""
    for host in hosts:
        try:
            with socket.create_connection((host, port), timeout=2) as s:
                if not s.recv(512).startswith(b"220 "):
                    return False
                s.sendall(b"QUIT\r\n")
        except OSError:
            return False
    return True


# -- logs -------------------------------------------------------------------------------


def log_tail(path: Path, limit: int = 6000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        return f"({path}: {e})"
    return text[-limit:]


def log_offsets(logs: Mapping[str, Path]) -> dict[str, int]:
    """The current size of each log, to see later what a test added."""
    out = {}
    for name, path in logs.items():
        try:
            out[name] = path.stat().st_size
        except OSError:
            out[name] = 0
    return out


def log_sections(logs: Mapping[str, Path], offsets: Mapping[str, int]) -> list[tuple[str, str]]:
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


# -- processes --------------------------------------------------------------------------


def process_gone(proc: subprocess.Popen[bytes], log: Path) -> Callable[[], str | None]:
    """For ``wait_until(alive=...)``: why ``proc`` is no longer running."""

    def check() -> str | None:
        if proc.poll() is None:
            return None
        return f"exited with status {proc.returncode}; log:\n{log_tail(log)}"

    return check


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int | None:
    """SIGTERM, then SIGKILL after ``timeout``; the exit status (None if killed)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return None
    return proc.returncode


def proc_status(pid: int) -> dict[str, str]:
    """/proc/PID/status as a dict."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def kib(value: str) -> int:
    """``12345 kB`` -> 12345."""
    return int(value.split()[0])


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rsplit(")", 1)[1].split()


def tree_pids(pid: int) -> list[int]:
    """``pid`` and its live descendants (a prefork milter's workers), parent first."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(_stat_fields(int(entry))[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop(0)
        out.append(p)
        todo.extend(sorted(children.get(p, ())))
    return out


def cpu_seconds(pid: int, children: bool = False) -> float:
    """utime + stime of the process (every thread), in seconds; with
    ``children`` also the CPU of its children that have exited and been reaped
    (cutime + cstime), so that a sum over ``tree_pids`` misses no worker."""
    try:
        f = _stat_fields(pid)
    except OSError:
        return 0.0
    ticks = int(f[11]) + int(f[12]) + ((int(f[13]) + int(f[14])) if children else 0)
    return ticks / CLK_TCK


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of ``pid`` and all its descendants, the exited ones included."""
    return sum(cpu_seconds(p, children=True) for p in tree_pids(pid))


def reset_peak_rss(pid: int) -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0, clear_refs value 5)."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/clear_refs", "w") as fh:
        fh.write("5")


def _status_kib(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_kib(pid: int) -> int:
    return _status_kib(pid, "VmRSS")


def peak_rss_kib(pid: int) -> int:
    return _status_kib(pid, "VmHWM")


def pss_kib(pid: int) -> int:
    """Proportional set size: shared pages (a forked worker's copy-on-write
    pages) counted once across the processes that share them."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


@dataclass
class Started:
    """When a (re)start began and when the socket first accepted."""

    spawned: float
    listening: float


class Daemon:
    """A server process of ours: ``argv`` in the foreground, its output in
    ``log``, ready when ``ready()`` holds.  Only this process (and what it
    forks) is ever signalled, by its pid.

    ``resolv_conf`` runs it in a private mount namespace where that file is
    bind-mounted over /etc/resolv.conf (``unshare -m`` execs, so the pid is
    the daemon's own); ``umask`` is set before the exec.
    """

    def __init__(
        self,
        name: str,
        argv: list[str],
        log: Path,
        ready: Callable[[], bool],
        *,
        env: Mapping[str, str] | None = None,
        umask: int | None = None,
        resolv_conf: Path | None = None,
        socket_spec: str = "",
    ):
        self.name = name
        self.argv = argv
        self.log = log
        self.ready = ready
        self.env = dict(env or {})
        self.umask = umask
        self.resolv_conf = resolv_conf
        self.socket_spec = socket_spec  # what an MTA's milter setting names
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts: list[Started] = []
        self.exit_status: int | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} was never started"
        return self.proc.pid

    def command(self) -> list[str]:
        if self.resolv_conf is None:
            return list(self.argv)
        return [
            "unshare", "-m", "--propagation", "private", "sh", "-c",
            f'mount --bind "{self.resolv_conf}" /etc/resolv.conf && exec "$@"', "sh",
            *self.argv,
        ]

    def start(self, timeout: float = 20.0, poll: float | None = None) -> Started:
        """Start it and wait until it is ready (``poll``: a fixed polling
        interval, for measuring restart times; else backing off)."""
        spawned = time.monotonic()
        umask = self.umask
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                env={**os.environ, **self.env} if self.env else None,
                preexec_fn=(lambda: os.umask(umask)) if umask is not None else None,
            )
        gone = process_gone(self.proc, self.log)
        try:
            if poll is None:
                wait_until(self.name, self.ready, timeout, gone)
            else:
                deadline = time.monotonic() + timeout
                while not self.ready():
                    reason = gone()
                    if reason:
                        raise LabError(f"{self.name}: {reason}")
                    if time.monotonic() > deadline:
                        raise LabError(f"{self.name}: not ready after {timeout} s")
                    time.sleep(poll)
        except LabError:
            stop_process(self.proc)
            raise
        started = Started(spawned, time.monotonic())
        self.starts.append(started)
        return started

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def terminate(self) -> None:
        """SIGTERM, as systemd stops it; not waiting."""
        if self.running():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL: no clean-up, no goodbye to the MTA."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def kill_tree(self) -> list[int]:
        """SIGKILL to the process and every descendant (as systemd's
        control-group kill would: a prefork parent and its workers at once);
        the pids signalled.  The process itself is reaped; its workers are
        its children, gone with it or reparented to init."""
        assert self.proc is not None
        pids = self.pids() if self.running() else []
        for pid in reversed(pids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(10)
        return pids

    def wait(self, timeout: float = 10.0) -> int | None:
        """The exit status; None if it had to be killed after ``timeout``."""
        if self.proc is None:
            return None
        try:
            self.exit_status = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            self.exit_status = None
        return self.exit_status

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM and wait; the exit status (None if it had to be killed)."""
        if self.proc is None:
            return None
        self.terminate()
        return self.wait(timeout)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    # /proc, of the process alone and of its whole tree (a prefork parent and workers)
    def status(self) -> dict[str, str]:
        return proc_status(self.pid)

    def rss_kib(self) -> int:
        return kib(self.status()["VmRSS"])

    def hwm_kib(self) -> int:
        return kib(self.status()["VmHWM"])

    def pids(self) -> list[int]:
        return tree_pids(self.pid)

    def tree_cpu_seconds(self) -> float:
        return tree_cpu_seconds(self.pid)

    def tree_rss_kib(self) -> int:
        return sum(rss_kib(p) for p in self.pids())


def milter_command() -> str:
    """``ipv6milter`` of this virtualenv (next to the running Python), else on PATH."""
    beside = Path(sys.executable).parent / "ipv6milter"
    if beside.exists():
        return str(beside)
    found = shutil.which("ipv6milter")
    if not found:
        raise LabError("the ipv6milter command is not installed (pip install -e .)")
    return found


def write_milter_config(path: Path, settings: Mapping[str, str], comment: str) -> Path:
    path.write_text(f"# {comment}\n" + "".join(f"{k} {v}\n" for k, v in settings.items()))
    return path


class MilterRunner(Daemon):
    """``ipv6milter -c FILE`` (or ``argv`` given a config file) on
    ``inet:PORT@127.0.0.1`` or, with ``unix=True``, on a unix socket in
    ``workdir`` that any user may connect to; restartable on that socket.
    ``settings`` are config lines, in order; a ``Socket`` among them wins."""

    def __init__(
        self,
        workdir: Path,
        name: str,
        settings: Mapping[str, str],
        *,
        unix: bool = False,
        comment: str = "ipv6milter of the tests",
        argv: list[str] | None = None,
        env: Mapping[str, str] | None = None,
    ):
        self.port = 0
        self.path: Path | None = None
        if unix:
            self.path = workdir / f"{name}.sock"
            first = {"Socket": f"unix:{self.path}", "UMask": "000"}
        else:
            self.port = free_port()
            first = {"Socket": f"inet:{self.port}@127.0.0.1"}
        self.settings = {**first, **settings}
        self.config = write_milter_config(
            workdir / f"{name}.conf", self.settings, f"{comment} ({name})")
        path = self.path
        port = self.port

        def ready() -> bool:
            return unix_listening(path) if path is not None else tcp_open("127.0.0.1", port)

        super().__init__(
            name, [*(argv or [milter_command()]), "-c", str(self.config)],
            workdir / f"{name}.log", ready, env=env,
            socket_spec=f"unix:{path}" if path is not None else f"inet:127.0.0.1:{port}",
        )

    def start(self, timeout: float = 20.0, poll: float | None = 0.005) -> Started:
        return super().start(timeout, poll)

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.proc is not None and self.proc.poll() is not None:
            self.exit_status = self.proc.returncode
            return self.exit_status
        return super().stop(timeout)

    def workers(self) -> int:
        """Its worker processes (named ipv6milter-wN by the supervisor)."""
        assert self.proc is not None
        pid = self.proc.pid
        names = []
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            with contextlib.suppress(OSError):
                names.append(Path(f"/proc/{child}/comm").read_text())
        return sum(name.startswith("ipv6milter-w") for name in names)

    def reload(self, text: str) -> None:
        """Write ``text`` as its configuration, send SIGHUP, and wait until the
        supervisor has reloaded it and every worker uses it (the supervisor
        hands the checked configuration down each worker's pipe after its
        own log line: the next transaction must find every worker on it)."""
        assert self.proc is not None
        log = self.log_text()
        reloaded, applied = (log.count("configuration reloaded"),
                             log.count("uses the new configuration"))
        workers = self.workers()
        self.config.write_text(text)
        self.proc.send_signal(signal.SIGHUP)
        wait_until("reload", lambda: self.log_text().count("configuration reloaded") > reloaded)
        wait_until("every worker on the new configuration",
                   lambda: self.log_text().count("uses the new configuration")
                   >= applied + workers)


def config_accepted(settings: Mapping[str, str], workdir: Path,
                    argv: list[str] | None = None) -> tuple[bool, str]:
    """Does this ipv6milter accept a configuration with ``settings``
    (``ipv6milter -n``)?  E.g. whether it knows the ``Workers`` key yet."""
    conf = write_milter_config(
        workdir / "probe.conf", {"Socket": f"unix:{workdir / 'probe.sock'}", **settings},
        "probe: is this configuration accepted")
    p = subprocess.run([*(argv or [milter_command()]), "-n", "-c", str(conf)],
                       capture_output=True, text=True, timeout=60)
    return p.returncode == 0, (p.stdout + p.stderr).strip()


# -- DNS: Knot, authoritative for zones given to it --------------------------------------


def txt(text: str) -> str:
    """A TXT rdata in zone-file syntax: strings of at most 255 characters."""
    parts = [text[i : i + 255] for i in range(0, len(text), 255)] or [""]
    return " ".join('"' + p.replace("\\", "\\\\").replace('"', '\\"') + '"' for p in parts)


def zone_file(origin: str, records: list[str], ttl: int = 300) -> str:
    head = [
        f"$ORIGIN {origin}.",
        f"$TTL {ttl}",
        "@ SOA ns.example.com. hostmaster.example.com. 1 3600 600 86400 300",
        "@ NS ns.example.com.",
    ]
    return "\n".join(head + records) + "\n"


def zone_ready(port: int, zone: str, hosts: tuple[str, ...] = LOOPBACKS) -> bool:
    """Knot answers authoritatively for ``zone`` on every host."""
    for host in hosts:
        q = dns.message.make_query(zone, "SOA")
        try:
            r = dns.query.udp(q, host, port=port, timeout=0.5)
        except (OSError, dns.exception.Timeout):
            return False
        if r.rcode() != dns.rcode.NOERROR or not r.flags & dns.flags.AA or not r.answer:
            return False
    return True


class Knot:
    """knotd, authoritative for ``zones``, on a free port of ``hosts`` (and on
    port 53 of ``port53`` if given); stop() and start() again keep the port
    and the zones."""

    def __init__(
        self,
        workdir: Path,
        zones: dict[str, list[str]],
        *,
        hosts: tuple[str, ...] = ("127.0.0.1",),
        port53: str | None = None,
        ttl: int = 300,
        log_level: str = "notice",
    ):
        self.workdir = workdir
        self.zones = zones
        self.hosts = hosts
        self.port53 = port53
        self.port = free_port()
        self.log = workdir / "knot.log"
        self.proc: subprocess.Popen[bytes] | None = None
        zonedir = workdir / "zones"
        zonedir.mkdir(parents=True)
        conf = []
        for origin, records in zones.items():
            (zonedir / f"{origin}.zone").write_text(zone_file(origin, records, ttl))
            conf.append(f"  - domain: {origin}\n    file: {origin}.zone\n")
        listen = [f"{h}@{self.port}" for h in hosts] + ([f"{port53}@53"] if port53 else [])
        self.conf = workdir / "knot.conf"
        self.conf.write_text(
            f"server:\n"
            f"    rundir: {workdir}\n"
            f"    listen: [ {', '.join(listen)} ]\n"
            f"database:\n"
            f"    storage: {workdir}/db\n"
            f"control:\n"
            f"    listen: {workdir}/knot.sock\n"
            f"log:\n"
            f"  - target: stderr\n"
            f"    any: {log_level}\n"
            f"template:\n"
            f"  - id: default\n"
            f"    storage: {zonedir}\n"
            f"    zonefile-sync: -1\n"
            f"    zonefile-load: whole\n"
            f"    journal-content: none\n"
            f"    semantic-checks: off\n"
            f"zone:\n" + "".join(conf)
        )

    @property
    def nameserver(self) -> str:
        return f"127.0.0.1:{self.port}"

    def ready(self) -> bool:
        return all(
            zone_ready(self.port, z, self.hosts)
            and (self.port53 is None or zone_ready(53, z, (self.port53,)))
            for z in self.zones
        )

    def start(self, timeout: float = 30.0) -> None:
        knotd = shutil.which("knotd") or "/usr/sbin/knotd"
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(
                [knotd, "-c", str(self.conf)], stdout=fh, stderr=subprocess.STDOUT
            )
        try:
            wait_until("knotd", self.ready, timeout, process_gone(self.proc, self.log))
        except LabError:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
        self.proc = None


@contextlib.contextmanager
def running(server: Knot) -> Iterator[Knot]:
    server.start()
    try:
        yield server
    finally:
        server.stop()


# -- Postfix, a private instance ---------------------------------------------------------

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


def base_main_cf(myhostname: str, mydomain: str) -> dict[str, str]:
    """main.cf settings every private instance shares (the directories are
    added by ``run_postfix``): loopback only, no DNS, no TLS, quick retries."""
    return {
        "compatibility_level": "3.6",
        "myhostname": myhostname,
        "mydomain": mydomain,
        "myorigin": "$myhostname",
        "mydestination": "",
        "local_recipient_maps": "",
        "alias_maps": "",
        "alias_database": "",
        "inet_protocols": "all",
        "inet_interfaces": "127.0.0.1, [::1]",
        "mynetworks": "127.0.0.0/8 [::1]/128",
        "smtpd_relay_restrictions": "permit_mynetworks, reject",
        "smtpd_recipient_restrictions": "",
        "smtpd_peername_lookup": "no",
        "smtpd_error_sleep_time": "0",
        "smtpd_client_connection_rate_limit": "0",
        "milter_default_action": "tempfail",
        "milter_protocol": "6",
        "smtp_host_lookup": "native",
        "smtp_dns_support_level": "disabled",
        "smtp_tls_security_level": "none",
        "smtpd_tls_security_level": "none",
        "address_verify_map": "",
        "notify_classes": "",
        "biff": "no",
        "queue_run_delay": "1s",
        "minimal_backoff_time": "1s",
        "maximal_backoff_time": "2s",
    }


@dataclass
class Postfix:
    """A running private Postfix: ``ports[service]`` is each smtpd listener's
    port (on every address of inet_interfaces)."""

    config_dir: Path
    ports: dict[str, int]
    log: Path
    milters: dict[str, str] = field(default_factory=dict)  # service -> smtpd_milters
    queue_dir: Path | None = None

    def port(self, service: str = "main") -> int:
        return self.ports[service]

    def queued(self) -> int:
        """Messages on their way (deferred ones wait apart, and do not count)."""
        n = 0
        for sub in ("maildrop", "incoming", "active"):
            d = (self.queue_dir or self.config_dir.parent / "queue") / sub
            if d.is_dir():
                n += sum(len(files) for _, _, files in os.walk(d))
        return n

    def drain(self, timeout: float = 30.0) -> None:
        wait_until("postfix queue to drain", lambda: self.queued() == 0, timeout=timeout)

    def postconf(self, settings: Mapping[str, str]) -> None:
        """Change main.cf and reload."""
        postconf = shutil.which("postconf") or "/usr/sbin/postconf"
        subprocess.run(
            [postconf, "-c", str(self.config_dir), "-e",
             *(f"{k}={v}" for k, v in settings.items())],
            check=True, capture_output=True, timeout=30,
        )
        postfix_command(self.config_dir, "reload", check=True)


def postfix_command(config_dir: Path, *args: str, check: bool = False
                    ) -> subprocess.CompletedProcess[str]:
    postfix = shutil.which("postfix") or "/usr/sbin/postfix"
    return subprocess.run(
        [postfix, "-c", str(config_dir), *args], capture_output=True, text=True, timeout=60,
        check=check,
    )


@contextlib.contextmanager
def run_postfix(
    keep_dir: Path | None,
    main_cf: Mapping[str, str],
    services: Mapping[str, Mapping[str, str]],
    *,
    greet_hosts: tuple[str, ...] = LOOPBACKS,
    prefix: str = "ipv6milter-postfix-",
    files: Mapping[str, str] | None = None,
    master_cf: str = "",
) -> Iterator[Postfix]:
    """A Postfix of its own with ``main_cf`` (over ``base_main_cf``'s kind of
    settings; the directories are added here) and one smtpd listener per
    service, each with its ``-o name=value`` options; ``files`` are written
    into its config directory first (lookup tables: ``cidr:{config_dir}/NAME``);
    ``master_cf`` lines are appended to master.cf (e.g. a second cleanup service).

    The instance lives in a directory of its own under /tmp, not under
    pytest's: Postfix opens data_directory files as its mail_owner, so the
    whole path must be searchable for that user, and pytest resets its temp
    root to 0700 whenever a pytest session starts.  The directory is removed
    at the end; the log is copied to ``keep_dir`` first (if one is given).  Needs root.
    """
    if os.geteuid() != 0:
        raise LabError("a private Postfix instance needs root (postfix -c DIR start)")
    base = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        base.chmod(0o711)  # searchable, not readable
        etc, queue, data = base / "etc", base / "queue", base / "data"
        for d in (etc, queue, data):
            d.mkdir()
        pw = pwd.getpwnam("postfix")
        os.chown(data, pw.pw_uid, pw.pw_gid)  # master.lock, owned by the mail_owner
        log = base / "postfix.log"
        for name, text in (files or {}).items():
            (etc / name).write_text(text)
        ports = {name: free_port() for name in services}
        lines = []
        for name, options in services.items():
            opts = {**options, "syslog_name": f"postfix/{name}"}
            lines.append(f"{ports[name]} inet n - n - - smtpd"
                         + "".join(f" -o {k}={v}" for k, v in opts.items()))
        (etc / "master.cf").write_text(
            MASTER_CF.format(smtpd_services="\n".join(lines)) + master_cf)
        settings = {
            "queue_directory": str(queue),
            "data_directory": str(data),
            "maillog_file": str(log),
            "maillog_file_prefixes": str(base),
            **main_cf,
        }
        (etc / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))
        try:
            started = postfix_command(etc, "start")
            if started.returncode != 0:
                raise LabError(
                    f"postfix start failed ({started.returncode}):"
                    f" {started.stdout}{started.stderr}\n{log_tail(log)}"
                )
            for port in ports.values():
                wait_until("postfix smtpd", lambda p=port: smtp_greets(p, greet_hosts))
            milters = {n: o.get("smtpd_milters", "") for n, o in services.items()}
            yield Postfix(etc, ports, log, milters, queue)
        finally:
            if postfix_command(etc, "stop").returncode != 0:
                postfix_command(etc, "abort")
            _kill_leftover_master(queue / "pid" / "master.pid")
    finally:
        if keep_dir is not None:
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


# -- the SMTP sink: where Postfix relays to ------------------------------------------------


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

    def __enter__(self) -> Sink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

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
