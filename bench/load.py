"""The load: pre-signed messages, smtp-source runs, a timed SMTP client for
latency, and CPU and memory from /proc over each milter's whole process tree
(a prefork parent and its workers).

Every loop here is bounded in count and in time.
"""

from __future__ import annotations

import email.utils
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import dkim

from tests.lab import (  # noqa: F401  (re-exported)
    CLK_TCK,
    cpu_seconds,
    peak_rss_kib,
    pss_kib,
    reset_peak_rss,
    rss_kib,
    tree_cpu_seconds,
    tree_pids,
)

from .servers import CLIENT, DOMAIN, HELO, LOAD_RCPT, SELECTOR, SENDER

# -- messages ---------------------------------------------------------------------------


def make_message(total_size: int, key: bytes) -> bytes:
    """A text message of about ``total_size`` bytes (CRLF line ends), signed
    rsa-sha256 with a 2048-bit key, c=relaxed/relaxed, through one
    DKIM-Signature prepended to it."""
    head = (
        f"From: Bench Sender <{SENDER}>\r\n"
        f"To: <{LOAD_RCPT}>\r\n"
        f"Subject: ipv6milter benchmark, {total_size // 1024} KB\r\n"
        f"Date: {email.utils.formatdate(localtime=False)}\r\n"
        f"Message-ID: <bench-{total_size}@{DOMAIN}>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        "\r\n"
    ).encode()
    line = b"The quick brown fox jumps over the lazy dog; 0123456789 abcdefghij ABCDEFG\r\n"
    body = bytearray()
    budget = total_size - len(head) - 600  # the signature header is ~600 bytes
    n = 0
    while len(body) + len(line) <= max(budget, len(line)):
        body += f"{n:05d} ".encode() + line
        n += 1
    msg = head + bytes(body)
    sig = dkim.sign(
        msg,
        SELECTOR.encode(),
        DOMAIN.encode(),
        key,
        canonicalize=(b"relaxed", b"relaxed"),
        include_headers=[b"from", b"to", b"subject", b"date", b"message-id",
                         b"mime-version", b"content-type"],
    )
    return sig + msg


def write_message_file(msg: bytes, path: Path) -> None:
    """For ``smtp-source -F``: LF line ends (it appends CRLF to each line)."""
    path.write_bytes(msg.replace(b"\r\n", b"\n"))


# -- smtp-source ------------------------------------------------------------------------


@dataclass
class RunResult:
    count: int
    concurrency: int
    seconds: float
    ok: bool
    error: str = ""

    @property
    def rate(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else 0.0


def smtp_source(
    port: int, message_file: Path, count: int, concurrency: int, timeout: float | None = None,
    host: str = CLIENT,
) -> RunResult:
    """``count`` messages, one SMTP session each, ``concurrency`` at a time,
    from ``host`` ([::1], or 127.0.0.1: an IPv4 client) to Postfix's port on
    that address; wall time of the whole run (bounded: by default it may
    take 30 s plus 0.1 s a message)."""
    if timeout is None:
        timeout = 30 + count / 10
    exe = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
    family, target = ("-6", f"[{host}]:{port}") if ":" in host else ("-4", f"{host}:{port}")
    argv = [
        exe, family, "-s", str(concurrency), "-m", str(count), "-F", str(message_file),
        "-f", SENDER, "-t", LOAD_RCPT, "-M", HELO, target,
    ]
    start = time.perf_counter()
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return RunResult(count, concurrency, time.perf_counter() - start, False,
                         f"smtp-source did not finish in {timeout} s")
    seconds = time.perf_counter() - start
    err = (p.stdout + p.stderr).strip()
    return RunResult(count, concurrency, seconds, p.returncode == 0 and not err, err[-500:])


# -- a timed SMTP session ---------------------------------------------------------------


class SmtpError(RuntimeError):
    pass


def _dot_stuff(msg: bytes) -> bytes:
    lines = msg.split(b"\r\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return b"".join((b"." + ln if ln.startswith(b".") else ln) + b"\r\n" for ln in lines)


class SmtpSession:
    """One message in one SMTP session, as smtp-source sends it (no pipelining)."""

    def __init__(self, port: int, timeout: float = 30.0, host: str = CLIENT):
        self.port = port
        self.timeout = timeout
        self.host = host

    def _reply(self, f) -> bytes:  # type: ignore[no-untyped-def]
        last = b""
        for _ in range(100):
            line = f.readline(4096)
            if not line:
                raise SmtpError("connection closed")
            last = line
            if line[3:4] != b"-":
                return last
        raise SmtpError("reply too long")

    def send(self, msg: bytes, rcpt: str = LOAD_RCPT) -> float:
        """Send ``msg``; seconds from connect to the reply to QUIT."""
        data = _dot_stuff(msg) + b".\r\n"
        start = time.perf_counter()
        with socket.create_connection((self.host, self.port), timeout=self.timeout) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            f = s.makefile("rb")
            steps = [
                (None, b"220"),
                (f"EHLO {HELO}\r\n".encode(), b"250"),
                (f"MAIL FROM:<{SENDER}>\r\n".encode(), b"250"),
                (f"RCPT TO:<{rcpt}>\r\n".encode(), b"250"),
                (b"DATA\r\n", b"354"),
                (data, b"250"),
                (b"QUIT\r\n", b"221"),
            ]
            for out, want in steps:
                if out is not None:
                    s.sendall(out)
                reply = self._reply(f)
                if not reply.startswith(want):
                    raise SmtpError(f"expected {want.decode()}, got {reply!r}")
        return time.perf_counter() - start


def latencies(port: int, msg: bytes, count: int, time_limit: float = 60.0,
              host: str = CLIENT) -> list[float]:
    """Sequential sessions (concurrency 1): each one's time in seconds."""
    session = SmtpSession(port, host=host)
    out = []
    deadline = time.monotonic() + time_limit
    for _ in range(count):
        if time.monotonic() > deadline:
            break
        out.append(session.send(msg))
    return out


# -- /proc, over process trees ------------------------------------------------------


class MemorySampler:
    """Samples the summed RSS and PSS of every process of ``roots``' trees
    every ``interval`` seconds while a run goes on (VmHWM is per process: a
    prefork milter's total needs sampling).  PSS counts the pages a forked
    worker shares with its parent once; RSS counts them in every process.
    The trees are looked up again every ``rescan`` seconds (a scan of /proc
    costs ~2 ms; reading one process's figures ~0.03 ms)."""

    def __init__(self, roots: Callable[[], list[int]], interval: float = 0.1,
                 rescan: float = 1.0):
        self.roots = roots
        self.interval = interval
        self.rescan = rescan
        self.peak_rss_kib = 0
        self.peak_pss_kib = 0
        self.max_procs = 0
        self._pids: list[int] = []
        self._scanned = -float("inf")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self, rescan: bool = False) -> None:
        now = time.monotonic()
        if rescan or now - self._scanned >= self.rescan:
            self._pids = [p for r in self.roots() for p in tree_pids(r)]
            self._scanned = now
        pids = self._pids
        self.max_procs = max(self.max_procs, len(pids))
        self.peak_rss_kib = max(self.peak_rss_kib, sum(rss_kib(p) for p in pids))
        self.peak_pss_kib = max(self.peak_pss_kib, sum(pss_kib(p) for p in pids))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> MemorySampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sample(rescan=True)


def quantile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    v = sorted(values)
    pos = (len(v) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)
