"""SPFVoidLookupLimit through the real Postfix and Knot (SPEC §1, §4).

An IPv6 client whose sender domain's SPF record lists three IPv4-only hosts
before its own ``ip6:`` costs three void AAAA lookups (RFC 7208 §4.6.4):
with the default limit of two, SPF is ``permerror`` and, without DKIM, the
message gets the 450 4.7.26; with ``SPFVoidLookupLimit 3`` the evaluation
reaches ``ip6:`` and passes.  Two milters of their own behind one Postfix.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .conftest import _LOGS, _started
from .harness import (
    AUTHSERV_ID,
    VOID_SPF,
    DnsWorld,
    MilterFactory,
    PostfixInstance,
    Sink,
    run_postfix,
)
from .replies import not_authenticated
from .smtpclient import (
    Outcome,
    by_method,
    header_fields,
    make_message,
    marker,
    parse_ar,
    transaction,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def void_postfix(
    tmp_path_factory: pytest.TempPathFactory, milters: MilterFactory, sink: Sink
) -> Iterator[PostfixInstance]:
    ms = {
        "default": _started(milters, "void-default"),
        "void3": _started(milters, "void3", SPFVoidLookupLimit="3"),
    }
    with run_postfix(tmp_path_factory.mktemp("postfix-void"), sink.port,
                     {name: m.socket_spec for name, m in ms.items()}) as pf:
        _LOGS["postfix-void"] = pf.log
        yield pf
    _LOGS.pop("postfix-void", None)


def _send(pf: PostfixInstance, service: str, dns: DnsWorld, mark: str) -> Outcome:
    sender = f"sender@{VOID_SPF}"
    return transaction(pf.port(service), addr=dns.good_ip, helo="mail.example.com",
                       mail_from=sender, rcpts=["someone@example.com"],
                       message=make_message(mark, from_addr=sender, to="someone@example.com"))


def test_ipv4_only_hosts_exhaust_the_default_void_lookup_limit(
    void_postfix: PostfixInstance, dns: DnsWorld
) -> None:
    out = _send(void_postfix, "default", dns, marker())
    assert out.rcpt.code == 250, out
    assert out.data is not None
    assert str(out.data) == not_authenticated(dns.good_ip)


def test_spf_void_lookup_limit_3_lets_the_record_pass(
    void_postfix: PostfixInstance, dns: DnsWorld, sink: Sink
) -> None:
    mark = marker()
    out = _send(void_postfix, "void3", dns, mark)
    assert out.accepted, out
    name, value = header_fields(sink.wait_for(mark).data)[0]
    assert name == "Authentication-Results"
    header = parse_ar(value)
    assert header.authserv_id == AUTHSERV_ID
    assert [r.result for r in by_method(header, "spf")] == ["pass"]
