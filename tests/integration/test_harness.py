"""The harness itself: if these fail, the acceptance tests say nothing."""

from __future__ import annotations

import pytest
from dns import resolver as dnsresolver
from dns import reversename

from .harness import AUTHSERV_ID, DnsWorld, PostfixInstance, Sink
from .smtpclient import header_fields, make_message, marker, transaction

pytestmark = pytest.mark.timeout(60)


def _resolver(dns_world: DnsWorld, host: str) -> dnsresolver.Resolver:
    r = dnsresolver.Resolver(configure=False)
    r.nameservers = [host]
    r.port = dns_world.port
    r.lifetime = 3
    return r


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_knot_serves_the_test_zones(dns: DnsWorld, host: str) -> None:
    r = _resolver(dns, host)
    ptr = r.resolve(reversename.from_address(dns.good_ip), "PTR", search=False)
    assert [p.target.to_text() for p in ptr] == ["mail.example.com."]
    aaaa = r.resolve("mail.example.com", "AAAA", search=False)
    assert [a.address for a in aaaa] == [dns.good_ip]
    spf = r.resolve("example.net", "TXT", search=False)
    assert [b"".join(t.strings) for t in spf] == [b"v=spf1 include:_spf.example.org -all"]
    key = r.resolve(f"{dns.selector}._domainkey.example.com", "TXT", search=False)
    assert b"".join(next(iter(key)).strings).startswith(b"v=DKIM1; k=rsa; p=")
    with pytest.raises(dnsresolver.NXDOMAIN):
        r.resolve(reversename.from_address(dns.noptr_ip), "PTR", search=False)
    # Outside Knot's zones: REFUSED, which dnspython reports as no usable server.
    with pytest.raises(dnsresolver.NoNameservers):
        r.resolve(reversename.from_address(dns.refused_ip), "PTR", search=False)


def test_postfix_relays_to_the_sink_unchanged(postfix: PostfixInstance, sink: Sink) -> None:
    """A trusted local client (127.0.0.1, no XCLIENT): the milter neither
    refuses nor stamps, so only Postfix's Received: is added on top."""
    mark = marker()
    msg = make_message(mark, from_addr="a@example.com", to="b@example.org")
    out = transaction(
        postfix.port(), mail_from="a@example.com", rcpts=["b@example.org"], message=msg
    )
    assert out.rcpt.code == 250, out
    assert out.data is not None and out.data.code == 250, out
    got = sink.wait_for(mark)
    assert got.mail_from == "a@example.com"
    assert got.rcpts == ("b@example.org",)
    fields = header_fields(got.data)
    assert fields[0][0] == "Received"
    assert f"by {AUTHSERV_ID}" in fields[0][1]
    assert got.data.split(b"\r\n\r\n", 1)[1] == msg.split(b"\r\n\r\n", 1)[1]
