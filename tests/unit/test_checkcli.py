"""``ipv6milter-check`` (SPEC §3): verdicts, exit codes 0/1/2, the printed header."""

from __future__ import annotations

import base64
import io
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dkim
import dns.reversename
import pytest

from ipv6milter import authresults, checkcli

from .fakedns import TEMP, FakeResolver

ADDR = "2001:db8::25"
REV = dns.reversename.from_address(ADDR).to_text(omit_final_dot=True)

CONF = """\
AuthservID mx.example.org
AcceptDomains example.org, .example.org
Nameservers 127.0.0.1:9
"""

GOOD_DNS: dict[tuple[str, str], Any] = {
    (REV, "PTR"): "mail.example.com.",
    ("mail.example.com", "AAAA"): ADDR,
    ("example.com", "TXT"): "v=spf1 ip6:2001:db8::/32 -all",
}

ARGS = ["--ip", ADDR, "--helo", "mail.example.com", "--mail-from", "a@example.com"]

R_550 = "550 5.2.1 Service unavailable, [example.net] does not accept email over IPv6."
R_45725 = (
    "450 4.7.25 Service unavailable, sending IPv6 address [2001:db8::25] must have "
    "reverse DNS record."
)
R_45726 = (
    "450 4.7.26 Service unavailable, message sent over IPv6 [2001:db8::25] must pass "
    "either SPF or DKIM validation."
)


@dataclass
class Outcome:
    code: int
    out: str
    resolver: FakeResolver

    @property
    def lines(self) -> list[str]:
        return self.out.splitlines()

    @property
    def header(self) -> str | None:
        """The printed Authentication-Results value, or None."""
        prefix = f"{authresults.FIELD}: "
        start = self.out.find(prefix)
        if start < 0:
            return None
        return self.out[start + len(prefix) :].rstrip("\n")

    def clauses(self) -> list[tuple[str, str]]:
        assert self.header is not None
        parsed = authresults.parse(self.header)
        assert parsed.authserv_id == "mx.example.org"
        return [(r.method, r.result) for r in parsed.results]


@pytest.fixture
def conf(tmp_path: Path):
    def write(text: str = CONF) -> str:
        path = tmp_path / "ipv6milter.conf"
        path.write_text(text, encoding="utf-8")
        return str(path)

    return write


@pytest.fixture
def check(conf):
    def run(argv: list[str], zone: dict[tuple[str, str], Any], text: str = CONF) -> Outcome:
        args = checkcli._parser().parse_args(["-c", conf(text), *argv])
        out = io.StringIO()
        fake = FakeResolver(zone)
        code = checkcli.run(args, out, resolver=fake)
        return Outcome(code, out.getvalue(), fake)

    return run


# -- exit 0 and 1 --


def test_accept_prints_accept_and_the_header(check):
    o = check([*ARGS, "--rcpt", "b@example.org"], GOOD_DNS)
    assert o.code == 0
    assert o.lines[0] == "accept"
    assert o.header == (
        "mx.example.org;\n"
        '\tiprev=pass policy.iprev="2001:db8::25" (mail.example.com);\n'
        "\tspf=pass smtp.mailfrom=a@example.com;\n"
        "\tdkim=none"
    )
    assert set(o.resolver.asked) == set(GOOD_DNS)


def test_recipient_not_opted_in_is_550(check):
    o = check([*ARGS, "--rcpt", "B@Example.NET"], GOOD_DNS)
    assert o.code == 1
    assert o.lines == [R_550]
    assert o.header is None


def test_subdomain_entry_opts_in(check):
    assert check([*ARGS, "--rcpt", "b@sub.example.org"], GOOD_DNS).code == 0


def test_no_ptr_is_450_4_7_25(check):
    zone = {k: v for k, v in GOOD_DNS.items() if k[1] != "PTR"}
    o = check([*ARGS, "--rcpt", "b@example.org"], zone)
    assert o.code == 1
    assert o.lines == [R_45725]


def test_550_wins_over_a_ptr_problem(check):
    zone = {k: v for k, v in GOOD_DNS.items() if k[1] != "PTR"}
    o = check([*ARGS, "--rcpt", "b@example.net"], zone)
    assert (o.code, o.lines) == (1, [R_550])


def test_fcrdns_needs_the_forward_confirmation(check):
    zone = {**GOOD_DNS, ("mail.example.com", "AAAA"): "2001:db8::99"}
    rcpt = ["--rcpt", "b@example.org"]
    assert check([*ARGS, *rcpt], zone).code == 0  # ReverseDNS ptr: a PTR exists
    o = check([*ARGS, *rcpt], zone, CONF + "ReverseDNS fcrdns\n")
    assert (o.code, o.lines) == (1, [R_45725])


def test_spf_fail_without_a_message_is_450_4_7_26(check):
    zone = {**GOOD_DNS, ("example.com", "TXT"): "v=spf1 -all"}
    o = check([*ARGS, "--rcpt", "b@example.org"], zone)
    assert o.code == 1
    assert o.lines == [R_45726]
    assert o.header is None


def test_spf_temperror_is_451_4_4_3(check):
    zone = {**GOOD_DNS, ("example.com", "TXT"): TEMP}
    o = check([*ARGS, "--rcpt", "b@example.org"], zone)
    assert o.code == 1
    assert o.lines[0].startswith("451 4.4.3 ")
    assert "4.7.26" not in o.out


def test_ptr_temperror_is_451_4_4_3(check):
    zone = {**GOOD_DNS, (REV, "PTR"): TEMP}
    o = check([*ARGS, "--rcpt", "b@example.org"], zone)
    assert o.code == 1
    assert o.lines[0].startswith("451 4.4.3 ")


def test_one_refused_recipient_among_accepted_ones(check):
    o = check([*ARGS, "--rcpt", "b@example.net", "--rcpt", "c@example.org"], GOOD_DNS)
    assert o.code == 0
    assert o.lines[0] == f"RCPT b@example.net: {R_550}"
    assert o.lines[1] == "accept"
    assert o.header is not None


def test_null_sender_uses_the_helo_identity(check):
    zone = {**GOOD_DNS, ("mail.example.com", "TXT"): "v=spf1 ip6:2001:db8::25 -all"}
    o = check(
        ["--ip", ADDR, "--helo", "mail.example.com", "--mail-from", "", "--rcpt", "b@example.org"],
        zone,
    )
    assert o.code == 0
    assert "spf=pass smtp.helo=mail.example.com" in o.out
    assert ("example.com", "TXT") not in o.resolver.asked


def test_monitor_mode_accepts_and_says_what_enforce_would_reply(check):
    zone = {**GOOD_DNS, ("example.com", "TXT"): "v=spf1 -all"}
    o = check([*ARGS, "--rcpt", "b@example.org"], zone, CONF + "Mode monitor\n")
    assert o.code == 0
    assert o.lines[0] == f"accept (monitor mode; enforce would reply: {R_45726})"
    assert o.clauses() == [("iprev", "pass"), ("spf", "fail"), ("dkim", "none")]


def test_a_client_outside_enforce_share_is_told_so(check):
    zone = {**GOOD_DNS, ("example.com", "TXT"): "v=spf1 -all"}
    o = check([*ARGS, "--rcpt", "b@example.org"], zone, CONF + "EnforceShare 0\n")
    assert o.code == 0
    assert o.lines[0] == f"accept (outside EnforceShare; enforce would reply: {R_45726})"


@pytest.mark.parametrize(
    ("argv", "text"),
    [
        (["--ip", "192.0.2.25"], CONF),
        (["--ip", "::ffff:192.0.2.25"], CONF),
        (["--ip", ADDR, "--authenticated"], CONF),
        (["--ip", ADDR], CONF + "TrustedHosts 2001:db8::/32\n"),
    ],
)
def test_out_of_scope_is_accepted_without_lookups_or_header(check, argv: list[str], text: str):
    rest = ["--helo", "h.example.com", "--mail-from", "a@example.com", "--rcpt", "b@example.net"]
    o = check([*argv, *rest], {}, text)
    assert o.code == 0
    assert o.lines == ["accept"]
    assert o.resolver.asked == []


def test_stamp_all_stamps_out_of_scope_mail(check):
    v4 = "192.0.2.25"
    rev4 = dns.reversename.from_address(v4).to_text(omit_final_dot=True)
    zone = {
        (rev4, "PTR"): "mail.example.com.",
        ("mail.example.com", "A"): v4,
        ("example.com", "TXT"): "v=spf1 ip4:192.0.2.0/24 -all",
    }
    argv = ["--ip", "::ffff:192.0.2.25", "--mail-from", "a@example.com", "--rcpt", "b@example.net"]
    o = check(argv, zone, CONF + "StampAll yes\n")
    assert o.code == 0
    assert o.lines[0] == "accept"
    assert "policy.iprev=192.0.2.25" in o.out  # the mapped address is judged as IPv4
    assert o.clauses() == [("iprev", "pass"), ("spf", "pass"), ("dkim", "none")]


def test_explain_shows_queries_and_reasoning(check):
    o = check([*ARGS, "--rcpt", "b@example.org", "--explain"], GOOD_DNS)
    assert o.code == 0
    explained = [line for line in o.lines if line.startswith("# ")]
    text = "\n".join(explained)
    assert f"# client {ADDR}: scope ipv6" in text
    assert f"{REV} PTR" in text
    assert "example.com TXT" in text
    assert "iprev=pass" in text
    assert "spf=pass" in text
    assert "RCPT b@example.org: accept" in text
    assert "no message given: judged without DKIM" in text
    # Without --explain, none of it.
    quiet = check([*ARGS, "--rcpt", "b@example.org"], GOOD_DNS)
    assert not any(line.startswith("#") for line in quiet.lines)


# -- with a message --


@pytest.fixture(scope="module")
def signing_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, str]:
    pem = tmp_path_factory.mktemp("checkcli-key") / "key.pem"
    subprocess.run(["openssl", "genrsa", "-out", str(pem), "2048"], check=True, capture_output=True)
    der = subprocess.run(
        ["openssl", "rsa", "-in", str(pem), "-pubout", "-outform", "DER"],
        check=True,
        capture_output=True,
    ).stdout
    return pem.read_bytes(), "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode("ascii")


MESSAGE = (
    b"From: a@example.com\r\nTo: b@example.org\r\nSubject: test\r\n"
    b"Message-ID: <1@example.com>\r\n\r\nHello.\r\n"
)


def signed_message(key: tuple[bytes, str], canon: tuple[bytes, bytes]) -> bytes:
    return dkim.sign(MESSAGE, b"sel1", b"example.com", key[0], canonicalize=canon) + MESSAGE


def test_dkim_pass_rescues_an_spf_fail(check, tmp_path: Path, signing_key):
    eml = tmp_path / "m.eml"
    eml.write_bytes(signed_message(signing_key, (b"relaxed", b"simple")))
    zone = {
        **GOOD_DNS,
        ("example.com", "TXT"): "v=spf1 -all",
        ("sel1._domainkey.example.com", "TXT"): signing_key[1],
    }
    o = check([*ARGS, "--rcpt", "b@example.org", str(eml)], zone)
    assert o.code == 0
    assert o.lines[0] == "accept"
    assert o.clauses() == [("iprev", "pass"), ("spf", "fail"), ("dkim", "pass")]
    assert "header.d=example.com header.s=sel1" in o.out


def test_message_with_lf_line_ends_still_verifies(check, tmp_path: Path, signing_key):
    eml = tmp_path / "m.eml"
    eml.write_bytes(signed_message(signing_key, (b"simple", b"simple")).replace(b"\r\n", b"\n"))
    zone = {
        **GOOD_DNS,
        ("example.com", "TXT"): "v=spf1 -all",
        ("sel1._domainkey.example.com", "TXT"): signing_key[1],
    }
    o = check([*ARGS, "--rcpt", "b@example.org", str(eml)], zone)
    assert o.code == 0
    assert ("dkim", "pass") in o.clauses()


def test_message_from_standard_input(check, monkeypatch, signing_key):
    data = signed_message(signing_key, (b"relaxed", b"relaxed"))
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    zone = {
        **GOOD_DNS,
        ("example.com", "TXT"): "v=spf1 -all",
        ("sel1._domainkey.example.com", "TXT"): signing_key[1],
    }
    o = check([*ARGS, "--rcpt", "b@example.org", "-"], zone)
    assert o.code == 0
    assert ("dkim", "pass") in o.clauses()


def test_failing_signature_does_not_rescue(check, tmp_path: Path, signing_key):
    eml = tmp_path / "m.eml"
    eml.write_bytes(signed_message(signing_key, (b"relaxed", b"simple")).replace(b"Hello", b"Bye"))
    zone = {
        **GOOD_DNS,
        ("example.com", "TXT"): "v=spf1 -all",
        ("sel1._domainkey.example.com", "TXT"): signing_key[1],
    }
    o = check([*ARGS, "--rcpt", "b@example.org", str(eml)], zone)
    assert (o.code, o.lines) == (1, [R_45726])


def test_dkim_key_temperror_is_451(check, tmp_path: Path, signing_key):
    eml = tmp_path / "m.eml"
    eml.write_bytes(signed_message(signing_key, (b"relaxed", b"simple")))
    zone = {
        **GOOD_DNS,
        ("example.com", "TXT"): "v=spf1 -all",
        ("sel1._domainkey.example.com", "TXT"): TEMP,
    }
    o = check([*ARGS, "--rcpt", "b@example.org", str(eml)], zone)
    assert o.code == 1
    assert o.lines[0].startswith("451 4.4.3 ")


# -- exit 2, through main() --


def test_usage_error_exits_2(capsys):
    with pytest.raises(SystemExit) as info:
        checkcli.main(["--helo", "x.example"])  # --ip is required
    assert info.value.code == 2
    assert "--ip" in capsys.readouterr().err


def test_config_error_exits_2_naming_the_line(conf, capsys):
    path = conf("AuthservID mx.example.org\n# comment\nFrobnicate yes\nMode maybe\n")
    assert checkcli.main(["-c", path, "--ip", ADDR]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"{path}:3: unknown key 'Frobnicate'",
        f"{path}:4: Mode: expected one of enforce, monitor, got 'maybe'",
    ]


def test_missing_config_file_exits_2(tmp_path: Path, capsys):
    missing = tmp_path / "none.conf"
    assert checkcli.main(["-c", str(missing), "--ip", ADDR]) == 2
    assert f"{missing}: no such file" in capsys.readouterr().err


def test_bad_ip_exits_2(conf, capsys):
    assert checkcli.main(["-c", conf(), "--ip", "not-an-ip"]) == 2
    assert "--ip: not an IP address" in capsys.readouterr().err


def test_missing_message_file_exits_2(conf, tmp_path: Path, capsys):
    missing = tmp_path / "none.eml"
    assert checkcli.main(["-c", conf(), "--ip", ADDR, str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err


def test_main_accepts_out_of_scope_mail_with_exit_0(conf, capsys):
    # An IPv4 client is out of scope: no DNS at all, so main() needs no fake resolver.
    assert checkcli.main(["-c", conf(), "--ip", "192.0.2.1", "--rcpt", "b@example.net"]) == 0
    assert capsys.readouterr().out == "accept\n"


def test_ip_forms_an_mta_might_pass(check):
    for raw in ("IPv6:2001:db8::25", "[2001:db8::25]", "2001:DB8:0:0:0:0:0:25"):
        argv = ["--ip", raw, "--helo", "mail.example.com", "--mail-from", "a@example.com"]
        o = check([*argv, "--rcpt", "b@example.org"], GOOD_DNS)
        assert o.code == 0, raw
        assert 'policy.iprev="2001:db8::25"' in o.out


# -- the installed console script --


def console_script() -> str:
    script = Path(sys.executable).parent / "ipv6milter-check"
    if not script.exists():
        pytest.fail("ipv6milter-check is not installed next to this Python")
    return str(script)


def test_console_script_usage_error():
    proc = subprocess.run([console_script()], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "usage: ipv6milter-check" in proc.stderr
    assert proc.stdout == ""


def test_console_script_config_error_names_the_line(conf):
    path = conf("AuthservID mx.example.org\n\nDNSTimeout fast\n")
    proc = subprocess.run(
        [console_script(), "-c", path, "--ip", ADDR], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert f"{path}:3: DNSTimeout: expected a number, got 'fast'" in proc.stderr
    assert proc.stdout == ""


# -- one judging path with the milter --


def test_explain_escapes_non_printable_text_from_dns(check):
    zone = {
        **GOOD_DNS,
        ("example.com", "TXT"): "v=spf1 -all exp=why.example.com",
        ("why.example.com", "TXT"): "no \x1b]2;owned\x07 \x1b[31mred\x7f",
    }
    o = check([*ARGS, "--rcpt", "b@example.org", "--explain"], zone)
    assert o.code == 1
    assert all(c.isprintable() for line in o.lines for c in line), o.out
    spf_line = next(line for line in o.lines if line.startswith("# spf=fail"))
    assert "no \\x1b]2;owned\\x07 \\x1b[31mred\\x7f" in spf_line
    assert checkcli.printable("a\u202eb\U000e0001c\td") == "a\\u202eb\\U000e0001c\\x09d"


def test_max_message_size_applies_as_in_the_milter(check, tmp_path: Path, signing_key):
    """Over MaxMessageSize the signature is reported, not verified (the
    milter's dkim=neutral): a message that only DKIM could pass is refused."""
    body = b"line of body text\r\n" * 100
    msg = MESSAGE.replace(b"Hello.\r\n", body)
    signed = dkim.sign(msg, b"sel1", b"example.com", signing_key[0]) + msg
    eml = tmp_path / "m.eml"
    eml.write_bytes(signed)
    zone = {
        **GOOD_DNS,
        ("example.com", "TXT"): "v=spf1 -all",
        ("sel1._domainkey.example.com", "TXT"): signing_key[1],
    }
    argv = [*ARGS, "--rcpt", "b@example.org", str(eml)]
    assert check(argv, zone, CONF + f"MaxMessageSize {len(signed)}\n").code == 0
    o = check([*argv, "--explain"], zone, CONF + f"MaxMessageSize {len(signed) - 1}\n")
    assert o.code == 1
    assert R_45726 in o.lines
    assert "# dkim=neutral d=example.com s=sel1: message too large" in o.lines
    assert ("sel1._domainkey.example.com", "TXT") not in o.resolver.asked


def test_recipients_without_a_domain(check):
    zone = {k: v for k, v in GOOD_DNS.items() if k[1] != "PTR"}  # no PTR
    o = check([*ARGS, "--rcpt", "root"], zone)
    assert (o.code, o.lines) == (1, [R_45725])
    o = check([*ARGS, "--rcpt", "<@relay.example:root>"], zone)
    assert (o.code, o.lines) == (1, [R_45725])
    o = check([*ARGS, "--rcpt", "PostMaster"], zone)
    assert o.code == 0 and o.lines[0] == "accept"
    spf_fail = {**GOOD_DNS, ("example.com", "TXT"): "v=spf1 -all"}
    o = check([*ARGS, "--rcpt", "root"], spf_fail)  # judged at end of message too
    assert (o.code, o.lines) == (1, [R_45726])


@pytest.mark.parametrize("raw", [
    MESSAGE,
    b"X-Folded: one\r\n\ttwo\r\n  three\r\nFrom: a@example.com\r\n\r\nbody\r\n\r\n\r\n",
    b"From: a@example.com\r\nSubject:no space\r\n\r\n",
    b"From: a@example.com\r\n\r\n",
])
def test_a_message_file_is_collected_byte_for_byte(raw: bytes):
    """ipv6milter-check hands the file to the milter's collector as an MTA
    would (fields with the space after the colon): it rebuilds it exactly and
    counts exactly its bytes against MaxMessageSize."""
    from ipv6milter import config as cfgmod

    msg = checkcli.collect(cfgmod.parse("AuthservID mx.example.org\n"), raw)
    assert msg.size == len(raw)
    assert msg.message() == raw


def test_a_line_that_is_not_a_field_starts_the_body():
    from ipv6milter.engine import split_fields

    fields, body = split_fields(b"From: a@example.com\r\nnot a field\r\nmore\r\n\r\nrest\r\n")
    assert fields == [("From", b" a@example.com")]
    assert body == b"not a field\r\nmore\r\n\r\nrest\r\n"
    assert split_fields(b"\r\nonly body\r\n") == ([], b"only body\r\n")


# -- From-aligned mode --

ALIGN_CONF = CONF + "Alignment relaxed\n"
R_45726_ALIGNED = (
    "450 4.7.26 Service unavailable, message sent over IPv6 [2001:db8::25] must pass "
    "either SPF or DKIM validation aligned with the From domain."
)


def test_explain_prints_every_dmarc_query_and_the_choice(check, tmp_path: Path):
    eml = tmp_path / "m.eml"
    eml.write_bytes(MESSAGE.replace(b"From: a@example.com",
                                    b"From: Boss <boss@news.example.com>"))
    argv = ["--ip", ADDR, "--helo", "mail.example.com", "--mail-from", "b@bounce.example.com",
            "--rcpt", "b@example.org", "--explain", str(eml)]
    zone = {**GOOD_DNS, ("bounce.example.com", "TXT"): "v=spf1 ip6:2001:db8::/32 -all",
            ("_dmarc.example.com", "TXT"): "v=DMARC1; p=reject"}
    o = check(argv, zone, ALIGN_CONF)
    assert o.code == 0, o.out
    assert "accept" in o.lines
    text = "\n".join(line for line in o.lines if line.startswith("# "))
    assert "From domain: news.example.com" in text
    for name in ("_dmarc.bounce.example.com", "_dmarc.example.com", "_dmarc.com",
                 "_dmarc.news.example.com"):
        assert f"{name} TXT" in text
    assert ("organizational domain of bounce.example.com: example.com (the DMARC record "
            "with the fewest labels, _dmarc.example.com)") in text
    assert "organizational domain of news.example.com: example.com" in text
    assert "spf=pass b@bounce.example.com: aligned with news.example.com" in text
    assert "aligned=spf" in text
    assert "alignment: 4 _dmarc queries" in text
    assert o.header is not None and "spf=pass (aligned with news.example.com)" in o.header
    # Each _dmarc name asked once, though both walks pass example.com and com.
    dmarc = [n for n, _ in o.resolver.asked if n.startswith("_dmarc.")]
    assert sorted(dmarc) == sorted(set(dmarc)) and len(dmarc) == 4


def test_an_unaligned_pass_is_refused_with_the_aligned_text(check, tmp_path: Path):
    eml = tmp_path / "m.eml"
    eml.write_bytes(MESSAGE.replace(b"From: a@example.com", b"From: ceo@bank.example"))
    o = check([*ARGS, "--rcpt", "b@example.org", str(eml)], GOOD_DNS, ALIGN_CONF)
    assert (o.code, o.lines) == (1, [R_45726_ALIGNED])
    # Alignment off: the same message is accepted on SPF alone.
    o = check([*ARGS, "--rcpt", "b@example.org", str(eml)], GOOD_DNS)
    assert o.code == 0 and o.lines[0] == "accept"


def test_a_dmarc_servfail_that_decides_is_451(check, tmp_path: Path):
    eml = tmp_path / "m.eml"
    eml.write_bytes(MESSAGE.replace(b"From: a@example.com", b"From: a@news.example.com"))
    zone = {**GOOD_DNS, ("_dmarc.example.com", "TXT"): TEMP}
    o = check([*ARGS, "--rcpt", "b@example.org", "--explain", str(eml)], zone, ALIGN_CONF)
    assert o.code == 1
    assert o.lines[-1].startswith("451 4.4.3 ")
    assert "organizational domain of example.com: unknown" in o.out
    assert "aligned=unknown" in o.out
