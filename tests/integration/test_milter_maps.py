"""Postfix scoping: ``smtpd_milter_maps`` with a cidr table that sends only
IPv6 clients through ipv6milter (Postfix >= 3.2; docs/admin-guide.md).

One Postfix with three smtpd listeners on the same milter: ``mapped`` has
the map, ``plain`` has not (the control: there an IPv4 client does reach the
milter, so the assertions below could fail), ``mapped_hc`` has the map and a
cleanup service whose header_checks drop Authentication-Results fields that
claim our authserv-id (what the milter would have removed for IPv4 clients).
Whether the milter saw a client is read from its metrics
(``ipv6milter_transactions_total`` by scope, counted at MAIL FROM, before
Postfix's reply to DATA) and from its decision log (one ``stage=eom`` line
per message, IPv4 ones included), each message tagged by a HELO name of its
own.
"""

from __future__ import annotations

import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .harness import (
    AUTHSERV_ID,
    GOOD_IP,
    NOPTR_IP,
    MilterFactory,
    MilterProcess,
    PostfixInstance,
    Sink,
    free_port,
    run_postfix,
    tcp_open,
    wait_until,
)
from .replies import no_ptr
from .smtpclient import auth_results, make_message, marker, parse_ar, transaction

pytestmark = pytest.mark.timeout(90)

MAP_FILE = "ipv6-only.cidr"
# Every IPv4 client, and an IPv4-mapped IPv6 address should one ever be
# presented, skips the milters; IPv6 clients fall through to smtpd_milters.
IPV6_ONLY = "0.0.0.0/0 DISABLE\n::ffff:0:0/96 DISABLE\n"
# What the milter removes from every client not in TrustedHosts, for the
# clients that no longer reach it (header_checks do not see milter headers).
HC_FILE = "forged-ar.regexp"
FORGED_AR = "/^Authentication-Results:[[:space:]]*{id}[[:space:]]*;/ IGNORE\n".format(
    id=AUTHSERV_ID.replace(".", "\\."))
CLEANUP_HC = ("cleanup_hc unix n - n - 0 cleanup"
              f" -o header_checks=regexp:$config_directory/{HC_FILE}\n")
SENDER = "sender@example.com"
RCPT = "someone@example.com"


@dataclass
class Scoped:
    postfix: PostfixInstance
    milter: MilterProcess
    metrics_port: int

    def transactions(self, scope: str) -> float:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as r:
            text = r.read().decode()
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == "ipv6milter_transactions_total" and s.labels == {"scope": scope}:
                    return s.value
        return 0.0

    def eom_lines(self, helo: str) -> list[str]:
        return [ln for ln in self.milter.log_text().splitlines()
                if "stage=eom" in ln and f"helo={helo}" in ln]


@pytest.fixture(scope="module")
def scoped(
    tmp_path_factory: pytest.TempPathFactory, milters: MilterFactory, sink: Sink
) -> Iterator[Scoped]:
    port = free_port()
    # 127.0.0.1 is not trusted here: a real IPv4 client is in the ipv4 scope.
    m = milters.start("maps", TrustedHosts="127.0.0.2", MetricsListen=f"127.0.0.1:{port}")
    wait_until("metrics endpoint", lambda: tcp_open("127.0.0.1", port), alive=None)
    with run_postfix(
        tmp_path_factory.mktemp("postfix-maps"),
        sink.port,
        {"mapped": m.socket_spec, "plain": m.socket_spec, "mapped_hc": m.socket_spec},
        service_options={
            "mapped": {"smtpd_milter_maps": f"cidr:$config_directory/{MAP_FILE}"},
            "mapped_hc": {"smtpd_milter_maps": f"cidr:$config_directory/{MAP_FILE}",
                          "cleanup_service_name": "cleanup_hc"},
        },
        files={MAP_FILE: IPV6_ONLY, HC_FILE: FORGED_AR},
        master_cf=CLEANUP_HC,
    ) as pf:
        yield Scoped(pf, m, port)


def _helo() -> str:
    return f"h{uuid.uuid4().hex[:12]}.example.com"


def _ipv4_message(scoped: Scoped, service: str, sink: Sink,
                  extra_headers: tuple[str, ...] = ()) -> tuple[str, bytes]:
    """A real IPv4 client (127.0.0.1, no XCLIENT); its HELO name and the
    message as delivered."""
    mark, helo = marker(), _helo()
    out = transaction(scoped.postfix.port(service), host="127.0.0.1", helo=helo,
                      mail_from=SENDER, rcpts=[RCPT],
                      message=make_message(mark, from_addr=SENDER, to=RCPT,
                                           extra_headers=extra_headers))
    assert out.accepted, out
    return helo, sink.wait_for(mark).data


def _not_stamped(raw: bytes) -> bool:
    return not [v for v in auth_results(raw) if v.lower().startswith(AUTHSERV_ID + ";")]


def test_without_the_map_an_ipv4_client_reaches_the_milter(scoped: Scoped, sink: Sink) -> None:
    """The control: ipv6milter in smtpd_milters sees IPv4 clients (and lets
    them through unjudged), which costs a milter round trip per stage."""
    before = scoped.transactions("ipv4")
    helo, raw = _ipv4_message(scoped, "plain", sink)
    assert scoped.transactions("ipv4") == before + 1
    lines = scoped.eom_lines(helo)
    assert len(lines) == 1 and "scope=ipv4" in lines[0] and "client=127.0.0.1" in lines[0], lines
    assert _not_stamped(raw)


def test_with_the_map_an_ipv4_client_never_reaches_the_milter(
    scoped: Scoped, sink: Sink
) -> None:
    before = {s: scoped.transactions(s) for s in ("ipv4", "ipv6", "trusted")}
    helo, raw = _ipv4_message(scoped, "mapped", sink)
    # The milter would have counted MAIL FROM before answering the end of DATA.
    assert {s: scoped.transactions(s) for s in before} == before
    assert scoped.eom_lines(helo) == [], scoped.eom_lines(helo)
    assert _not_stamped(raw)
    # The map is what kept it away: the same milter on the other listener saw one.
    helo2, _ = _ipv4_message(scoped, "plain", sink)
    assert len(scoped.eom_lines(helo2)) == 1


def _eom_lines_of(scoped: Scoped, client: str) -> int:
    return sum(1 for ln in scoped.milter.log_text().splitlines()
               if "stage=eom" in ln and f"client={client} " in ln)


def test_with_the_map_an_ipv6_client_is_judged(scoped: Scoped, sink: Sink) -> None:
    before = scoped.transactions("ipv6")
    lines_before = _eom_lines_of(scoped, GOOD_IP)
    mark, helo = marker(), "mail.example.com"
    out = transaction(scoped.postfix.port("mapped"), host="::1", addr=GOOD_IP,
                      name="mail.example.com", helo=helo, mail_from=SENDER, rcpts=[RCPT],
                      message=make_message(mark, from_addr=SENDER, to=RCPT))
    assert out.accepted, out
    raw = sink.wait_for(mark).data
    ours = [v for v in auth_results(raw) if v.lower().startswith(AUTHSERV_ID + ";")]
    assert len(ours) == 1, raw[:600]
    methods = {r.method: r.result for r in parse_ar(ours[0]).results}
    assert methods["iprev"] == "pass" and methods["spf"] == "pass", methods
    assert scoped.transactions("ipv6") == before + 1
    assert _eom_lines_of(scoped, GOOD_IP) == lines_before + 1


def test_with_the_map_an_ipv6_client_without_ptr_is_refused(scoped: Scoped) -> None:
    mark = marker()
    out = transaction(scoped.postfix.port("mapped"), host="::1", addr=NOPTR_IP,
                      mail_from=SENDER, rcpts=[RCPT],
                      message=make_message(mark, from_addr=SENDER, to=RCPT))
    assert str(out.rcpt) == no_ptr(NOPTR_IP)
    assert out.data is None


def test_the_map_applies_to_the_address_xclient_presents(scoped: Scoped, sink: Sink) -> None:
    """A front end that names the client with XCLIENT: the connection comes
    from [::1] (IPv6, which the map lets through), the client it presents is
    IPv4; Postfix looks the map up again for it, and the milter sees nothing."""
    before = scoped.transactions("ipv4")
    mark, helo = marker(), _helo()
    out = transaction(scoped.postfix.port("mapped"), host="::1", addr="192.0.2.10", helo=helo,
                      mail_from=SENDER, rcpts=[RCPT],
                      message=make_message(mark, from_addr=SENDER, to=RCPT))
    assert out.accepted, out
    assert _not_stamped(sink.wait_for(mark).data)
    assert scoped.transactions("ipv4") == before
    assert scoped.eom_lines(helo) == []
    # Without the map the same claim is an IPv4 client the milter sees.
    helo = _helo()
    out = transaction(scoped.postfix.port("plain"), host="::1", addr="192.0.2.10", helo=helo,
                      mail_from=SENDER, rcpts=[RCPT],
                      message=make_message(marker(), from_addr=SENDER, to=RCPT))
    assert out.accepted, out
    assert scoped.transactions("ipv4") == before + 1
    lines = scoped.eom_lines(helo)
    assert len(lines) == 1 and "client=192.0.2.10" in lines[0], lines


FORGED = f"Authentication-Results: {AUTHSERV_ID}; spf=pass smtp.mailfrom=forged@example.com"


def _ours(raw: bytes) -> list[str]:
    return [v for v in auth_results(raw) if v.lower().startswith(AUTHSERV_ID + ";")]


def test_with_the_map_a_forged_header_from_ipv4_is_no_longer_removed(
    scoped: Scoped, sink: Sink
) -> None:
    """The price of the map: the milter removes fields that claim our
    authserv-id from every client not trusted, IPv4 ones included; a client
    the map keeps away keeps its forgery, unless header_checks remove it."""
    _, raw = _ipv4_message(scoped, "plain", sink, (FORGED,))
    assert _ours(raw) == []  # the milter removed it
    _, raw = _ipv4_message(scoped, "mapped", sink, (FORGED,))
    assert len(_ours(raw)) == 1 and "forged@example.com" in _ours(raw)[0]
    _, raw = _ipv4_message(scoped, "mapped_hc", sink, (FORGED,))
    assert _ours(raw) == []  # header_checks removed it


def test_header_checks_leave_the_milters_own_header(scoped: Scoped, sink: Sink) -> None:
    """IPv6 through the map and those header_checks: the forgery is dropped,
    the milter's own field (added after header_checks ran) is delivered."""
    mark = marker()
    out = transaction(scoped.postfix.port("mapped_hc"), host="::1", addr=GOOD_IP,
                      name="mail.example.com", mail_from=SENDER, rcpts=[RCPT],
                      message=make_message(mark, from_addr=SENDER, to=RCPT,
                                           extra_headers=(FORGED,)))
    assert out.accepted, out
    ours = _ours(sink.wait_for(mark).data)
    assert len(ours) == 1 and "forged" not in ours[0], ours
    assert {r.method for r in parse_ar(ours[0]).results} >= {"iprev", "spf"}
