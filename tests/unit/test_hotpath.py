"""The hot path's caches: each key record read once, DNS answers served
before dnspython, metric children bound once; the results stay the same."""

from __future__ import annotations

import time
from typing import Any

import dkim
import dkim.crypto
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import dns.reversename
import dns.rrset
import pytest

from ipv6milter import dkimaccept
from ipv6milter.dkimcheck import check_dkim
from ipv6milter.resolver import Budget, Resolver, TempFail
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
    r = FakeResolver({(KEY_NAME, "TXT"): big})
    assert [x.result for x in check_dkim(r, message, Budget(20), 5)] == ["pass"]
    assert dkimaccept._read_key_cached.cache_info().currsize == 0


# -- the DNS answer cache in front of dnspython --------------------------------------------


def _add(message: dns.message.Message, section: Any, name: str, ttl: int, rdtype: str,
         texts: list[str]) -> None:
    """Records into a section so that dnspython's index finds them."""
    rrset = message.find_rrset(section, dns.name.from_text(name), dns.rdataclass.IN,
                               dns.rdatatype.from_text(rdtype), create=True)
    for rd in dns.rrset.from_text(name, ttl, "IN", rdtype, *texts):
        rrset.add(rd, ttl)


def _answer(name: str, rdtype: str, texts: list[str], ttl: int = 300,
            soa_minimum: int | None = None, rcode: int = 0) -> dns.resolver.Answer:
    q = dns.message.make_query(name, rdtype)
    response = dns.message.make_response(q)
    response.set_rcode(rcode)
    if texts:
        _add(response, response.answer, name, ttl, rdtype, texts)
    if soa_minimum is not None:
        _add(response, response.authority, "example.com.", 3600, "SOA",
             [f"ns. h. 1 3600 600 86400 {soa_minimum}"])
    return dns.resolver.Answer(dns.name.from_text(name), dns.rdatatype.from_text(rdtype),
                               dns.rdataclass.IN, response)


class Counted:
    """A real Resolver whose dnspython resolve() calls are counted; the answers
    put here are what resolve() returns (or raises, for NXDOMAIN) without a
    packet sent; any other name goes to a closed port (a temporary failure)."""

    def __init__(self, size: int = 100):
        self.hits: list[bool] = []
        self.r = Resolver((("127.0.0.1", 9),), timeout=1.0, cache_size=size,
                          on_cache=self.hits.append)
        self.calls: list[str] = []
        self.wire: dict[tuple[str, str], dns.resolver.Answer] = {}
        real = self.r._r.resolve

        def resolve(name: Any, rdtype: Any, **kwargs: Any) -> Any:
            self.calls.append(f"{name} {rdtype}")
            answer = self.wire.get((str(name).lower().rstrip("."), str(rdtype)))
            if answer is None:
                return real(name, rdtype, **kwargs)
            if answer.response.rcode() == dns.rcode.NXDOMAIN:
                raise dns.resolver.NXDOMAIN(qnames=[answer.qname],
                                            responses={answer.qname: answer.response})
            return answer

        self.r._r.resolve = resolve  # type: ignore[method-assign]

    def put(self, answer: dns.resolver.Answer) -> None:
        name = answer.qname.to_text(omit_final_dot=True).lower()
        self.wire[(name, dns.rdatatype.to_text(answer.rdtype))] = answer


def test_a_cached_answer_skips_dnspython_and_is_the_same():
    c = Counted()
    c.put(_answer("mail.example.com.", "AAAA", ["2001:db8::25"]))
    first_trace: list[str] = []
    first = c.r.query("mail.example.com", "AAAA", Budget(5, first_trace))
    assert c.calls == ["mail.example.com AAAA"]
    for spelling in ("mail.example.com", "MAIL.Example.com.", "mail.example.com."):
        trace: list[str] = []
        again = c.r.query(spelling, "AAAA", Budget(5, trace))
        assert [x.address for x in again] == [x.address for x in first] == ["2001:db8::25"]
        assert trace == [first_trace[0].replace("mail.example.com", spelling, 1)]
    assert len(c.calls) == 1  # dnspython was asked once
    assert c.hits == [False, True, True, True]  # one count a lookup: a miss, then hits


def test_a_cached_answer_expires_with_its_ttl():
    c = Counted()
    c.put(_answer("mail.example.com.", "A", ["192.0.2.25"], ttl=60))
    c.r.query("mail.example.com", "A", Budget(5))
    c.r.query("mail.example.com", "A", Budget(5))
    assert len(c.calls) == 1
    now = time.time()
    c.r._answers.clock = lambda: now + 61
    c.put(_answer("mail.example.com.", "A", ["192.0.2.26"], ttl=60))  # the server's, renewed
    assert [x.address for x in c.r.query("mail.example.com", "A", Budget(5))] == ["192.0.2.26"]
    assert len(c.calls) == 2


def test_no_data_and_nxdomain_are_kept_by_the_soa_minimum():
    c = Counted()
    c.put(_answer("example.com.", "TXT", [], soa_minimum=120))  # no data
    nx = _answer("gone.example.com.", "PTR", [], soa_minimum=60, rcode=dns.rcode.NXDOMAIN)
    c.put(nx)
    for _ in range(3):
        assert c.r.query("example.com", "TXT", Budget(5)) == []
        trace: list[str] = []
        assert c.r.query("gone.example.com", "PTR", Budget(5, trace)) == []
        assert trace == ["gone.example.com PTR: NXDOMAIN"]
    assert len(c.calls) == 2
    now = time.time()
    c.r._answers.clock = lambda: now + 90  # past the NXDOMAIN's 60 s, not the 120 s
    c.r.query("example.com", "TXT", Budget(5))
    c.r.query("gone.example.com", "PTR", Budget(5))
    assert c.calls[2:] == ["gone.example.com PTR"]


def test_nxdomain_without_a_soa_is_not_kept():
    c = Counted()
    c.put(_answer("gone.example.com.", "PTR", [], rcode=dns.rcode.NXDOMAIN))
    for _ in range(2):
        assert c.r.query("gone.example.com", "PTR", Budget(5)) == []
    assert len(c.calls) == 2


def test_a_temporary_failure_is_never_kept():
    c = Counted()
    for _ in range(2):
        with pytest.raises(TempFail):
            c.r.query("down.example.com", "TXT", Budget(5))
    assert len(c.calls) == 2


def test_a_spent_budget_fails_even_for_a_cached_answer():
    c = Counted()
    c.put(_answer("mail.example.com.", "AAAA", ["2001:db8::25"]))
    c.r.query("mail.example.com", "AAAA", Budget(5))
    with pytest.raises(TempFail):
        c.r.query("mail.example.com", "AAAA", Budget(0))


def test_the_answer_cache_is_bounded():
    c = Counted(size=2)
    for host in ("a", "b", "c"):
        c.put(_answer(f"{host}.example.com.", "A", ["192.0.2.1"]))
        c.r.query(f"{host}.example.com", "A", Budget(5))
    assert len(c.r._answers) == 2
    c.r.query("c.example.com", "A", Budget(5))
    assert len(c.calls) == 3


# -- metric children bound once ------------------------------------------------------------


def test_metric_children_are_looked_up_once_and_count_the_same(monkeypatch: pytest.MonkeyPatch):
    from prometheus_client.metrics import MetricWrapperBase

    from ipv6milter import config as config_mod
    from ipv6milter.metrics import Metrics
    from ipv6milter.model import ACCEPT

    m = Metrics()
    m.loaded(config_mod.Config())
    asked: list[tuple[str, ...]] = []
    real = MetricWrapperBase.labels

    def labels(self: Any, *values: str) -> Any:
        asked.append(values)
        return real(self, *values)

    monkeypatch.setattr(MetricWrapperBase, "labels", labels)
    for _ in range(5):
        m.results.labels("spf", "pass").inc()
        m.decision("eom", ACCEPT)
        m.cache(True)
        with m.timed("dkim"):
            pass
    # Once per label set not seen before (eom/accept/enforce and hit are
    # bound when the configuration is loaded): spf/pass and dkim.
    assert asked == [("spf", "pass"), ("dkim",)]
    value = m.registry.get_sample_value
    assert value("ipv6milter_check_results_total", {"method": "spf", "result": "pass"}) == 5
    assert value("ipv6milter_decisions_total",
                 {"stage": "eom", "reply": "accept", "mode": "enforce"}) == 5
    assert value("ipv6milter_dns_cache_lookups_total", {"result": "hit"}) == 5
    assert value("ipv6milter_check_duration_seconds_count", {"check": "dkim"}) == 5
    assert m.results.labels("spf", "pass") is m.results.metric.labels("spf", "pass")


@pytest.mark.parametrize("text", ["2001:db8::25", "192.0.2.25", "::ffff:192.0.2.25"])
def test_ptr_asks_dnspythons_reverse_name(text: str):
    import ipaddress

    import dns.reversename

    addr = ipaddress.ip_address(text)
    rev = dns.reversename.from_address(text).to_text()
    c = Counted()
    c.put(_answer(rev, "PTR", ["mail.example.com."]))
    trace: list[str] = []
    for _ in range(2):
        assert c.r.ptr(addr, Budget(5, trace)) == ["mail.example.com"]
    assert c.calls == [f"{rev} PTR"]
    assert trace == [f"{rev} PTR: mail.example.com."] * 2


# -- SPF results kept while their answers are (resolver.ExpiringLRU in the Engine) ---------

ADDR6 = "2001:db8::25"


def _spf_engine(ttl: int = 60) -> tuple[Counted, Any]:
    import ipaddress

    from ipv6milter import config
    from ipv6milter.engine import Engine

    c = Counted()
    c.put(_answer("example.com.", "TXT", ['"v=spf1 include:inc.example.com -all"'], ttl=300))
    c.put(_answer("inc.example.com.", "TXT", [f'"v=spf1 ip6:{ADDR6} -all"'], ttl=ttl))
    eng = Engine(config.parse("AcceptDomains example.org\n"), c.r)
    return c, (eng, ipaddress.ip_address(ADDR6))


def test_a_budget_expires_with_the_soonest_answer_it_used():
    c = Counted()
    c.put(_answer("a.example.com.", "A", ["192.0.2.1"], ttl=300))
    c.put(_answer("b.example.com.", "TXT", ['"x"'], ttl=60))
    budget = Budget(5)
    now = time.time()
    c.r.query("a.example.com", "A", budget)
    assert now + 299 < budget.expires <= now + 301
    c.r.query("b.example.com", "TXT", budget)
    c.r.query("a.example.com", "A", budget)  # from the cache: its own expiry, later
    assert now + 59 < budget.expires <= now + 61
    with pytest.raises(TempFail):
        c.r.query("down.example.com", "A", budget)  # nothing listens: a failure
    assert budget.expires == 0


def test_an_spf_result_is_kept_until_the_soonest_of_its_answers_expires():
    c, (eng, addr) = _spf_engine(ttl=60)
    first = eng.spf(addr, "<a@example.com>", "mail.example.com")
    assert first.result == "pass"
    assert eng.spf(addr, "<a@example.com>", "mail.example.com") == first
    assert c.calls == ["example.com TXT", "inc.example.com TXT"]
    assert c.hits == [False, False]  # the second check asked nothing at all
    assert eng.metrics.registry.get_sample_value(
        "ipv6milter_check_results_reused_total", {"check": "spf"}) == 1
    # Another HELO, sender or void-lookup limit is another question.
    eng.spf(addr, "<b@example.com>", "mail.example.com")
    assert c.hits[2:] == [True, True]
    # Past the include's 60 s both the answer and the result are gone.
    now = time.time()
    c.r._answers.clock = eng._spf_results.clock = lambda: now + 61
    assert eng.spf(addr, "<a@example.com>", "mail.example.com").result == "pass"
    assert c.calls[2:] == ["inc.example.com TXT"]
    eng.shutdown()


def test_a_temporary_error_and_an_explained_check_are_asked_again():
    c, (eng, addr) = _spf_engine()
    for _ in range(2):
        assert eng.spf(addr, "<a@down.example>", "h").result == "temperror"
    assert c.calls.count("down.example TXT") == 2
    eng.spf(addr, "<a@example.com>", "h")
    trace: list[str] = []
    assert eng.spf(addr, "<a@example.com>", "h", trace=trace).result == "pass"
    assert any(line.startswith("inc.example.com TXT") for line in trace), trace
    eng.shutdown()


def test_a_reload_forgets_the_spf_results():
    from ipv6milter import config

    c, (eng, addr) = _spf_engine()
    eng.spf(addr, "<a@example.com>", "h")
    hits = len(c.hits)
    eng.reload(config.parse("AcceptDomains example.org\n"))  # the same settings
    eng.spf(addr, "<a@example.com>", "h")
    assert len(c.hits) == hits + 2  # evaluated again (from the answer cache)
    eng.shutdown()


def test_an_iprev_result_is_kept_until_its_answers_expire_and_a_failure_is_not():
    import ipaddress

    from ipv6milter import config
    from ipv6milter.engine import Engine
    from ipv6milter.model import Iprev

    c = Counted()
    rev6 = dns.reversename.from_address(ADDR6).to_text()
    c.put(_answer(rev6, "PTR", ["mail.example.com."], ttl=300))
    c.put(_answer("mail.example.com.", "AAAA", [ADDR6], ttl=30))
    eng = Engine(config.parse("AcceptDomains example.org\n"), c.r)
    addr = ipaddress.ip_address(ADDR6)
    first = eng.iprev(addr)
    assert first.result is Iprev.PASS
    assert eng.iprev(addr) == first and len(c.calls) == 2 and c.hits == [False, False]
    assert eng.metrics.registry.get_sample_value(
        "ipv6milter_check_results_reused_total", {"check": "ptr"}) == 1
    now = time.time()
    eng._iprev_results.clock = c.r._answers.clock = lambda: now + 31
    assert eng.iprev(addr) == first
    assert c.calls[2:] == ["mail.example.com AAAA"]  # past the AAAA's 30 s: asked again
    other = ipaddress.ip_address("2001:db8::99")  # no PTR server answers: temperror
    for _ in range(2):
        assert eng.iprev(other).result is Iprev.TEMPERROR
    assert sum(call.endswith("PTR") for call in c.calls) == 3
    eng.shutdown()
