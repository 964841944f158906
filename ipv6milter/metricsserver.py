"""The ``/metrics`` endpoint: its socket and directory, and the process that serves it.

``MetricsListen`` is bound by the supervisor before privileges are dropped,
as the milter socket is.  Every process counts into files of its own in a
private directory (prometheus-client's multiprocess mode); a process of its
own, running as ``UserID``, serves their sum: the supervisor stays free of
threads and of network input, and a worker busy with a hostile message does
not hold up a scrape.  Root only ever works on the entries of that very
directory, through a descriptor held open (its path in /tmp could be swapped
for a symbolic link once the directory belongs to ``UserID``).
"""

from __future__ import annotations

import contextlib
import http.server
import logging
import os
import selectors
import signal
import socket
import tempfile
from typing import Any

from .config import Config
from .configpipe import Receiver
from .worker import STOP

log = logging.getLogger("ipv6milter")


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class MetricsEndpoint:
    """The supervisor's side: the socket, the directory, and the supervisor's own counts."""

    def __init__(self) -> None:
        self.listener: socket.socket | None = None
        self.directory: str | None = None
        self.fd: int | None = None  # the directory, held open
        self.metrics: Any = None  # the supervisor's own counts (reloads)

    def bind(self, cfg: Config, owner: tuple[int, int] | None) -> bool:
        from .metrics import Metrics, enable_multiprocess

        if cfg.metrics_listen:
            host, port = cfg.metrics_listen
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            try:
                s = socket.socket(family, socket.SOCK_STREAM)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                s.bind((host, port))
                s.listen(64)
            except OSError as e:
                log.error("cannot serve metrics on %s port %d: %s", host, port, e)
                return False
            self.listener = s
            # Private to this run: every process counts into its own files here.
            self.directory = tempfile.mkdtemp(prefix="ipv6milter-metrics.")
            self.fd = os.open(self.directory,
                              os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            if owner:
                os.chown(self.fd, *owner)
            enable_multiprocess(self.directory)
            log.info("metrics on http://%s/metrics", _hostport(host, port))
        # The supervisor's own counts (reloads), in files the metrics server,
        # running as UserID, must be able to read whatever the umask.
        old_umask = os.umask(0o022)
        try:
            self.metrics = Metrics()
            self.metrics.loaded(cfg)
        finally:
            os.umask(old_umask)
        return True

    def forget(self, pid: int) -> None:
        """A process is gone: its live gauges leave the sums (its counts stay),
        or, for the check as UserID, everything it counted."""
        from .metrics import process_dead

        if self.fd is not None:
            process_dead(pid, self.fd)

    def discard(self, pid: int) -> None:
        if self.fd is not None:
            for name in os.listdir(self.fd):
                if name.endswith(f"_{pid}.db"):
                    os.unlink(name, dir_fd=self.fd)

    def remove(self) -> None:
        """At the stop: the directory and every file in it."""
        if not (self.directory and self.fd is not None):
            return
        with contextlib.suppress(OSError):
            for name in os.listdir(self.fd):
                os.unlink(name, dir_fd=self.fd)
            parent, name = os.path.split(self.directory)
            parent_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
                held = os.fstat(self.fd)
                if (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino):
                    os.rmdir(name, dir_fd=parent_fd)
            finally:
                os.close(parent_fd)
        os.close(self.fd)


class _MetricsHandler(http.server.BaseHTTPRequestHandler):
    timeout = 2.0  # a slow client holds the metrics process at most this long

    def do_GET(self) -> None:
        from .metrics import exposition

        if self.path.split("?", 1)[0] not in ("/metrics", "/"):
            self.send_error(404)
            return
        body, ctype = exposition(self.server.registry)  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("metrics: " + format, *args)


class MetricsServer:
    """The process that serves ``/metrics``: every process's counts summed,
    and the digest of the configuration the workers run (from its pipe)."""

    def __init__(self, cfg: Config, listener: socket.socket, directory: str, pipe: int):
        from .metrics import aggregate_registry

        self.cfg = cfg
        self.listener = listener
        self.pipe = Receiver(pipe)
        self.registry = aggregate_registry(directory, lambda: self.cfg)

    def _on_stop(self, signum: int, frame: object) -> None:
        raise SystemExit(0)

    def run(self) -> int:
        for sig in STOP:
            signal.signal(sig, self._on_stop)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP)
        self.listener.setblocking(False)
        sel = selectors.DefaultSelector()
        sel.register(self.listener, selectors.EVENT_READ)
        sel.register(self.pipe.fd, selectors.EVENT_READ)
        with contextlib.suppress(SystemExit), sel:
            while True:
                for key, _ in sel.select():
                    if key.fd == self.pipe.fd:
                        configs = self.pipe.read()
                        if configs is None:
                            sel.unregister(self.pipe.fd)
                        elif configs:
                            self.cfg = configs[-1]
                        continue
                    self._answer()
        return 0

    def _answer(self) -> None:
        try:
            conn, addr = self.listener.accept()
        except OSError:
            return  # another connection's reset, or EAGAIN
        try:
            conn.setblocking(True)
            _MetricsHandler(conn, addr, self)
        except OSError as e:
            log.debug("metrics request from %s: %s", addr, e)
        finally:
            conn.close()
