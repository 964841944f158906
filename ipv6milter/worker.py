"""A worker process: one libmilter main loop on the shared socket, and its signals.

The supervisor forks the workers after binding the socket; each runs
libmilter's main loop on the inherited listening socket (the kernel hands
every MTA connection to one of them; inside a worker libmilter runs one
thread per connection), and takes new configurations from its pipe
(``configpipe``).  The only module that starts libmilter's main loop.

Signals.  libmilter starts a thread of its own that ``sigwait``s for SIGHUP,
SIGTERM and SIGINT and *stops the milter* on any of them, SIGHUP included
(libmilter's signal.c).  So a worker never needs a SIGHUP, and must never
take one: reload comes through the pipe, and SIGHUP (with SIGUSR1) is
*ignored* in the main thread, which never blocks it.  For a signal sent to
the process Linux asks the thread-group leader (the main thread) whether it
ignores the signal, and discards an ignored one when it is sent (kernel
``prepare_signal``/``sig_ignored``): it is never queued, so libmilter's
``sigwait`` cannot take it, however the threads' masks stand at that moment.
Setting SIG_IGN also discards one already pending (POSIX), which is what
makes a SIGHUP that arrived between the fork and this set-up harmless: the
supervisor forks with the signals blocked, the child ignores SIGHUP/SIGUSR1
before anything else and only then unblocks them.  No handler runs, so
nothing needs SA_NODEFER.

SIGTERM and SIGINT stop the worker: a Python handler in the main thread
calls ``milter.stop()``.  libmilter's loop runs in a second thread that
blocks every signal, so the main thread takes them; one that arrives while
the kernel blocks it for the instant its C handler runs goes to libmilter's
signal thread, which stops the worker too.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import selectors
import signal
import threading
from functools import partial
from typing import Any

from .cli import setup_logging
from .config import Config
from .configpipe import Receiver
from .metrics import config_hash

log = logging.getLogger("ipv6milter")

IGNORED = {signal.SIGHUP, signal.SIGUSR1}
STOP = {signal.SIGTERM, signal.SIGINT}
# Blocked in the supervisor across each fork (see ``Supervisor._spawn``).
ALL = IGNORED | STOP

_M_ARENA_MAX = -8


def limit_malloc_arenas(arenas: int = 2) -> None:
    """glibc gives each thread that allocates a malloc arena of its own and
    keeps their free memory: with libmilter's thread per connection that
    grows the resident size to about twice what a few arenas hold (121 -> 62
    MiB measured, throughput unchanged: docs/performance.md).  mallopt(3) takes
    two ints, no structure.  Set before any thread starts."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.mallopt(_M_ARENA_MAX, arenas)
    except (OSError, AttributeError):
        log.debug("mallopt not available; malloc arenas not limited")


def ignore_reload_signals() -> None:
    """In a child of the supervisor, first thing: SIGHUP and SIGUSR1 ignored
    (one already pending is discarded), then unblocked in this, the main,
    thread, where the kernel looks when it decides to discard them."""
    for sig in IGNORED:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, IGNORED)


def register_callbacks(milter: Any, Milter: Any) -> None:
    """Wire libmilter's callbacks to the per-connection object, as
    ``Milter.runmilter`` does, but leaving socket set-up to us so that
    privileges can be dropped between binding and serving.  libmilter wants
    this before the socket is opened, so the supervisor calls it."""
    milter.set_connect_callback(Milter.connect_callback)
    milter.set_helo_callback(lambda ctx, host: ctx.getpriv().hello(host))
    milter.set_envfrom_callback(lambda ctx, *b: ctx.getpriv().envfrom_bytes(*b))
    milter.set_envrcpt_callback(lambda ctx, *b: ctx.getpriv().envrcpt_bytes(*b))
    milter.set_header_callback(lambda ctx, f, v: ctx.getpriv().header_bytes(f, v))
    milter.set_eoh_callback(lambda ctx: ctx.getpriv().eoh())
    milter.set_body_callback(lambda ctx, chunk: ctx.getpriv().body(chunk))
    milter.set_eom_callback(lambda ctx: ctx.getpriv().eom())
    milter.set_abort_callback(lambda ctx: ctx.getpriv().abort())
    milter.set_close_callback(Milter.close_callback)
    milter.register(
        "ipv6milter",
        data=lambda ctx: ctx.getpriv().data(),
        unknown=lambda ctx, cmd: ctx.getpriv().unknown(cmd),
        negotiate=Milter.negotiate_callback,
    )


class Worker:
    """One process serving the shared socket (the child side of a fork).

    Constructed in the child with every signal still blocked, before any
    thread starts: the engine (and whatever it starts) inherits that.
    """

    def __init__(self, cfg: Config, number: int, pipe: int):
        from .engine import Engine

        self.number = number
        self.pipe = Receiver(pipe)
        limit_malloc_arenas()
        self.engine = Engine(cfg, isolate=True)
        self.failure: str | None = None

    def reload(self, cfg: Config) -> None:
        setup_logging(cfg)
        self.engine.reload(cfg)
        log.info("worker %d (pid %d) uses the new configuration %s", self.number,
                 os.getpid(), config_hash(cfg))

    def _on_stop(self, signum: int, frame: object) -> None:
        import milter

        milter.stop()

    def _main_loop(self, ended: int) -> None:
        import milter

        # Blocked in this thread before libmilter starts any: its signal
        # thread, connection threads and our DNS pool all inherit the mask.
        signal.pthread_sigmask(signal.SIG_BLOCK, ALL)
        try:
            milter.main()
        except milter.error as e:
            self.failure = str(e)
        finally:
            os.close(ended)  # wakes the main thread

    def run(self) -> int:
        import Milter

        from .milter import Ipv6Milter

        for sig in STOP:
            signal.signal(sig, self._on_stop)
        Milter.factory = partial(Ipv6Milter, self.engine)
        ended_r, ended_w = os.pipe2(os.O_CLOEXEC)
        loop = threading.Thread(target=self._main_loop, args=(ended_w,), name="libmilter")
        loop.start()
        # Blocked since the fork; from now on this thread, and only this one,
        # takes them (its handlers run here, between selects).
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP)
        log.debug("worker %d (pid %d) serving", self.number, os.getpid())
        try:
            self._serve_pipe(ended_r)
            loop.join()
        finally:
            os.close(ended_r)
            self.engine.shutdown()
        if self.failure:
            log.error("worker %d: milter main loop failed: %s", self.number, self.failure)
            return 1
        return 0

    def _serve_pipe(self, ended: int) -> None:
        """New configurations from the supervisor, until libmilter's loop ends."""
        sel = selectors.DefaultSelector()
        sel.register(ended, selectors.EVENT_READ)
        sel.register(self.pipe.fd, selectors.EVENT_READ)
        with sel:
            while True:
                for key, _ in sel.select():
                    if key.fd == ended:
                        return
                    configs = self.pipe.read()
                    if configs is None:
                        # The supervisor is gone (its death signal kills us too).
                        sel.unregister(self.pipe.fd)
                    elif configs:
                        self.reload(configs[-1])
