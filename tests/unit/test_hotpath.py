"""The hot path's caches: each key record read once, DNS answers served
before dnspython, metric children bound once; the results stay the same."""

from __future__ import annotations

from typing import Any

import dkim
import dkim.crypto
import pytest

from ipv6milter import dkimaccept, dkimcheck
from ipv6milter.dkimcheck import check_dkim
from ipv6milter.resolver import Budget
from tests.dkimkeys import make_key

from .fakedns import FakeResolver

MESSAGE = (
    b"From: Sender <sender@example.com>\r\n"
    b"To: rcpt@example.org\r\n"
    b"Subject: hot path\r\n"
    b"\r\n"
    b"Hello.\r\n"
)
KEY_NAME = "hot._domainkey.example.com"


def _signed(body: bytes = MESSAGE) -> tuple[bytes, str]:
    private, record = make_key(1024, tag="hotpath")
    return dkim.sign(body, b"hot", b"example.com", private) + body, record


def _counting_asn1(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    original = dkim.crypto.asn1_parse

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(dkim.crypto, "asn1_parse", counted)
    return calls


def test_a_repeat_signers_key_record_is_parsed_once(monkeypatch: pytest.MonkeyPatch):
    message, record = _signed()
    dkimaccept._read_key_cached.cache_clear()
    dkimcheck._prepare_key_cached.cache_clear()
    calls = _counting_asn1(monkeypatch)
    r = FakeResolver({(KEY_NAME, "TXT"): record})
    first = check_dkim(r, message, Budget(20), 5)
    parsed = len(calls)
    assert parsed > 0
    for _ in range(3):
        assert check_dkim(r, message, Budget(20), 5) == first
    assert len(calls) == parsed  # no ASN.1 parse for the repeats
    assert [x.result for x in first] == ["pass"]
    assert r.asked.count((KEY_NAME, "TXT")) == 4  # the lookup itself is not skipped


def test_a_cached_key_gives_dkimpys_own_answers():
    """Pass, a body changed after signing, a header changed: the same
    results with the key read from the cache as dkimpy's own verify()."""
    message, record = _signed()
    altered_body = message.replace(b"Hello.", b"Hullo.")
    altered_head = message.replace(b"Subject: hot path", b"Subject: hot paths")
    r = FakeResolver({(KEY_NAME, "TXT"): record})
    for m in (message, altered_body, altered_head, message):
        ours = check_dkim(r, m, Budget(20), 5)
        try:
            alone = dkim.DKIM(m).verify(dnsfunc=lambda _n, timeout=5: record.encode("ascii"))
        except dkim.ValidationError:
            alone = False
        assert (ours[0].result == "pass") == bool(alone), (m, ours)
    results = [check_dkim(r, m, Budget(20), 5)[0].result
               for m in (message, altered_body, altered_head)]
    assert results == ["pass", "fail", "fail"]


def test_a_large_key_record_is_not_kept():
    message, record = _signed()
    big = record.replace("v=DKIM1;", "v=DKIM1; n=" + "x" * dkimaccept.CACHEABLE_RECORD + ";")
    dkimaccept._read_key_cached.cache_clear()
    dkimcheck._prepare_key_cached.cache_clear()
    r = FakeResolver({(KEY_NAME, "TXT"): big})
    assert [x.result for x in check_dkim(r, message, Budget(20), 5)] == ["pass"]
    assert dkimaccept._read_key_cached.cache_info().currsize == 0
    assert dkimcheck._prepare_key_cached.cache_info().currsize == 0
