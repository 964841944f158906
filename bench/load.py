"""The load: pre-signed messages, smtp-source runs, a timed SMTP client for
latency, and per-process CPU and memory from /proc.

Every loop here is bounded in count and in time.
"""

from __future__ import annotations

import email.utils
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import dkim

from .servers import DOMAIN, HELO, LOAD_RCPT, SELECTOR, SENDER

CLK_TCK = os.sysconf("SC_CLK_TCK")


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
    port: int, message_file: Path, count: int, concurrency: int, timeout: float | None = None
) -> RunResult:
    """``count`` messages, one SMTP session each, ``concurrency`` at a time,
    from [::1] to Postfix's [::1]:port; wall time of the whole run (bounded:
    by default it may take 30 s plus 0.1 s a message)."""
    if timeout is None:
        timeout = 30 + count / 10
    exe = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
    argv = [
        exe, "-6", "-s", str(concurrency), "-m", str(count), "-F", str(message_file),
        "-f", SENDER, "-t", LOAD_RCPT, "-M", HELO, f"[::1]:{port}",
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

    def __init__(self, port: int, timeout: float = 30.0):
        self.port = port
        self.timeout = timeout

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
        with socket.create_connection(("::1", self.port), timeout=self.timeout) as s:
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


def latencies(port: int, msg: bytes, count: int, time_limit: float = 60.0) -> list[float]:
    """Sequential sessions (concurrency 1): each one's time in seconds."""
    session = SmtpSession(port)
    out = []
    deadline = time.monotonic() + time_limit
    for _ in range(count):
        if time.monotonic() > deadline:
            break
        out.append(session.send(msg))
    return out


# -- /proc ------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (every thread), in seconds."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def reset_peak_rss(pid: int) -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0, clear_refs value 5)."""
    with open(f"/proc/{pid}/clear_refs", "w") as fh:
        fh.write("5")


def peak_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def quantile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    v = sorted(values)
    pos = (len(v) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)
