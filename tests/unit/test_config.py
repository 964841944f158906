"""The configuration file (SPEC §4): every key, its errors, AcceptDomains matching."""

from __future__ import annotations

import dataclasses
import ipaddress
from pathlib import Path

import pytest

from ipv6milter import config
from ipv6milter.config import Config, ConfigError, DomainSet


def parse(text: str) -> Config:
    return config.parse(text, "test.conf")


def errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config.parse(text, "test.conf")
    return info.value.errors


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


# -- defaults --


def test_empty_file_gives_the_documented_defaults():
    cfg = parse("")
    assert cfg.socket == "inet:8894@localhost"
    assert cfg.authserv_id is None
    assert cfg.accept_domains == DomainSet()
    assert not cfg.accept_domains.matches("example.com")
    assert cfg.trusted_hosts == (
        ipaddress.ip_network("127.0.0.1/32"),
        ipaddress.ip_network("::1/128"),
    )
    assert cfg.skip_authenticated is True
    assert cfg.reverse_dns == "ptr"
    assert cfg.mode == "enforce"
    assert cfg.monitor is False
    assert cfg.enforce_share == 100
    assert cfg.stamp_all is False
    assert cfg.nameservers == ()
    assert cfg.dns_timeout == 5.0
    assert cfg.stage_timeout == 20.0
    assert cfg.max_signatures == 5
    assert cfg.spf_void_lookup_limit == 2
    assert cfg.max_message_size == 67108864
    assert cfg.user_id is None
    assert cfg.umask == 0o007
    assert cfg.pid_file is None
    assert cfg.syslog is False
    assert cfg.log_level == "info"
    assert cfg.metrics_listen is None
    assert cfg.source == "test.conf"


def test_parsed_defaults_equal_the_dataclass_defaults():
    assert dataclasses.replace(parse(""), source=None) == Config()


def test_every_key_of_the_spec_is_known():
    documented = {
        "Socket",
        "AuthservID",
        "AcceptDomains",
        "TrustedHosts",
        "SkipAuthenticated",
        "ReverseDNS",
        "Mode",
        "EnforceShare",
        "StampAll",
        "Nameservers",
        "DNSTimeout",
        "StageTimeout",
        "MaxSignatures",
        "Alignment",
        "SPFVoidLookupLimit",
        "MaxMessageSize",
        "UserID",
        "UMask",
        "PidFile",
        "Syslog",
        "LogLevel",
        "MetricsListen",
        "Workers",
    }
    assert {k.name for k in config.KEYS} == documented


# -- every key, set --


FULL = """\
# every key of SPEC §4
Socket inet6:9999@[::1]
AuthservID MX.Example.ORG
AcceptDomains example.com, .example.net
TrustedHosts 10.0.0.0/8, 2001:db8:1::/48
SkipAuthenticated no
ReverseDNS fcrdns
Mode monitor
EnforceShare 25
StampAll yes
Nameservers 192.0.2.53, [2001:db8::53]:5353
DNSTimeout 2.5
StageTimeout 15
MaxSignatures 3
Alignment relaxed
SPFVoidLookupLimit 20
MaxMessageSize 1048576
UserID ipv6milter:mail
UMask 027
PidFile /run/ipv6milter/ipv6milter.pid
Syslog yes
LogLevel debug
MetricsListen [::1]:9894
"""


def test_every_key_is_parsed_to_its_value():
    cfg = parse(FULL)
    assert cfg.socket == "inet6:9999@::1"
    assert cfg.authserv_id == "mx.example.org"
    assert cfg.accept_domains == DomainSet(
        exact=frozenset({"example.com"}), parents=frozenset({"example.net"})
    )
    assert cfg.trusted_hosts == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("2001:db8:1::/48"),
    )
    assert cfg.skip_authenticated is False
    assert cfg.reverse_dns == "fcrdns"
    assert cfg.mode == "monitor"
    assert cfg.monitor is True
    assert cfg.enforce_share == 25
    assert cfg.stamp_all is True
    assert cfg.nameservers == (("192.0.2.53", 53), ("2001:db8::53", 5353))
    assert cfg.dns_timeout == 2.5
    assert cfg.stage_timeout == 15.0
    assert cfg.max_signatures == 3
    assert cfg.spf_void_lookup_limit == 20
    assert cfg.max_message_size == 1048576
    assert cfg.user_id == "ipv6milter:mail"
    assert cfg.umask == 0o027
    assert cfg.pid_file == "/run/ipv6milter/ipv6milter.pid"
    assert cfg.syslog is True
    assert cfg.log_level == "debug"
    assert cfg.metrics_listen == ("::1", 9894)


def test_keys_are_case_insensitive():
    cfg = parse("socket inet:1234@localhost\nMODE monitor\nsTaMpAlL yes\nlogLEVEL warning")
    assert cfg.socket == "inet:1234@localhost"
    assert cfg.mode == "monitor"
    assert cfg.stamp_all is True
    assert cfg.log_level == "warning"


def test_word_values_are_case_insensitive():
    cfg = parse("Mode MONITOR\nReverseDNS FCrDNS\nLogLevel Error\nSyslog YES")
    assert (cfg.mode, cfg.reverse_dns, cfg.log_level, cfg.syslog) == (
        "monitor",
        "fcrdns",
        "error",
        True,
    )


@pytest.mark.parametrize(
    ("word", "value"),
    [
        ("yes", True),
        ("true", True),
        ("1", True),
        ("no", False),
        ("false", False),
        ("0", False),
        ("Yes", True),
        ("FALSE", False),
    ],
)
def test_booleans(word: str, value: bool):
    text = f"SkipAuthenticated {word}\nStampAll {word}\nSyslog {word}"
    cfg = parse(text)
    assert (cfg.skip_authenticated, cfg.stamp_all, cfg.syslog) == (value, value, value)


@pytest.mark.parametrize("word", ["maybe", "2", "y", "enable"])
def test_a_bad_boolean_is_an_error_naming_the_line(word: str):
    assert errors(f"# first\nSyslog {word}") == [
        f"test.conf:2: Syslog: expected yes/no/true/false/1/0, got {word!r}"
    ]


def test_comments_and_blank_lines_are_ignored():
    cfg = parse(
        "# a comment\n"
        "\n"
        "   # an indented comment\n"
        "Mode monitor # a trailing comment\n"
        "LogLevel debug\t# after a tab\n"
        "   \n"
    )
    assert cfg.mode == "monitor"
    assert cfg.log_level == "debug"


def test_value_whitespace_is_trimmed():
    cfg = parse("   Mode     monitor    \n\tLogLevel\twarning")
    assert (cfg.mode, cfg.log_level) == ("monitor", "warning")


@pytest.mark.parametrize(
    "text",
    [
        "a.example, b.example, c.example",
        "a.example b.example c.example",
        "a.example,b.example,c.example",
        "a.example , b.example\tc.example",
    ],
)
def test_lists_are_comma_or_space_separated(text: str):
    cfg = parse(f"AcceptDomains {text}")
    assert cfg.accept_domains.exact == {"a.example", "b.example", "c.example"}


def test_trusted_hosts_list_forms():
    cfg = parse("TrustedHosts 192.0.2.1,10.0.0.0/8 2001:db8::/32, ::1")
    assert cfg.trusted_hosts == tuple(
        ipaddress.ip_network(n) for n in ("192.0.2.1/32", "10.0.0.0/8", "2001:db8::/32", "::1/128")
    )


def test_empty_trusted_hosts_trusts_nobody():
    cfg = parse("TrustedHosts")
    assert cfg.trusted_hosts == ()
    assert not cfg.is_trusted(ip("127.0.0.1"))
    assert not cfg.is_trusted(ip("::1"))


def test_empty_accept_domains_accepts_nothing():
    cfg = parse("AcceptDomains")
    assert not cfg.accept_domains.matches("example.com")


def test_empty_nameservers_means_the_system_resolver():
    assert parse("Nameservers").nameservers == ()


# -- errors --


def test_unknown_key_names_the_line():
    assert errors("Mode enforce\n\nMaxSignature 5") == ["test.conf:3: unknown key 'MaxSignature'"]


def test_duplicate_key_names_both_lines():
    assert errors("Mode enforce\n# x\nmode monitor") == ["test.conf:3: Mode already set on line 1"]


@pytest.mark.parametrize(
    "key",
    [
        "Socket",
        "AuthservID",
        "SkipAuthenticated",
        "ReverseDNS",
        "Mode",
        "StampAll",
        "DNSTimeout",
        "StageTimeout",
        "MaxSignatures",
        "SPFVoidLookupLimit",
        "MaxMessageSize",
        "UserID",
        "UMask",
        "PidFile",
        "Syslog",
        "LogLevel",
        "MetricsListen",
    ],
)
def test_empty_value_is_an_error(key: str):
    assert errors(f"\n{key}   # nothing") == [f"test.conf:2: {key} needs a value"]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("Socket tcp:8894", "Socket: expected inet:PORT@HOST"),
        ("Socket inet:0@localhost", "Socket: port out of range"),
        ("Socket inet:65536@localhost", "Socket: port out of range"),
        ("Socket inet:localhost:8894", "Socket: expected inet:PORT@HOST"),
        ("Socket unix:relative.sock", "Socket: expected inet:PORT@HOST"),
        ("AuthservID mx;example.org", "AuthservID: expected a host name"),
        ("AcceptDomains bad..example", "AcceptDomains: not a domain name: 'bad..example'"),
        ("AcceptDomains -bad.example", "AcceptDomains: not a domain name"),
        ("AcceptDomains .", "AcceptDomains: not a domain name"),
        ("TrustedHosts 10.0.0.0/33", "TrustedHosts: not an address or network: '10.0.0.0/33'"),
        ("TrustedHosts localhost", "TrustedHosts: not an address or network"),
        ("ReverseDNS dnssec", "ReverseDNS: expected one of ptr, fcrdns"),
        ("Mode reject", "Mode: expected one of enforce, monitor"),
        ("Nameservers ns.example.com", "Nameservers: not an IP address"),
        ("Nameservers 192.0.2.53:0", "Nameservers: bad port"),
        ("Nameservers [2001:db8::53]:99999", "Nameservers: bad port"),
        ("DNSTimeout soon", "DNSTimeout: expected a number"),
        ("DNSTimeout 0", "DNSTimeout: 0 is out of range"),
        ("StageTimeout -1", "StageTimeout: -1 is out of range"),
        ("MaxSignatures 0", "MaxSignatures: 0 is out of range"),
        ("MaxSignatures 2.5", "MaxSignatures: expected a number"),
        ("SPFVoidLookupLimit 1", "SPFVoidLookupLimit: 1 is out of range 2..20"),
        ("SPFVoidLookupLimit 21", "SPFVoidLookupLimit: 21 is out of range 2..20"),
        ("SPFVoidLookupLimit two", "SPFVoidLookupLimit: expected a number"),
        ("MaxMessageSize 1k", "MaxMessageSize: expected a number"),
        ("UserID bad user", "UserID: expected user or user:group"),
        ("UMask 8", "UMask: expected an octal mask"),
        ("PidFile run/x.pid", "PidFile: expected an absolute path"),
        ("LogLevel verbose", "LogLevel: expected one of debug, info, warning, error"),
        ("MetricsListen 127.0.0.1", "MetricsListen: a port is required"),
        ("MetricsListen localhost:9894", "MetricsListen: not an IP address"),
    ],
)
def test_bad_values_name_the_line_and_key(line: str, message: str):
    (error,) = errors(f"# comment\n\n{line}")
    assert error.startswith(f"test.conf:3: {message}")


def test_several_errors_are_reported_together():
    errs = errors(
        "Mode monitor\n"  # 1
        "Frobnicate yes\n"  # 2
        "Mode enforce\n"  # 3
        "Socket\n"  # 4
        "MaxSignatures many\n"  # 5
        "LogLevel debug\n"  # 6 (fine)
        "Syslog perhaps\n"  # 7
    )
    assert [e.split(":")[1] for e in errs] == ["2", "3", "4", "5", "7"]
    assert "unknown key 'Frobnicate'" in errs[0]
    assert "Mode already set on line 1" in errs[1]
    assert "Socket needs a value" in errs[2]
    assert "MaxSignatures" in errs[3]
    assert "Syslog" in errs[4]


def test_config_error_message_lists_every_error():
    with pytest.raises(ConfigError) as info:
        config.parse("A 1\nB 2", "x.conf")
    assert str(info.value) == "x.conf:1: unknown key 'A'\nx.conf:2: unknown key 'B'"


def test_stage_timeout_shorter_than_dns_timeout_is_an_error():
    assert errors("DNSTimeout 30\nStageTimeout 10") == [
        "test.conf:2: StageTimeout (10) is shorter than DNSTimeout (30)"
    ]
    # Against the default StageTimeout (20), the DNSTimeout line is named.
    assert errors("# x\nDNSTimeout 30") == [
        "test.conf:2: StageTimeout (20) is shorter than DNSTimeout (30)"
    ]
    assert parse("DNSTimeout 20").dns_timeout == 20.0


# -- AcceptDomains --


def domains(text: str) -> DomainSet:
    return parse(f"AcceptDomains {text}").accept_domains


def test_exact_domain_matches_only_itself():
    d = domains("example.com")
    assert d.matches("example.com")
    assert not d.matches("mail.example.com")
    assert not d.matches("example.org")
    assert not d.matches("notexample.com")
    assert not d.matches("com")


def test_dot_prefix_matches_subdomains_only():
    d = domains(".example.com")
    assert d.matches("mail.example.com")
    assert d.matches("a.b.example.com")
    assert not d.matches("example.com")
    assert not d.matches("badexample.com")
    assert not d.matches("example.com.evil.example")


def test_exact_and_subdomains_together():
    d = domains("example.com .example.com")
    assert d.matches("example.com")
    assert d.matches("mx.example.com")


def test_star_matches_everything():
    d = domains("*")
    assert d.everything
    assert d.matches("example.com")
    assert d.matches("anything.example")
    assert not d.matches("")


def test_matching_is_case_insensitive():
    d = domains("Example.COM .Sub.Example.ORG")
    assert d.matches("EXAMPLE.com")
    assert d.matches("mx.SUB.example.org")


def test_trailing_dot_is_ignored_on_both_sides():
    d = domains("example.com. .example.net.")
    assert d.matches("example.com")
    assert d.matches("example.com.")
    assert d.matches("mx.example.net.")
    assert not d.matches("example.net.")


@pytest.mark.parametrize("configured", ["bücher.de", "BÜCHER.de", "xn--bcher-kva.de"])
@pytest.mark.parametrize(
    "recipient", ["bücher.de", "Bücher.DE.", "xn--bcher-kva.de", "XN--BCHER-KVA.DE"]
)
def test_idn_u_label_and_a_label_are_the_same_domain(configured: str, recipient: str):
    assert domains(configured).matches(recipient)
    assert not domains(configured).matches("bucher.de")


def test_idn_subdomain_entry():
    d = domains(".bücher.de")
    assert d.parents == {"xn--bcher-kva.de"}
    assert d.matches("mail.xn--bcher-kva.de")
    assert d.matches("mail.bücher.de")
    assert not d.matches("bücher.de")


def test_domain_set_entries_list_every_entry():
    d = domains("b.example .c.example a.example * !x.example !.y.example")
    assert d.entries() == "*, a.example, b.example, .c.example, !x.example, !.y.example"
    assert DomainSet().entries() == ""


def test_domain_set_str_is_the_effective_rule():
    assert str(domains("*")) == "all domains"
    assert str(domains("* !legacy.example.com")) == "all domains except legacy.example.com"
    assert str(domains("example.com .example.net !old.example.net")) == (
        "example.com, subdomains of example.net except old.example.net"
    )
    assert str(domains("* !.example.org !a.example")) == (
        "all domains except a.example, subdomains of example.org"
    )
    assert str(DomainSet()) == "no domains (every in-scope recipient gets the 550)"
    assert str(domains("!only.example")) == "no domains (every in-scope recipient gets the 550)"


@pytest.mark.parametrize("prefix", ["", "file:"])
def test_domain_file_one_entry_a_line(tmp_path: Path, prefix: str):
    f = tmp_path / "domains"
    f.write_text(
        "# opted-in domains\nexample.com\n\n  .example.net   # subdomains only\nBücher.DE.\n",
        encoding="utf-8",
    )
    d = domains(f"{prefix}{f}")
    assert d.matches("example.com")
    assert d.matches("mx.example.net")
    assert not d.matches("example.net")
    assert d.matches("xn--bcher-kva.de")
    assert not d.matches("example.org")


def test_domain_file_error_names_the_files_line(tmp_path: Path):
    f = tmp_path / "domains"
    f.write_text("example.com\n# comment\nbad..example\nok.example\n", encoding="utf-8")
    (error,) = errors(f"Mode enforce\nAcceptDomains file:{f}")
    assert error.startswith("test.conf:2: AcceptDomains: ")
    assert f"{f}:3: not a domain name: 'bad..example'" in error


def test_domain_file_reports_every_bad_line(tmp_path: Path):
    f = tmp_path / "domains"
    f.write_text("bad..one\nfine.example\n-bad.two\n", encoding="utf-8")
    (error,) = errors(f"AcceptDomains {f}")
    assert f"{f}:1:" in error
    assert f"{f}:3:" in error
    assert f"{f}:2:" not in error


def test_missing_domain_file_is_an_error(tmp_path: Path):
    missing = tmp_path / "nope"
    (error,) = errors(f"AcceptDomains {missing}")
    assert error.startswith("test.conf:1: AcceptDomains: cannot read domain list")
    assert str(missing) in error


def test_domain_file_star(tmp_path: Path):
    f = tmp_path / "domains"
    f.write_text("*\n", encoding="utf-8")
    assert domains(str(f)).matches("anything.example")


# -- AcceptDomains exceptions (!example.com, !.example.com) --


def test_exact_exception_beats_star():
    d = domains("* !legacy.example.com")
    assert not d.matches("legacy.example.com")
    assert not d.matches("LEGACY.Example.COM.")
    assert d.matches("mail.legacy.example.com")  # an exact exception covers only itself
    assert d.matches("example.com")
    assert d.matches("anything.example")


def test_subdomain_exception_spares_the_domain_itself():
    d = domains("* !.example.net")
    assert not d.matches("mail.example.net")
    assert not d.matches("a.b.example.net")
    assert d.matches("example.net")
    assert d.matches("badexample.net")


def test_exception_beats_an_exact_entry_and_a_subdomain_entry():
    d = domains("legacy.example.com .example.org !legacy.example.com !old.example.org")
    assert not d.matches("legacy.example.com")
    assert not d.matches("old.example.org")
    assert d.matches("new.example.org")


def test_exception_order_does_not_matter():
    assert domains("!legacy.example * ").matches("x.example")
    assert not domains("!legacy.example * ").matches("legacy.example")
    assert domains("!legacy.example, *") == domains("*, !legacy.example")


def test_exception_alone_opts_nothing_in():
    d = domains("!legacy.example")
    assert not d.matches("legacy.example")
    assert not d.matches("other.example")


@pytest.mark.parametrize("configured", ["!bücher.de", "!BÜCHER.de", "!xn--bcher-kva.de"])
@pytest.mark.parametrize("recipient", ["bücher.de", "XN--BCHER-KVA.DE", "Bücher.de."])
def test_idn_exception_as_u_label_or_a_label(configured: str, recipient: str):
    d = domains(f"* {configured}")
    assert not d.matches(recipient)
    assert d.matches("bucher.de")


def test_idn_subdomain_exception():
    d = domains("* !.bücher.de")
    assert d.except_parents == {"xn--bcher-kva.de"}
    assert not d.matches("mail.xn--bcher-kva.de")
    assert d.matches("bücher.de")


def test_domain_file_with_exceptions(tmp_path: Path):
    f = tmp_path / "domains"
    f.write_text("# on by default\n*\n!legacy.example.com  # opted out\n!.old.example\n",
                 encoding="utf-8")
    for form in (str(f), f"file:{f}"):
        d = domains(form)
        assert d.matches("example.com")
        assert not d.matches("legacy.example.com")
        assert not d.matches("mx.old.example")
        assert d.matches("old.example")


def test_domain_file_bad_exception_names_the_files_line(tmp_path: Path):
    f = tmp_path / "domains"
    f.write_text("*\n!\n!*\n!bad..example\n!fine.example\n", encoding="utf-8")
    (error,) = errors(f"AcceptDomains {f}")
    assert f"{f}:2: an exception names a domain" in error
    assert f"{f}:3: an exception names a domain" in error
    assert f"{f}:4: not a domain name: '!bad..example'" in error
    assert f"{f}:5:" not in error


@pytest.mark.parametrize("entry", ["!", "!*", "!!x.example", "!..x.example"])
def test_bad_exception_is_an_error_naming_the_line(entry: str):
    (error,) = errors(f"Mode enforce\nAcceptDomains * {entry}")
    assert error.startswith("test.conf:2: AcceptDomains: ")


def test_describe_shows_the_entries_and_the_rule_and_parses_back():
    cfg = parse("AcceptDomains * !legacy.example.com")
    (line,) = [x for x in config.describe(cfg) if x.startswith("AcceptDomains")]
    assert line == "AcceptDomains *, !legacy.example.com  # all domains except legacy.example.com"
    assert parse(line).accept_domains == cfg.accept_domains
    empty = [x for x in config.describe(Config()) if x.startswith("AcceptDomains")]
    assert parse(empty[0]).accept_domains == DomainSet()


# -- EnforceShare --


@pytest.mark.parametrize(("text", "share"), [("0", 0), ("1", 1), ("50", 50), ("100", 100),
                                             ("25%", 25), ("007", 7)])
def test_enforce_share_values(text: str, share: int):
    assert parse(f"EnforceShare {text}").enforce_share == share


@pytest.mark.parametrize("text", ["101", "-1", "12.5", "half", "1e2", "50 %%", "0x10"])
def test_enforce_share_out_of_range_or_not_a_number_names_the_line(text: str):
    (error,) = errors(f"# staged\nMode enforce\nEnforceShare {text}")
    assert error.startswith("test.conf:3: EnforceShare: expected a whole percentage 0..100"), error


def test_enforce_share_needs_a_value_and_is_set_once():
    assert errors("EnforceShare") == ["test.conf:1: EnforceShare needs a value"]
    assert errors("EnforceShare 10\nenforceshare 20") == [
        "test.conf:2: EnforceShare already set on line 1"
    ]


# -- Nameservers, Socket, MetricsListen --


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("192.0.2.53", (("192.0.2.53", 53),)),
        ("192.0.2.53:5353", (("192.0.2.53", 5353),)),
        ("2001:db8::53", (("2001:db8::53", 53),)),
        ("[::1]:5353", (("::1", 5353),)),
        ("[2001:DB8::53]", (("2001:db8::53", 53),)),
        ("192.0.2.1, 192.0.2.2:54", (("192.0.2.1", 53), ("192.0.2.2", 54))),
        ("[::1]:5353,127.0.0.1", (("::1", 5353), ("127.0.0.1", 53))),
    ],
)
def test_nameserver_forms(text: str, expected: tuple[tuple[str, int], ...]):
    assert parse(f"Nameservers {text}").nameservers == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("inet:8894@localhost", "inet:8894@localhost"),
        ("inet:8894@127.0.0.1", "inet:8894@127.0.0.1"),
        ("inet:12345", "inet:12345@localhost"),
        ("inet6:8894@::1", "inet6:8894@::1"),
        ("inet6:8894@[::1]", "inet6:8894@::1"),
        ("inet6:8894", "inet6:8894@::1"),
        (
            "unix:/var/spool/postfix/ipv6milter/ipv6milter.sock",
            "unix:/var/spool/postfix/ipv6milter/ipv6milter.sock",
        ),
        ("local:/run/ipv6milter.sock", "unix:/run/ipv6milter.sock"),
    ],
)
def test_socket_forms(text: str, expected: str):
    assert parse(f"Socket {text}").socket == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[::1]:9894", ("::1", 9894)),
        ("127.0.0.1:9894", ("127.0.0.1", 9894)),
        ("off", None),
        ("no", None),
    ],
)
def test_metrics_listen_forms(text: str, expected: tuple[str, int] | None):
    assert parse(f"MetricsListen {text}").metrics_listen == expected


@pytest.mark.parametrize(("text", "mask"), [("007", 0o007), ("0027", 0o027), ("77", 0o077)])
def test_umask_is_octal(text: str, mask: int):
    assert parse(f"UMask {text}").umask == mask


# -- TrustedHosts and is_trusted --


def test_is_trusted_v4_and_v6_networks():
    cfg = parse("TrustedHosts 192.0.2.0/24, 2001:db8:aa::/48 198.51.100.7 2001:db8::1")
    assert cfg.is_trusted(ip("192.0.2.200"))
    assert cfg.is_trusted(ip("198.51.100.7"))
    assert cfg.is_trusted(ip("2001:db8:aa:1::25"))
    assert cfg.is_trusted(ip("2001:db8::1"))
    assert not cfg.is_trusted(ip("192.0.3.1"))
    assert not cfg.is_trusted(ip("198.51.100.8"))
    assert not cfg.is_trusted(ip("2001:db8:ab::25"))
    assert not cfg.is_trusted(ip("2001:db8::2"))


def test_default_trusted_hosts_are_loopback():
    cfg = Config()
    assert cfg.is_trusted(ip("127.0.0.1"))
    assert cfg.is_trusted(ip("::1"))
    assert not cfg.is_trusted(ip("127.0.0.2"))
    assert not cfg.is_trusted(ip("2001:db8::25"))


def test_host_bits_in_a_network_are_accepted():
    cfg = parse("TrustedHosts 10.1.2.3/8")
    assert cfg.trusted_hosts == (ipaddress.ip_network("10.0.0.0/8"),)
    assert cfg.is_trusted(ip("10.200.0.1"))


# -- AuthservID --


def test_authserv_id_order():
    assert parse("AuthservID mx.example.org").default_authserv_id("mta.example") == "mx.example.org"
    assert Config().default_authserv_id("MTA.example") == "mta.example"


# -- load --


def test_load_reads_the_file_and_names_it(tmp_path: Path):
    f = tmp_path / "ipv6milter.conf"
    f.write_text("Mode monitor\n", encoding="utf-8")
    cfg = config.load(str(f))
    assert cfg.mode == "monitor"
    assert cfg.source == str(f)


def test_load_errors_name_the_file_and_line(tmp_path: Path):
    f = tmp_path / "ipv6milter.conf"
    f.write_text("Mode monitor\nBogus 1\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        config.load(str(f))
    assert info.value.errors == [f"{f}:2: unknown key 'Bogus'"]


def test_load_missing_explicit_file_is_an_error(tmp_path: Path):
    missing = tmp_path / "missing.conf"
    with pytest.raises(ConfigError) as info:
        config.load(str(missing))
    assert info.value.errors == [f"{missing}: no such file"]


def test_load_missing_default_file_gives_defaults(tmp_path: Path):
    cfg = config.load(str(tmp_path / "missing.conf"), default_if_missing=True)
    assert cfg == Config()


def test_load_existing_file_with_default_if_missing_still_reads_it(tmp_path: Path):
    f = tmp_path / "ipv6milter.conf"
    f.write_text("StampAll yes\n", encoding="utf-8")
    assert config.load(str(f), default_if_missing=True).stamp_all is True


def test_load_bad_file_with_default_if_missing_is_still_an_error(tmp_path: Path):
    f = tmp_path / "ipv6milter.conf"
    f.write_text("StampAll perhaps\n", encoding="utf-8")
    with pytest.raises(ConfigError):
        config.load(str(f), default_if_missing=True)


def test_load_unreadable_file_is_an_error(tmp_path: Path):
    f = tmp_path / "latin1.conf"
    f.write_bytes(b"AuthservID caf\xe9.example\n")
    with pytest.raises(ConfigError) as info:
        config.load(str(f))
    assert info.value.errors[0].startswith(f"{f}: cannot read")
    with pytest.raises(ConfigError) as info:
        config.load(str(tmp_path))  # a directory
    assert info.value.errors[0].startswith(f"{tmp_path}: cannot read")


# -- describe --


def test_describe_defaults():
    assert config.describe(Config()) == [
        "Socket inet:8894@localhost",
        "AuthservID -",
        "AcceptDomains   # no domains (every in-scope recipient gets the 550)",
        "TrustedHosts 127.0.0.1/32, ::1/128",
        "SkipAuthenticated yes",
        "ReverseDNS ptr",
        "Mode enforce",
        "EnforceShare 100",
        "StampAll no",
        "Nameservers -",
        "DNSTimeout 5",
        "StageTimeout 20",
        "MaxSignatures 5",
        "Alignment off  # any SPF or DKIM pass is enough (EOP's rule)",
        "SPFVoidLookupLimit 2",
        "MaxMessageSize 67108864",
        "UserID -",
        "UMask 007",
        "PidFile -",
        "Syslog no",
        "LogLevel info",
        "MetricsListen -",
        "Workers auto",
    ]


@pytest.mark.parametrize("mode", ["off", "relaxed", "strict"])
def test_alignment_modes(mode: str):
    cfg = parse(f"Alignment {mode.upper()}\n")
    assert cfg.alignment == mode
    (line,) = [x for x in config.describe(cfg) if x.startswith("Alignment")]
    assert line.startswith(f"Alignment {mode}  # ")
    assert parse(line + "\n").alignment == mode  # -n's line parses back
    assert "organizational domain" in config.describe(parse("Alignment relaxed\n"))[
        [k.name for k in config.KEYS].index("Alignment")]


def test_alignment_default_is_off_and_bad_values_name_the_line():
    assert Config().alignment == "off"
    with pytest.raises(ConfigError) as info:
        parse("Mode enforce\nAlignment dmarc\n")
    assert info.value.errors == [
        "test.conf:2: Alignment: expected one of off, relaxed, strict, got 'dmarc'"]


def test_describe_full_config():
    lines = config.describe(parse(FULL))
    assert "Socket inet6:9999@::1" in lines
    assert "AuthservID mx.example.org" in lines
    assert "AcceptDomains example.com, .example.net  # example.com, subdomains of example.net" \
        in lines
    assert "TrustedHosts 10.0.0.0/8, 2001:db8:1::/48" in lines
    assert "Nameservers 192.0.2.53:53, [2001:db8::53]:5353" in lines
    assert "DNSTimeout 2.5" in lines
    assert "UMask 027" in lines
    assert "MetricsListen [::1]:9894" in lines
    assert "Mode monitor" in lines
    assert "Syslog yes" in lines
    assert len(lines) == len(config.KEYS)


def test_describe_of_a_full_config_parses_back_to_it():
    cfg = parse(FULL)
    assert parse("\n".join(config.describe(cfg))) == cfg
