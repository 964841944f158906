"""ipv6milter-report: reading decision lines whatever their prefix, counting,
bounded tables, the three formats, exit statuses (SPEC §3)."""

from __future__ import annotations

import csv
import datetime as dt
import gzip
import io
import json
import time
from pathlib import Path

import pytest

from ipv6milter import logfmt, report
from ipv6milter.report import Clock, Report, Table, parse_when

UTC = dt.UTC


def line(**kw: object) -> str:
    fields: dict[str, object] = {
        "stage": "eom", "qid": "Q1", "client": "2001:db8::25", "scope": "ipv6",
        "helo": "mail.example.com", "from_domain": "example.com",
        "rcpt_domain": "example.org", "iprev": "pass", "ptr": "mail.example.com",
        "spf": "pass", "dkim": "none", "reply": "accept",
    }
    fields.update(kw)
    fields.setdefault("mode", "enforce")
    fields.setdefault("elapsed_ms", 3)
    return logfmt.PREFIX + logfmt.format_fields({k: v for k, v in fields.items() if v != ...})


def run(text: str, *args: str) -> tuple[int, str]:
    out = io.StringIO()
    rc = report.main([*args, "-"], stdin=io.BytesIO(text.encode()), stdout=out)
    return rc, out.getvalue()


def as_json(text: str, *args: str) -> dict:
    rc, out = run(text, "--format", "json", *args)
    assert rc == 0
    return json.loads(out)


# -- prefixes and timestamps ---------------------------------------------------------------


NOW = dt.datetime(2026, 12, 1, 16, 0, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(("prefix", "expected"), [
    ("2026-12-01T15:09:05+00:00 mx ipv6milter[1]: ", "2026-12-01T15:09:05+00:00"),
    ("2026-12-01T15:09:05.123456+01:00 mx ipv6milter[1]: ", "2026-12-01T14:09:05+00:00"),
    ("2026-12-01T15:09:05+0100 mx ipv6milter[1]: ", "2026-12-01T14:09:05+00:00"),  # short-iso
    ("2026-12-01T15:09:05Z mx ipv6milter[1]: ", "2026-12-01T15:09:05+00:00"),
    ("<22>1 2026-12-01T15:09:05Z mx ipv6milter 1 - - ", "2026-12-01T15:09:05+00:00"),
    ("Tue 2026-12-01 15:09:05 UTC mx ipv6milter[1]: ", "2026-12-01T15:09:05+00:00"),
    ("1764601745 mx ipv6milter[1]: ", "2025-12-01T15:09:05+00:00"),
])
def test_iso_prefixes(prefix: str, expected: str) -> None:
    t = Clock(NOW)(prefix + line())
    assert t is not None
    assert dt.datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds") == expected


def test_syslog_prefix_is_local_time_in_the_most_recent_year(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    try:
        clock = Clock(NOW)
        t = clock("Dec  1 15:09:05 mx ipv6milter[1]: " + line())
        assert t == dt.datetime(2026, 12, 1, 15, 9, 5, tzinfo=UTC).timestamp()
        # In early January, a December line is from last year.
        jan = Clock(dt.datetime(2027, 1, 2, tzinfo=UTC).timestamp())
        t = jan("Dec 31 23:59:59 mx ipv6milter[1]: " + line())
        assert t == dt.datetime(2026, 12, 31, 23, 59, 59, tzinfo=UTC).timestamp()
        assert clock("<13>Nov 30 01:02:03 mx x: " + line()) is not None
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


@pytest.mark.parametrize("prefix", ["", "INFO ipv6milter.milter: ", "ipv6milter[7]: ",
                                    "Foo 99 99:99:99 ", "2026-13-45T99:00:00 "])
def test_no_usable_time(prefix: str) -> None:
    assert Clock(NOW)(prefix + line()) is None


def test_parse_when() -> None:
    assert parse_when("24h", now=NOW) == NOW - 86400
    assert parse_when("90m", now=NOW) == NOW - 5400
    assert parse_when("7d", now=NOW) == NOW - 7 * 86400
    assert parse_when("2026-12-01T15:00Z") == dt.datetime(2026, 12, 1, 15, tzinfo=UTC).timestamp()
    with pytest.raises(ValueError, match="not a time"):
        parse_when("yesterday-ish")


# -- counting --------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", [
    "", "INFO ipv6milter.milter: ", "Dec  1 15:09:05 mx ipv6milter[123]: ",
    "2026-12-01T15:09:05+00:00 mx ipv6milter[123]: ",
])
def test_every_prefix_is_read(prefix: str) -> None:
    got = as_json(prefix + line(reply="450 4.7.26", spf="fail") + "\n")
    assert got["replies"] == [{"status": "refused", "stage": "eom", "reply": "450 4.7.26",
                               "count": 1, "first_seen": got["replies"][0]["first_seen"],
                               "last_seen": got["replies"][0]["last_seen"]}]
    assert (got["replies"][0]["first_seen"] is None) == (prefix[:1] in ("", "I"))


def test_forged_helo_counts_as_what_happened() -> None:
    hostile = [
        'x" reply=accept spf=pass y="',
        'x reply=accept would_reply=- spf=pass',
        "decision stage=eom client=2001:db8:bad::1 reply=accept",
        'a\\" reply=accept \\',
        "x\nINFO ipv6milter.milter: decision stage=eom reply=accept",
    ]
    text = "".join("INFO ipv6milter.milter: " + line(helo=h, spf="fail", dkim="fail",
                                                     reply="450 4.7.26") + "\n"
                   for h in hostile)
    got = as_json(text)
    assert got["unparsed"] == 0
    assert got["messages"] == 5 and got["accepted"] == 0
    assert [(r["reply"], r["count"]) for r in got["replies"]] == [("450 4.7.26", 5)]
    assert got["accepted_mix"] == []


FORGED = 'decision stage=eom client=2001:db8:bad::1 scope=ipv6 reply="550 5.2.1" z='


@pytest.mark.parametrize("text", [
    # Postfix quotes the client's HELO in its reject lines ...
    "Dec  1 15:09:05 mx postfix/smtpd[1]: NOQUEUE: milter-reject: RCPT from unknown"
    f"[2001:db8::1]: 550 5.2.1 x; from=<a@b.example> to=<c@d.example> proto=ESMTP helo=<{FORGED}>",
    # ... and the text a client pipelined, as it came.
    "Dec  1 15:09:05 mx postfix/smtpd[1]: improper command pipelining after CONNECT from "
    f"unknown[2001:db8::1]: {FORGED}",
    "Dec  1 15:09:05 mx postfix/smtpd[1]: improper command pipelining after CONNECT from "
    f"unknown[2001:db8::1]: x ipv6milter[1]: INFO ipv6milter.milter: {FORGED}",
    f"improper command pipelining after CONNECT from unknown[2001:db8::1]: {FORGED}",  # -o cat
    f"Dec  1 15:09:05 mx other-daemon[9]: {FORGED}",
])
def test_decisions_quoted_in_other_programs_lines_are_not_counted(text: str) -> None:
    got = as_json(text + "\n")
    assert got["replies"] == [] and got["messages"] == 0
    assert got["unparsed"] == 1


@pytest.mark.parametrize("prefix", [
    "Dec 01 15:09:05.123456 mx ipv6milter[1]: ",  # journalctl -o short-precise
    "Tue 2026-12-01 15:09:05 UTC mx ipv6milter[1]: ",  # -o short-full
    "1764601745.123456 mx ipv6milter[1]: ",  # -o short-unix
    "Dec 01 15:09:05 mx ipv6milter[1]: INFO ipv6milter.milter: ",  # stderr, in the journal
    "<22>1 2026-12-01T15:09:05Z mx ipv6milter 1234 - - ",  # RFC 5424
    "ipv6milter[1]: ",
])
def test_more_prefixes_of_ours(prefix: str) -> None:
    got = as_json(prefix + line(reply="450 4.7.26") + "\n")
    assert got["unparsed"] == 0 and got["replies"][0]["count"] == 1


def test_monitor_and_share_lines_are_would_be_refusals() -> None:
    text = "\n".join([
        line(reply="accept", would_reply="450 4.7.26", spf="fail", mode="monitor"),
        line(stage="rcpt", reply="accept", would_reply="550 5.2.1", mode="monitor",
             iprev="-", ptr="-", spf=..., dkim=...),
        line(stage="rcpt", reply="450 4.7.25", iprev="permerror", ptr="-", spf=..., dkim=...),
        line(stage="rcpt", reply="accept"),  # an accepted recipient (debug): not counted
        line(),
    ]) + "\n"
    got = as_json(text)
    assert got["messages"] == 2 and got["accepted"] == 2 and got["accepted_would_refuse"] == 1
    assert {(r["status"], r["stage"], r["reply"]) for r in got["replies"]} == {
        ("would refuse", "eom", "450 4.7.26"), ("would refuse", "rcpt", "550 5.2.1"),
        ("refused", "rcpt", "450 4.7.25")}
    ptrs = {r["reply"]: r["ptr"] for r in got["senders"]}
    # PTR not looked at for a 550; "no PTR" when the lookup found none.
    assert ptrs == {"450 4.7.26": "mail.example.com", "550 5.2.1": "-", "450 4.7.25": "no PTR"}
    assert {(m["iprev"], m["spf"], m["dkim"]): m["messages"] for m in got["accepted_mix"]} == {
        ("pass", "fail", "none"): 1, ("pass", "pass", "none"): 1}


def test_senders_are_grouped_by_64_network() -> None:
    text = "".join(line(client=c, reply="450 4.7.26") + "\n" for c in (
        "2001:db8:1:2::25", "2001:db8:1:2:ffff::1", "2001:db8:1:3::25", "192.0.2.1"))
    got = as_json(text)
    assert {(r["network"], r["count"]) for r in got["senders"]} == {
        ("2001:db8:1:2::/64", 2), ("2001:db8:1:3::/64", 1), ("192.0.2.1", 1)}


def test_dkim_summary_per_message() -> None:
    text = "".join(line(dkim=d) + "\n" for d in ("fail,pass", "permerror,fail", "none", "-"))
    got = as_json(text)
    assert sorted(m["dkim"] for m in got["accepted_mix"]) == ["-", "fail+permerror", "none",
                                                              "pass"]


@pytest.mark.parametrize("bad", [
    'decision stage=eom client=2001:db8::25 helo="unterminated reply=accept',
    "decision stage=eom client=2001:db8::25 scope=ipv6",  # no reply
    "decision stage=mail client=2001:db8::25 reply=accept",  # no such stage
    "decision stage=eom client=x reply=accept ju\"nk",
    line()[:60],  # cut short by a syslog line limit
])
def test_decision_lines_that_do_not_parse_are_counted(bad: str) -> None:
    rc, out = run(f"Dec  1 15:09:05 mx ipv6milter[1]: {bad}\n{line()}\n")
    assert rc == 0
    assert "1 line looked like a decision but could not be parsed" in out
    assert as_json(bad + "\n")["unparsed"] == 1


def test_other_lines_are_only_counted_as_read() -> None:
    got = as_json("Dec  1 15:09:05 mx postfix/smtpd[1]: connect from x\n\n\xff\n" + line() + "\n")
    assert got["lines"] == 4 and got["unparsed"] == 0 and got["messages"] == 1


def test_since_and_until() -> None:
    text = "".join(f"2026-12-01T{h:02d}:00:00Z mx ipv6milter[1]: "
                   f"{line(reply='450 4.7.26')}\n" for h in range(10, 15))
    text += line(reply="450 4.7.26") + "\n"  # no time
    got = as_json(text, "--since", "2026-12-01T11:00Z", "--until", "2026-12-01T13:00Z")
    assert [r["count"] for r in got["replies"]] == [2]
    assert got["out_of_range"] == 3 and got["untimed"] == 1
    assert got["replies"][0]["first_seen"].startswith("2026-12-01T11:00:00")
    assert as_json(text)["replies"][0]["count"] == 6  # without a period, all count


# -- bounded tables --------------------------------------------------------------------------


def test_table_folds_the_rare_half_and_keeps_totals() -> None:
    t = Table(10)
    for _ in range(50):
        t.add(("heavy",), 1.0)
    for i in range(1000):
        t.add((f"rare{i}",), float(i))
    assert len(t.rows) <= 10
    assert t.total == 1050
    assert t.top(1)[0][0] == ("heavy",) and t.top(1)[0][1][0] == 50
    assert t.folded > 0 and t.other[1] == 0.0


def test_report_memory_is_capped_by_max_keys() -> None:
    rep = Report(max_keys=100)
    rep.feed(
        (line(from_domain=f"d{i}.example", client=f"2001:db8:{i:x}::1", reply="450 4.7.26")
         + "\n").encode() for i in range(5000))
    assert len(rep.senders.rows) <= 100 and rep.senders.total == 5000
    assert len(rep._nets) <= 65537
    out = io.StringIO()
    report.write_text(rep, out, top=5)
    assert "folded into (other)" in out.getvalue()
    assert "(other)" in out.getvalue()


# -- formats and the command ----------------------------------------------------------------


def test_text_output_neutralises_control_characters_and_long_values() -> None:
    raw = ('decision stage=eom client=2001:db8::25 scope=ipv6 from_domain="\x1b[31mred'
           '\x1b[0m" ptr=' + "p" * 150 + ' reply="450 4.7.26"\n')
    rc, out = run(raw)
    assert rc == 0 and "\x1b" not in out
    assert "p" * 60 not in out and "…" in out


def test_csv_is_one_table_with_a_section_column() -> None:
    rc, out = run(line(reply="450 4.7.26") + "\n" + line() + "\n", "--format", "csv")
    assert rc == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert tuple(rows[0].keys()) == report.CSV_COLUMNS
    by = {(r["section"], r["status"]): r for r in rows}
    assert by[("summary", "messages")]["count"] == "2"
    assert by[("reply", "refused")]["reply"] == "450 4.7.26"
    assert by[("sender", "refused")]["network"] == "2001:db8::/64"
    assert by[("accepted", "")]["iprev"] == "pass"


def test_top_limits_the_sender_rows_and_sums_the_rest() -> None:
    text = "".join(line(from_domain=f"d{i}.example", reply="450 4.7.26") + "\n"
                   for i in range(5))
    got = as_json(text, "--top", "2")
    assert len(got["senders"]) == 2 and got["senders_not_shown"] == 3
    assert len(as_json(text, "--top", "0")["senders"]) == 5


def test_files_gzip_and_stdin(tmp_path: Path) -> None:
    plain = tmp_path / "mail.log"
    plain.write_text(line(reply="450 4.7.26") + "\n")
    packed = tmp_path / "mail.log.1.gz"
    with gzip.open(packed, "wt") as fh:
        fh.write(line(reply="450 4.7.26") + "\n")
    out = io.StringIO()
    assert report.main(["--format", "json", str(plain), str(packed)], stdout=out) == 0
    assert json.loads(out.getvalue())["replies"][0]["count"] == 2


def test_unreadable_file_exits_1_and_still_reports(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    plain = tmp_path / "mail.log"
    plain.write_text(line(reply="450 4.7.26") + "\n")
    out = io.StringIO()
    rc = report.main(["--format", "json", str(tmp_path / "missing"), str(plain)], stdout=out)
    assert rc == 1
    got = json.loads(out.getvalue())
    assert got["replies"][0]["count"] == 1 and "missing" in got["errors"][0]
    assert "missing" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["--since", "soon"], ["--top", "-1"], ["--format", "xml"],
                                  ["--max-keys", "1"], ["--top", "x"]])
def test_usage_errors_exit_2(args: list[str]) -> None:
    with pytest.raises(SystemExit) as e:
        rc = report.main(args, stdin=io.BytesIO(b""), stdout=io.StringIO())
        raise SystemExit(rc)
    assert e.value.code == 2


def test_empty_input() -> None:
    rc, out = run("")
    assert rc == 0 and "0 lines read" in out and out.count("none") == 3


def test_a_file_without_line_ends_is_read_in_pieces(tmp_path: Path) -> None:
    f = tmp_path / "huge.log"
    f.write_bytes(b"x" * (3 * report.MAX_LINE + 10) + b"\n" + line().encode() + b"\n")
    out = io.StringIO()
    assert report.main(["--format", "json", str(f)], stdout=out) == 0
    got = json.loads(out.getvalue())
    assert got["lines"] == 5 and got["messages"] == 1 and got["unparsed"] == 0


# -- what a sender wrote stays data (SPEC §3) -------------------------------------------------


@pytest.mark.parametrize("domain", ["=cmd|' /C calc'!A0", "+1+cmd|x", "-2+3", "@SUM(A1)",
                                    "\tx=1", "\rx=1"])
def test_csv_cells_a_spreadsheet_would_run_are_written_as_text(domain: str) -> None:
    # Written by hand: the milter's own lines never carry a tab or CR (logfmt
    # replaces controls), but a report reads whatever a log holds.
    quoted = '"' + domain.replace("\\", "\\\\").replace('"', '\\"') + '"'
    raw = (f"decision stage=eom client=2001:db8::25 scope=ipv6 from_domain={quoted} "
           f'ptr={quoted} reply="450 4.7.26"\n')
    rc, out = run(raw, "--format", "csv")
    assert rc == 0
    rows = csv.DictReader(io.StringIO(out, newline=""))
    (sender,) = [r for r in rows if r["section"] == "sender"]
    assert sender["from_domain"] == "'" + domain
    assert sender["ptr"] == "'" + domain
    assert len(out.split("\r\n")) == 2 + 7 + 1 + 1  # header, summary, reply, sender, end
    # Nothing in the file starts a cell with the formula character.
    for r in csv.reader(io.StringIO(out, newline="")):
        assert not any(c.startswith(("=", "+", "@", "\t", "\r")) for c in r), r


def test_csv_leaves_ordinary_cells_and_the_dash_alone() -> None:
    _, out = run(line(reply="450 4.7.26", ptr="-", iprev="pass") + "\n", "--format", "csv")
    rows = csv.DictReader(io.StringIO(out, newline=""))
    (sender,) = [r for r in rows if r["section"] == "sender"]
    assert sender["from_domain"] == "example.com" and sender["ptr"] == "-"
    assert sender["reply"] == "450 4.7.26"


@pytest.mark.parametrize(("raw", "shown"), [
    ("evil\u202egro.example", "evil\\u202egro.example"),  # RIGHT-TO-LEFT OVERRIDE
    ("a\u2066b\u2069c", "a\\u2066b\\u2069c"),  # isolates
    ("a\u200fb", "a\\u200fb"),  # RIGHT-TO-LEFT MARK
    ("a\u061cb", "a\\u061cb"),
    ("zero\u200bwidth", "zero\\u200bwidth"),
    ("tag\U000e0041", "tag\\U000e0041"),
    ("esc\x1b[2Jx", "esc\\x1b[2Jx"),
    ("c1\x9bx", "c1\\x9bx"),
    ("bücher.example", "bücher.example"),  # letters are shown as they are
])
def test_text_output_escapes_control_and_bidi_characters(raw: str, shown: str) -> None:
    # By hand: logfmt already replaces controls in the milter's own lines.
    rc, out = run('decision stage=eom client=2001:db8::25 scope=ipv6 '
                  f'from_domain="{raw}" reply="450 4.7.26"\n')
    assert rc == 0
    assert shown in out
    if raw != shown:
        assert raw not in out
    assert not any(c in out for c in "\u202e\u2066\u2069\u200f\u061c\u200b\x1b\x9b")


def test_the_aligned_refusal_is_a_reply_of_its_own() -> None:
    text = "".join([
        line(reply="450 4.7.26") + "\n",
        line(reply="450 4.7.26", alignment="relaxed", aligned="none",
             header_from="bank.example") + "\n",
        line(reply="accept", would_reply="450 4.7.26", mode="monitor", alignment="strict",
             aligned="none", header_from="-") + "\n",
        line(reply="451 4.4.3", alignment="relaxed", aligned="unknown",
             header_from="example.com") + "\n",
    ])
    got = as_json(text)
    replies = {(r["status"], r["reply"]): r["count"] for r in got["replies"]}
    assert replies == {("refused", "450 4.7.26"): 1, ("refused", "450 4.7.26 aligned"): 1,
                       ("would refuse", "450 4.7.26 aligned"): 1, ("refused", "451 4.4.3"): 1}
    _, out = run(text)
    assert "450 4.7.26 aligned" in out
    assert "no SPF/DKIM pass aligned with the From domain" in out
    assert "neither SPF nor DKIM passed" in out
