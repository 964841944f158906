"""dkimpy's steps over sender data and ours give the same output (dkimcanon,
and the parsing steps of dkimcheck and dkimaccept that replace dkimpy's)."""

from __future__ import annotations

import re

import dkim
import dkim.canonicalization
import pytest
from dkim.util import parse_tag_value
from hypothesis import given, settings
from hypothesis import strategies as st

from ipv6milter import dkimaccept, dkimcanon, dkimcheck
from ipv6milter.dkimcheck import check_dkim
from ipv6milter.resolver import Budget
from tests.dkimkeys import make_key
from tests.unit.fakedns import FakeResolver

ORIGINAL = dkim.canonicalization.compress_whitespace
assert ORIGINAL is not dkimcanon.compress_whitespace
ORIGINAL_STRIP = dkim.canonicalization.strip_trailing_whitespace
assert ORIGINAL_STRIP is not dkimcanon.strip_trailing_whitespace

bodies = st.lists(st.sampled_from([b" ", b"\t", b"a", b"\r\n", b"  ", b" \t", b"\t ", b"x y"]),
                  max_size=200).map(b"".join)


@settings(max_examples=400)
@given(bodies)
def test_same_output_as_dkimpy(body: bytes) -> None:
    assert dkimcanon.compress_whitespace(body) == ORIGINAL(body)


@given(st.binary(max_size=300))
def test_same_output_on_any_bytes(body: bytes) -> None:
    assert dkimcanon.compress_whitespace(body) == ORIGINAL(body)


@settings(max_examples=400)
@given(bodies)
def test_strip_trailing_whitespace_same_output_as_dkimpy(body: bytes) -> None:
    assert dkimcanon.strip_trailing_whitespace(body) == ORIGINAL_STRIP(body)


@given(st.binary(max_size=300))
def test_strip_trailing_whitespace_same_output_on_any_bytes(body: bytes) -> None:
    assert dkimcanon.strip_trailing_whitespace(body) == ORIGINAL_STRIP(body)


def test_install_is_idempotent_and_verification_still_works() -> None:
    try:
        dkimcanon.install()
        dkimcanon.install()
        assert dkim.canonicalization.compress_whitespace is dkimcanon.compress_whitespace
        assert dkim.canonicalization.strip_trailing_whitespace is \
            dkimcanon.strip_trailing_whitespace
        private, key = make_key()
        body = b"Hello   world \t again\r\n \r\nend.\r\n"
        msg = b"From: a@example.com\r\nSubject:  spaced   out\r\n\r\n" + body
        sig = dkim.sign(msg, b"sel1", b"example.com", private,
                        canonicalize=(b"relaxed", b"relaxed"))
        r = FakeResolver({("sel1._domainkey.example.com", "TXT"): key})
        from ipv6milter.dkimcheck import check_dkim
        from ipv6milter.resolver import Budget
        assert [x.result for x in check_dkim(r, sig + msg, Budget(5), 5)] == ["pass"]
    finally:
        dkimcanon.uninstall()
    assert dkim.canonicalization.compress_whitespace is ORIGINAL
    assert dkim.canonicalization.strip_trailing_whitespace is ORIGINAL_STRIP


# -- the b= removal, the h= split, the b= check, the header parse: dkimpy's answers -------

DKIMPY = dkimcanon._DKIMPY  # dkimpy's own objects, as dkimcanon found them
tag_text = st.lists(st.sampled_from([b"b", b"=", b" ", b"\t", b"\r\n", b"\n", b"\r", b";",
                                     b"A", b"/", b"+", b"h", b"x", b"b=", b"; b=", b"\r\n "]),
                    max_size=60).map(b"".join)


@settings(max_examples=800)
@given(tag_text)
def test_b_value_removal_same_as_dkimpy(value: bytes) -> None:
    assert dkimcanon.RE_BTAG.sub(b"\\1", value) == DKIMPY["RE_BTAG"].sub(b"\\1", value)


def test_b_value_removal_on_a_real_signature() -> None:
    private, _ = make_key()
    sig = dkim.sign(b"From: a@example.com\r\n\r\nhi\r\n", b"sel1", b"example.com", private)
    value = sig.split(b":", 1)[1]
    ours = dkimcanon.RE_BTAG.sub(b"\\1", value)
    assert ours == DKIMPY["RE_BTAG"].sub(b"\\1", value)
    assert ours.rstrip().endswith(b"b=") and len(ours) < len(value) - 100


@settings(max_examples=500)
@given(st.lists(st.sampled_from([b"from", b"To", b":", b" ", b"\t", b"\r\n ", b"x-y", b"::"]),
                max_size=30).map(b"".join))
def test_h_split_same_as_dkimpy(h: bytes) -> None:
    tags = parse_tag_value(b"h=" + h) if h.strip() else {b"h": b""}
    expected = [x.lower() for x in re.split(rb"\s*:\s*", tags[b"h"])]
    assert dkimaccept.signed_fields(tags) == expected


@settings(max_examples=500)
@given(st.lists(st.sampled_from([b"A", b"z", b"0", b"+", b"/", b"=", b" ", b"\t", b"\r\n",
                                 b"\n", b"!", b"-", b"=="]), max_size=30).map(b"".join))
def test_b_check_same_as_dkimpy(b: bytes) -> None:
    dkimpy_ok = re.match(rb"[\s0-9A-Za-z+/]+[\s=]*$", b) is not None
    assert dkimaccept._b_is_base64(b) == dkimpy_ok


field_lines = st.lists(
    st.one_of(
        st.builds(lambda n, v: n + b":" + v,
                  st.sampled_from([b"From", b"To", b"Subject", b"DKIM-Signature", b"X-A_b.c"]),
                  st.sampled_from([b"", b" x", b"  two  words ", b"\ttab", b" a:b", b" \r"])),
        st.sampled_from([b" folded", b"\tfolded again", b"  ", b"\t"]),
    ),
    max_size=12,
)


@settings(max_examples=500)
@given(field_lines, st.sampled_from([b"\r\n", b"\n"]))
def test_header_parse_same_as_dkimpy(lines: list[bytes], end: bytes) -> None:
    """On every header dkimpy accepts, the same (name, value) list."""
    head = end.join(lines)
    try:
        expected = [tuple(f) for f in dkim.rfc822_parse(head + b"\r\n\r\n")[0]]
    except (dkim.MessageFormatError, IndexError):
        with pytest.raises(dkim.MessageFormatError):
            dkimcheck.parse_header(head)
        return
    assert dkimcheck.parse_header(head) == expected


@pytest.mark.parametrize("head", [b"Subject : x", b"Subject\t:x\r\n folded", b"X-Y \t : z"])
def test_header_parse_takes_white_space_before_the_colon(head: bytes) -> None:
    with pytest.raises(dkim.MessageFormatError):
        dkim.rfc822_parse(head + b"\r\n\r\n")
    ((name, value),) = dkimcheck.parse_header(head)
    assert name == head.split(b":")[0] and dkimcanon.field_name(name) in (b"subject", b"x-y")
    assert value == head.split(b":", 1)[1] + b"\r\n"


@pytest.mark.parametrize("head", [b"no colon here", b" folded first: x", b"Bad Name: x",
                                  b"A: b\r\nnext line without colon"])
def test_header_parse_refuses_what_is_no_field(head: bytes) -> None:
    with pytest.raises(dkim.MessageFormatError):
        dkimcheck.parse_header(head)


def test_header_parse_skips_an_mbox_from_line_as_dkimpy_does() -> None:
    head = b"From a@example.com Thu Jan  1 00:00:00 2024\r\nSubject: x"
    assert dkimcheck.parse_header(head) == [tuple(f) for f in dkim.rfc822_parse(
        head + b"\r\n\r\n")[0]] == [(b"Subject", b" x\r\n")]


def test_select_headers_takes_names_written_with_white_space() -> None:
    headers = [(b"From", b"1"), (b"Subject ", b"2"), (b"subject\t", b"3"), (b"To", b"4")]
    names = [b"subject", b"from", b"subject", b"subject"]
    assert dkimcanon.select_headers(headers, names) == [headers[2], headers[0], headers[1]]
    assert DKIMPY["select_headers"](headers, names) == [headers[0]]  # dkimpy's: names as written


# -- install ---------------------------------------------------------------------------------


def test_install_puts_every_replacement_in_place_and_uninstall_takes_it_back() -> None:
    try:
        dkimcanon.install()
        assert dkimcanon.installed()
        assert dkim.RE_BTAG is dkimcanon.RE_BTAG
        assert dkim.select_headers is dkimcanon.select_headers
    finally:
        dkimcanon.uninstall()
    assert not dkimcanon.installed()
    assert dkim.RE_BTAG is DKIMPY["RE_BTAG"]
    assert dkim.select_headers is DKIMPY["select_headers"]


def test_install_leaves_what_is_not_dkimpys_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    def trap(*args: object) -> bool:
        raise AssertionError("trap")

    monkeypatch.setattr(dkim, "RSASSA_PKCS1_v1_5_verify", trap)
    try:
        dkimcanon.install()
        assert dkim.RSASSA_PKCS1_v1_5_verify is trap
        assert dkim.RE_BTAG is dkimcanon.RE_BTAG
    finally:
        dkimcanon.uninstall()


def test_check_dkim_installs_the_replacements() -> None:
    dkimcanon.uninstall()
    private, key = make_key()
    msg = b"From: a@example.com\r\nSubject: x\r\n\r\nbody\r\n"
    signed = dkim.sign(msg, b"sel1", b"example.com", private) + msg
    r = FakeResolver({("sel1._domainkey.example.com", "TXT"): key})
    try:
        assert [x.result for x in check_dkim(r, signed, Budget(5), 5)] == ["pass"]
        assert dkimcanon.installed()
    finally:
        dkimcanon.uninstall()


@pytest.mark.parametrize("unit", [b"a  b\t \r\n", b" \t \r\n\r\n", b"x" * 70 + b"  \r\n", b"\r\n"])
def test_relaxed_body_in_chunks_same_as_dkimpy(unit: bytes) -> None:
    """Past a megabyte the body is canonicalized a chunk of lines at a time."""
    body = unit * ((3 << 20) // len(unit) + 1) + b"tail  \r\n\r\n"
    assert len(body) > 3 << 20
    dkimcanon.uninstall()
    expected = dkim.canonicalization.Relaxed.canonicalize_body(body)
    assert dkimcanon.relaxed_body(body) == expected
    assert dkimcanon.relaxed_body(body[:1000]) == \
        dkim.canonicalization.Relaxed.canonicalize_body(body[:1000])
