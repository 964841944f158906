"""The hot path's cheaper steps (issue #18) give the answers of the steps
they replace, on any input: each is compared with the original here."""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import os

import authres
import dkim
import dkim.canonicalization
from dkim.canonicalization import CanonicalizationPolicy
from hypothesis import given, settings
from hypothesis import strategies as st

from ipv6milter import authresults, dkimaccept, dkimcanon, dkimcheck, logfmt
from ipv6milter.dkimaccept import Refusal
from ipv6milter.dkimcheck import check_dkim
from ipv6milter.model import DkimResult, Iprev, IprevResult, SpfResult
from ipv6milter.resolver import Budget
from tests.dkimkeys import make_key
from tests.unit.fakedns import FakeResolver

# Bytes that make header ends and folding: what head_end must agree on.
_HEAD_BYTES = st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b"a", b":", b" ", b"\n\n",
                                        b"\r\n\r\n", b"\n\r\n", b"\r\r"]),
                       max_size=40).map(b"".join)


@settings(max_examples=600)
@given(_HEAD_BYTES)
def test_head_end_is_the_span_of_the_regex(message: bytes) -> None:
    m = dkimcheck._HEAD_END.search(message)
    assert dkimcheck.head_end(message) == ((m.start(), m.end()) if m else None)


@given(st.binary(max_size=200))
def test_head_end_on_any_bytes(message: bytes) -> None:
    m = dkimcheck._HEAD_END.search(message)
    assert dkimcheck.head_end(message) == ((m.start(), m.end()) if m else None)


def test_split_message_given_the_end_splits_the_same() -> None:
    for message in (b"A: b\r\n\r\nbody\r\n", b"A: b\n\nbody\n", b"A: b\r\n", b"\r\nbody",
                    b"A: b\r\n\n\r\nx", b""):
        assert dkimcheck.split_message(message, dkimcheck.head_end(message)) == \
            dkimcheck.split_message(message)


_WORDS = st.lists(st.sampled_from([b"ex", b"ample", b".", b"com", b" ", b"\t", b"\r\n ",
                                    b"AbC+/", b"=", b"rsa-sha256", b"from", b":"]),
                  max_size=6).map(b"".join)
# Tags written any way: the mandatory ones (their b= folded or not), and
# names in capitals that dkimpy keeps apart and signature_tags lowers.
_B = st.sampled_from([b"YWJj ZGVm", b"YWJj\r\n ZGVm", b" Y W J j ", b"YWJjZGVm"])
_D = st.sampled_from([b"example.com", b" example.com ", b"ex ample.com", b"EXAMPLE.com"])
_EXTRA = st.dictionaries(st.sampled_from([b"D", b"S", b"B", b"x", b"z9", b"c", b" t"]), _WORDS,
                         max_size=4)


def _value(b: bytes, d: bytes, extra: dict[bytes, bytes], extra_first: bool) -> bytes:
    mandatory = [(b"v", b"1"), (b"a", b"rsa-sha256"), (b"b", b), (b"bh", b"YWJj"), (b"d", d),
                 (b"s", b"sel"), (b"h", b"from:to")]
    parts = [*extra.items(), *mandatory] if extra_first else [*mandatory, *extra.items()]
    return b"; ".join(k + b"=" + v for k, v in parts)


@settings(max_examples=400)
@given(_B, _D, _EXTRA, st.booleans())
def test_reported_tags_are_those_signature_tags_gives(b: bytes, d: bytes,
                                                      extra: dict[bytes, bytes],
                                                      extra_first: bool) -> None:
    value = _value(b, d, extra, extra_first)
    signature = dkimaccept.read_signature(value)
    if isinstance(signature, Refusal):
        return  # describe() then reads the field itself
    full = dkimcheck.signature_tags(value)
    reported = dkimcheck._reported_tags(signature.tags, value)
    assert dkimcheck.describe(value, "pass", "x", reported) == \
        dkimcheck.describe(value, "pass", "x")
    if not any(k != k.lower() for k in extra):
        for k in (b"d", b"s", b"b"):
            assert reported[k] == full[k]


def test_the_reported_tags_strategy_reaches_accepted_signatures() -> None:
    # The test above must compare something: these are read, not refused.
    assert not isinstance(dkimaccept.read_signature(_value(b"YWJj\r\n ZGVm", b"example.com",
                                                           {b"D": b"evil.example"}, True)),
                          Refusal)


# -- dkimcanon: the header unfolding and the header hash --------------------------------

_FOLDS = st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b"a", b" ", b"\t", b"\r\r\n",
                                   b"\n\r"]), max_size=30).map(b"".join)


@settings(max_examples=600)
@given(_FOLDS)
def test_unfold_removes_what_dkimpys_regex_removes(value: bytes) -> None:
    assert dkimcanon.unfold_header_value(value) == \
        dkimcanon._DKIMPY["unfold_header_value"](value)


@given(st.binary(max_size=200))
def test_unfold_on_any_bytes(value: bytes) -> None:
    assert dkimcanon.unfold_header_value(value) == \
        dkimcanon._DKIMPY["unfold_header_value"](value)


_NAMES = st.sampled_from([b"From", b"from", b"To", b"Subject", b"Subject ", b"X-A",
                          b"DKIM-Signature"])
_FIELDS = st.lists(st.tuples(_NAMES, _FOLDS.map(lambda v: v + b"\r\n")), max_size=10)
_H = st.lists(st.sampled_from([b"from", b"to", b"subject", b"x-a", b"date"]), max_size=8)
_SIG = st.tuples(st.sampled_from([b"DKIM-Signature", b"dkim-signature "]),
                 st.sampled_from([b" v=1; b=abc\r\n def; d=x\r\n", b"b=; a=x", b"a=1;\tb = Zm9v",
                                  b" b=abc\r\n", b"x=1"]))


@settings(max_examples=400)
@given(_FIELDS, _H, _SIG, st.sampled_from([b"simple/simple", b"relaxed/relaxed"]),
       st.booleans())
def test_hash_headers_hashes_what_dkimpys_hashes(fields, names, sigheader, c: bytes,
                                                 installed: bool) -> None:
    policy = CanonicalizationPolicy.from_c_value(c)
    try:
        if installed:
            dkimcanon.install()
        headers = policy.canonicalize_headers(fields)
        ours, theirs = hashlib.sha256(), hashlib.sha256()
        picked = dkimcanon.hash_headers(ours, policy, headers, list(names), sigheader, {})
        expected = dkimcanon._DKIMPY["hash_headers"](theirs, policy, headers, list(names),
                                                     sigheader, {})
    finally:
        dkimcanon.uninstall()
    assert picked == expected
    assert ours.digest() == theirs.digest()


def test_check_dkim_installs_the_header_steps_and_verifies() -> None:
    private, key = make_key()
    msg = (b"From: a@example.com\r\nSubject:  folded\r\n  over   lines\r\nTo: b@example.org\r\n"
           b"\r\nbody\r\n")
    for c in ((b"relaxed", b"relaxed"), (b"simple", b"simple")):
        sig = dkim.sign(msg, b"sel1", b"example.com", private, canonicalize=c)
        r = FakeResolver({("sel1._domainkey.example.com", "TXT"): key})
        try:
            assert [x.result for x in check_dkim(r, sig + msg, Budget(5), 5)] == ["pass"]
            assert dkim.hash_headers is dkimcanon.hash_headers
            assert dkim.canonicalization.unfold_header_value is dkimcanon.unfold_header_value
            tampered = sig + msg.replace(b"folded", b"fooled")
            assert [x.result for x in check_dkim(r, tampered, Budget(5), 5)] == ["fail"]
        finally:
            dkimcanon.uninstall()


# -- logfmt: a plain value written without the general path ------------------------------

def _value_general(v: object) -> str:
    """logfmt.value's general path alone (every value went through it)."""
    if v is None or v == "":
        return logfmt.MISSING
    text = logfmt.printable(logfmt._CONTROL.sub("?", str(v)))[: logfmt.MAX_VALUE]
    if logfmt._NEEDS_QUOTES.search(text):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


_TEXT = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.sampled_from('ab.-@"=\\ \x7f\x9f\u2028\udcff!~<>[]'), max_size=40),
    st.text(alphabet="ab", min_size=195, max_size=205),
    st.integers(), st.none(), st.floats(allow_nan=False),
)


@settings(max_examples=600)
@given(_TEXT)
def test_logfmt_value_is_the_general_paths(v: object) -> None:
    assert logfmt.value(v) == _value_general(v)


def test_lean_records_keep_what_the_formats_print(caplog) -> None:
    saved = logging._srcfile, logging.logThreads  # type: ignore[attr-defined]
    try:
        logfmt.lean_records()
        with caplog.at_level(logging.INFO, logger="ipv6milter.test"):
            logging.getLogger("ipv6milter.test").info("x %s", "y")
        (record,) = caplog.records
        line = logging.Formatter("ipv6milter[%(process)d]: %(levelname)s %(name)s: "
                                 "%(message)s").format(record)
        assert line == f"ipv6milter[{os.getpid()}]: INFO ipv6milter.test: x y"
        assert record.funcName == "(unknown function)"  # no frame walk for it
    finally:
        logging._srcfile, logging.logThreads = saved  # type: ignore[attr-defined]


# -- authresults: each clause rendered once ----------------------------------------------

def _header_value_before(authserv_id: str, results: list) -> str:
    """authresults.header_value as it was: every clause rendered twice."""
    hdr = authres.AuthenticationResultsHeader(authserv_id=authserv_id, results=list(results))
    clauses = [str(r) for r in hdr.results]
    flat = hdr.header_value()
    if flat != "; ".join([hdr.authserv_id, *clauses]):
        return flat
    return ";\n\t".join([hdr.authserv_id, *clauses])


_WORD = st.sampled_from(["example.com", "a b", 'q"x', "x@y", "", "sel1", "(c)", "AbCd/+=="])
_DKIM = st.builds(DkimResult, st.sampled_from(["pass", "fail", "permerror", "policy", "neutral"]),
                  _WORD, _WORD, _WORD, st.sampled_from(["", "no key record: x", "bad (x)"]))
_SPF = st.one_of(st.none(), st.builds(SpfResult, st.sampled_from(["pass", "fail", "none"]),
                                      st.sampled_from(["a@example.com", "x y@z", "[::1]",
                                                       "helo.example"]),
                                      st.sampled_from(["mailfrom", "helo"])))
_IPREV = st.one_of(st.none(), st.builds(IprevResult, st.sampled_from(list(Iprev)),
                                        st.lists(_WORD, max_size=3).map(tuple)))


@settings(max_examples=1000)
@given(_IPREV, _SPF, st.lists(_DKIM, max_size=3), st.sampled_from(["mx.example", "a b"]))
def test_header_value_is_what_it_was(iprev, spf, dkim_results, authserv_id: str) -> None:
    results = authresults.results_for(ipaddress.ip_address("2001:db8::1"), iprev, spf,
                                      dkim_results)
    assert authresults.header_value(authserv_id, results) == \
        _header_value_before(authserv_id, results)
    assert authresults.header_value(authserv_id, []) == _header_value_before(authserv_id, [])


@settings(max_examples=60, deadline=None)  # each example is a header of ~1000 lines
@given(st.lists(st.sampled_from([b"A: b\r\n", b" folded\r\n", b"\r\n", b"\n", b"x\n", b"\t\n"]),
                min_size=990, max_size=1010).map(b"".join))
def test_the_field_limit_shortcut_decides_as_the_count(head: bytes) -> None:
    # Around MAX_HEADER_FIELDS (1000) lines: the line count alone or the
    # full count, the same answer.
    assert dkimcheck._over_field_limit(head) == \
        (dkimcheck._field_count(head) > dkimcheck.limits.MAX_HEADER_FIELDS)


@settings(max_examples=400)
@given(st.lists(st.tuples(st.sampled_from(["Subject", "X-A", "From"]), _HEAD_BYTES), max_size=6),
       st.booleans())
def test_the_rebuilt_message_makes_every_line_end_crlf_as_the_regex_did(
        fields: list[tuple[str, bytes]], leading_space: bool) -> None:
    import re

    from ipv6milter.engine import Message

    msg = Message(1 << 20, 5, "mx.example.org", leading_space=leading_space)
    for name, value in fields:
        msg.header(name, value)
    msg.body(b"body\r\n")
    sep = b":" if leading_space else b": "
    head = b"\r\n".join(n.encode() + sep + v for n, v in fields)
    assert msg.message() == re.sub(rb"\r?\n", b"\r\n", head) + b"\r\n\r\nbody\r\n"


_ADDRS = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6),
                   st.sampled_from([ipaddress.ip_address(a) for a in (
                       "::1", "127.0.0.1", "2001:db8::1", "2001:db8:0:1::ffff", "10.1.2.3",
                       "::ffff:10.1.2.3", "fe80::1")]))


@settings(max_examples=400)
@given(_ADDRS)
def test_trusted_hosts_by_integers_match_what_ipaddress_says(addr) -> None:
    from ipv6milter import config

    cfg = config.parse("AcceptDomains example.org\nTrustedHosts 127.0.0.0/8, ::1, "
                       "10.0.0.0/9, 2001:db8::/64, 192.0.2.7, ::ffff:0:0/96\n")
    expected = any(addr.version == n.version and addr in n for n in cfg.trusted_hosts)
    assert cfg.is_trusted(addr) == expected
