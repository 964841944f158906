"""Prometheus metrics (``MetricsListen``), on a registry of our own.

Counting is always on and cheap; the HTTP endpoint is served only when
``MetricsListen`` is set.  Every name and label is documented in
docs/metrics.md.

With worker processes (``Workers``) every process counts into files of its
own in a private directory (prometheus-client's multiprocess mode) and the
supervising parent serves one view summed over all of them: a scrape sees
one target whatever the number of workers, and the counts of a worker that
died stay in the sums.  ``ipv6milter_connections_in_flight`` counts live
workers only; the configuration's digest comes from the parent, which
checked the file the workers reloaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, values
from prometheus_client.core import InfoMetricFamily, Metric

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


class Children:
    """A labelled metric whose child for each label set is looked up once.

    prometheus-client's ``labels()`` checks and converts the values and takes
    a lock on every call; on the hot path (several counts a message) a dict
    lookup does.  The children are the metric's own, so names, labels and
    values are unchanged; everything else is the metric's (``__getattr__``).
    Only for label values from a small fixed set (they are kept for good).
    """

    def __init__(self, metric: Any):
        self.metric = metric
        self._children: dict[tuple[str, ...], Any] = {}

    def labels(self, *values: str) -> Any:
        child = self._children.get(values)
        if child is None:
            child = self._children.setdefault(values, self.metric.labels(*values))
        return child

    def __getattr__(self, name: str) -> Any:
        return getattr(self.metric, name)


class _Timed:
    """Observes the time spent in a ``with`` block on a histogram child."""

    __slots__ = ("child", "start")

    def __init__(self, child: Any):
        self.child = child

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.child.observe(time.perf_counter() - self.start)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.connections: Any = Children(Counter(
            "ipv6milter_connections", "SMTP connections by scope at connect", ["scope"],
            registry=r))
        self.transactions: Any = Children(Counter(
            "ipv6milter_transactions", "Mail transactions (MAIL FROM) by scope", ["scope"],
            registry=r))
        self.in_flight = Gauge(
            "ipv6milter_connections_in_flight", "SMTP connections open now", registry=r,
            multiprocess_mode="livesum")
        self.decisions: Any = Children(Counter(
            "ipv6milter_decisions",
            "Policy decisions by stage (rcpt, eom) and reply; with mode=monitor (Mode "
            "monitor, or a client outside EnforceShare) the reply is the one enforce mode "
            "would have given",
            ["stage", "reply", "mode"], registry=r))
        self.results: Any = Children(Counter(
            "ipv6milter_check_results", "Check results by method (iprev, spf, dkim)",
            ["method", "result"], registry=r))
        self.latency: Any = Children(Histogram(
            "ipv6milter_check_duration_seconds",
            "Time spent in each check (ptr, spf, dkim) and waiting at end of message (message)",
            ["check"], buckets=_BUCKETS, registry=r))
        self.stopped: Any = Children(Counter(
            "ipv6milter_checks_stopped",
            "Checks stopped in their helper process, by check (spf, dkim, header, from) and cause "
            "(cpu: over the CPU bound; crash; timeout; cancelled; busy: no helper free)",
            ["check", "cause"], registry=r))
        self.dns_cache: Any = Children(Counter(
            "ipv6milter_dns_cache_lookups", "DNS cache lookups by result (hit, miss)",
            ["result"], registry=r))
        self.reused: Any = Children(Counter(
            "ipv6milter_check_results_reused",
            "Checks answered by a result kept from an earlier identical check over the same, "
            "still cached, DNS answers, by check (ptr, spf)",
            ["check"], registry=r))
        self.reloads: Any = Children(Counter(
            "ipv6milter_config_reloads", "Configuration reloads by result (ok, failed)",
            ["result"], registry=r))
        self.enforce_share = Gauge(
            "ipv6milter_enforce_share_percent",
            "EnforceShare in use: percent of in-scope client networks whose refusals are "
            "enforced (0 in Mode monitor)", registry=r,
            # With workers: one value, not one per process (every live process
            # has the same configuration once a reload has reached it).
            multiprocess_mode="livemax")
        self.config = Info(
            "ipv6milter_config", "The configuration in use: its digest and source", registry=r)
        # Export the label sets an operator graphs, so rates start at zero
        # instead of appearing with the first event.
        self._hits = self.dns_cache.labels("hit")
        self._misses = self.dns_cache.labels("miss")
        self.reused_ptr = self.reused.labels("ptr")
        self.reused_spf = self.reused.labels("spf")
        for label in ("ok", "failed"):
            self.reloads.labels(label)
        for check in ("spf", "dkim", "header", "from"):
            self.stopped.labels(check, "cpu")
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
        # Once per DNS question (several a message): the two children bound
        # in __init__, no label look-up.
        (self._hits if hit else self._misses).inc()

    def timed(self, check: str) -> _Timed:
        """``with metrics.timed(check):`` observes the block's duration.  A
        small class, not a generator context manager (which costs a
        generator, its frame and two resumptions for each check)."""
        return _Timed(self.latency.labels(check))

    def serve(self, host: str, port: int) -> None:
        from prometheus_client import start_http_server

        start_http_server(port, addr=host, registry=self.registry)


# -- one view over worker processes ------------------------------------------------------

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def enable_multiprocess(path: str) -> None:
    """Count into files under ``path`` from now on, in this process and its children.

    prometheus-client chooses how values are stored when it is first
    imported; the milter imports it before it knows whether it will fork
    (everything is loaded before privileges are dropped), so the choice is
    made again here, before any metric exists.
    """
    os.environ[MULTIPROC_ENV] = path
    values.ValueClass = values.get_value_class()


_LIVE_MODES = ("liveall", "livesum", "livemin", "livemax", "livemostrecent")


def process_dead(pid: int, directory: int) -> None:
    """A worker is gone: its live gauges (in flight) leave the sums, its counts stay.

    What prometheus-client's ``mark_process_dead`` does, on the directory open
    as ``directory`` (a descriptor): the supervisor may be root and the
    directory the workers' own.
    """
    for mode in _LIVE_MODES:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"gauge_{mode}_{pid}.db", dir_fd=directory)


class _ConfigInfo:
    """``ipv6milter_config_info`` from the supervisor's view of the configuration
    (an Info metric is not shared between processes)."""

    def __init__(self, current: Callable[[], Config]):
        self.current = current

    def collect(self) -> Iterable[Metric]:
        cfg = self.current()
        m = InfoMetricFamily(
            "ipv6milter_config", "The configuration in use: its digest and source")
        m.add_metric([], {"hash": config_hash(cfg), "source": cfg.source or "built-in"})
        yield m


def aggregate_registry(path: str, current: Callable[[], Config]) -> CollectorRegistry:
    """The registry a supervisor serves: every process's files summed, plus the config."""
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=path)
    registry.register(_ConfigInfo(current))  # type: ignore[arg-type]
    return registry


def exposition(registry: CollectorRegistry) -> tuple[bytes, str]:
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return generate_latest(registry), CONTENT_TYPE_LATEST
