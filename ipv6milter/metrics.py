"""Prometheus metrics (``MetricsListen``), on a registry of our own.

Counting is always on and cheap; the HTTP endpoint is served only when
``MetricsListen`` is set.  Every name and label is documented in
docs/metrics.md.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from .config import Config, describe
from .model import Verdict

# DNS-bound work: from a cached answer (~1 ms) to StageTimeout (20 s).
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30)


def reply_label(verdict: Verdict) -> str:
    """``accept`` or the enhanced status code: 5.2.1, 4.7.25, 4.7.26, 4.4.3, 4.3.0."""
    return verdict.reply.xcode if verdict.reply is not None else "accept"


def config_hash(cfg: Config) -> str:
    """A short digest of the effective configuration (not of the file's comments)."""
    return hashlib.sha256("\n".join(describe(cfg)).encode()).hexdigest()[:16]


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.connections = Counter(
            "ipv6milter_connections", "SMTP connections by scope at connect", ["scope"],
            registry=r)
        self.transactions = Counter(
            "ipv6milter_transactions", "Mail transactions (MAIL FROM) by scope", ["scope"],
            registry=r)
        self.in_flight = Gauge(
            "ipv6milter_connections_in_flight", "SMTP connections open now", registry=r)
        self.decisions = Counter(
            "ipv6milter_decisions",
            "Policy decisions by stage (rcpt, eom) and reply; with mode=monitor (Mode "
            "monitor, or a client outside EnforceShare) the reply is the one enforce mode "
            "would have given",
            ["stage", "reply", "mode"], registry=r)
        self.results = Counter(
            "ipv6milter_check_results", "Check results by method (iprev, spf, dkim)",
            ["method", "result"], registry=r)
        self.latency = Histogram(
            "ipv6milter_check_duration_seconds",
            "Time spent in each check (ptr, spf, dkim) and waiting at end of message (message)",
            ["check"], buckets=_BUCKETS, registry=r)
        self.dns_cache = Counter(
            "ipv6milter_dns_cache_lookups", "DNS cache lookups by result (hit, miss)",
            ["result"], registry=r)
        self.reloads = Counter(
            "ipv6milter_config_reloads", "Configuration reloads by result (ok, failed)",
            ["result"], registry=r)
        self.enforce_share = Gauge(
            "ipv6milter_enforce_share_percent",
            "EnforceShare in use: percent of in-scope client networks whose refusals are "
            "enforced (0 in Mode monitor)", registry=r)
        self.config = Info(
            "ipv6milter_config", "The configuration in use: its digest and source", registry=r)
        # Export the label sets an operator graphs, so rates start at zero
        # instead of appearing with the first event.
        for label in ("hit", "miss"):
            self.dns_cache.labels(label)
        for label in ("ok", "failed"):
            self.reloads.labels(label)
        self.mode = "enforce"  # the configured Mode, set by loaded()

    def loaded(self, cfg: Config) -> None:
        self.config.info({"hash": config_hash(cfg), "source": cfg.source or "built-in"})
        self.mode = cfg.mode
        self.enforce_share.set(0 if cfg.monitor else cfg.enforce_share)
        # A client outside EnforceShare is counted with mode="monitor": export
        # both label sets while the share is partial.
        modes = {cfg.mode} | ({"monitor"} if cfg.enforce_share < 100 else set())
        for stage, reply in (("rcpt", "accept"), ("rcpt", "5.2.1"), ("rcpt", "4.7.25"),
                             ("rcpt", "4.4.3"), ("eom", "accept"), ("eom", "4.7.26"),
                             ("eom", "4.4.3"), ("eom", "internal-error")):
            for mode in sorted(modes):
                self.decisions.labels(stage, reply, mode)

    def decision(self, stage: str, verdict: Verdict) -> None:
        # A refusal carries how this client was handled (a client outside
        # EnforceShare: "monitor"); an accept is the same in both modes and is
        # counted under the configured Mode.
        mode = verdict.mode if verdict.reply is not None else self.mode
        self.decisions.labels(stage, reply_label(verdict), mode).inc()

    def cache(self, hit: bool) -> None:
        self.dns_cache.labels("hit" if hit else "miss").inc()

    @contextmanager
    def timed(self, check: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.latency.labels(check).observe(time.perf_counter() - start)

    def serve(self, host: str, port: int) -> None:
        from prometheus_client import start_http_server

        start_http_server(port, addr=host, registry=self.registry)
