"""Fixtures for the operations tests: a Knot, a sink, a private Postfix and
milters with their metrics endpoints, built from the integration harness.

    ops.dns / ops.sink / ops.postfix     as in tests/integration
    ops.milters["enforce"|"monitor"|"reload"]   MilterProcess
    ops.metrics_port[name]               its MetricsListen port
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.harness import (
    AUTHSERV_ID,
    OPTED_IN,
    DnsWorld,
    MilterFactory,
    MilterProcess,
    PostfixInstance,
    Sink,
    free_port,
    run_knot,
    run_postfix,
    run_sink,
)


@dataclass
class Ops:
    dns: DnsWorld
    sink: Sink
    postfix: PostfixInstance
    factory: MilterFactory
    milters: dict[str, MilterProcess] = field(default_factory=dict)
    metrics_port: dict[str, int] = field(default_factory=dict)
    metrics_host: dict[str, str] = field(default_factory=dict)

    def metrics_url(self, name: str) -> str:
        host = self.metrics_host[name]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.metrics_port[name]}/metrics"

    def scrape(self, name: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample of one milter's /metrics: (name, sorted labels) -> value."""
        with urllib.request.urlopen(self.metrics_url(name), timeout=5) as r:
            text = r.read().decode()
        out = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out


def sample(scrape: dict, name: str, **labels: str) -> float:
    return scrape.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="session")
def ops(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ops]:
    with run_knot(tmp_path_factory.mktemp("knot")) as dns, run_sink() as sink:
        factory = MilterFactory(tmp_path_factory.mktemp("milter"), {
            "Nameservers": dns.nameserver,
            "AcceptDomains": ", ".join(OPTED_IN),
            "AuthservID": AUTHSERV_ID,
            "DNSTimeout": "2",
            "StageTimeout": "4",
        })
        milters: dict[str, MilterProcess] = {}
        ports: dict[str, int] = {}
        hosts = {"enforce": "127.0.0.1", "monitor": "::1", "reload": "127.0.0.1"}
        try:
            for name, extra in (("enforce", {}), ("monitor", {"Mode": "monitor"}),
                                ("reload", {})):
                ports[name] = free_port()
                h = hosts[name]
                listen = f"[{h}]:{ports[name]}" if ":" in h else f"{h}:{ports[name]}"
                milters[name] = factory.start(name, MetricsListen=listen, **extra)
            services = {n: m.socket_spec for n, m in milters.items()}
            with run_postfix(tmp_path_factory.mktemp("postfix"), sink.port, services) as pf:
                yield Ops(dns, sink, pf, factory, milters, ports, hosts)
        finally:
            statuses = factory.stop_all()
        assert all(s == 0 for s in statuses.values()), statuses
