"""The supervisor (the parent): workers started, replaced, signalled and stopped; reload.

The supervisor binds the socket once (``listener``, before privileges are
dropped), checks what ``UserID`` can do (``privileges``), then forks the
workers (``worker``) and, with ``MetricsListen``, the metrics server
(``metricsserver``).  It starts no thread at all (libmilter's signal thread,
the DNS pool, an HTTP server are all started in the children, after the
fork): it only replaces a child that dies, reloads, and at a clean stop
stops the children and removes the unix socket, the pid file and the
metrics directory, once.

Signals here only set flags that the loop acts on (the supervisor has no
libmilter thread to race with): SIGHUP or SIGUSR1 reload, SIGTERM or SIGINT
stop, SIGCHLD reaps.  A reload is checked once, here -- the file parsed, and
with ``UserID`` read again as that user -- and the ``Config`` that passed is
what every child runs: it goes down each child's pipe (``configpipe``), and a
child forked later is forked with it.  No child is ever sent SIGHUP.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import selectors
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

from . import __version__, config, privileges
from .cli import load, setup_logging
from .config import Config, ConfigError
from .configpipe import Sender
from .listener import Listener, open_socket
from .metricsserver import MetricsEndpoint, MetricsServer
from .pidfile import remove_pid_file, write_pid_file
from .worker import ALL, Worker, ignore_reload_signals, register_callbacks

log = logging.getLogger("ipv6milter")

_RELOAD = {signal.SIGHUP, signal.SIGUSR1}
_STOP = {signal.SIGTERM, signal.SIGINT}
# A worker that dies sooner than this after its start counts as failing at
# once; the next start then waits (0.5 s, doubling, at most 30 s), and after
# this many such deaths in a row the milter gives up (systemd restarts it).
_QUICK_DEATH = 5.0
_MAX_QUICK_DEATHS = 8
_STOP_GRACE = 15.0
# Changing these takes a restart: the socket, the ids and the number of
# processes are fixed at the start.
_AT_START = ("socket", "user_id", "umask", "pid_file", "metrics_listen", "workers")


def workers_wanted(cfg: Config) -> int:
    """``Workers``, with ``auto`` as one per CPU this process may run on."""
    if cfg.workers:
        return cfg.workers
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except OSError:
        return max(1, os.cpu_count() or 1)


@dataclass
class _Slot:
    number: int  # 1..Workers; 0 is the metrics server
    pid: int | None = None
    started: float = 0.0
    quick_deaths: int = 0
    due: float = 0.0  # when to start the next one
    pipe: Sender | None = None  # the configurations it is sent

    @property
    def name(self) -> str:
        return f"worker {self.number}" if self.number else "metrics server"


class Supervisor:
    """The running milter: binds, supervises the children, reloads.

    With ``UserID`` and started as root, the supervisor stays root and runs
    nothing else: no thread, no socket it reads from, no message, nothing
    from the network (the master-process model of Postfix and nginx); every
    process that handles input -- the workers, the metrics server -- switches
    to ``UserID`` right after its fork.  Root is kept for one reason: to
    remove the pid file and the unix socket at a clean stop wherever they
    are (a /run that only root may write, a socket directory of root's).
    """

    def __init__(self, path: str | None, cfg: Config):
        self.path = path
        self.cfg = cfg
        self.failure: str | None = None
        self.slots: list[_Slot] = []
        self.metrics_slot: _Slot | None = None
        self.endpoint = MetricsEndpoint()
        self.pid = os.getpid()
        self._flags: set[int] = set()
        self._listener: Listener | None = None
        self._wake: tuple[int, int] | None = None
        self._ids: tuple[int, int] | None = None  # UserID's uid and gid, when switching

    def _on_signal(self, signum: int, frame: object) -> None:
        self._flags.add(signum)

    # -- the start ----------------------------------------------------------------------
    def run(self) -> int:
        import Milter
        import milter

        from .preflight import Preflight, PreflightError

        cfg = self.cfg
        # Handlers first: a SIGHUP must never find the default action (exit)
        # once the socket is open.
        for sig in _STOP | _RELOAD | {signal.SIGCHLD}:
            signal.signal(sig, self._on_signal)
        # Everything loaded now, while every file can be read (see preflight),
        # our own modules included: the workers import nothing after the switch.
        for name in (".engine", ".milter"):
            importlib.import_module(name, __package__)
        try:
            preflight = Preflight()
            preflight.judge(cfg)
        except PreflightError as e:
            log.error("the milter cannot judge a message: %s", e)
            return 1
        if cfg.user_id:
            try:
                self._ids = privileges.user_ids(cfg.user_id)
            except KeyError as e:
                log.error("cannot switch to UserID %s: %s", cfg.user_id, e)
                return 1
        elif os.geteuid() == 0:
            log.warning("running as root: set UserID, or start as an unprivileged user")
        # A bug that escapes our own guard defers the message, never accepts it.
        Milter.set_exception_policy(Milter.TEMPFAIL)
        register_callbacks(milter, Milter)
        self._listener = open_socket(milter, cfg, self._ids)
        if self._listener is None:
            return 1
        try:
            return self._serve(preflight)
        finally:
            self._cleanup()

    def _serve(self, preflight: Any) -> int:
        cfg = self.cfg
        if cfg.pid_file:
            try:
                write_pid_file(cfg.pid_file, self.pid)
            except OSError as e:
                log.error("cannot write PidFile %s: %s", cfg.pid_file, e.strerror or e)
                return 1
        # Bound before privileges are dropped, as the milter socket is.
        if not self.endpoint.bind(cfg, self._ids):
            return 1
        if self._ids:
            checked = privileges.check_start(cfg, self._ids, preflight, self.endpoint.directory)
            if checked is None:
                return 1
            self.endpoint.discard(checked)  # what the check counted is not the milter's work
        n = workers_wanted(cfg)
        self.slots = [_Slot(i + 1) for i in range(n)]
        if self.endpoint.listener is not None:
            self.metrics_slot = _Slot(0)
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._wake = (r, w)
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        for slot in self._all_slots():
            self._spawn(slot)
        log.info(
            "ipv6milter %s listening on %s (mode %s, AcceptDomains %s, %d worker%s)",
            __version__, cfg.socket, cfg.mode, cfg.accept_domains, n, "" if n == 1 else "s",
        )
        self._loop()
        self._stop_children()
        if self.failure:
            log.error("%s", self.failure)
            return 1
        log.info("stopped")
        return 0

    def _all_slots(self) -> list[_Slot]:
        return self.slots + ([self.metrics_slot] if self.metrics_slot else [])

    # -- the children -------------------------------------------------------------------
    def _spawn(self, slot: _Slot) -> None:
        if threading.active_count() != 1:
            log.warning("forking with %d threads running", threading.active_count())
        privileges.flush_logs()
        r, w = os.pipe2(os.O_CLOEXEC)
        # The child starts with these blocked: a SIGTERM sent to a new child
        # is never taken by the handler it inherited from us and lost, and a
        # SIGHUP waits until the child ignores it (which discards it).
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, ALL)
        pid = os.fork()
        if pid != 0:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        if pid == 0:  # the child
            code = 70
            try:
                os.close(w)
                code = self._child(slot, r)
            except BaseException:
                log.exception("%s failed", slot.name)
            finally:
                privileges.flush_logs()
                # Never back into the parent's code; and no exit handler may
                # touch what the parent still owns.
                os._exit(code)
        os.close(r)
        slot.pid = pid
        slot.started = time.monotonic()
        slot.pipe = Sender(w)

    def _child(self, slot: _Slot, pipe: int) -> int:
        ignore_reload_signals()  # first of all (see the worker module)
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        # Only the supervisor writes to a child's pipe.
        for fd in [*(self._wake or ()), *(s.pipe.fd for s in self._all_slots() if s.pipe)]:
            os.close(fd)
        privileges.switch_user(self._ids, self.pid)
        endpoint = self.endpoint
        if slot.number == 0:
            privileges.set_process_name("ipv6milter-metr")
            assert endpoint.listener is not None and endpoint.directory is not None
            return MetricsServer(self.cfg, endpoint.listener, endpoint.directory, pipe).run()
        if endpoint.listener is not None:
            endpoint.listener.close()
        privileges.set_process_name(f"ipv6milter-w{slot.number}")
        return Worker(self.cfg, slot.number, pipe).run()

    def _loop(self) -> None:
        assert self._wake is not None
        sel = selectors.DefaultSelector()
        sel.register(self._wake[0], selectors.EVENT_READ)
        while True:
            flags, self._flags = self._flags, set()
            if flags & _STOP:
                log.info("%s received, stopping", signal.Signals(min(flags & _STOP)).name)
                return
            self._reap()
            if self.failure:
                return
            if flags & _RELOAD:
                self.reload()
            now = time.monotonic()
            for slot in self._all_slots():
                if slot.pid is None and slot.due <= now:
                    self._spawn(slot)
            waiting = [s.due - now for s in self._all_slots() if s.pid is None]
            timeout = max(0.0, min(waiting)) if waiting else None
            # A configuration a child has not taken in whole yet: go on when it can.
            writing = [s.pipe for s in self._all_slots() if s.pipe and s.pipe.pending]
            for pipe in writing:
                sel.register(pipe.fd, selectors.EVENT_WRITE, pipe)
            for key, _ in sel.select(timeout):
                if key.data is None:
                    with contextlib.suppress(OSError):
                        while os.read(self._wake[0], 512):
                            pass
                else:
                    key.data.flush()
            for pipe in writing:
                sel.unregister(pipe.fd)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.endpoint.forget(pid)
            slot = next((s for s in self._all_slots() if s.pid == pid), None)
            if slot is None:
                continue
            slot.pid = None
            if slot.pipe is not None:
                slot.pipe.close()
                slot.pipe = None
            lived = time.monotonic() - slot.started
            how = (f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
                   if os.WIFSIGNALED(status) else f"exited with status {os.WEXITSTATUS(status)}")
            slot.quick_deaths = slot.quick_deaths + 1 if lived < _QUICK_DEATH else 0
            if slot.quick_deaths >= _MAX_QUICK_DEATHS:
                self.failure = (f"{slot.name} {how} {slot.quick_deaths} times in a row "
                                f"right after its start; giving up")
                return
            delay = 0.0 if slot.quick_deaths == 0 else min(30.0, 0.5 * 2 ** (slot.quick_deaths - 1))
            slot.due = time.monotonic() + delay
            log.warning("%s (pid %d) %s after %.1f s; starting another%s", slot.name,
                        pid, how, lived, f" in {delay:g} s" if delay else "")

    # -- reload -------------------------------------------------------------------------
    def _refuse(self, errors: list[str]) -> None:
        for line in errors:
            log.error("reload failed, keeping the running configuration: %s", line)
        self.endpoint.metrics.reloads.labels("failed").inc()

    def reload(self) -> None:
        old = self.cfg
        try:
            new = load(self.path)
        except ConfigError as e:
            self._refuse(e.errors)
            return
        if self._ids:
            # What the workers' own user cannot read is no configuration of theirs
            # (SPEC §3), even though they are handed it rather than reading it.
            errors = privileges.check_reload(self.path, old.user_id or "", self._ids)
            if errors:
                self._refuse(errors)
                return
        restart_only = [k.name for k in config.KEYS
                        if k.attr in _AT_START and getattr(new, k.attr) != getattr(old, k.attr)]
        if restart_only:
            log.warning("reload: %s change(s) need a restart to apply", ", ".join(restart_only))
        setup_logging(new)
        self.cfg = new  # what a child started from now on is forked with
        self.endpoint.metrics.loaded(new)
        self.endpoint.metrics.reloads.labels("ok").inc()
        log.info("configuration reloaded from %s", new.source or "built-in defaults")
        for slot in self._all_slots():
            if slot.pipe is not None:
                slot.pipe.send(new)

    # -- the stop -----------------------------------------------------------------------
    def _stop_children(self) -> None:
        _stop(self._all_slots())

    def _cleanup(self) -> None:
        signal.set_wakeup_fd(-1)
        for slot in self._all_slots():
            if slot.pipe is not None:
                slot.pipe.close()
                slot.pipe = None
        if self._listener is not None:
            self._listener.remove()
        if self.cfg.pid_file:
            remove_pid_file(self.cfg.pid_file, self.pid)
        self.endpoint.remove()


def _stop(slots: list[_Slot]) -> None:
    """SIGTERM to every child; SIGKILL to any still there after the grace time."""
    for slot in slots:
        if slot.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(slot.pid, signal.SIGTERM)
    deadline = time.monotonic() + _STOP_GRACE
    killed = False
    while True:
        while True:
            try:
                pid, _status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                pid = 0
                for slot in slots:
                    slot.pid = None
            if pid == 0:
                break
            for slot in slots:
                if slot.pid == pid:
                    slot.pid = None
        live = [s for s in slots if s.pid is not None]
        if not live:
            return
        if not killed and time.monotonic() > deadline:
            for slot in live:
                log.warning("%s (pid %d) did not stop; killing it", slot.name, slot.pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.pid, signal.SIGKILL)  # type: ignore[arg-type]
            killed = True
        time.sleep(0.02)  # SIGCHLD would wake a select; a short poll is as good here
