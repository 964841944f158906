"""Metrics, the decision log and live reload, through a real Postfix."""

from __future__ import annotations

import re
import signal

import pytest

from ipv6milter import config
from ipv6milter.metrics import config_hash
from tests.integration.harness import wait_until
from tests.integration.smtpclient import Session, make_message, marker, transaction
from tests.operations.conftest import Ops, sample

pytestmark = pytest.mark.timeout(120)

DECISIONS = "ipv6milter_decisions_total"


def send_mix(ops: Ops, service: str) -> dict[str, object]:
    """A known mix: two accepts, 5.2.1, 4.7.25, 4.7.26 and 4.4.3."""
    d = ops.dns
    port = ops.postfix.port(service)
    out = {}
    for label, addr, sender, rcpt in (
        ("accept-1", d.good_ip, "a@example.com", "b@example.com"),
        ("accept-2", d.good_ip, "a@example.com", "c@example.net"),
        ("5.2.1", d.good_ip, "a@example.com", f"b@{d.not_opted_in}"),
        ("4.7.25", d.noptr_ip, "a@example.com", "b@example.com"),
        ("4.7.26", d.good_ip, "x@spffail.test", "b@example.com"),
        ("4.4.3", d.refused_ip, "a@example.com", "b@example.com"),
    ):
        m = marker()
        msg = make_message(m, from_addr=sender, to=rcpt)
        out[label] = transaction(port, addr=addr, mail_from=sender, rcpts=[rcpt], message=msg)
    return out


def delta(after: dict, before: dict, name: str, **labels: str) -> float:
    return sample(after, name, **labels) - sample(before, name, **labels)


def test_metrics_count_exactly_what_was_decided(ops: Ops) -> None:
    before = ops.scrape("enforce")
    out = send_mix(ops, "enforce")
    assert out["accept-1"].accepted and out["accept-2"].accepted
    assert out["5.2.1"].rcpt.code == 550 and out["4.7.25"].rcpt.code == 450
    assert out["4.7.26"].data.code == 450 and out["4.4.3"].rcpt.code == 451
    wait_until("connections closed", lambda: sample(
        ops.scrape("enforce"), "ipv6milter_connections_in_flight") == 0)
    after = ops.scrape("enforce")

    def dec(stage: str, reply: str) -> float:
        return delta(after, before, DECISIONS, stage=stage, reply=reply, mode="enforce")

    assert dec("rcpt", "accept") == 3  # two accepts and the 4.7.26 message
    assert dec("rcpt", "5.2.1") == 1
    assert dec("rcpt", "4.7.25") == 1
    assert dec("rcpt", "4.4.3") == 1
    assert dec("eom", "accept") == 2
    assert dec("eom", "4.7.26") == 1
    assert dec("eom", "4.4.3") == 0
    res = "ipv6milter_check_results_total"
    assert delta(after, before, res, method="iprev", result="pass") == 3
    assert delta(after, before, res, method="spf", result="pass") == 2
    assert delta(after, before, res, method="spf", result="fail") == 1
    assert delta(after, before, res, method="dkim", result="none") == 3
    assert delta(after, before, "ipv6milter_connections_total", scope="ipv6") == 6
    assert delta(after, before, "ipv6milter_transactions_total", scope="ipv6") == 6
    # A PTR check whose answer is cached runs only when its result is wanted:
    # the 5.2.1 connection (refused before any check decides) may not run it.
    assert delta(after, before, "ipv6milter_check_duration_seconds_count", check="ptr") in (5, 6)
    assert delta(after, before, "ipv6milter_check_duration_seconds_count", check="message") == 3
    misses = delta(after, before, "ipv6milter_dns_cache_lookups_total", result="miss")
    reused_ptr = delta(after, before, "ipv6milter_check_results_reused_total", check="ptr")
    assert misses > 0
    # Four connections from one client, at least three of which run their
    # PTR check (the 5.2.1 one may not need it): each worker evaluates it
    # once at most, the others reuse that result (which worker takes which
    # connection is the kernel's choice, so SPF reuse and cache hits are
    # not certain here; tests/unit/test_hotpath.py counts them exactly).
    assert max(0, 3 - ops.milters["enforce"].workers()) <= reused_ptr <= 5

    # The decision log says the same, one line a decision, greppable.
    log = ops.milters["enforce"].log_text()
    assert len(re.findall(r'stage=eom .*reply="450 4\.7\.26"', log)) == 1
    assert len(re.findall(r'stage=rcpt .*rcpt_domain=example\.org .*reply="550 5\.2\.1"', log)) == 1
    line = next(li for li in log.splitlines() if 'reply="450 4.7.25"' in li)
    for key in ("qid=", "client=2001:db8::dead", "helo=mail.example.com",
                "from_domain=example.com", "rcpt_domain=example.com", "iprev=permerror",
                "mode=enforce", "elapsed_ms="):
        assert key in line, line


def test_monitor_mode_counts_what_it_would_have_refused(ops: Ops) -> None:
    before = ops.scrape("monitor")
    out = send_mix(ops, "monitor")
    assert all(o.accepted for o in out.values()), out
    after = ops.scrape("monitor")
    for stage, reply in (("rcpt", "5.2.1"), ("rcpt", "4.7.25"), ("rcpt", "4.4.3"),
                         ("eom", "4.7.26")):
        assert delta(after, before, DECISIONS, stage=stage, reply=reply, mode="monitor") == 1
    assert delta(after, before, DECISIONS, stage="eom", reply="accept", mode="enforce") == 0
    log = ops.milters["monitor"].log_text()
    assert 'reply=accept would_reply="450 4.7.26" mode=monitor' in log


def test_config_info_metric_carries_the_hash(ops: Ops) -> None:
    m = ops.milters["enforce"]
    cfg = config.load(str(m.config))
    s = ops.scrape("enforce")
    assert sample(s, "ipv6milter_config_info", hash=config_hash(cfg),
                  source=str(m.config)) == 1


def test_sighup_during_an_open_session(ops: Ops) -> None:
    m = ops.milters["reload"]
    port = ops.postfix.port("reload")
    d = ops.dns
    original = m.config.read_text()
    before = ops.scrape("reload")
    rcpt = f"b@{d.not_opted_in}"
    try:
        with Session(port, addr=d.good_ip, name="mail.example.com") as s:
            msg = make_message(marker(), from_addr="a@example.com", to=rcpt)
            assert s.send("a@example.com", [rcpt], msg).rcpt.code == 550

            # Opt the domain in and switch to monitor mode, mid-session.
            new = original.replace(f"AcceptDomains {', '.join(d.opted_in)}",
                                   f"AcceptDomains {', '.join(d.opted_in)}, {d.not_opted_in}")
            assert new != original
            m.reload(new + "Mode monitor\n")
            mk = marker()
            out = s.send("a@example.com", [rcpt],
                         make_message(mk, from_addr="a@example.com", to=rcpt))
            assert out.accepted, out
            assert ops.sink.wait_for(mk)
            # Monitor mode: a refusal is only logged now.
            out = s.send("x@spffail.test", [rcpt],
                         make_message(marker(), from_addr="x@spffail.test", to=rcpt))
            assert out.accepted, out

            # A broken configuration is refused, with its line; the running one stays.
            m.config.write_text(new + "Mode monitor\nAcceptDomains twice.example\n")
            m.proc.send_signal(signal.SIGHUP)
            wait_until("failed reload", lambda: "reload failed" in m.log_text())
            assert re.search(rf"{re.escape(str(m.config))}:\d+: AcceptDomains already set",
                             m.log_text())
            out = s.send("x@spffail.test", [rcpt],
                         make_message(marker(), from_addr="x@spffail.test", to=rcpt))
            assert out.accepted, out
        after = ops.scrape("reload")
        assert delta(after, before, "ipv6milter_config_reloads_total", result="ok") == 1
        assert delta(after, before, "ipv6milter_config_reloads_total", result="failed") == 1
        assert delta(after, before, DECISIONS, stage="eom", reply="4.7.26", mode="monitor") == 2
    finally:
        m.config.write_text(original)
        m.proc.send_signal(signal.SIGHUP)
