"""The decision log's line format: ``key=value`` pairs in logfmt form (SPEC §4).

A value is written bare when it is non-empty and holds no space, ``"``,
``=`` or ``\\``; otherwise it is double-quoted with ``\\"`` and ``\\\\``
escaped.  Control characters never reach a line (they are replaced by
``?`` before quoting), so one decision is always one physical line, and
``parse(format(fields)) == fields`` for every value a client can send:
a hostile HELO cannot add or change a field.  Bytes that are not UTF-8
(pymilter hands them over as lone surrogates) are written as the text
``\\xNN``, so that the line is UTF-8 that every log destination takes,
syslog included (SPEC §4); ``printable`` does the same for any log line.

A decision line is ``decision `` followed by the pairs; whatever a log
system puts in front (a syslog prefix, the level of the stderr format) is
skipped by ``find_decision``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

PREFIX = "decision "
MISSING = "-"
MAX_VALUE = 200  # characters of one value kept in a line (a HELO can be 64 KiB)

# C0 and C1 controls and the Unicode line separators: nothing that a log
# reader could take for the end of a line.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_NEEDS_QUOTES = re.compile(r'[ "=\\]')
_PAIR = re.compile(r'([^ ="]+)=("(?:[^"\\]|\\.)*"|[^ "]*)')
_UNESCAPE = re.compile(r"\\(.)")
# Printable ASCII but space, '"', '=' and '\\': a value written as it is
# (most of them: domains, addresses, results), one match instead of the
# three passes of the general path.
_PLAIN = re.compile(r'[!#-<>-\[\]-~]+')


def printable(text: str) -> str:
    """``text`` as UTF-8 can carry it: a byte that was not UTF-8 (a lone
    surrogate from ``surrogateescape``) becomes the four characters ``\\xNN``,
    any other lone surrogate ``\\udNNN``; everything else is left alone."""
    if _SURROGATE.search(text) is None:
        return text
    return _SURROGATE.sub(_escape_surrogate, text)


def _escape_surrogate(m: re.Match[str]) -> str:
    code = ord(m.group())
    return f"\\x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"\\u{code:04x}"


def value(v: object) -> str:
    """One value as written: ``-`` for nothing, quoted when it must be."""
    if v is None or v == "":
        return MISSING
    text = v if type(v) is str else str(v)
    if len(text) <= MAX_VALUE and _PLAIN.fullmatch(text):
        return text  # nothing to replace, escape, cut or quote
    text = printable(_CONTROL.sub("?", text))[:MAX_VALUE]
    if _NEEDS_QUOTES.search(text):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


def format_fields(fields: Mapping[str, object]) -> str:
    """``k=v k=v …``; keys are ours (plain words), values are escaped."""
    return " ".join(f"{k}={value(v)}" for k, v in fields.items())


def lean_records() -> None:
    """Log records without what no formatter of ours prints (logging's own
    switches, its documented optimisation): no caller's file, line and
    function (a frame walk per record), no thread name.  The process id
    stays (the syslog format prints it)."""
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = False


def parse(text: str) -> dict[str, str] | None:
    """The fields of ``k=v …`` text, or None when it is not exactly logfmt.

    A quoted value comes back unescaped; ``-`` stays ``-`` (the caller knows
    it means "nothing").  The first occurrence of a key wins.
    """
    fields: dict[str, str] = {}
    pos, end = 0, len(text.rstrip("\r\n"))
    while pos < end:
        if text[pos] == " ":
            pos += 1
            continue
        m = _PAIR.match(text, pos)
        if m is None or (m.end() < end and text[m.end()] != " "):
            return None
        raw = m.group(2)
        v = _UNESCAPE.sub(r"\1", raw[1:-1]) if raw.startswith('"') else raw
        fields.setdefault(m.group(1), v)
        pos = m.end()
    return fields


def find_decision(line: str) -> dict[str, str] | None:
    """The fields of a decision line, whatever prefix a log system added;
    None for any other line (or a decision line that does not parse)."""
    at = line.find(PREFIX + "stage=")
    if at < 0:
        return None
    return parse(line[at + len(PREFIX):])
