"""The last line of defence (isolation.py): checks in helper processes, a CPU
bound the kernel enforces, DNS kept in the worker, helpers replaced."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import threading
import time
from collections.abc import Iterator
from functools import partial

import dkim
import Milter
import pytest

from ipv6milter import authresults, config, isolation, limits
from ipv6milter.engine import CancellableBudget, Engine, Message
from ipv6milter.milter import Ipv6Milter
from ipv6milter.resolver import Budget
from tests.dkimkeys import make_key
from tests.lab import wait_until
from tests.unit.fakedns import TEMP, FakeResolver
from tests.unit.milterctx import RecordingCtx
from tests.unit.test_milter import GOOD, message, zone

ADDR = ipaddress.ip_address(GOOD)
MARK = "zzmark"
CPU = 0.3  # the helpers' CPU bound in these tests


@pytest.fixture
def burn_marker(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv(isolation.BURN_ENV, MARK)
    isolation._burn_marker.cache_clear()
    yield MARK
    monkeypatch.delenv(isolation.BURN_ENV)
    isolation._burn_marker.cache_clear()


@pytest.fixture
def helpers() -> Iterator[isolation.Helpers]:
    h = isolation.Helpers(cpu_seconds=CPU, most=3, idle=1)
    yield h
    h.close()


def signed(selector: str = "sel1", extra: bytes = b"") -> bytes:
    private, _ = make_key()
    msg = message(extra=extra)
    return dkim.sign(msg, selector.encode(), b"example.com", private,
                     canonicalize=(b"relaxed", b"relaxed")) + msg


# -- the planted burn ------------------------------------------------------------------------


def test_the_planted_burn_holds_the_gil() -> None:
    """No other thread of the process runs during it: what a super-linear
    regex in a library does, and what the helpers must contain."""
    isolation._seconds_per_step()  # calibrated once, before (its own C call)
    ticks: list[float] = []
    stop = threading.Event()

    def watcher() -> None:
        while not stop.is_set():
            ticks.append(time.monotonic())
            time.sleep(0.001)

    t = threading.Thread(target=watcher)
    t.start()
    time.sleep(0.05)
    start = time.monotonic()
    isolation.burn(0.4)
    end = time.monotonic()
    stop.set()
    t.join()
    inside = [x for x in ticks if start + 0.01 < x < end - 0.01]
    # The steps were calibrated in CPU time; a host whose speed changes
    # (other guests) may make 0.4 s run shorter: what matters is the window.
    assert end - start >= 0.1
    assert not inside, f"the watcher ran {len(inside)} times during the burn"


def test_without_the_marker_nothing_burns() -> None:
    start = time.process_time()
    isolation._planted("spf", f"{MARK}spf@example.com")
    assert time.process_time() - start < 0.05


# -- helpers run the checks as the worker would ----------------------------------------------


def test_checks_in_a_helper_give_the_in_process_results(helpers: isolation.Helpers) -> None:
    r = zone()
    spf, cpu = helpers.call("spf", (ADDR, "a@example.com", "mail.example.com"), r, Budget(5))
    assert spf == isolation.spf(zone(), Budget(5), ADDR, "a@example.com", "mail.example.com")
    assert spf.result == "pass" and 0 <= cpu < CPU
    msg = signed()
    got, _ = helpers.call("dkim", (5,), r, Budget(5), payload=msg)
    assert got == isolation.dkim(zone(), Budget(5), msg, 5)
    assert [d.result for d in got] == ["pass"]
    ident, _ = helpers.call("header", (b" (c (nested)) mx.example.org; spf=pass",), r, Budget(0))
    assert ident == "mx.example.org"


@pytest.mark.parametrize("record", [
    "v=spf1 mx -all", "v=spf1 a:mail.example.com -all", "v=spf1 ptr -all",
    "v=spf1 ptr:example.com -all", "v=spf1 exists:%{i}.x.example.com -all",
    "v=spf1 include:inc.example.com -all", "v=spf1 mx:spf.example//64 ?all",
])
def test_every_record_type_an_spf_check_reads_crosses_the_pipe_unchanged(
        helpers: isolation.Helpers, record: str) -> None:
    """TXT, A/AAAA, MX and PTR answers go across as plain tuples: the checks
    must read them exactly as they read dnspython's objects."""
    zone_ = {
        ("spf.example", "TXT"): record,
        ("spf.example", "MX"): ["10 mail.example.com.", "20 mx.example.com."],
        ("mx.example.com", "AAAA"): "2001:db8::1",
        ("mail.example.com", "A"): "192.0.2.1",
        ("inc.example.com", "TXT"): f"v=spf1 ip6:{GOOD} -all",
        ("5.2.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa", "PTR"):
            ["mail.example.com.", "other.test."],
        (f"{'.'.join(ADDR.exploded.replace(':', ''))}.x.example.com", "A"):
            "127.0.0.2",
    }
    zone_[("mail.example.com", "AAAA")] = GOOD
    there, _ = helpers.call("spf", (ADDR, "a@spf.example", "mail.example.com"),
                            FakeResolver(zone_), Budget(5))
    here = isolation.spf(FakeResolver(zone_), Budget(5), ADDR, "a@spf.example",
                         "mail.example.com")
    assert there == here


def test_dns_is_asked_by_the_worker(helpers: isolation.Helpers) -> None:
    """The helper's lookups reach the worker's resolver (its cache, its
    budget, its metrics): here, the FakeResolver of this very process."""
    r = zone()
    helpers.call("spf", (ADDR, "a@example.com", "mail.example.com"), r, Budget(5))
    helpers.call("dkim", (5,), r, Budget(5), payload=signed())
    assert ("example.com", "TXT") in r.asked
    assert ("sel1._domainkey.example.com", "TXT") in r.asked


def test_a_temporary_dns_failure_crosses_the_pipe(helpers: isolation.Helpers) -> None:
    r = zone()
    spf, _ = helpers.call("spf", (ADDR, "a@temp.example", "mail.example.com"), r, Budget(5))
    assert spf.result == "temperror"
    r.add("sel1._domainkey.example.com", "TXT", TEMP)
    r.zone[("sel1._domainkey.example.com", "TXT")] = TEMP
    got, _ = helpers.call("dkim", (5,), r, Budget(5), payload=signed())
    assert [d.result for d in got] == ["temperror"]


def test_the_trace_of_explain_keeps_its_order(helpers: isolation.Helpers) -> None:
    trace: list[str] = []
    helpers.call("spf", (ADDR, "a@example.com", "mail.example.com"), zone(), Budget(5, trace))
    assert any(line.startswith("example.com TXT") for line in trace), trace


def test_an_exception_in_a_check_is_an_internal_error_with_its_traceback(
        helpers: isolation.Helpers) -> None:
    with pytest.raises(isolation.HelperError, match="Traceback"):
        helpers.call("spf", ("not an address", "a@example.com", "x"), zone(), Budget(5))
    spf, _ = helpers.call("spf", (ADDR, "a@example.com", "mail.example.com"), zone(), Budget(5))
    assert spf.result == "pass"  # the helper serves on


# -- the CPU bound ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["spf", "dkim", "header"])
def test_a_check_past_its_cpu_bound_is_stopped_and_its_helper_replaced(
        burn_marker: str, path: str) -> None:
    h = isolation.Helpers(cpu_seconds=CPU, most=3, idle=1)
    try:
        calls = {
            "spf": (("spf", (ADDR, f"{burn_marker}spf@example.com", "x"), zone(), Budget(5)),
                    {}),
            "dkim": (("dkim", (5,), zone(), Budget(5)), {"payload": signed(f"{burn_marker}dkim")}),
            "header": (("header", (f"(c) {burn_marker}header.example; none".encode(),), zone(),
                        Budget(0)), {}),
        }
        args, kw = calls[path]
        first = h._idle[0].pid
        start = time.monotonic()
        with pytest.raises(isolation.Stopped) as e:
            h.call(*args, **kw)  # type: ignore[arg-type]
        assert e.value.cause == isolation.CPU and e.value.result == "permerror"
        assert time.monotonic() - start < isolation.BURN_SECONDS / 3
        with pytest.raises(ProcessLookupError):
            os.kill(first, 0)  # that helper is gone, and reaped
        assert h._idle and h._idle[0].pid != first  # a new one is ready
        spf, _ = h.call("spf", (ADDR, "a@example.com", "mail.example.com"), zone(), Budget(5))
        assert spf.result == "pass"
    finally:
        h.close()


def test_a_cancelled_check_has_its_helper_killed_at_once(burn_marker: str) -> None:
    h = isolation.Helpers(cpu_seconds=20.0, most=3, idle=1)
    try:
        budget = CancellableBudget(10)
        threading.Timer(0.3, budget.cancel).start()
        start = time.monotonic()
        with pytest.raises(isolation.Stopped) as e:
            h.call("spf", (ADDR, f"{burn_marker}spf@example.com", "x"), zone(), budget)
        assert e.value.cause == isolation.CANCELLED
        assert time.monotonic() - start < 2.0
    finally:
        h.close()


def test_a_helper_that_dies_otherwise_is_a_temporary_error(burn_marker: str,
                                                           helpers: isolation.Helpers) -> None:
    pid = helpers._idle[0].pid
    threading.Timer(0.2, os.kill, (pid, signal.SIGSEGV)).start()
    with pytest.raises(isolation.Stopped) as e:
        # A burn longer than the kill's delay, shorter than the CPU bound.
        helpers.call("header", (f"{burn_marker}header".encode(),), zone(), Budget(0), cpu=20.0)
    assert e.value.cause == isolation.CRASH and e.value.result == "temperror"
    assert "SIGSEGV" in e.value.detail


def test_every_helper_busy_until_the_deadline(burn_marker: str) -> None:
    h = isolation.Helpers(cpu_seconds=3.0, most=1, idle=1)
    try:
        def burning() -> None:
            with pytest.raises(isolation.Stopped):
                h.call("header", (f"{burn_marker}header".encode(),), zone(), Budget(0))

        t = threading.Thread(target=burning)
        t.start()
        wait_until("the only helper taken by the burn", lambda: not h._idle, timeout=5)
        with pytest.raises(isolation.Stopped) as e:
            h.call("spf", (ADDR, "a@example.com", "x"), zone(), Budget(0.1), cpu=0.1)
        assert e.value.cause == isolation.BUSY
        t.join()
    finally:
        h.close()


# -- the engine ------------------------------------------------------------------------------


@pytest.fixture
def isolated(burn_marker: str) -> Iterator[Engine]:
    cfg = config.parse("AcceptDomains example.org\nAuthservID mx.example.org\n")
    e = Engine(cfg, zone(), workers=2, isolate=True)
    assert e._helpers is not None
    e._helpers.cpu_seconds = CPU
    yield e
    e.shutdown()


def _stopped(engine: Engine, check: str) -> float:
    return engine.metrics.registry.get_sample_value(
        "ipv6milter_checks_stopped_total", {"check": check, "cause": "cpu"}) or 0.0


def test_the_engine_reports_a_stopped_check_by_cause_and_counts_it(isolated: Engine) -> None:
    spf = isolated.spf(ADDR, f"<{MARK}spf@example.com>", "mail.example.com")
    assert (spf.result, spf.scope, spf.identity) == ("permerror", "mailfrom",
                                                      f"{MARK}spf@example.com")
    assert _stopped(isolated, "spf") == 1
    msg = signed(f"{MARK}dkim")
    with pytest.MonkeyPatch.context() as m:
        m.setattr("ipv6milter.limits.CHECK_CPU_SECONDS", CPU)
        dk = isolated.dkim(msg)
    assert [(d.result, d.domain, d.selector) for d in dk] == [
        ("permerror", "example.com", f"{MARK}dkim")]
    assert _stopped(isolated, "dkim") == 1
    # The header names why, in words of ours.
    value = authresults.build("mx.example.org", ADDR, None, spf, dk)
    assert "check stopped at its CPU bound" in value
    assert isolated.spf(ADDR, "a@example.com", "mail.example.com").result == "pass"


def test_one_cpu_bound_for_all_authentication_results_fields_of_a_message(
        isolated: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("ipv6milter.limits.HEADER_CPU_SECONDS", CPU)
    msg = Message(10**6, 5, "mx.example.org", read_id=isolated.authserv_ids())
    msg.header("Authentication-Results", b" other.example; spf=pass")
    msg.header("Authentication-Results", f" (c) {MARK}header.example; none".encode())
    assert _stopped(isolated, "header") == 1
    start = time.monotonic()
    msg.header("Authentication-Results", b" (c) other.example; spf=pass")  # bound spent
    assert time.monotonic() - start < 0.05
    # A field that begins plainly is still read, in the worker, in one pass.
    msg.header("Authentication-Results", b" other.example; spf=pass (x)")
    msg.header("Authentication-Results", b" mx.example.org; spf=pass")
    # The unreadable fields are deleted as ours, and so is ours.
    assert msg.forged_indexes() == [5, 3, 2]
    # The next message has a bound of its own.
    fresh = Message(10**6, 5, "mx.example.org", read_id=isolated.authserv_ids())
    fresh.header("Authentication-Results", b" (c) other.example; spf=pass")
    fresh.header("Authentication-Results", b" (c) MX.example.org; spf=pass")
    assert fresh.forged_indexes() == [2]


def test_the_adapter_with_isolation_decides_as_without(isolated: Engine) -> None:
    ctx = RecordingCtx(partial(Ipv6Milter, isolated))
    ctx.connect(GOOD)
    forged = b"Authentication-Results: mx.example.org; spf=pass\r\n"
    out = ctx.transaction("x@fail.example", ["b@example.org"], signed(extra=forged))
    assert out["eom"] == Milter.CONTINUE, out
    adds = [c for c in ctx.calls if c[0] == "add"]
    parsed = authresults.parse(adds[0][2].strip())
    assert {r.method: r.result for r in parsed.results} == {
        "iprev": "pass", "spf": "fail", "dkim": "pass"}
    assert [c for c in ctx.calls if c[0] == "chg"], ctx.calls  # the forged field deleted


def test_without_isolation_the_engine_forks_nothing() -> None:
    cfg = config.parse("AcceptDomains example.org\n")
    e = Engine(cfg, FakeResolver())
    assert not e.isolated
    e.shutdown()


def test_a_long_check_drops_to_the_lowest_priority_and_is_replaced(burn_marker: str) -> None:
    """On a busy host a runaway check takes only CPU nobody else wants."""
    h = isolation.Helpers(cpu_seconds=1.5, most=3, idle=1)
    try:
        pid = h._idle[0].pid
        seen: list[int] = []

        def watch() -> None:
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and not seen:
                with contextlib.suppress(OSError):
                    if os.getpriority(os.PRIO_PROCESS, pid) == 19:
                        seen.append(19)
                time.sleep(0.02)

        t = threading.Thread(target=watch)
        t.start()
        with pytest.raises(isolation.Stopped):
            h.call("header", (f"{burn_marker}header".encode(),), zone(), Budget(0))
        t.join()
        assert seen == [19]
        # An ordinary check keeps its helper, at its priority.
        h.call("header", (b"a.example; none",), zone(), Budget(0))
        again = h._idle[0].pid
        h.call("header", (b"a.example; none",), zone(), Budget(0))
        ours = os.getpriority(os.PRIO_PROCESS, 0)
        assert h._idle[0].pid == again and os.getpriority(os.PRIO_PROCESS, again) == ours
    finally:
        h.close()


def test_from_aligned_mode_reads_the_from_field_in_a_helper(isolated: Engine) -> None:
    from ipv6milter.model import Aligned, DkimResult, SpfResult

    spf = SpfResult("pass", "a@example.com", "mailfrom")
    dkim = (DkimResult("pass", "example.com", "sel1"),)
    facts = isolated.alignment("strict", [b" a@example.com"], spf, dkim, Budget(5))
    assert (facts.from_domain, facts.spf, facts.dkim) == (
        "example.com", Aligned.YES, (Aligned.YES,))
    stopped = isolated.alignment("strict", [f" a@{MARK}from.example.com".encode()], spf, dkim,
                                 Budget(5))
    assert (stopped.from_domain, stopped.spf, stopped.dkim) == (None, Aligned.NO, (Aligned.NO,))
    assert "CPU bound" in stopped.from_problem
    assert _stopped(isolated, "from") == 1


_TRICKY = ' \t\r\n;()"\\ax.Z\xa0\u2028@=é'


@pytest.mark.parametrize("seed", range(5))
def test_a_plain_authserv_id_is_read_as_authres_reads_it(seed: int) -> None:
    """The worker reads a field that begins plainly itself: it must agree
    with authresults.authserv_id_of wherever it answers."""
    import random

    rng = random.Random(seed)
    answered = 0
    for _ in range(4000):
        text = "".join(rng.choice(_TRICKY) for _ in range(rng.randrange(0, 24)))
        value = text.encode("utf-8")
        plain = isolation.plain_authserv_id(value)
        if plain is not None:
            answered += 1
            assert plain == authresults.authserv_id_of(text), repr(text)
    assert answered > 500
    assert isolation.plain_authserv_id(b" mx.example.org; spf=pass (c)") == "mx.example.org"
    assert isolation.plain_authserv_id(b" (c) mx.example.org; spf=pass") is None
    assert isolation.plain_authserv_id(b' "mx.example.org"; spf=pass') is None


class _BulkyResolver(FakeResolver):
    """Counts 100 KiB of DNS messages per answer into the stage's budget."""

    def query(self, name: object, rdtype: str, budget: Budget) -> list[object]:
        out = super().query(name, rdtype, budget)
        budget.dns_bytes += 100 * 1024
        return out


def test_the_stage_dns_bytes_the_worker_counts_bound_the_helper_too(
        helpers: isolation.Helpers) -> None:
    """DNS_STAGE_BYTES is counted where the lookups are (the worker); an SPF
    evaluation in a helper stops at it exactly as one in-process does."""
    def zone_() -> FakeResolver:
        r = _BulkyResolver({
            # Over the bound at a:b.example: no data there would be a void
            # lookup and "fail"; the bound itself is "permerror".
            ("spf.example", "TXT"): "v=spf1 include:a.example a:b.example -all",
            ("a.example", "TXT"): "v=spf1 ip6:2001:db8:ffff::/48 -all",
            ("b.example", "AAAA"): "2001:db8::99",
        })
        return r

    there, _ = helpers.call("spf", (ADDR, "a@spf.example", "x.example"), zone_(), Budget(5))
    here = isolation.spf(zone_(), Budget(5), ADDR, "a@spf.example", "x.example")
    assert there == here
    assert here.result == "permerror", here


def _gone(pid: int) -> bool:
    """Dead: no such process, or a zombie not yet reaped."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_without_its_zygote_a_worker_still_answers_every_check(
        isolated: Engine, caplog: pytest.LogCaptureFixture) -> None:
    """Not expected (the zygote dies with the worker), but defined: the idle
    helpers die with the zygote (a check on one is a temporary error), then
    the checks run in the worker itself, logged as such."""
    assert isolated._helpers is not None
    zygote = isolated._helpers._zygote.pid
    os.kill(zygote, signal.SIGKILL)
    wait_until("the zygote gone", lambda: _gone(zygote), timeout=5)
    results = [isolated.spf(ADDR, "a@example.com", "mail.example.com").result for _ in range(4)]
    assert set(results) <= {"pass", "temperror"}
    assert results[-1] == "pass"
    assert "run in the worker itself" in caplog.text


class _GatedResolver(FakeResolver):
    """Holds every lookup until ``gate`` is set: checks that overlap."""

    def __init__(self, gate: threading.Event, **kwargs: object):
        super().__init__(zone().zone)
        self.gate = gate

    def query(self, name: object, rdtype: str, budget: Budget) -> list[object]:
        self.gate.wait(10)
        return super().query(name, rdtype, budget)


def _overlapping_checks(h: isolation.Helpers, n: int) -> None:
    gate = threading.Event()
    r = _GatedResolver(gate)
    threads = [threading.Thread(target=h.call, args=("spf", (ADDR, "a@example.com", "h"), r,
                                                       Budget(5))) for _ in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while h._live < n and time.monotonic() < deadline:  # every check has its helper
        time.sleep(0.01)
    gate.set()
    for t in threads:
        t.join(10)


def test_helpers_started_for_overlapping_checks_stay_for_the_next_ones() -> None:
    """Under concurrent load each check would otherwise fork a helper and
    reap it again: the helpers a burst started serve the next burst."""
    h = isolation.Helpers(cpu_seconds=CPU, most=4, idle=1)
    try:
        _overlapping_checks(h, 3)
        first = sorted(x.pid for x in h._idle)
        assert len(first) == 3
        _overlapping_checks(h, 3)
        assert sorted(x.pid for x in h._idle) == first  # no helper forked again
    finally:
        h.close()


def test_helpers_idle_past_idle_seconds_end_down_to_the_kept_ones() -> None:
    h = isolation.Helpers(cpu_seconds=CPU, most=4, idle=1, idle_seconds=0.0)
    try:
        _overlapping_checks(h, 3)
        time.sleep(0.01)
        h.call("spf", (ADDR, "a@example.com", "h"), zone(), Budget(5))
        assert len(h._idle) == 1 and h._live == 1  # the surplus ended, one kept
    finally:
        h.close()


def test_a_check_takes_a_helper_freed_within_spawn_after_instead_of_forking(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A fork of the worker costs more than waiting a few milliseconds for a
    helper to finish its check: under load, helpers are reused, not forked."""
    monkeypatch.setattr(isolation, "SPAWN_AFTER", 5.0)
    h = isolation.Helpers(cpu_seconds=CPU, most=4, idle=1)
    try:
        pid = h._idle[0].pid
        gate = threading.Event()
        first = threading.Thread(target=h.call, args=(
            "spf", (ADDR, "a@example.com", "h"), _GatedResolver(gate), Budget(5)))
        first.start()
        wait_until("the only helper busy", lambda: not h._idle, 5)
        results: list[object] = []
        second = threading.Thread(target=lambda: results.append(h.call(
            "spf", (ADDR, "a@example.com", "h"), zone(), Budget(5))[0].result))
        second.start()
        # The second check waits on the helpers' condition (CPython's
        # Condition keeps its waiters in _waiters) instead of forking.
        wait_until("the second check waiting for a helper",
                   lambda: len(h._cond._waiters) == 1, 5)  # type: ignore[attr-defined]
        assert h._live == 1
        gate.set()
        first.join(10)
        second.join(10)
        assert results == ["pass"]
        assert h._live == 1 and [x.pid for x in h._idle] == [pid]
    finally:
        h.close()


def test_with_every_helper_held_past_spawn_after_a_check_starts_its_own() -> None:
    """A helper held by a slow zone's DNS does not make others wait longer
    than SPAWN_AFTER."""
    h = isolation.Helpers(cpu_seconds=CPU, most=4, idle=1)
    gate = threading.Event()
    first = threading.Thread(target=h.call, args=(
        "spf", (ADDR, "a@example.com", "h"), _GatedResolver(gate), Budget(5)))
    try:
        first.start()
        wait_until("the helper busy", lambda: not h._idle, 5)
        start = time.monotonic()
        result, _cpu = h.call("spf", (ADDR, "a@example.com", "h"), zone(), Budget(5))
        assert result.result == "pass"
        assert h._live == 2
        assert time.monotonic() - start < 2.0  # not held until the first finished
    finally:
        gate.set()
        first.join(10)
        h.close()


class _Expiring(FakeResolver):
    """A FakeResolver whose answers the worker's cache keeps until ``until``."""

    def __init__(self, until: float):
        super().__init__(zone().zone)
        self.until = until
        self.hits = 0

    def expiry(self, name: str, rdtype: str) -> float | None:
        return self.until

    def count_hits(self, n: int) -> None:
        self.hits += n


def test_a_helper_answers_again_from_its_copy_until_the_answer_expires() -> None:
    h = isolation.Helpers(cpu_seconds=CPU, most=1, idle=1)
    try:
        r = _Expiring(time.time() + 60)
        args = (ADDR, "a@example.com", "mail.example.com")
        assert h.call("spf", args, r, Budget(5))[0].result == "pass"
        msg = signed()
        assert [d.result for d in h.call("dkim", (5,), r, Budget(5), payload=msg)[0]] == ["pass"]
        asked = list(r.asked)
        assert ("example.com", "TXT") in asked
        # The same checks again in the same helper: nothing crosses the pipe,
        # and the copies count as the worker's cache hits.
        assert h.call("spf", args, r, Budget(5))[0].result == "pass"
        assert [d.result for d in h.call("dkim", (5,), r, Budget(5), payload=msg)[0]] == ["pass"]
        assert r.asked == asked and r.hits == len(asked)
        # A spent stage is a temporary failure, as in the worker.
        assert h.call("spf", args, r, Budget(0))[0].result == "temperror"
        # Another resolver (a reload with new name servers): asked anew.
        other = _Expiring(time.time() + 60)
        assert h.call("spf", args, other, Budget(5))[0].result == "pass"
        assert ("example.com", "TXT") in other.asked
        # An expired answer is asked again.
        stale = _Expiring(time.time() - 1)
        h.call("spf", args, stale, Budget(5))
        h.call("spf", args, stale, Budget(5))
        assert stale.asked.count(("example.com", "TXT")) == 2
    finally:
        h.close()


def test_a_helper_keeps_no_copy_of_large_answers() -> None:
    big = "v=spf1 " + " ".join(f"ip6:2001:db8:1::{i:x}" for i in range(250)) + f" ip6:{GOOD} -all"
    assert len(big) > limits.HELPER_ANSWER_TEXT
    h = isolation.Helpers(cpu_seconds=CPU, most=1, idle=1)
    try:
        r = _Expiring(time.time() + 60)
        r.zone[("big.example", "TXT")] = [big]
        for _ in range(2):
            assert h.call("spf", (ADDR, "a@big.example", "h"), r, Budget(5))[0].result == "pass"
        assert r.asked.count(("big.example", "TXT")) == 2
    finally:
        h.close()


def test_an_spf_result_from_a_helper_is_kept_until_its_answers_expire() -> None:
    """The worker keeps the result for as long as the soonest answer the
    check used, the helper's own copies included."""
    from tests.unit.test_hotpath import Counted, _answer

    c = Counted()
    c.put(_answer("example.com.", "TXT", [f'"v=spf1 ip6:{GOOD} -all"'], ttl=60))
    cfg = config.parse("AcceptDomains example.org\n")
    eng = Engine(cfg, c.r, workers=2, isolate=True)
    try:
        for _ in range(3):
            assert eng.spf(ADDR, "<a@example.com>", "h").result == "pass"
        assert c.calls == ["example.com TXT"] and c.hits == [False]
        now = time.time()
        eng._spf_results.clock = lambda: now + 61  # the result is past its answer
        assert eng.spf(ADDR, "<a@example.com>", "h").result == "pass"
        assert c.hits == [False, True]  # evaluated again (the helper's copy: a hit)
        assert not eng._spf_results._data  # computed from an answer it is past
        eng._spf_results.clock = time.time
        eng.spf(ADDR, "<a@example.com>", "h")
        assert c.hits == [False, True, True]
        # Kept by the expiry of the helper's copy (the worker was not asked).
        kept = [e[0] for e in eng._spf_results._data.values()]
        assert kept == [pytest.approx(now + 60, abs=2)]
    finally:
        eng.shutdown()
