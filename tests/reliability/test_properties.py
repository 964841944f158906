"""Property-based tests (hypothesis): whatever the input, a defined outcome.

* the configuration parser: a Config, or a ConfigError whose every message
  names a line of the file, the line it is about; never another exception;
* address canonicalisation: every way an MTA may write an address parses to
  it, and replies show it in RFC 5952 form (checked against an independent
  implementation of RFC 5952 §4); IPv4-mapped addresses count as IPv4;
* the header builder: any results, hostile strings included, give a header
  that authres parses back to exactly those results and nothing more;
* the DKIM body shortcut of dkimcheck: same canonical body as dkimpy's own.

Examples are derandomized (the same ones each run: CI does not flake) and
nothing is stored in a .hypothesis directory.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import string
import time

import dkim
import pytest
from dkim.canonicalization import Relaxed, Simple
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from ipv6milter import authresults, config, policy
from ipv6milter.config import Config, ConfigError
from ipv6milter.dkimcheck import canonical_equivalent, split_message
from ipv6milter.model import DkimResult, Iprev, IprevResult, Scope, SpfResult
from ipv6milter.spfcheck import RESULTS as SPF_RESULTS

PROPERTY = settings(
    max_examples=400,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)

# -- the configuration parser ------------------------------------------------------------

KEY_NAMES = [k.name for k in config.KEYS]
SRC = "/etc/ipv6milter/test.conf"

tricky_chars = st.sampled_from(
    [*" \t#,:[]@%/\\\"'=;*.-_0123456789abcdefxyzXYZ",
     "\x00", "\x0b", "\x0c", "\x1c", "\x85", "\u2028", "\u00a0", "ß", "ü", "例", "\ufeff"]
)
values = st.one_of(
    st.text(tricky_chars, max_size=30),
    st.text(max_size=30),
    st.sampled_from([
        "yes", "no", "0", "1", "inet:8894@localhost", "inet6:1@[::1]", "unix:/x", "local:/y",
        "5", "0.1", "1e400", "nan", "inf", "-1", "9" * 5000, "007", "0999", "nobody:nogroup",
        "[::1]:5353", "127.0.0.1:53", "::1", "[::1]:0", "[::1]:99999", "*", ".example.com",
        "faß.de", "xn--fa-hia.de", "☃.net", "a" * 64 + ".com", "file:/nonexistent/x",
        "/proc/self/nonexistent", "file:", "/", "off", "2001:db8::/129", "fe80::1%eth0",
        "/tmp/\x00x", "file:/tmp/\x00", "1_0", "\uff11\uff12",
    ]),
)
key_words = st.one_of(
    st.sampled_from(KEY_NAMES).map(lambda k: k.swapcase() if len(k) % 2 else k.lower()),
    st.sampled_from(KEY_NAMES),
    st.text(tricky_chars, min_size=1, max_size=12),
)
config_lines = st.one_of(
    st.tuples(key_words, st.sampled_from([" ", "\t", "  "]), values).map("".join),
    st.sampled_from(["", "# comment", "   ", "#", "\t# indented comment", "\r"]),
    st.text(tricky_chars, max_size=40),
    st.text(max_size=40),
)


@PROPERTY
@given(st.lists(config_lines, max_size=12))
def test_config_parser_gives_a_config_or_errors_naming_their_line(parts: list[str]) -> None:
    text = "\n".join(parts)
    lines = text.split("\n")  # as grep -n numbers them
    try:
        cfg = config.parse(text, SRC)
    except ConfigError as e:
        assert e.errors
        for message in e.errors:
            m = re.match(rf"{re.escape(SRC)}:(\d+): ", message)
            assert m, message
            number = int(m.group(1))
            # The line an editor, sed or grep -n shows under that number.
            assert 1 <= number <= len(lines), (message, lines)
            words = re.split(r"\s+#", lines[number - 1].strip(), maxsplit=1)[0].split(None, 1)
            assert words, (message, lines[number - 1])
            rest = message[m.end():]
            if rest.startswith("unknown key "):
                assert rest == f"unknown key {words[0]!r}", (message, words)
            elif rest.startswith("StageTimeout ("):
                assert words[0].lower() in ("stagetimeout", "dnstimeout"), (message, words)
            else:  # "<Key>: problem", "<Key> needs a value", "<Key> already set on line N"
                key = re.split(r"[: ]", rest, maxsplit=1)[0]
                assert words[0].lower() == key.lower(), (message, words)
        return
    assert isinstance(cfg, Config)
    assert cfg.source == SRC
    for k in config.KEYS:  # every value has the type of its default
        default = getattr(Config(), k.attr)
        got = getattr(cfg, k.attr)
        assert got is None or default is None or type(got) is type(default), k.name


@PROPERTY
@given(
    st.sampled_from(["AcceptDomains", "PidFile", "acceptdomains"]),
    st.sampled_from(["/", "file:/", "file:", "/tmp/", "/dev/null/", "/proc/"]),
    st.text(tricky_chars, max_size=12),
)
def test_path_values_are_checked_never_crash(key: str, prefix: str, rest: str) -> None:
    """A path goes to open(): NUL, a directory, a missing or unreadable file
    is an error naming line 2, not an exception."""
    assume("\n" not in rest and "#" not in rest)
    try:
        config.parse(f"# paths\n{key} {prefix}{rest}\n", SRC)
    except ConfigError as e:
        assert all(m.startswith(f"{SRC}:2: ") for m in e.errors), e.errors


@PROPERTY
@given(st.text(max_size=200))
def test_config_parser_never_raises_on_any_text(text: str) -> None:
    with contextlib.suppress(ConfigError):
        config.parse(text, SRC)


# -- addresses ----------------------------------------------------------------------------


def rfc5952(addr: ipaddress.IPv6Address) -> str:
    """RFC 5952 §4, written independently of the ipaddress module's own output."""
    fields = [int.from_bytes(addr.packed[i : i + 2], "big") for i in range(0, 16, 2)]
    best_start, best_len = -1, 0
    i = 0
    while i < 8:
        if fields[i] == 0:
            j = i
            while j < 8 and fields[j] == 0:
                j += 1
            if j - i > best_len:  # the longest run; the first of equal ones (§4.2.3)
                best_start, best_len = i, j - i
            i = j
        else:
            i += 1
    text = [format(f, "x") for f in fields]  # lower case, no leading zeros (§4.1, §4.3)
    if best_len < 2:  # "::" never stands for a single 0 field (§4.2.2)
        return ":".join(text)
    return ":".join(text[:best_start]) + "::" + ":".join(text[best_start + best_len :])


def renderings(addr: ipaddress.IPv6Address) -> list[str]:
    exploded = addr.exploded
    no_leading = ":".join(f.lstrip("0") or "0" for f in exploded.split(":"))
    out = [
        str(addr),
        exploded,
        exploded.upper(),
        no_leading,
        f"IPv6:{no_leading}",  # Sendmail's {client_addr}: prefix, uncompressed
        f"[IPv6:{exploded.upper()}]",
        f"[{addr}]",
        f" {addr} ",
        f"{addr}%eth0",
        f"ipv6:{addr}",
    ]
    if addr.ipv4_mapped:
        out += [f"::ffff:{addr.ipv4_mapped}", f"IPv6:0:0:0:0:0:FFFF:{addr.ipv4_mapped}"]
    return out


v6 = st.one_of(
    st.ip_addresses(v=6),
    st.ip_addresses(v=4).map(lambda a: ipaddress.IPv6Address(f"::ffff:{a}")),
    st.sampled_from([
        ipaddress.IPv6Address(x)
        for x in ("::", "::1", "2001:db8::", "2001:db8:0:0:1:0:0:1", "2001:0:0:1::1",
                  "1:0:0:2:0:0:0:3", "0:0:1::", "2001:db8:1:1:1:1:1:0", "fe80::1")
    ]),
)
NO_TRUST = Config(trusted_hosts=())


@PROPERTY
@given(v6)
def test_every_rendering_parses_to_the_address_and_replies_use_rfc5952(
    addr: ipaddress.IPv6Address,
) -> None:
    for text in renderings(addr):
        assert policy.parse_address(text) == addr, text
    canonical = rfc5952(addr)
    assert str(addr) == canonical
    for reply in (policy.no_reverse_dns(addr), policy.not_authenticated(addr),
                  policy.dns_tempfail("reverse DNS", addr)):
        assert f"[{canonical}]" in reply.text
        assert "%" not in reply.text


@PROPERTY
@given(v6, st.booleans(), st.booleans())
def test_classify_mapped_counts_as_ipv4(
    addr: ipaddress.IPv6Address, authenticated: bool, skip: bool
) -> None:
    cfg = Config(trusted_hosts=(), skip_authenticated=skip)
    scope = policy.classify(cfg, addr, authenticated)
    if authenticated and skip:
        assert scope is Scope.AUTHENTICATED
    elif addr.ipv4_mapped:
        assert scope is Scope.MAPPED
        assert policy.effective_address(addr) == addr.ipv4_mapped
        # Trusting the IPv4 address trusts its mapped form too.
        trusting = Config(trusted_hosts=(ipaddress.ip_network(addr.ipv4_mapped),))
        assert policy.classify(trusting, addr) is Scope.TRUSTED
    else:
        assert scope is Scope.IPV6
        assert policy.effective_address(addr) == addr
    assert scope.in_scope == (scope is Scope.IPV6)


@PROPERTY
@given(st.ip_addresses(v=4))
def test_classify_ipv4(addr: ipaddress.IPv4Address) -> None:
    assert policy.classify(NO_TRUST, addr) is Scope.IPV4
    assert policy.parse_address(str(addr)) == addr
    assert policy.parse_address(f"[{addr}]") == addr


@PROPERTY
@given(st.one_of(st.text(max_size=60), st.text(string.hexdigits + ":.[]%IPv6", max_size=60)))
def test_parse_address_of_any_text_is_an_address_or_none(text: str) -> None:
    got = policy.parse_address(text)
    assert got is None or isinstance(got, ipaddress.IPv4Address | ipaddress.IPv6Address)


# -- the header builder ---------------------------------------------------------------------

hostname_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
hostnames = st.lists(hostname_label, min_size=1, max_size=4).map(".".join)
hostile = st.one_of(
    st.text(max_size=40),
    st.text(st.sampled_from(list("abc.-_@;()\"\\ =/+\r\n\t:[]<>,")), max_size=30),
    hostnames,
)
authserv_ids = hostnames
iprev_results = st.builds(
    IprevResult,
    result=st.sampled_from(list(Iprev)),
    names=st.lists(st.one_of(hostnames, hostile), max_size=7).map(tuple),
)
spf_results = st.builds(
    SpfResult,
    result=st.sampled_from(SPF_RESULTS),
    identity=st.one_of(
        hostile,
        st.tuples(st.from_regex(r"[a-zA-Z0-9.+_-]{1,20}", fullmatch=True), hostnames).map(
            "@".join),
        hostnames,
        st.sampled_from(["[IPv6:2001:db8::1]", "[192.0.2.1]", "<>", ""]),
    ),
    scope=st.sampled_from(["mailfrom", "helo"]),
)
dkim_results = st.builds(
    DkimResult,
    result=st.sampled_from(["pass", "fail", "neutral", "temperror", "permerror"]),
    domain=st.one_of(hostnames, hostile, st.just("")),
    selector=st.one_of(hostname_label, hostile, st.just("")),
    b=st.one_of(st.from_regex(r"[A-Za-z0-9+/=]{0,8}", fullmatch=True), hostile),
)
TOKEN = re.compile(r"[A-Za-z0-9._-]{1,253}")


@PROPERTY
@given(
    authserv_ids,
    st.one_of(st.none(), st.ip_addresses()),
    st.one_of(st.none(), iprev_results),
    st.one_of(st.none(), spf_results),
    st.lists(dkim_results, max_size=6),
)
def test_any_results_round_trip_through_authres(
    authserv_id: str,
    addr: ipaddress.IPv4Address | ipaddress.IPv6Address | None,
    iprev: IprevResult | None,
    spf: SpfResult | None,
    dkims: list[DkimResult],
) -> None:
    value = authresults.build(authserv_id, addr, iprev, spf, dkims)
    # One header field value: no line end that is not a fold, no NUL.
    assert "\0" not in value
    assert all(line.startswith("\t") for line in value.split("\n")[1:]), value
    assert "\r" not in value
    header = authresults.parse(value)
    assert header.authserv_id == authserv_id
    got = [(r.method, r.result, {f"{p.type}.{p.name}": p.value for p in r.properties})
           for r in header.results]

    want: list[tuple[str, str, dict[str, str]]] = []
    if iprev is not None and addr is not None:
        want.append(("iprev", iprev.result.value, {"policy.iprev": str(addr)}))
    if spf is not None:
        props = {}
        if spf.scope == "helo":
            if re.fullmatch(r"[A-Za-z0-9._:\[\]-]{1,255}", spf.identity):
                props["smtp.helo"] = spf.identity
        else:
            domain = spf.identity.rpartition("@")[2]
            if re.fullmatch(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}@[A-Za-z0-9._-]{1,253}",
                            spf.identity):
                props["smtp.mailfrom"] = spf.identity
            elif TOKEN.fullmatch(domain):
                props["smtp.mailfrom"] = domain
        want.append(("spf", spf.result, props))
    if not dkims:
        want.append(("dkim", "none", {}))
    for r in dkims:
        props = {}
        if TOKEN.fullmatch(r.domain):
            props["header.d"] = r.domain
        if TOKEN.fullmatch(r.selector):
            props["header.s"] = r.selector
        if re.fullmatch(r"[A-Za-z0-9+/=]{1,64}", r.b):
            props["header.b"] = r.b
        want.append(("dkim", r.result, props))
    assert got == want, value


@PROPERTY
@given(st.lists(st.sampled_from(["pass", "fail", "none"]), max_size=4), authserv_ids)
def test_our_own_header_is_recognised_as_forged_by_the_next_hop(
    words: list[str], authserv_id: str
) -> None:
    value = authresults.build(authserv_id, None, None, None,
                              [DkimResult(w, "example.com", "s") for w in words])
    assert authresults.forged_indexes([value, "other.example; spf=pass"], authserv_id) == [1]


# -- dkimcheck's body shortcut is exact ---------------------------------------------------

bodies = st.lists(
    st.sampled_from([b"a", b" ", b"\t", b"\r", b"\n", b"\r\n", b"\r\n", b"  \r\n", b"\t\r\n"]),
    max_size=20,
).map(b"".join)


@PROPERTY
@given(bodies)
def test_cutting_a_tail_of_empty_lines_keeps_the_canonical_body(body: bytes) -> None:
    for algorithm, canon in ((b"simple", Simple), (b"relaxed", Relaxed)):
        cut = canonical_equivalent(body, algorithm, longer_than=0)
        assert canon.canonicalize_body(cut) == canon.canonicalize_body(body)
        assert len(cut) <= len(body) + 2


messages = st.lists(
    st.sampled_from([b"a", b"b:", b"X: y\r\n", b" ", b"\t", b"\r", b"\n", b"\r\n", b"\n\n",
                     b"\r\n\r\n", b"From x", b"DKIM-Signature: v=1\r\n"]),
    max_size=14,
).map(b"".join)


@PROPERTY
@given(messages)
def test_split_message_agrees_with_dkimpy(message: bytes) -> None:
    def parse(m: bytes) -> object:
        try:
            return dkim.rfc822_parse(m)
        except (dkim.MessageFormatError, IndexError):
            return None

    want = parse(message)
    head, body = split_message(message)
    got = parse(head + b"\r\n\r\n")
    assume(want is not None or got is None)
    if want is None:
        assert got is None
        return
    assert got is not None
    assert (got[0], body) == want  # type: ignore[index]


@pytest.mark.parametrize("algorithm", [b"simple", b"relaxed"])
def test_a_million_empty_lines_are_cut_fast(algorithm: bytes) -> None:
    blank = b"  \r\n" * 1000 if algorithm == b"relaxed" else b""
    body = b"text\r\n" + b"\r\n" * 1_000_000 + blank
    start = time.monotonic()
    cut = canonical_equivalent(body, algorithm)
    assert time.monotonic() - start < 1.0
    assert len(cut) < 16
    canon = Simple if algorithm == b"simple" else Relaxed
    assert canon.canonicalize_body(cut) == canon.canonicalize_body(body) == b"text\r\n"
