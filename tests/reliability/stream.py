"""A bounded stream of SMTP transactions through Postfix, and what became of each.

Every message is in scope (an IPv6 client claimed with XCLIENT, an
opted-in recipient) and would be accepted with DNS working: its client,
HELO and sender names are its own (``zones.stream_*``), so each message
asks DNS something new and every DNS fault is felt.  Two in three pass by
SPF; the third fails SPF and passes by a DKIM signature whose selector is
its own too.
"""

from __future__ import annotations

import re
import smtplib
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import dkim

from tests.integration.harness import AUTHSERV_ID, Sink
from tests.integration.smtpclient import header_fields, make_message, parse_ar, unfold

from .zones import STREAM, stream_addr, stream_host, stream_key

RCPT = "rcpt@example.com"
SMTP_TIMEOUT = 60


@dataclass
class Sent:
    """One transaction as the client saw it."""

    n: int
    phase: str
    start: float
    end: float = 0.0
    stage: str = ""  # where it ended: data (accepted), or the refusing command
    code: int = 0
    text: str = ""
    disconnected: bool = False

    @property
    def accepted(self) -> bool:
        return self.stage == "data" and self.code == 250

    @property
    def reply(self) -> str:
        return f"{self.code} {self.text}".strip()


def mark_of(n: int) -> str:
    return f"stream{n:06d}"


def build_message(n: int) -> tuple[str, bytes, str]:
    """(envelope sender, message bytes, HELO) of message ``n``."""
    mark = mark_of(n)
    helo = stream_host(n)
    if n % 3 == 2:
        sender = f"user@x{n}.fail.{STREAM}"
        msg = make_message(mark, from_addr=sender, to=RCPT)
        key = stream_key()[0]
        sig = dkim.sign(
            msg, f"k{n}".encode(), STREAM.encode(), key,
            canonicalize=(b"relaxed", b"simple"),
            include_headers=[b"from", b"to", b"subject", b"date", b"message-id"],
        )
        return sender, sig + msg, helo
    sender = f"user@{helo}"
    return sender, make_message(mark, from_addr=sender, to=RCPT), helo


def send(port: int, n: int, phase: str, message: tuple[str, bytes, str] | None = None) -> Sent:
    """One transaction on its own connection, claiming client ``n``."""
    sender, msg, helo = message or build_message(n)
    out = Sent(n, phase, time.monotonic())

    def done(stage: str, code: int, text: bytes | str) -> Sent:
        out.stage, out.code = stage, code
        out.text = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
        out.end = time.monotonic()
        return out

    stage = "connect"
    s: smtplib.SMTP | None = None
    try:
        s = smtplib.SMTP("127.0.0.1", port, timeout=SMTP_TIMEOUT)
        stage = "ehlo"
        code, text = s.ehlo("client.test")
        if code != 250:
            return done(stage, code, text)
        stage = "xclient"
        code, text = s.docmd("XCLIENT", f"ADDR=IPV6:{stream_addr(n)} NAME=[UNAVAILABLE]")
        if code != 220:
            return done(stage, code, text)
        stage = "ehlo2"
        code, text = s.ehlo(helo)
        if code != 250:
            return done(stage, code, text)
        stage = "mail"
        code, text = s.mail(sender)
        if code != 250:
            return done(stage, code, text)
        stage = "rcpt"
        code, text = s.rcpt(RCPT)
        if code != 250:
            return done(stage, code, text)
        stage = "data"
        code, text = s.data(msg)
        return done(stage, code, text)
    except smtplib.SMTPResponseException as e:
        return done(stage, e.smtp_code, e.smtp_error)
    except (smtplib.SMTPServerDisconnected, OSError) as e:
        out.disconnected = True
        return done(stage, 0, f"{type(e).__name__}: {e}")
    finally:
        if s is not None:
            try:
                s.quit()
            except (smtplib.SMTPException, OSError):
                s.close()


class Stream:
    """``total`` messages from ``clients`` threads.

    ``set_phase`` records what is going on (a fault, or ``clean``) with its
    time; each message is labelled with the fault its transaction overlapped,
    or, when it overlapped none, with the clean phase it ran in.  After a 4xx
    a client waits ``backoff`` seconds before its next message, as a sending
    MTA would, instead of spinning through the stream while the milter is
    down.
    """

    def __init__(self, port: int, total: int, clients: int, clean: tuple[str, ...],
                 backoff: float = 0.2):
        self.port = port
        self.total = total
        self.clients = clients
        self.clean = clean
        self.backoff = backoff
        self.history: list[tuple[float, str]] = [(0.0, clean[0])]
        self.sent: list[Sent] = []
        self._next = 0
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def set_phase(self, name: str) -> None:
        with self._lock:
            self.history.append((time.monotonic(), name))

    @property
    def phase(self) -> str:
        with self._lock:
            return self.history[-1][1]

    def label(self, s: Sent) -> str:
        """The first fault that overlapped the transaction, else its clean phase."""
        spans = []
        for i, (t, name) in enumerate(self.history):
            end = self.history[i + 1][0] if i + 1 < len(self.history) else float("inf")
            if t <= s.end and end >= s.start:
                spans.append(name)
        faults = [p for p in spans if p not in self.clean]
        return faults[0] if faults else spans[0]

    @property
    def started(self) -> int:
        with self._lock:
            return self._next

    def _take(self) -> int | None:
        with self._lock:
            if self._next >= self.total:
                return None
            n = self._next
            self._next += 1
            return n

    def _worker(self) -> None:
        while (n := self._take()) is not None:
            result = send(self.port, n, "")
            with self._lock:
                self.sent.append(result)
            if not result.accepted:
                time.sleep(self.backoff)

    def start(self) -> None:
        self._threads = [
            threading.Thread(target=self._worker, name=f"client{i}", daemon=True)
            for i in range(self.clients)
        ]
        for t in self._threads:
            t.start()

    def wait_started(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.started < count and time.monotonic() < deadline:
            time.sleep(0.01)

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        stuck = [t.name for t in self._threads if t.is_alive()]
        if stuck:
            raise AssertionError(f"client threads still running after {timeout} s: {stuck}")


# -- reconciliation ---------------------------------------------------------------------------

_MARK = re.compile(rb"Message-ID: <(stream\d{6})@")


@dataclass
class Delivered:
    ours: int  # Authentication-Results fields with our authserv-id
    first_is_ours: bool
    parses: bool
    copies: int = 1


def delivered(sink: Sink) -> dict[str, Delivered]:
    """The stream's messages in the sink, by mark, with their headers checked."""
    out: dict[str, Delivered] = {}
    for msg in sink.messages:
        m = _MARK.search(msg.data)
        if not m:
            continue
        mark = m.group(1).decode()
        if mark in out:
            out[mark].copies += 1
            continue
        fields = header_fields(msg.data)
        ours = [
            v for name, v in fields
            if name.lower() == "authentication-results"
            and unfold(v).strip().lower().startswith(AUTHSERV_ID + ";")
        ]
        first = bool(fields) and fields[0][0] == "Authentication-Results" and bool(ours)
        try:
            parses = bool(ours) and parse_ar(ours[0]).authserv_id == AUTHSERV_ID
        except Exception:  # authres raises its own SyntaxError and others
            parses = False
        out[mark] = Delivered(len(ours), first and fields[0][1] == ours[0], parses)
    return out


@dataclass
class Reconciliation:
    rows: dict[str, Counter[str]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def count(self, phase: str, column: str) -> None:
        self.rows.setdefault(phase, Counter())[column] += 1

    def table(self, phases: list[str], columns: list[str]) -> list[str]:
        widths = [max(6, len(c)) + 2 for c in columns]

        def line(first: str, cells: list[object]) -> str:
            return f"{first:<15}" + "".join(
                f"{c!s:>{w}}" for c, w in zip(cells, widths, strict=True)
            )

        head = line("phase", list(columns))
        lines = [head, "-" * len(head)]
        total: Counter[str] = Counter()
        for p in phases:
            row = self.rows.get(p, Counter())
            total.update(row)
            lines.append(line(p, [row[c] for c in columns]))
        lines.append("-" * len(head))
        lines.append(line("total", [total[c] for c in columns]))
        return lines


COLUMNS = ["sent", "delivered", "4xx", "4.4.3 dns", "4.7.1 mta", "4.3.0 bug", "other 4xx",
           "5xx", "lost", "dropped"]


def reconcile(sent: list[Sent], got: dict[str, Delivered]) -> Reconciliation:
    """Every message: delivered once, stamped once, or refused with a 4xx."""
    r = Reconciliation()
    for s in sent:
        mark = mark_of(s.n)
        r.count(s.phase, "sent")
        d = got.get(mark)
        if s.accepted:
            if d is None:
                r.count(s.phase, "lost")
                r.problems.append(f"{mark}: accepted ({s.reply}) but never delivered")
                continue
            r.count(s.phase, "delivered")
            if d.ours != 1 or not d.first_is_ours or not d.parses or d.copies != 1:
                r.problems.append(
                    f"{mark}: delivered with {d.ours} of our headers (first={d.first_is_ours},"
                    f" parses={d.parses}, copies={d.copies})"
                )
            continue
        if d is not None:
            r.problems.append(f"{mark}: refused at {s.stage} ({s.reply}) yet delivered")
        if s.disconnected or s.code == 0:
            r.count(s.phase, "dropped")
            r.problems.append(f"{mark}: no SMTP reply at {s.stage}: {s.text}")
        elif 400 <= s.code < 500:
            r.count(s.phase, "4xx")
            if "4.4.3" in s.text:
                r.count(s.phase, "4.4.3 dns")
            elif "4.7.1" in s.text:
                r.count(s.phase, "4.7.1 mta")
            elif "4.3.0" in s.text:
                r.count(s.phase, "4.3.0 bug")
                r.problems.append(f"{mark}: internal error reply at {s.stage}: {s.reply}")
            else:
                r.count(s.phase, "other 4xx")
        elif 500 <= s.code < 600:
            r.count(s.phase, "5xx")
            r.problems.append(f"{mark}: 5xx at {s.stage} during {s.phase}: {s.reply}")
        else:
            r.count(s.phase, "dropped")
            r.problems.append(f"{mark}: unexpected reply at {s.stage}: {s.reply}")
    return r
