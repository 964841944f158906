"""Runs the checks: what the milter adapter and ipv6milter-check share.

An ``Engine`` owns the live configuration, the resolver and a small thread
pool.  Lookups that can start early do (PTR at connect, SPF at MAIL FROM),
in the pool, so that RCPT and end of message wait as little as possible.
Each started check has its own ``Budget`` of ``StageTimeout`` seconds.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from . import dkimcanon
from .config import Config
from .dkimcheck import check_dkim
from .iprev import check_iprev
from .metrics import Metrics
from .model import DkimResult, IPAddress, Iprev, IprevResult, SpfResult
from .resolver import Budget, Resolver
from .spfcheck import check_spf

log = logging.getLogger(__name__)

T = TypeVar("T")

# Grace on top of StageTimeout when waiting for a pooled check: the check
# enforces the budget itself; this only guards against a starved pool.
_WAIT_GRACE = 2.0


class Engine:
    def __init__(self, cfg: Config, resolver: Resolver | None = None, workers: int = 16,
                 metrics: Metrics | None = None):
        self._lock = threading.Lock()
        self.metrics = metrics or Metrics()
        self._cfg = cfg
        self._resolver = resolver or self._new_resolver(cfg)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dns")
        self.metrics.loaded(cfg)
        dkimcanon.install()

    def _new_resolver(self, cfg: Config) -> Resolver:
        return Resolver(cfg.nameservers, cfg.dns_timeout, on_cache=self.metrics.cache)

    @property
    def cfg(self) -> Config:
        return self._cfg

    @property
    def resolver(self) -> Resolver:
        return self._resolver

    def reload(self, cfg: Config) -> None:
        """Swap in a new configuration; checks already started keep the old one."""
        with self._lock:
            if (cfg.nameservers, cfg.dns_timeout) != (self._cfg.nameservers, self._cfg.dns_timeout):
                self._resolver = self._new_resolver(cfg)
            self._cfg = cfg
        self.metrics.loaded(cfg)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def budget(self, trace: list[str] | None = None) -> Budget:
        return Budget(self._cfg.stage_timeout, trace)

    # -- the checks, synchronous -----------------------------------------------------

    def iprev(self, addr: IPAddress, trace: list[str] | None = None) -> IprevResult:
        with self.metrics.timed("ptr"):
            return check_iprev(self._resolver, addr, self.budget(trace))

    def spf(
        self, addr: IPAddress, mail_from: str, helo: str, trace: list[str] | None = None
    ) -> SpfResult:
        with self.metrics.timed("spf"):
            return check_spf(self._resolver, addr, mail_from, helo, self.budget(trace))

    def dkim(self, message: bytes, trace: list[str] | None = None) -> tuple[DkimResult, ...]:
        with self.metrics.timed("dkim"):
            return check_dkim(
                self._resolver, message, self.budget(trace), self._cfg.max_signatures
            )

    # -- started early, awaited later ---------------------------------------------------

    def start(self, fn: Callable[..., T], *args: object) -> Future[T]:
        return self._pool.submit(fn, *args)

    def wait(self, fut: Future[T] | None, fallback: T) -> T:
        """The result of a started check; ``fallback`` if it never finished in time."""
        if fut is None:
            return fallback
        try:
            return fut.result(timeout=self._cfg.stage_timeout + _WAIT_GRACE)
        except concurrent.futures.TimeoutError:
            log.warning("a DNS check did not finish within StageTimeout; counted as temporary")
            fut.cancel()
            return fallback


IPREV_UNFINISHED = IprevResult(Iprev.TEMPERROR, ptr_temperror=True, detail="did not finish in time")
