"""``ipv6milter-report``: what the policy refused, and would refuse, from the decision log.

Reads decision lines (SPEC §4, ``logfmt``) from files or standard input,
whatever a log system put in front of them (a syslog prefix, ``journalctl``'s
short formats, the milter's own ``INFO ipv6milter.milter:`` on stderr), and
prints:

- refusals and would-be refusals by stage and reply;
- the senders behind them: sender domain, client /64 network, PTR name;
- the iprev/spf/dkim mix of the in-scope mail that was accepted.

Memory stays bounded whatever the size of the input: only counters are kept,
and each table tracks at most ``--max-keys`` distinct rows.  When a table is
full, the less counted half of its rows is folded into one "other" row (so
totals stay exact); a row that comes back after being folded starts again
from zero, and the report says that its counts are then lower bounds.

Exit status: 0 the report was written; 1 an input could not be read (the
others are still reported); 2 a usage error.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import gzip
import json
import re
import socket
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, TextIO

from . import __version__, logfmt

MARK = b"decision stage="

# What may stand before "decision stage=" on a line of ours, anchored at the
# start of the line: a syslog priority, a time and a host, the syslog tag,
# the level and logger of the stderr format.  Anything else (a Postfix line
# quoting a client's HELO or pipelined text, for one) is not the milter's
# decision, whatever follows: counted as a line that does not parse.
_TIME = (r"(?:\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(?:[.,]\d+)?(?:Z|[+-]\d\d:?\d\d)?"
         r"|[A-Z][a-z]{2} +\d{1,2} \d\d:\d\d:\d\d(?:\.\d+)?"
         r"|[A-Z][a-z]{2} \d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?: [A-Z]{2,5})?"
         r"|\d{9,}(?:\.\d+)?)")
_OUR_PREFIX = re.compile(
    r"(?:<\d{1,3}>)?"
    r"(?:1 " + _TIME + r" \S+ \S*ipv6milter\S* \S+ \S+ - "  # RFC 5424, no structured data
    r"|(?:" + _TIME + r" \S+ )?(?:[^\s\[:]*ipv6milter[^\s\[:]*(?:\[\d+\])?: )?)"
    r"(?:(?:DEBUG|INFO|WARNING|ERROR|CRITICAL) ipv6milter(?:\.\w+)*: )?"
)
MAX_LINE = 1 << 20
MAX_FIELD = 200  # characters of a value kept in a key (logfmt writes no more)
DEFAULT_MAX_KEYS = 10_000
OTHER = "(other)"
ALIGNED_REPLY = "450 4.7.26 aligned"
NO_PTR = "no PTR"

# What each enhanced code means, for the text table.
MEANING = {
    "5.2.1": "recipient domain not opted in (AcceptDomains)",
    "4.7.25": "no valid reverse DNS (PTR)",
    "4.7.26": "neither SPF nor DKIM passed",
    "4.7.26 aligned": "no SPF/DKIM pass aligned with the From domain",
    "4.4.3": "temporary DNS failure",
    "4.3.0": "internal error",
}

# -- timestamps ----------------------------------------------------------------------

# ISO 8601 (RFC 5424 syslog, rsyslog's high-precision format, journalctl -o
# short-iso), optionally after a syslog priority "<13>1 ".
_ISO = re.compile(
    r"(?:<\d{1,3}>\d? ?)?(\d{4}-\d\d-\d\d)[T ](\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:?\d\d)?"
)
# RFC 3164 syslog and journalctl's default: "Dec  1 15:09:05".
_BSD = re.compile(r"(?:<\d{1,3}>)?([A-Z][a-z]{2}) +(\d{1,2}) (\d\d):(\d\d):(\d\d)")
_EPOCH = re.compile(r"(\d{9,}(?:\.\d+)?) ")
_WEEKDAY = re.compile(r"[A-Z][a-z]{2} \d{4}-")
_MONTHS = {m: i for i, m in enumerate(
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1)}


class Clock:
    """Turns the prefix of a log line into a POSIX time, or None.

    Times without a zone are local time.  A syslog time has no year: the
    most recent year that does not put it more than a day in the future.
    One second of log carries many lines with the same prefix: the last
    answers are remembered.
    """

    def __init__(self, now: float | None = None):
        self.now = time.time() if now is None else now
        self._cache: dict[str, float | None] = {}

    def __call__(self, line: str) -> float | None:
        head = line[:40]
        m = _EPOCH.match(head)  # journalctl -o short-unix
        if m:
            return float(m.group(1))
        if _WEEKDAY.match(head):  # journalctl -o short-full: "Tue 2026-12-01 15:09:05 UTC"
            head = head[4:].replace(" UTC ", "Z ", 1)
        m = _ISO.match(head)
        if m:
            key = m.group(0)
            if key not in self._cache:
                self._remember(key, _iso_time(m))
            return self._cache[key]
        m = _BSD.match(head)
        if m:
            key = m.group(0)
            if key not in self._cache:
                self._remember(key, self._bsd_time(m))
            return self._cache[key]
        return None

    def _remember(self, key: str, value: float | None) -> None:
        if len(self._cache) > 4096:
            self._cache.clear()
        self._cache[key] = value

    def _bsd_time(self, m: re.Match[str]) -> float | None:
        month = _MONTHS.get(m.group(1))
        if month is None:
            return None
        year = dt.datetime.fromtimestamp(self.now).year
        for y in (year, year - 1):
            try:
                t = dt.datetime(y, month, int(m.group(2)), int(m.group(3)), int(m.group(4)),
                                int(m.group(5))).timestamp()
            except ValueError:  # Feb 29 of another year, day 31 of a short month
                continue
            if t <= self.now + 86400:
                return t
        return None


def _iso_time(m: re.Match[str]) -> float | None:
    zone = m.group(4) or ""
    if zone and zone != "Z" and ":" not in zone:
        zone = zone[:3] + ":" + zone[3:]
    try:
        return dt.datetime.fromisoformat(
            f"{m.group(1)}T{m.group(2)}{m.group(3) or ''}{'+00:00' if zone == 'Z' else zone}"
        ).timestamp()
    except ValueError:
        return None


_RELATIVE = re.compile(r"(\d+)\s*([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_when(text: str, now: float | None = None) -> float:
    """``--since``/``--until``: ISO date or date and time (local unless it
    carries a zone), or a span back from now (``90m``, ``24h``, ``7d``)."""
    now = time.time() if now is None else now
    t = text.strip()
    m = _RELATIVE.fullmatch(t)
    if m:
        return now - int(m.group(1)) * _UNITS[m.group(2)]
    try:
        return dt.datetime.fromisoformat(t.replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise ValueError(
            f"not a time: {text!r} (use 2026-12-01, '2026-12-01 15:00', 2026-12-01T15:00Z or 24h)"
        ) from None


def iso(t: float | None) -> str | None:
    if t is None:
        return None
    return dt.datetime.fromtimestamp(t).astimezone().isoformat(timespec="seconds")


def _short_time(t: float | None) -> str:
    if t is None:
        return "-"
    return dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")


# -- bounded tables ---------------------------------------------------------------------


class Table:
    """Counters for at most ``limit`` keys: ``[count, first, last, extra]``.

    When a new key finds the table full, the less counted half of the rows is
    folded into ``other`` (lossy counting): totals stay exact, the rows kept
    are the heavy ones, and ``folded`` says how many rows were given up.
    """

    def __init__(self, limit: int):
        self.limit = max(2, limit)
        self.rows: dict[tuple[str, ...], list[Any]] = {}
        self.other: list[Any] = [0, None, None, 0]
        self.folded = 0

    def add(self, key: tuple[str, ...], t: float | None, extra: int = 0) -> None:
        row = self.rows.get(key)
        if row is None:
            if len(self.rows) >= self.limit:
                self._fold()
            row = self.rows[key] = [0, t, t, 0]
        row[0] += 1
        row[3] += extra
        if t is not None:
            _widen(row, t)

    def _fold(self) -> None:
        ranked = sorted(self.rows.items(), key=lambda kv: kv[1][0])
        for key, row in ranked[: len(ranked) // 2]:
            del self.rows[key]
            self.other[0] += row[0]
            self.other[3] += row[3]
            for t in (row[1], row[2]):
                if t is not None:
                    _widen(self.other, t)
            self.folded += 1

    def top(self, n: int) -> list[tuple[tuple[str, ...], list[Any]]]:
        ranked = sorted(self.rows.items(), key=lambda kv: (-kv[1][0], kv[0]))
        return ranked if n <= 0 else ranked[:n]

    @property
    def total(self) -> int:
        return sum(r[0] for r in self.rows.values()) + self.other[0]


def _widen(row: list[Any], t: float) -> None:
    if row[1] is None or t < row[1]:
        row[1] = t
    if row[2] is None or t > row[2]:
        row[2] = t


# -- reading -----------------------------------------------------------------------------


@dataclass
class Report:
    max_keys: int = DEFAULT_MAX_KEYS
    since: float | None = None
    until: float | None = None
    clock: Clock = field(default_factory=Clock)
    lines: int = 0
    decisions: int = 0
    unparsed: int = 0
    out_of_range: int = 0
    untimed: int = 0  # skipped: no time on the line, with --since/--until
    messages: int = 0  # in-scope stage=eom lines
    accepted: int = 0
    accepted_would: int = 0  # accepted, but enforcement would have refused them
    replies: Table = field(init=False)
    senders: Table = field(init=False)
    mix: Table = field(init=False)
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.replies = Table(self.max_keys)
        self.senders = Table(self.max_keys)
        self.mix = Table(self.max_keys)
        self._nets: dict[str, str] = {}

    def feed(self, lines: Iterable[bytes]) -> None:
        for raw in lines:
            self.lines += 1
            if MARK not in raw:
                continue
            self.line(raw.decode("utf-8", "replace"))

    def line(self, text: str) -> None:
        at = text.find(logfmt.PREFIX + "stage=")
        if at < 0:
            return  # not a decision line at all
        fields = logfmt.find_decision(text) if _OUR_PREFIX.fullmatch(text, 0, at) else None
        if fields is None or not {"stage", "client", "reply"} <= fields.keys() or (
            fields["stage"] not in ("rcpt", "eom")
        ):
            self.unparsed += 1
            return
        refused = fields["reply"] != "accept"
        would = fields.get("would_reply", "-")
        is_refusal = refused or would != "-"
        in_scope = fields.get("scope") == "ipv6"
        if not (is_refusal or (in_scope and fields["stage"] == "eom")):
            return  # an accepted recipient (debug level): the message's line counts it
        period = self.since is not None or self.until is not None
        t = self.clock(text) if (is_refusal or period) else None
        if period:
            if t is None:
                self.untimed += 1
                return
            if (self.since is not None and t < self.since) or (
                self.until is not None and t >= self.until
            ):
                self.out_of_range += 1
                return
        self.decisions += 1
        stage = fields["stage"]
        if stage == "eom" and in_scope:
            self.messages += 1
            if not refused:
                self.accepted += 1
                self.accepted_would += would != "-"
                self.mix.add((_v(fields, "iprev"), _v(fields, "spf"), _dkim(fields)), t,
                             1 if would != "-" else 0)
        if not is_refusal:
            return
        status, reply = ("refused", fields["reply"]) if refused else ("would refuse", would)
        reply = reply[:MAX_FIELD]
        if stage == "eom" and reply == "450 4.7.26" and fields.get("alignment", "-") != "-":
            # From-aligned mode's refusal keeps 4.7.26 (SPEC §1) but is a rule
            # of its own: an administrator turning Alignment on needs to see
            # what it adds to the refusals.
            reply = ALIGNED_REPLY
        self.replies.add((status, stage, reply), t)
        self.senders.add(
            (status, reply, _v(fields, "from_domain"), self._network(fields["client"][:MAX_FIELD]),
             _ptr(fields)),
            t,
        )

    def _network(self, client: str) -> str:
        """The client's /64 (an IPv4 client: its address), RFC 5952 form.

        inet_pton/inet_ntop rather than ``ipaddress``: a tenth of the time,
        and glibc's text form is RFC 5952's (no lone ``:0:`` shortened).
        """
        net = self._nets.get(client)
        if net is None:
            try:
                packed = socket.inet_pton(socket.AF_INET6, client)
            except OSError:
                try:
                    net = socket.inet_ntop(socket.AF_INET, socket.inet_pton(socket.AF_INET,
                                                                            client))
                except OSError:
                    net = client[:MAX_FIELD]
            else:
                net = socket.inet_ntop(socket.AF_INET6, packed[:8] + bytes(8)) + "/64"
            if len(self._nets) > 65536:
                self._nets.clear()
            self._nets[client] = net
        return net

    def read(self, names: Sequence[str], stdin: IO[bytes]) -> None:
        for name in names or ["-"]:
            try:
                if name == "-":
                    self.feed(_bounded_lines(stdin))
                else:
                    with _open(name) as fh:
                        self.feed(_bounded_lines(fh))
            except (OSError, EOFError, gzip.BadGzipFile) as e:
                reason = e.strerror if isinstance(e, OSError) and e.strerror else e
                self.errors.append(f"{name}: {reason}")


def _bounded_lines(fh: IO[bytes]) -> Iterator[bytes]:
    """The file's lines, a line longer than MAX_LINE in pieces: memory stays
    bounded even for a file without line ends.  A decision line is a few
    hundred bytes (logfmt keeps 200 characters of a value)."""
    return iter(lambda: fh.readline(MAX_LINE), b"")


def _open(name: str) -> IO[bytes]:
    if name.endswith(".gz"):
        return gzip.open(name, "rb")  # logrotate's compressed generations
    return open(name, "rb")


def _v(fields: dict[str, str], key: str) -> str:
    return fields.get(key, "-")[:MAX_FIELD] or "-"


def _ptr(fields: dict[str, str]) -> str:
    """The first PTR name; ``no PTR`` when the lookup found none; ``-`` when
    it was not looked at (a 550 for a domain not opted in comes first) or
    failed temporarily."""
    ptr = _v(fields, "ptr")
    if ptr != "-":
        return ptr
    return NO_PTR if fields.get("iprev") in ("permerror", "fail") else "-"


def _dkim(fields: dict[str, str]) -> str:
    """One word for a message: ``pass`` if any signature verified, else the
    results that occurred (``fail+permerror``), ``none`` unsigned."""
    results = set(fields.get("dkim", "-").split(","))
    if "pass" in results:
        return "pass"
    return "+".join(sorted(results))[:MAX_FIELD]


# -- output ------------------------------------------------------------------------------

# What must not reach a terminal as itself (SPEC §3): C0 and C1 controls,
# the Unicode format characters (the bidirectional embeddings, overrides and
# isolates U+202A-U+202E and U+2066-U+2069 that reorder what follows them, the
# marks, zero-width characters, the byte order mark), line and paragraph
# separators, surrogates, and everything past the BMP (its tag characters are
# invisible too).
_ESCAPED = re.compile(
    "[\x00-\x1f\x7f-\x9f\u00ad\u061c\u180e\u200b-\u200f\u2028-\u202e\u2060-\u206f"
    "\ud800-\udfff\ufeff\ufff9-\ufffb\U00010000-\U0010ffff]")


def _escape(m: re.Match[str]) -> str:
    n = ord(m.group())
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"


def _cell(value: object, width: int = 48) -> str:
    """Text for a terminal: every control and bidi character escaped (shown as
    ``\\u202e``, so that what a sender wrote is seen, not obeyed), long
    names shortened."""
    s = _ESCAPED.sub(_escape, str(value))
    return s if len(s) <= width else s[: width - 1] + "…"


def _table(out: TextIO, head: Sequence[str], rows: Sequence[Sequence[object]],
           right: Iterable[int] = ()) -> None:
    cells = [[_cell(c) for c in head]] + [[_cell(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]
    right = set(right)
    for r in cells:
        parts = [c.rjust(w) if i in right else c.ljust(w)
                 for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        out.write(("  " + "  ".join(parts)).rstrip() + "\n")


def _fmt(n: int) -> str:
    return f"{n:,}"


def write_text(rep: Report, out: TextIO, top: int) -> None:
    out.write(f"ipv6milter-report {__version__}: {_fmt(rep.lines)} lines read, "
              f"{_fmt(rep.decisions)} decisions counted\n")
    if rep.unparsed:
        what = "line looked like a decision" if rep.unparsed == 1 else \
            "lines looked like decisions"
        out.write(f"  {_fmt(rep.unparsed)} {what} but could not be parsed (not counted)\n")
    if rep.since is not None or rep.until is not None:
        out.write(f"  period: {_short_time(rep.since)} to {_short_time(rep.until)}; "
                  f"{_fmt(rep.out_of_range)} decisions outside it, "
                  f"{_fmt(rep.untimed)} without a time (not counted)\n")
    out.write(f"  in-scope messages: {_fmt(rep.messages)}, accepted {_fmt(rep.accepted)} "
              f"(of which enforcement would refuse {_fmt(rep.accepted_would)}), "
              f"refused at end of data {_fmt(rep.messages - rep.accepted)}\n")

    out.write("\nRefusals by reply (refused: sent to the client; would refuse: Mode monitor "
              "or outside EnforceShare)\n")
    rows = [(s, st, r, _fmt(row[0]), _short_time(row[1]), _short_time(row[2]),
             MEANING.get(r.split(" ", 1)[-1], ""))
            for (s, st, r), row in rep.replies.top(0)]
    if rep.replies.other[0]:
        o = rep.replies.other
        rows.append((OTHER, "", "", _fmt(o[0]), _short_time(o[1]), _short_time(o[2]), ""))
    if rows:
        _table(out, ("status", "stage", "reply", "count", "first seen", "last seen", "meaning"),
               rows, right=(3,))
    else:
        out.write("  none\n")

    ranked = rep.senders.top(top)
    out.write(f"\nSenders behind them ({_shown(rep.senders, len(ranked))}; "
              "a rcpt refusal counts once per recipient)\n")
    rows = [(s, r, _fmt(row[0]), d, net, ptr, _short_time(row[1]),
             _short_time(row[2])) for (s, r, d, net, ptr), row in ranked]
    count, _ = hidden(rep.senders, len(ranked))
    if count:
        rows.append((OTHER, "", _fmt(count), "", "", "", "", ""))
    if rows:
        _table(out, ("status", "reply", "count", "sender domain", "client network", "PTR",
                     "first seen", "last seen"), rows, right=(2,))
    else:
        out.write("  none\n")

    ranked = rep.mix.top(top)
    out.write(f"\nAccepted in-scope mail by iprev / spf / dkim ({_shown(rep.mix, len(ranked))})\n")
    total = rep.accepted or 1
    rows = [(i, s, d, _fmt(row[0]), f"{100 * row[0] / total:.1f}%", _fmt(row[3]))
            for (i, s, d), row in ranked]
    count, would = hidden(rep.mix, len(ranked))
    if count:
        rows.append((OTHER, "", "", _fmt(count), f"{100 * count / total:.1f}%", _fmt(would)))
    if rows:
        _table(out, ("iprev", "spf", "dkim", "messages", "share", "would refuse"), rows,
               right=(3, 4, 5))
    else:
        out.write("  none\n")
    for t in (rep.replies, rep.senders, rep.mix):
        if t.folded:
            out.write(f"\nNote: more than {_fmt(t.limit)} distinct rows in a table; "
                      f"{_fmt(t.folded)} rarely seen rows were folded into {OTHER}, and the "
                      "counts shown are lower bounds (--max-keys raises the limit).\n")
            break
    for e in rep.errors:
        out.write(f"\nerror: {e}\n")


def _shown(t: Table, n: int) -> str:
    return f"top {n} of {_fmt(len(t.rows))} rows" if n < len(t.rows) else f"{n} rows"


def hidden(t: Table, shown: int) -> tuple[int, int]:
    """Count and would-refuse count of the rows past the first ``shown``,
    folded ones included."""
    rest = [r for _, r in t.top(0)[shown:]]
    return t.other[0] + sum(r[0] for r in rest), t.other[3] + sum(r[3] for r in rest)


def as_dict(rep: Report, top: int) -> dict[str, Any]:
    def stats(row: list[Any]) -> dict[str, Any]:
        return {"count": row[0], "first_seen": iso(row[1]), "last_seen": iso(row[2])}

    return {
        "version": __version__,
        "lines": rep.lines,
        "decisions": rep.decisions,
        "unparsed": rep.unparsed,
        "since": iso(rep.since),
        "until": iso(rep.until),
        "out_of_range": rep.out_of_range,
        "untimed": rep.untimed,
        "messages": rep.messages,
        "accepted": rep.accepted,
        "replies": [{"status": s, "stage": st, "reply": r, **stats(row)}
                    for (s, st, r), row in rep.replies.top(0)],
        "senders": [{"status": s, "reply": r, "from_domain": d, "network": n, "ptr": p,
                     **stats(row)} for (s, r, d, n, p), row in rep.senders.top(top)],
        "accepted_mix": [{"iprev": i, "spf": s, "dkim": d, "messages": row[0],
                          "would_refuse": row[3]} for (i, s, d), row in rep.mix.top(top)],
        "accepted_would_refuse": rep.accepted_would,
        # Rows past --top and rows folded away (--max-keys), summed.
        "senders_not_shown": hidden(rep.senders, min(len(rep.senders.rows), top or 1 << 62))[0],
        "accepted_mix_not_shown": hidden(rep.mix, min(len(rep.mix.rows), top or 1 << 62))[0],
        "folded_rows": {"replies": rep.replies.folded, "senders": rep.senders.folded,
                        "accepted_mix": rep.mix.folded},
        "errors": rep.errors,
    }


CSV_COLUMNS = ("section", "status", "stage", "reply", "from_domain", "network", "ptr",
               "iprev", "spf", "dkim", "count", "would_refuse", "first_seen", "last_seen")


# A cell a spreadsheet would take for a formula (OWASP "CSV injection"):
# "=cmd|' /C calc'!A0" in a sender's domain must stay text.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: object) -> object:
    """``value`` as a csv cell that stays data: a text starting with ``=``,
    ``+``, ``-``, ``@``, tab or CR gets a single quote in front (the OWASP
    rule); ``-``, this report's "nothing", is left as it is (a lone minus is
    no formula)."""
    if isinstance(value, str) and value.startswith(_FORMULA_START) and value != "-":
        return "'" + value
    return value


def write_csv(rep: Report, out: TextIO, top: int) -> None:
    """One table: a ``section`` column says which part of the report a row is."""
    # RFC 4180's CRLF: the csv module quotes a value holding any character of
    # the line terminator, so a CR in a sender's text cannot end the row.
    w = csv.DictWriter(out, CSV_COLUMNS, lineterminator="\r\n")
    w.writeheader()
    d = as_dict(rep, top)

    def row(values: dict[str, Any]) -> None:
        w.writerow({k: csv_cell(v) for k, v in values.items()})

    for key in ("lines", "decisions", "unparsed", "out_of_range", "untimed", "messages",
                "accepted"):
        row({"section": "summary", "status": key, "count": d[key]})
    for r in d["replies"]:
        row({"section": "reply", **r})
    for r in d["senders"]:
        row({"section": "sender", **r})
    for r in d["accepted_mix"]:
        row({"section": "accepted", "count": r.pop("messages"), **r})


# -- the command -----------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ipv6milter-report",
        description="Summarise ipv6milter's decision log: refusals, would-be refusals, "
                    "the senders behind them, and the iprev/spf/dkim mix of accepted mail.",
    )
    p.add_argument("files", nargs="*", metavar="FILE",
                   help="log files (.gz read too); '-' or none: standard input")
    p.add_argument("--format", choices=("text", "json", "csv"), default="text",
                   help="output format (default text)")
    p.add_argument("--since", metavar="TIME",
                   help="only decisions at or after TIME (2026-12-01, '2026-12-01 15:00', 24h)")
    p.add_argument("--until", metavar="TIME", help="only decisions before TIME")
    p.add_argument("--top", metavar="N", type=int, default=20,
                   help="rows of the sender and accepted-mail tables (default 20; 0: all)")
    p.add_argument("--max-keys", metavar="N", type=int, default=DEFAULT_MAX_KEYS,
                   help=f"distinct rows tracked per table (default {DEFAULT_MAX_KEYS}); "
                        "bounds the memory used")
    p.add_argument("--version", action="version", version=f"ipv6milter-report {__version__}")
    return p


def main(argv: Sequence[str] | None = None, stdin: IO[bytes] | None = None,
         stdout: TextIO | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    out = stdout or sys.stdout
    try:
        since = parse_when(args.since) if args.since else None
        until = parse_when(args.until) if args.until else None
    except ValueError as e:
        p.print_usage(sys.stderr)
        print(f"ipv6milter-report: error: {e}", file=sys.stderr)
        return 2
    if args.top < 0 or args.max_keys < 2:
        p.print_usage(sys.stderr)
        print("ipv6milter-report: error: --top must be >= 0 and --max-keys >= 2",
              file=sys.stderr)
        return 2
    rep = Report(max_keys=args.max_keys, since=since, until=until)
    rep.read(args.files, stdin or sys.stdin.buffer)
    try:
        if args.format == "json":
            json.dump(as_dict(rep, args.top), out, indent=2)
            out.write("\n")
        elif args.format == "csv":
            write_csv(rep, out, args.top)
        else:
            write_text(rep, out, args.top)
        out.flush()
    except BrokenPipeError:  # | head
        return 0
    for e in rep.errors:
        print(f"ipv6milter-report: {e}", file=sys.stderr)
    return 1 if rep.errors else 0


if __name__ == "__main__":
    sys.exit(main())
