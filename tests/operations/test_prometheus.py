"""A real Prometheus (Debian's package) scrapes the milters; every panel query
of the Grafana dashboard gets a valid answer from it."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.harness import free_port, wait_until
from tests.integration.smtpclient import make_message, marker, transaction
from tests.operations.conftest import Ops

pytestmark = pytest.mark.timeout(120)

DASHBOARD = Path(__file__).parents[2] / "packaging" / "grafana" / "ipv6milter.json"


def api(port: int, path: str, **params: str) -> dict:
    url = f"http://127.0.0.1:{port}{path}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def prometheus(ops: Ops, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    binary = shutil.which("prometheus")
    assert binary, "Debian's prometheus package is needed (make deps-test)"
    work = tmp_path_factory.mktemp("prometheus")
    targets = [ops.metrics_url(n).removeprefix("http://").removesuffix("/metrics")
               for n in ("enforce", "monitor")]
    (work / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: ipv6milter\n    static_configs:\n"
        f"      - targets: {json.dumps(targets)}\n")
    port = free_port()
    log = work / "prometheus.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [binary, f"--config.file={work / 'prometheus.yml'}",
             f"--storage.tsdb.path={work / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
            stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        def ready() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False

        wait_until("prometheus ready", ready, timeout=60)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def dashboard_queries() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p["targets"]]


def test_prometheus_scrapes_the_decisions_and_every_panel_query_is_valid(
        ops: Ops, prometheus: int) -> None:
    d = ops.dns
    # Something to see: one accept and one refusal on each milter.
    for service in ("enforce", "monitor"):
        for sender in ("a@example.com", "x@spffail.test"):
            transaction(ops.postfix.port(service), addr=d.good_ip, mail_from=sender,
                        rcpts=["b@example.com"],
                        message=make_message(marker(), from_addr=sender, to="b@example.com"))

    def scraped() -> bool:
        r = api(prometheus, "/api/v1/query",
                query='sum(ipv6milter_decisions_total{stage="eom", reply="4.7.26"})')
        return r["status"] == "success" and bool(r["data"]["result"]) and float(
            r["data"]["result"][0]["value"][1]) >= 2

    wait_until("the decisions scraped", scraped, timeout=30)

    def both_up() -> bool:
        up = api(prometheus, "/api/v1/query", query='up{job="ipv6milter"}')["data"]["result"]
        return sorted(float(s["value"][1]) for s in up) == [1.0, 1.0]

    wait_until("both milters scraped (127.0.0.1 and [::1])", both_up, timeout=30)
    monitor = api(prometheus, "/api/v1/query", query=(
        'ipv6milter_decisions_total{mode="monitor", stage="eom", reply="4.7.26"}'))
    assert float(monitor["data"]["result"][0]["value"][1]) >= 1

    queries = dashboard_queries()
    assert len(queries) >= 8
    for title, expr in queries:
        r = api(prometheus, "/api/v1/query", query=expr)
        assert r["status"] == "success", (title, expr, r)
    # Rates need two scrapes in the window: wait for one and check a panel has data.
    decisions = next(e for t, e in queries if t.startswith("Decisions per reply"))
    wait_until("a rate over two scrapes", lambda: bool(
        api(prometheus, "/api/v1/query", query=decisions)["data"]["result"]), timeout=30)
