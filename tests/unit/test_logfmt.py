"""The decision log's logfmt form: every line parses back to its fields."""

from __future__ import annotations

import unicodedata

from hypothesis import given
from hypothesis import strategies as st

from ipv6milter import logfmt


def test_a_forged_helo_stays_one_field() -> None:
    helo = 'x" reply=accept spf=pass y="'
    line = "INFO ipv6milter.milter: decision " + logfmt.format_fields(
        {"stage": "eom", "helo": helo, "reply": "450 4.7.26"})
    assert logfmt.find_decision(line) == {"stage": "eom", "helo": helo, "reply": "450 4.7.26"}


def test_missing_and_control_characters() -> None:
    fields = {"a": None, "b": "", "c": "x\x1b[31my\n\x85"}
    assert logfmt.format_fields(fields) == "a=- b=- c=x?[31my??"


def test_syslog_prefix_is_skipped_and_other_lines_are_not_decisions() -> None:
    line = "Dec  1 10:00:00 mx ipv6milter[42]: decision stage=rcpt reply=accept"
    assert logfmt.find_decision(line) == {"stage": "rcpt", "reply": "accept"}
    assert logfmt.find_decision("INFO ipv6milter: stopped") is None
    assert logfmt.find_decision('decision stage=rcpt helo="unterminated') is None


# Printable characters (no C0/C1 controls), as an explicit alphabet: Debian's
# hypothesis predates characters(exclude_categories=...).
_ALPHABET = [c for c in map(chr, range(0x20, 0x300)) if unicodedata.category(c) != "Cc"]
_values = st.text(_ALPHABET, min_size=1, max_size=logfmt.MAX_VALUE)


@given(st.dictionaries(st.from_regex(r"[a-z_]{1,12}", fullmatch=True), _values, max_size=8))
def test_round_trip(fields: dict[str, str]) -> None:
    assert logfmt.parse(logfmt.format_fields(fields)) == {
        k: (v if v else "-") for k, v in fields.items()}


def test_bytes_that_are_not_utf8_are_escaped_never_dropped() -> None:
    # As pymilter hands over a MAIL FROM that is not UTF-8 (surrogateescape).
    domain = b"b\xff\xfe.example".decode("utf-8", "surrogateescape")
    line = logfmt.format_fields({"stage": "rcpt", "from_domain": domain, "odd": "x\ud800y"})
    assert line.encode("utf-8")  # strict: what SysLogHandler does
    assert line == r'stage=rcpt from_domain="b\\xff\\xfe.example" odd="x\\ud800y"'
    assert logfmt.parse(line) == {
        "stage": "rcpt", "from_domain": r"b\xff\xfe.example", "odd": r"x\ud800y"}
    assert logfmt.printable("plain é text") == "plain é text"
