"""The openspf RFC 7208 test suite, through the product's own SPF path.

``rfc7208-tests.yml`` ships in pyspf's source distribution; ``make test``
fetches it into .cache/ (the Makefile's ``$(SPF_SUITE)`` rule: ``pip download
--no-binary :all: pyspf==<installed version>``); it is never committed.

Each scenario's zone data is served over the wire by zoneserver.py on
127.0.0.1, and each case is judged twice against it:

* **ours**: ``spfcheck.check_spf`` with a ``resolver.Resolver`` pointed at the
  server, i.e. the product's pyspf bridge and its own handling of the
  envelope (brackets, empty local part, HELO for the null sender, names that
  cannot exist);
* **plain**: pyspf alone (``spf.query(...).check()``) with its own dnspython
  lookup, pointed at the same server.

Every case must pass in ours, including those plain pyspf fails over the
same server (ptr-cname-loop: pyspf answers temperror where RFC 7208 §5.5
skips the name); the pytest summary ("RFC 7208 suite") lists what failed,
and in which.  The result must be one of the suite's results; where the
suite gives an explanation, ours must match it (``DEFAULT``: pyspf's default
text, no exp= used).  The suite's Received-SPF ``header`` and pyspf's
``bestguess`` are not compared: the product writes neither.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dns.resolver
import pytest
import spf
import yaml

from ipv6milter.resolver import Budget, Resolver, pyspf_bridge
from ipv6milter.spfcheck import check_spf

from . import conftest, zoneserver

SUITE = Path(__file__).resolve().parents[2] / ".cache" / "pyspf" / "rfc7208-tests.yml"
TIMEOUT = 3.0  # generous: every answer is immediate, a failure is a SERVFAIL

pytestmark = [
    pytest.mark.timeout(120),
    # plain pyspf calls dnspython's 1.x query(); the product never does
    pytest.mark.filterwarnings("ignore:please use dns.resolver.resolve:DeprecationWarning"),
]



@dataclass(frozen=True)
class Case:
    scenario: str
    name: str
    spec: str
    host: str
    mailfrom: str
    helo: str
    results: tuple[str, ...]
    explanation: str | None


@dataclass(frozen=True)
class Outcome:
    result: str
    explanation: str


def load(path: Path) -> list[tuple[dict[str, Any], list[Case]]]:
    out = []
    with path.open("rb") as f:
        for scenario in yaml.safe_load_all(f):
            cases = []
            for name, t in scenario["tests"].items():
                results = t["result"] if isinstance(t["result"], list) else [t["result"]]
                cases.append(Case(scenario["description"], name, str(t.get("spec", "")),
                                  str(t["host"]), str(t.get("mailfrom", "")),
                                  str(t.get("helo", "")), tuple(results),
                                  t.get("explanation")))
            out.append((scenario.get("zonedata") or {}, cases))
    return out


def ours(port: int, case: Case) -> Outcome:
    resolver = Resolver((("127.0.0.1", port),), timeout=TIMEOUT)
    res = check_spf(resolver, ipaddress.ip_address(case.host), case.mailfrom, case.helo,
                    Budget(20))
    return Outcome(res.result, res.detail)


def plain(port: int, case: Case) -> Outcome:
    pyspf_bridge.uninstall()
    r = dns.resolver.Resolver(configure=False)
    r.nameservers = ["127.0.0.1"]
    r.port = port
    r.timeout = r.lifetime = TIMEOUT
    saved = dns.resolver.default_resolver
    dns.resolver.default_resolver = r
    try:
        q = spf.query(i=case.host, s=case.mailfrom, h=case.helo, timeout=TIMEOUT)
        result, _code, explanation = q.check()
    finally:
        dns.resolver.default_resolver = saved
    return Outcome({"unknown": "permerror", "error": "temperror"}.get(result, result),
                   str(explanation))


def problem(case: Case, got: Outcome) -> str | None:
    """Why ``got`` does not satisfy ``case``, or None."""
    if got.result not in case.results:
        return f"result {got.result}, expected {'/'.join(case.results)}"
    if case.explanation is not None:
        expected = (spf.EXPLANATIONS.get(got.result, "") if case.explanation == "DEFAULT"
                    else case.explanation)
        if got.explanation != expected:
            return f"explanation {got.explanation!r}, expected {expected!r}"
    return None


def test_rfc7208_suite_through_our_resolver_and_bridge() -> None:
    if not SUITE.exists():
        pytest.fail(f"{SUITE} is missing: `make test` fetches it "
                    "(make .cache/pyspf/rfc7208-tests.yml)")
    scenarios = load(SUITE)
    failures, known, rows = [], [], 0
    with zoneserver.running() as server:
        for zonedata, cases in scenarios:
            server.load(zonedata)
            for case in cases:
                rows += 1
                why = problem(case, ours(server.port, case))
                if why is None:
                    continue
                plain_why = problem(case, plain(server.port, case))
                label = f"{case.name} ({case.scenario}, RFC 7208 {case.spec})"
                if plain_why is None:
                    failures.append(f"{label}: {why}; plain pyspf passes")
                else:
                    known.append(f"{label}: ours {why}; plain pyspf {plain_why}")
    lines = [f"{rows} cases, {rows - len(failures) - len(known)} pass, "
             f"{len(known)} fail in plain pyspf too, {len(failures)} fail only in ours"]
    lines += [f"  also fails in plain pyspf: {k}" for k in known]
    lines += [f"  FAILS: {f}" for f in failures]
    conftest.report("RFC 7208 suite (openspf, pyspf's sdist)", lines)
    assert rows > 100, rows
    assert not failures, "\n".join(failures)
    # No failure is tolerated because pyspf alone fails it too: ptr-cname-loop,
    # which plain pyspf answers temperror, passes in ours (RFC 7208 §5.5).
    assert not known, "\n".join(known)
