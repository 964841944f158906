"""ipv6milter side by side with OpenDKIM and the Python milters (issues #5, #12).

    python -m bench.run [--rounds 3] [--seconds 2.5] [--quick]

One private Postfix, one smtpd listener per configuration (its own
``-o smtpd_milters=``), mail from [::1] by ``smtp-source``, one SMTP session per
message, DKIM-signed (rsa-sha256, 2048 bits, relaxed/relaxed), SPF passing
through one ``include``, every milter on a unix socket.  Each configuration's
work is checked on a delivered sample before its numbers are measured; then
rounds of all (size, concurrency) cells, configurations alternating, medians
reported.  ipv6milter runs twice, with ``Workers 1`` and with its default
(``Workers auto``; the key is probed with ``ipv6milter -n`` first); CPU and
memory are counted over each milter's whole process tree.  The scoping runs
send from 127.0.0.1, an IPv4 client, with and without ``smtpd_milter_maps``.
Writes bench/results.md, bench/results.json, bench/results.png and the py-spy
profile of ipv6milter (bench/profile-ipv6milter.txt); ``--quick`` writes to a
temporary directory unless ``--out`` is given.

Needs root (Postfix, unshare, /proc of other users' processes).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import email.parser
import email.policy
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests import lab

from . import load, report, rspamd
from .servers import (
    AUTHSERV_ID,
    CLIENT,
    CLIENT4,
    IPV6_ONLY_MAP,
    SAMPLE_RCPT,
    BenchError,
    Milter,
    Sink,
    make_key,
    run_knot,
    run_postfix,
    run_sink,
    start_milter,
)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SIZES = (4096, 102400)
CONCURRENCY = (1, 8, 32)
CELLS = [(s, c) for s in SIZES for c in CONCURRENCY]
QUICK_CELLS = [(4096, 1), (4096, 8), (102400, 8)]
SCOPING_CELLS = [(4096, 1), (4096, 8), (4096, 32)]
QUICK_SCOPING_CELLS = [(4096, 8)]
IPV6_ONLY = {"smtpd_milter_maps": f"cidr:$config_directory/{IPV6_ONLY_MAP}"}


def size_label(size: int) -> str:
    return f"{size // 1024} KB"


# -- the configurations -------------------------------------------------------------------


@dataclass
class Conf:
    name: str
    label: str
    daemons: tuple[str, ...]  # milter daemons, in smtpd_milters order
    expect: tuple[str, ...]  # what the delivered sample's A-R must say
    experiment: bool = False  # measured in the experiments phase, not the main table
    skipped: str = ""  # why it was not measured
    verified: str = ""  # what the check found
    client: str = CLIENT  # where the load comes from ([::1], or 127.0.0.1 for IPv4)
    service: dict[str, str] = field(default_factory=dict)  # more -o options of its smtpd
    scoping: bool = False  # measured in the scoping phase (IPv4 clients, smtpd_milter_maps)


IPV6_EXPECT = ("iprev=pass", "spf=pass", "dkim=pass")
CONFIGS = [
    Conf("postfix", "Postfix, no milter", (), ()),
    Conf("noop", "pymilter no-op milter", ("noop",), ()),
    Conf("opendkim", "OpenDKIM verify (C)", ("opendkim",), ("dkim=pass",)),
    Conf("dkimpy", "dkimpy-milter verify", ("dkimpy",), ("dkim=pass",)),
    Conf("pyspf", "pyspf-milter", ("pyspf",), ("spf=pass",)),
    Conf("chain", "dkimpy-milter + pyspf-milter chained", ("dkimpy", "pyspf"),
         ("dkim=pass", "spf=pass")),
    Conf("rspamd", "rspamd (C + Lua: SPF, DKIM, PTR + forward, a header)", ("rspamd",),
         IPV6_EXPECT),
    Conf("ipv6milter", "ipv6milter (enforce, Workers default)", ("ipv6milter",), IPV6_EXPECT),
    Conf("ipv6milter_w1", "ipv6milter (enforce, Workers 1)", ("ipv6milter_w1",), IPV6_EXPECT),
    # Scoping: what IPv4 clients cost with ipv6milter in smtpd_milters, and with
    # smtpd_milter_maps sending only IPv6 clients through it (the IPv6 row shows
    # that the map still lets them through).
    Conf("v4_postfix", "IPv4 client: Postfix, no milter", (), (), client=CLIENT4, scoping=True),
    Conf("v4_milter", "IPv4 client: ipv6milter in smtpd_milters", ("ipv6milter",), (),
         client=CLIENT4, scoping=True),
    Conf("v4_map", "IPv4 client: ipv6milter, smtpd_milter_maps IPv6-only", ("ipv6milter",), (),
         client=CLIENT4, service=IPV6_ONLY, scoping=True),
    Conf("v6_map", "IPv6 client: ipv6milter, smtpd_milter_maps IPv6-only", ("ipv6milter",),
         IPV6_EXPECT, service=IPV6_ONLY, scoping=True),
    # Experiments: the proposals of docs/performance.md, measured before they
    # are implemented (bench/prototype.py patches the running process only).
    Conf("noop_nr", "pymilter no-op, every callback @noreply", ("noop_nr",), (), True),
    Conf("x_noreply", "ipv6milter + noreply header/body", ("x_noreply",), IPV6_EXPECT, True),
    Conf("x_dkimfast", "ipv6milter + faster dkimpy paths", ("x_dkimfast",), IPV6_EXPECT, True),
    Conf("x_nopool", "ipv6milter + checks inline (no pool)", ("x_nopool",), IPV6_EXPECT, True),
    Conf("x_quiet", "ipv6milter, LogLevel warning", ("x_quiet",), IPV6_EXPECT, True),
    Conf("x_arena", "ipv6milter, MALLOC_ARENA_MAX=2", ("x_arena",), IPV6_EXPECT, True),
    Conf("x_all", "ipv6milter + all of the above", ("x_all",), IPV6_EXPECT, True),
]
EXPERIMENT_CELLS = [(4096, 1), (4096, 8), (102400, 8), (102400, 32)]
NOOP_EXPERIMENT_CELLS = [(4096, 1), (4096, 8)]
# Experiment name -> (patches, extra config lines, extra environment).
VARIANTS: dict[str, tuple[str, str, dict[str, str]]] = {
    "x_noreply": ("noreply", "", {}),
    "x_dkimfast": ("dkimfast", "", {}),
    "x_nopool": ("nopool", "", {}),
    "x_quiet": ("", "LogLevel warning\n", {}),
    "x_arena": ("", "", {"MALLOC_ARENA_MAX": "2"}),
    "x_all": ("noreply,dkimfast,nopool", "LogLevel warning\n", {"MALLOC_ARENA_MAX": "2"}),
}


def _venv_bin(name: str) -> str:
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else (shutil.which(name) or name)


@dataclass
class DaemonCmd:
    argv: list[str]
    private_resolv: bool = False  # no resolver setting: give it our resolv.conf
    env: dict[str, str] = field(default_factory=dict)
    start_timeout: float = 30.0  # seconds until its socket listens
    ready: Callable[[int], bool] | None = None  # and this holds of its pid


def socket_path(sockdir: Path, name: str) -> Path:
    return sockdir / f"{name}.sock"


def ipv6milter_conf(path: Path, sock: Path, nameserver: str, extra: str = "") -> Path:
    path.write_text(
        "# ipv6milter under benchmark: [::1] is in scope (not trusted)\n"
        f"Socket unix:{sock}\n"
        "UMask 000\n"
        "Mode enforce\n"
        "AcceptDomains bench.example\n"
        "TrustedHosts 127.0.0.2\n"
        f"Nameservers {nameserver}\n" + extra
    )
    return path


def daemon_commands(sockdir: Path, rundir: Path, nameserver: str, addr53: str
                    ) -> dict[str, DaemonCmd]:
    cmds: dict[str, DaemonCmd] = {}
    noop = [sys.executable, str(HERE / "noop_milter.py")]
    cmds["noop"] = DaemonCmd([*noop, f"unix:{socket_path(sockdir, 'noop')}"])
    cmds["noop_nr"] = DaemonCmd([*noop, "--noreply", f"unix:{socket_path(sockdir, 'noop_nr')}"])
    if shutil.which("opendkim") or Path("/usr/sbin/opendkim").exists():
        conf = rundir / "opendkim.conf"
        # Debian's OpenDKIM resolves with libunbound: Nameservers makes it a
        # forwarder to Knot.  (ResolverConfiguration, an unbound.conf, is parsed
        # by a non-reentrant parser and crashed opendkim under concurrency:
        # "fatal flex scanner internal error--end of buffer missed".)
        conf.write_text(
            "# OpenDKIM, verify only\n"
            "Mode v\n"
            f"Socket local:{socket_path(sockdir, 'opendkim')}\n"
            "UMask 000\n"
            "Background no\n"
            "Syslog no\n"
            f"Nameservers {addr53}\n"
            "MinimumKeyBits 1024\n"
            "SoftwareHeader no\n"
        )
        cmds["opendkim"] = DaemonCmd(
            [shutil.which("opendkim") or "/usr/sbin/opendkim", "-f", "-x", str(conf)], True)
    if shutil.which("dkimpy-milter"):
        conf = rundir / "dkimpy-milter.conf"
        conf.write_text(
            "# dkimpy-milter, verify only\n"
            "Syslog no\n"
            "UMask 000\n"
            "Mode v\n"
            f"Socket local:{socket_path(sockdir, 'dkimpy')}\n"
            f"PidFile {rundir / 'dkimpy-milter.pid'}\n"
            "UserID dkimpy-milter\n"
            f"AuthservID {AUTHSERV_ID}\n"
        )
        cmds["dkimpy"] = DaemonCmd([shutil.which("dkimpy-milter") or "dkimpy-milter",
                                    str(conf)], True)
    if shutil.which("pyspf-milter"):
        conf = rundir / "pyspf-milter.conf"
        # Debian's shipped settings, except the socket, the pid file, the umask
        # and skip_addresses (its default skips ::1, our client).
        conf.write_text(
            "debugLevel = 1\n"
            "TestOnly = 1\n"
            "HELO_reject = Fail\n"
            "Mail_From_reject = Fail\n"
            "PermError_reject = False\n"
            "TempError_Defer = False\n"
            "skip_addresses = 127.0.0.0/8\n"
            f"Socket = local:{socket_path(sockdir, 'pyspf')}\n"
            f"PidFile = {rundir / 'pyspf-milter.pid'}\n"
            "UserID = pyspf-milter\n"
            "UMask = 0\n"
            "InternalHosts = 127.0.0.1\n"
            f"Authserv_Id = {AUTHSERV_ID}\n"
        )
        cmds["pyspf"] = DaemonCmd([shutil.which("pyspf-milter") or "pyspf-milter", str(conf)],
                                  True)
    if rspamd.available():
        # One event loop per usable CPU, as ipv6milter's Workers auto has one
        # process per CPU.  Its first start compiles hyperscan databases (the
        # TLD list) into its work directory: about 15 s on an idle machine.
        argv = rspamd.configure(rundir / "rspamd", socket_path(sockdir, "rspamd"), nameserver,
                                len(os.sched_getaffinity(0)))
        n = len(os.sched_getaffinity(0))
        cmds["rspamd"] = DaemonCmd(argv, start_timeout=180.0,
                                   ready=lambda pid: rspamd.workers_up(pid, n))
    conf = ipv6milter_conf(rundir / "ipv6milter.conf", socket_path(sockdir, "ipv6milter"),
                           nameserver)
    cmds["ipv6milter"] = DaemonCmd([_venv_bin("ipv6milter"), "-c", str(conf)])
    conf = ipv6milter_conf(rundir / "ipv6milter_w1.conf", socket_path(sockdir, "ipv6milter_w1"),
                           nameserver, "Workers 1\n")
    cmds["ipv6milter_w1"] = DaemonCmd([_venv_bin("ipv6milter"), "-c", str(conf)])
    for name, (patches, extra, env) in VARIANTS.items():
        conf = ipv6milter_conf(rundir / f"{name}.conf", socket_path(sockdir, name),
                               nameserver, extra)
        cmds[name] = DaemonCmd(
            [sys.executable, "-m", "bench.prototype", "-c", str(conf)],
            env={"PYTHONPATH": str(ROOT), "IPV6MILTER_BENCH_PATCHES": patches, **env})
    return cmds


# -- verification ---------------------------------------------------------------------------


def send_sample(port: int, msg: bytes, tag: str, host: str = CLIENT) -> None:
    marked = f"X-Bench-Sample: {tag}\r\n".encode() + msg  # not signed: DKIM unaffected
    load.SmtpSession(port, host=host).send(marked, rcpt=SAMPLE_RCPT)


def wait_sample(sink: Sink, tag: str, timeout: float = 30.0) -> bytes:
    try:
        return sink.wait_for(f"X-Bench-Sample: {tag}\r\n", timeout).data
    except AssertionError as e:
        raise BenchError(str(e)) from None


def auth_results(raw: bytes) -> list[str]:
    """Our authserv-id's Authentication-Results values (unfolded, lower case),
    and Received-SPF values, of a delivered message."""
    msg = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(raw)
    out = []
    for name in ("Authentication-Results", "Received-SPF"):
        for v in msg.get_all(name) or []:
            out.append(re.sub(r"\s+", " ", str(v)).strip().lower())
    return out


def header_position(raw: bytes) -> str:
    """Where the first Authentication-Results (or Received-SPF) field sits
    among the delivered sample's header fields: above or below the Received:
    of the Postfix under test (milter index 0 is above it)."""
    msg = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(raw, headersonly=True)
    names = [k.lower() for k in msg]
    at = next((i for i, n in enumerate(names)
               if n in ("authentication-results", "received-spf")), -1)
    return f"field {at + 1} of {len(names)}, after {names[:at]}" if at >= 0 else "?"


# -- one measured run ---------------------------------------------------------------------


@dataclass
class Sample:
    conf: str
    size: int
    conc: int
    round: int
    count: int
    seconds: float
    rate: float
    cpu: float  # milter CPU seconds during the run (all its daemons, every process)
    peak_rss_kib: int  # max VmHWM of any one process of its daemons (a worker)
    ok: bool
    error: str = ""
    log_problems: int = 0
    phase: str = "main"  # or "experiment", "scoping"
    total_rss_kib: int = 0  # peak of the summed RSS of all its processes (sampled)
    total_pss_kib: int = 0  # the same in PSS (shared pages counted once)
    procs: int = 0  # processes of its daemons (parent + workers)
    helper_cpu: float = 0.0  # of ``cpu``: ipv6milter's check helpers (isolation.py)
    workers: int = 0  # ipv6milter's worker processes (named ipv6milter-wN); 0: none


@dataclass
class Bench:
    postfix: object
    daemons: dict[str, Milter]
    messages: dict[int, bytes]
    files: dict[int, Path]
    samples: list[Sample] = field(default_factory=list)
    latency: dict[tuple[str, str, int], list[float]] = field(default_factory=dict)
    sent: dict[str, int] = field(default_factory=dict)  # every message, any phase
    log_offset: int = 0
    deadline: float = float("inf")  # time.monotonic() after which no run starts

    def pids(self, conf: Conf) -> list[int]:
        """The daemons' own pids (the roots of their process trees)."""
        return [self.daemons[d].pid for d in conf.daemons]

    def all_pids(self, conf: Conf) -> list[int]:
        """Every process of the daemons: a prefork parent and its workers."""
        return [p for root in self.pids(conf) for p in load.tree_pids(root)]

    def check_alive(self, conf: Conf) -> None:
        for d in conf.daemons:
            m = self.daemons[d]
            if m.proc.poll() is not None:
                raise BenchError(f"{d} died (status {m.proc.returncode}); see {m.log}")

    def new_log_problems(self) -> int:
        log: Path = self.postfix.log  # type: ignore[attr-defined]
        try:
            with open(log, "rb") as fh:
                fh.seek(self.log_offset)
                text = fh.read()
                self.log_offset = fh.tell()
        except OSError:
            return 0
        bad = re.findall(rb"(?m)^.*(?:warning: .*milter|reject: |fatal: |panic: ).*$", text)
        return len(bad)

    def run(self, conf: Conf, size: int, conc: int, count: int, rnd: int,
            phase: str = "main") -> Sample | None:
        """One smtp-source run (kept unless it is a calibration run, round 0);
        None (and ``conf.skipped`` set) if a milter died."""
        try:
            s = self._run(conf, size, conc, count, rnd, phase)
        except BenchError as e:
            conf.skipped = f"stopped being measured at {size // 1024} KB c={conc}: {e}"
            print(f"bench: {conf.name}: {conf.skipped}", flush=True)
            return None
        if rnd > 0:
            self.samples.append(s)
        return s

    def _run(self, conf: Conf, size: int, conc: int, count: int, rnd: int,
             phase: str) -> Sample:
        if time.monotonic() > self.deadline:
            raise BenchError("the bench's time limit (--max-minutes) was reached")
        drained = ""
        try:
            self.postfix.drain()  # type: ignore[attr-defined]
        except BenchError as e:  # measured all the same, but not trusted
            drained = str(e)
        self.new_log_problems()
        self.check_alive(conf)
        roots = self.pids(conf)
        for pid in self.all_pids(conf):
            load.reset_peak_rss(pid)
        # Over each daemon's whole tree, workers that exited (reaped) included.
        cpu0 = sum(load.tree_cpu_seconds(p) for p in roots)
        helpers0 = sum(helper_cpu_seconds(p) for p in roots)
        port = self.postfix.ports[conf.name]  # type: ignore[attr-defined]
        with load.MemorySampler(lambda: roots) as mem:
            r = load.smtp_source(port, self.files[size], count, conc, host=conf.client)
        self.sent[conf.name] = self.sent.get(conf.name, 0) + count
        cpu = sum(load.tree_cpu_seconds(p) for p in roots) - cpu0
        helper_cpu = sum(helper_cpu_seconds(p) for p in roots) - helpers0
        rss = max((load.peak_rss_kib(p) for p in self.all_pids(conf)), default=0)
        problems = self.new_log_problems()
        return Sample(conf.name, size, conc, rnd, count, r.seconds, r.rate, cpu, rss,
                      r.ok and problems == 0 and not drained, r.error or drained, problems,
                      phase, mem.peak_rss_kib, mem.peak_pss_kib, mem.max_procs, helper_cpu,
                      sum(_comm(p).startswith("ipv6milter-w") for r in roots
                          for p in load.tree_pids(r)))


# -- the benchmark ---------------------------------------------------------------------------


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def helper_cpu_seconds(root: int) -> float:
    """CPU seconds of ipv6milter's check helpers under ``root``: the live ones
    (named ``ipv6milter-chk``) and those their zygote (``ipv6milter-zyg``)
    has reaped (its children's time)."""
    total = 0.0
    for pid in load.tree_pids(root):
        comm = _comm(pid)
        if comm == "ipv6milter-chk":
            total += load.cpu_seconds(pid)
        elif comm == "ipv6milter-zyg":
            total += load.cpu_seconds(pid, children=True) - load.cpu_seconds(pid)
    return total


def _idle_rss_kib(pid: int) -> int:
    """Summed RSS of the daemon's tree once it has settled after binding its
    socket (a prefork parent forks its workers then)."""
    time.sleep(0.5)
    return sum(load.rss_kib(p) for p in load.tree_pids(pid))


def calibrate_count(rate: float, seconds: float, conc: int) -> int:
    return int(min(4000, max(conc * 6, 60, rate * seconds)))


def versions() -> dict[str, str]:
    def dpkg(pkg: str) -> str:
        p = subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg],
                           capture_output=True, text=True)
        return p.stdout.strip() or "not installed"

    def rev() -> str:
        p = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                           capture_output=True, text=True)
        changed = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "ipv6milter"],
            capture_output=True, text=True).stdout.split("\n")
        files = [ln[3:] for ln in changed if ln.strip()]
        note = f"; uncommitted changes in {', '.join(files)}" if files else ""
        return (p.stdout.strip() or "?") + note

    import Milter

    from ipv6milter import __version__

    return {
        "ipv6milter": f"{__version__} (git {rev()})",
        "postfix": dpkg("postfix"),
        "knot": dpkg("knot"),
        "opendkim": dpkg("opendkim"),
        "dkimpy-milter": dpkg("dkimpy-milter"),
        "pyspf-milter": dpkg("pyspf-milter"),
        "rspamd": dpkg("rspamd"),
        "pymilter (.venv)": getattr(Milter, "__version__", "?"),
        "python": platform.python_version(),
    }


def machine() -> dict[str, str]:
    model = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    debian = "?"
    with contextlib.suppress(OSError):
        debian = Path("/etc/debian_version").read_text().strip()
    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "kernel": platform.release(),
        "debian": debian,
        "loadavg_at_start": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
    }


def profile_ipv6milter(bench: Bench, conf: Conf, count: int, out_raw: Path,
                       workdir: Path) -> dict[str, object]:
    """py-spy of the ipv6milter processes (parent and workers) during a 4 KB c=8 run."""
    pyspy = _venv_bin("py-spy")
    pid = bench.daemons["ipv6milter"].pid
    tmp = workdir / "profile.raw"
    bench.postfix.drain()  # type: ignore[attr-defined]
    proc = subprocess.Popen(
        [pyspy, "record", "--pid", str(pid), "--rate", "250", "--format", "raw",
         "--output", str(tmp), "--threads", "--gil", "--nonblocking", "--subprocesses",
         "--duration", "120"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    time.sleep(1.5)  # py-spy attaches
    if proc.poll() is not None:
        out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
        return {"error": f"py-spy exited at once: {out[-800:]}"}
    port = bench.postfix.ports[conf.name]  # type: ignore[attr-defined]
    r = load.smtp_source(port, bench.files[4096], count, 8)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if not tmp.exists():
        out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
        return {"error": f"py-spy wrote nothing: {out[-800:]}"}
    shutil.copy(tmp, out_raw)
    summary = report.summarise_profile(tmp.read_text(errors="replace"))
    summary["run"] = {"count": count, "seconds": r.seconds, "rate": r.rate, "ok": r.ok}
    return summary


def _status(s: Sample) -> str:
    return "" if s.ok else "  FAILED: " + (s.error or f"{s.log_problems} log problems")


def measure(bench: Bench, confs: list[Conf], cells: list[tuple[int, int]] | dict[str, list],
            rounds: int, seconds: float, latency_count: int, phase: str
            ) -> dict[tuple[str, int, int], int]:
    """Calibrate (also the warm-up), then ``rounds`` rounds of every cell with
    the configurations alternating (rotated each round), then c=1 latency."""

    def cells_of(c: Conf) -> list[tuple[int, int]]:
        return cells[c.name] if isinstance(cells, dict) else cells

    all_cells = sorted({cell for c in confs for cell in cells_of(c)})
    counts: dict[tuple[str, int, int], int] = {}
    for size, conc in all_cells:
        for c in confs:
            if (size, conc) not in cells_of(c):
                continue
            n = max(conc * 4, 40 if size == 4096 else 20)
            s = bench.run(c, size, conc, n, rnd=0, phase=phase)
            if s is None:
                continue
            counts[(c.name, size, conc)] = calibrate_count(s.rate, seconds, conc)
            print(f"bench: {phase} calibrate {c.name:10} {size_label(size):>6} c={conc:<2}"
                  f" {s.rate:7.1f}/s -> {counts[(c.name, size, conc)]} messages{_status(s)}",
                  flush=True)
    for rnd in range(1, rounds + 1):
        t_round = time.monotonic()
        k = (rnd - 1) % len(confs)
        order = confs[k:] + confs[:k]
        for size, conc in all_cells:
            for c in order:
                if c.skipped or (c.name, size, conc) not in counts:
                    continue
                s = bench.run(c, size, conc, counts[(c.name, size, conc)], rnd, phase)
                if s is None:
                    continue
                print(f"bench: {phase} round {rnd} {c.name:10} {size_label(size):>6} c={conc:<2}"
                      f" {s.rate:7.1f}/s ({s.count} in {s.seconds:.2f} s,"
                      f" cpu {1000 * s.cpu / s.count:.2f} ms/msg"
                      + (f" ({1000 * s.helper_cpu / s.count:.2f} in helpers)," if s.helper_cpu
                         else ",") +
                      f" rss {s.peak_rss_kib / 1024:.1f} MiB){_status(s)}", flush=True)
        # Latency at c=1, each session timed by our own client.
        for c in order:
            for size in SIZES:
                if c.skipped or not any(cell[0] == size for cell in cells_of(c)):
                    continue
                try:
                    bench.postfix.drain()  # type: ignore[attr-defined]
                    lat = load.latencies(bench.postfix.ports[c.name],  # type: ignore[attr-defined]
                                         bench.messages[size], latency_count, host=c.client)
                except (load.SmtpError, OSError, BenchError) as e:
                    print(f"bench: latency {c.name} {size_label(size)}: {e}", flush=True)
                    continue
                bench.latency.setdefault((phase, c.name, size), []).extend(lat)
                bench.sent[c.name] = bench.sent.get(c.name, 0) + len(lat)
        print(f"bench: {phase} round {rnd} done in {time.monotonic() - t_round:.0f} s",
              flush=True)
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=2.0,
                   help="target length of one measured run (sets each message count)")
    p.add_argument("--latency-count", type=int, default=40,
                   help="sessions timed per configuration, size and round at c=1")
    p.add_argument("--quick", action="store_true",
                   help="a one-minute smoke test of every code path: 1 round, 3 cells, short"
                   " runs, no experiments, profile or micro; results go to a temporary"
                   " directory unless --out is given")
    p.add_argument("--only", help="comma-separated configuration names")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--no-micro", action="store_true")
    p.add_argument("--no-experiments", action="store_true",
                   help="skip the prototype variants (bench/prototype.py)")
    p.add_argument("--out", help="where results.* go (default bench/; --quick: a temporary"
                   " directory)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    p.add_argument("--max-minutes", type=float, default=20.0,
                   help="no new run starts after this (the whole bench stays bounded)")
    args = p.parse_args(argv)
    cells, scoping_cells = CELLS, SCOPING_CELLS
    if args.quick:
        args.rounds, args.seconds, args.latency_count = 1, 0.4, 5
        args.no_experiments = args.no_profile = args.no_micro = True
        args.max_minutes = min(args.max_minutes, 4.0)
        cells, scoping_cells = QUICK_CELLS, QUICK_SCOPING_CELLS
    if args.out is None:
        args.out = (tempfile.mkdtemp(prefix="ipv6milter-bench-quick-") if args.quick
                    else str(HERE))
    if os.geteuid() != 0:
        print("bench: needs root (private Postfix, unshare, /proc)", file=sys.stderr)
        return 2
    started = time.monotonic()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    configs = [c for c in CONFIGS if (not args.only or c.name in args.only.split(","))
               and not (c.experiment and args.no_experiments)]
    workdir = Path(tempfile.mkdtemp(prefix="ipv6milter-bench-"))
    workdir.chmod(0o755)
    sockdir, rundir = workdir / "sock", workdir / "run"
    sockdir.mkdir()
    sockdir.chmod(0o1777)
    rundir.mkdir()
    rundir.chmod(0o1777)
    print(f"bench: work directory {workdir}", flush=True)
    info = {"machine": machine(), "versions": versions(),
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")}
    print(f"bench: {info['machine']}", flush=True)
    # Workers (SPEC §4) may be unknown to this ipv6milter: ask it.
    workers_ok, workers_out = lab.config_accepted({"Workers": "1"}, rundir,
                                                  [_venv_bin("ipv6milter")])
    info["workers"] = "supported" if workers_ok else f"not supported: {workers_out[-300:]}"
    print(f"bench: ipv6milter's Workers key: {info['workers']}", flush=True)
    for c in configs:
        if c.name == "ipv6milter_w1" and not workers_ok:
            c.skipped = f"this ipv6milter does not know the Workers key (ipv6milter -n: " \
                        f"{workers_out[-200:]})"
        if c.name == "ipv6milter" and not workers_ok:
            c.label = "ipv6milter (enforce, one process: no Workers key)"

    key, record = make_key(2048)
    messages = {size: load.make_message(size, key) for size in SIZES}
    files = {}
    for size, msg in messages.items():
        files[size] = workdir / f"message-{size // 1024}k.eml"
        load.write_message_file(msg, files[size])

    result: dict[str, object] = {"info": info, "args": vars(args)}
    with contextlib.ExitStack() as stack:
        dns = stack.enter_context(run_knot(workdir / "knot", key, record))
        sink = stack.enter_context(run_sink())
        resolv = rundir / "resolv.conf"
        resolv.write_text(f"nameserver {dns.addr53}\noptions timeout:2 attempts:2\n")
        print(f"bench: Knot on 127.0.0.1/::1 port {dns.port} and {dns.addr53} port 53",
              flush=True)

        cmds = daemon_commands(sockdir, rundir, dns.nameserver, dns.addr53)
        daemons: dict[str, Milter] = {}
        idle_rss: dict[str, float] = {}  # MiB right after start, before any mail

        def stop_daemons() -> None:
            for m in daemons.values():
                m.terminate()
            for m in daemons.values():
                m.stop(timeout=15)

        stack.callback(stop_daemons)
        wanted = {d for c in configs if not c.skipped for d in c.daemons}
        for name in sorted(wanted):
            if name not in cmds:
                continue
            cmd = cmds[name]
            try:
                daemons[name] = start_milter(name, cmd.argv, socket_path(sockdir, name), workdir,
                                             resolv_conf=resolv if cmd.private_resolv else None,
                                             env=cmd.env, timeout=cmd.start_timeout,
                                             ready=cmd.ready)
                print(f"bench: {name} running, pid {daemons[name].pid}", flush=True)
                idle_rss[name] = _idle_rss_kib(daemons[name].pid) / 1024
            except BenchError as e:
                print(f"bench: {name} did not start: {e}", flush=True)
        for c in configs:
            missing = [d for d in c.daemons if d not in daemons]
            if missing and not c.skipped:
                c.skipped = f"not available: {', '.join(missing)} (not installed or did not start)"
        live = [c for c in configs if not c.skipped]
        specs = {c.name: ",".join(daemons[d].socket_spec for d in c.daemons) for c in live}
        postfix = stack.enter_context(run_postfix(
            workdir, sink.port, specs, {c.name: c.service for c in live if c.service}))
        bench = Bench(postfix, daemons, messages, files)
        bench.deadline = started + 60 * args.max_minutes

        # 1. Did each configuration do its work?  One delivered sample each.
        for c in live:
            try:
                send_sample(postfix.ports[c.name], messages[4096], c.name, c.client)
                raw = wait_sample(sink, c.name)
            except (BenchError, load.SmtpError, OSError) as e:
                c.skipped = f"verification sample failed: {e}"
                continue
            found = auth_results(raw)
            lacking = [e for e in c.expect if not any(e in v for v in found)]
            if lacking:
                c.skipped = f"its header lacks {lacking}: found {found}"
            else:
                c.verified = "; ".join(found) if found else "delivered (nothing to stamp)"
                if found:
                    c.verified += f" [{header_position(raw)}]"
            print(f"bench: verify {c.name}: {c.skipped or c.verified}", flush=True)
        live = [c for c in live if not c.skipped]

        main_confs = [c for c in live if not c.experiment and not c.scoping]
        exp_confs = [c for c in live if c.experiment]
        scoping_confs = [c for c in live if c.scoping]
        counts = measure(bench, main_confs, cells, args.rounds, args.seconds,
                         args.latency_count, "main") if main_confs else {}
        if scoping_confs:
            measure(bench, scoping_confs, scoping_cells, args.rounds, args.seconds,
                    args.latency_count, "scoping")
        if exp_confs and not args.no_experiments:
            # The baseline is measured again, alternating with its variants.
            base = [c for c in main_confs if c.name in ("noop", "ipv6milter")]
            cells = {c.name: NOOP_EXPERIMENT_CELLS if c.name.startswith("noop") else
                     EXPERIMENT_CELLS for c in base + exp_confs}
            measure(bench, base + exp_confs, cells, max(1, min(args.rounds, 2)),
                    args.seconds * 0.75, max(10, args.latency_count // 2), "experiment")

        # 4. Where ipv6milter's time goes: py-spy during a 4 KB c=8 run.
        ipv6 = next((c for c in live if c.name == "ipv6milter" and not c.skipped), None)
        if ipv6 and not args.no_profile and ("ipv6milter", 4096, 8) in counts:
            n = int(counts[("ipv6milter", 4096, 8)] * 8 / args.seconds)  # ~8 s
            print(f"bench: profiling ipv6milter (py-spy, {n} messages, 4 KB c=8)", flush=True)
            result["profile"] = profile_ipv6milter(bench, ipv6, n,
                                                   out / "profile-ipv6milter.txt", workdir)
        # 5. Its parts in isolation (same code, same DNS server, no MTA).
        if ipv6 and not args.no_micro:
            print("bench: micro-benchmarks of ipv6milter's parts", flush=True)
            micro_out = workdir / "micro.json"
            mp = subprocess.run(
                [sys.executable, "-m", "bench.micro", "--nameserver", dns.nameserver,
                 "--message-4k", str(files[4096]), "--message-100k", str(files[102400]),
                 "--out", str(micro_out)],
                cwd=ROOT, capture_output=True, text=True, timeout=300,
            )
            if mp.returncode == 0 and micro_out.exists():
                result["micro"] = json.loads(micro_out.read_text())
            else:
                result["micro"] = {"error": (mp.stdout + mp.stderr)[-2000:]}
                print(f"bench: micro failed: {result['micro']}", flush=True)

        stop_daemons()
        noop_log = daemons["noop"].log.read_text(errors="replace") if "noop" in daemons else ""
        m = re.search(r"messages=(\d+)", noop_log)
        result["noop_messages"] = int(m.group(1)) if m else None

    result["idle_rss"] = idle_rss
    result["configs"] = [
        {"name": c.name, "label": c.label, "skipped": c.skipped, "verified": c.verified,
         "daemons": list(c.daemons), "experiment": c.experiment, "scoping": c.scoping,
         "client": c.client, "service": c.service}
        for c in configs
    ]
    result["samples"] = [vars(s) for s in bench.samples]
    result["latency"] = {f"{k[0]}|{k[1]}|{k[2]}": v for k, v in bench.latency.items()}
    result["noop_expected"] = bench.sent.get("noop", 0) + 1  # + the sample
    result["wall_seconds"] = time.monotonic() - started
    info["machine"]["loadavg_at_end"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    (out / "results.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    text = report.markdown(result)
    (out / "results.md").write_text(text)
    try:
        report.plot(result, out / "results.png")
    except ImportError as e:
        print(f"bench: no plot ({e})", flush=True)
    print(text, flush=True)
    print(f"bench: wall time {result['wall_seconds']:.0f} s; results in {out}", flush=True)
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    failed = [s for s in bench.samples if not s.ok]
    if failed:
        print(f"bench: {len(failed)} of {len(bench.samples)} runs failed and were left out"
              " (see results.md, Checks)", flush=True)
    ipv6 = [c for c in configs if c.name == "ipv6milter"]
    if not ipv6 or ipv6[0].skipped or not ipv6[0].verified:
        print("bench: ipv6milter itself was not measured", flush=True)
        return 1
    return 1 if len(failed) > len(bench.samples) // 10 else 0


if __name__ == "__main__":
    sys.exit(main())
