"""The faster whitespace passes give exactly dkimpy's output."""

from __future__ import annotations

import dkim
import dkim.canonicalization
from hypothesis import given, settings
from hypothesis import strategies as st

from ipv6milter import dkimcanon
from tests.dkimkeys import make_key
from tests.unit.fakedns import FakeResolver

ORIGINAL = dkim.canonicalization.compress_whitespace
assert ORIGINAL is not dkimcanon.compress_whitespace
ORIGINAL_STRIP = dkim.canonicalization.strip_trailing_whitespace
assert ORIGINAL_STRIP is not dkimcanon.strip_trailing_whitespace

bodies = st.lists(st.sampled_from([b" ", b"\t", b"a", b"\r\n", b"  ", b" \t", b"\t ", b"x y"]),
                  max_size=200).map(b"".join)


@settings(max_examples=2000)
@given(bodies)
def test_same_output_as_dkimpy(body: bytes) -> None:
    assert dkimcanon.compress_whitespace(body) == ORIGINAL(body)


@given(st.binary(max_size=300))
def test_same_output_on_any_bytes(body: bytes) -> None:
    assert dkimcanon.compress_whitespace(body) == ORIGINAL(body)


@settings(max_examples=2000)
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
