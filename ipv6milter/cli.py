"""``ipv6milter``: run the milter in the foreground, or check a configuration.

The only module that starts libmilter.

Processes (``Workers``).  The parent binds the socket once (libmilter's
``opensocket``, before privileges are dropped), then forks the workers;
each runs libmilter's main loop on the inherited listening socket, so the
kernel hands every MTA connection to one of them, and inside a worker
libmilter runs one thread per connection as before.  The parent starts no
thread at all (libmilter's signal thread, the DNS pool, an HTTP server are
all started in the workers, after the fork): it only forwards signals,
replaces a worker that dies, serves ``/metrics`` summed over all workers,
and at a clean stop removes the unix socket and the pid file, once.  The
listening socket is non-blocking: every worker's poll() wakes on a new
connection, one accept() wins and the others get EAGAIN and poll again
(with a blocking socket they would sleep in accept() and not see a stop).

libmilter removes a unix socket's path when its main loop ends (if it runs
as a user other than root).  A worker that stops must not take the path away
from the others, so the socket is bound at a private name and renamed into
place: libmilter only knows the private name, which no longer exists.

Signals.  libmilter starts a thread of its own that ``sigwait``s for SIGHUP,
SIGTERM and SIGINT and *stops the milter* on any of them, SIGHUP included.
A kill(2) aimed at the process goes to the main thread whenever the main
thread does not block the signal (Linux looks there first), so in a worker
libmilter's main loop runs in a second thread, every thread but the main one
blocks the three signals, and the main thread stays in Python where its
handlers run: SIGHUP/SIGUSR1 reload, SIGTERM/SIGINT ask libmilter to stop.
While a handler runs the kernel would block its signal in the main thread and
hand the next one to libmilter's thread, so the handlers are installed with
SA_NODEFER.  The parent has no libmilter thread: its handlers only set flags
that its loop acts on (reload checked once, then forwarded; stop forwarded).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import errno
import grp
import http.server
import importlib
import logging
import logging.handlers
import os
import pwd
import selectors
import signal
import socket
import stat
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

from . import __version__, config
from .config import Config, ConfigError

log = logging.getLogger("ipv6milter")

_SIGNALS = {signal.SIGHUP, signal.SIGTERM, signal.SIGINT}
_RELOAD = {signal.SIGHUP, signal.SIGUSR1}
_STOP = {signal.SIGTERM, signal.SIGINT}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ipv6milter",
        description="Milter for the anonymous-inbound-email-over-IPv6 policy.",
    )
    p.add_argument(
        "-c", "--config", metavar="FILE", help=f"configuration file (default {config.DEFAULT_PATH})"
    )
    p.add_argument(
        "-n", "--check-config", action="store_true", help="check the configuration and exit"
    )
    p.add_argument("--self-test", action="store_true",
                   help="check the resolvers, the socket and AuthservID, then exit")
    p.add_argument("--version", action="version", version=f"ipv6milter {__version__}")
    return p


def setup_logging(cfg: Config) -> None:
    level = getattr(logging, cfg.log_level.upper())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(stderr)
    if cfg.syslog:
        try:
            sh = logging.handlers.SysLogHandler(
                "/dev/log", facility=logging.handlers.SysLogHandler.LOG_MAIL
            )
        except OSError as e:
            log.warning("Syslog yes, but /dev/log is not usable: %s", e)
        else:
            sh.setFormatter(logging.Formatter("ipv6milter[%(process)d]: %(message)s"))
            root.addHandler(sh)
    root.setLevel(level)


def load(path: str | None) -> Config:
    return config.load(path, default_if_missing=path is None)


def check_config(path: str | None) -> int:
    try:
        cfg = load(path)
    except ConfigError as e:
        for line in e.errors:
            print(line, file=sys.stderr)
        return 1
    print(f"{cfg.source or 'built-in defaults'}: configuration OK")
    for line in config.describe(cfg):
        print(f"  {line}")
    return 0


class _Sigaction(ctypes.Structure):
    # glibc's struct sigaction on Linux (x86_64, aarch64): handler, 1024-bit
    # mask, flags, restorer.
    _fields_ = (
        ("sa_handler", ctypes.c_void_p),
        ("sa_mask", ctypes.c_ulong * (1024 // (8 * ctypes.sizeof(ctypes.c_ulong)))),
        ("sa_flags", ctypes.c_int),
        ("sa_restorer", ctypes.c_void_p),
    )


_SA_NODEFER = 0x40000000


def _no_defer(sig: int) -> bool:
    """Add SA_NODEFER to the handler Python installed for ``sig``."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        action = _Sigaction()
        if libc.sigaction(sig, None, ctypes.byref(action)) != 0:
            return False
        action.sa_flags |= _SA_NODEFER
        return libc.sigaction(sig, ctypes.byref(action), None) == 0
    except (OSError, AttributeError):
        return False


_M_ARENA_MAX = -8


def _limit_malloc_arenas(arenas: int = 2) -> None:
    """glibc gives each thread that allocates a malloc arena of its own and
    keeps their free memory: with libmilter's thread per connection that
    grows the resident size to about twice what a few arenas hold (measured
    in docs/performance.md).  Set before any thread starts."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.mallopt(_M_ARENA_MAX, arenas)
    except (OSError, AttributeError):
        log.debug("mallopt not available; malloc arenas not limited")


# -- the listening socket -------------------------------------------------------------


def _find_listener(spec: str, bind_path: str | None = None) -> socket.socket | None:
    """libmilter's listening socket, found among our descriptors (it does not expose
    it): an inet socket by its port, a unix one by the name it was bound at.
    The caller closes the returned duplicate."""
    if spec.startswith("unix:"):
        families: tuple[socket.AddressFamily, ...] = (socket.AF_UNIX,)
        want: object = bind_path or spec[5:]
    else:
        families = (socket.AF_INET6, socket.AF_INET)
        want = int(spec.split(":", 1)[1].split("@", 1)[0])
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            for family in families:
                try:
                    s = socket.socket(family, socket.SOCK_STREAM, fileno=os.dup(fd))
                except OSError:
                    continue
                if s.family in families and s.getsockopt(
                        socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                    where = s.getsockname()
                    if (where if s.family == socket.AF_UNIX else where[1]) == want:
                        return s
                s.close()
                break
        except OSError:
            continue
    return None


def _no_delay(spec: str) -> None:
    """TCP_NODELAY on libmilter's listening socket (accepted ones inherit it).

    libmilter writes each reply in small pieces; with Nagle's algorithm meeting
    the MTA's delayed ACKs every message stalls tens of milliseconds on an
    inet socket.
    """
    s = _find_listener(spec)
    if s is None:
        log.debug("listening socket for %s not found; TCP_NODELAY not set", spec)
        return
    with s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _non_blocking(spec: str, bind_path: str | None) -> bool:
    """O_NONBLOCK on the shared listening socket (see the module's docstring).
    Linux does not pass the flag on to accepted sockets."""
    s = _find_listener(spec, bind_path)
    if s is None:
        return False
    with s:
        s.setblocking(False)  # a flag of the open file, shared with libmilter's descriptor
    return True


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _user_ids(user_id: str) -> tuple[int, int]:
    user, _, group = user_id.partition(":")
    pw = pwd.getpwnam(user)
    gid = grp.getgrnam(group).gr_gid if group else pw.pw_gid
    return pw.pw_uid, gid


def write_pid_file(path: str, pid: int) -> None:
    """Write ``pid`` to ``path``, never through a symbolic link.

    The milter still runs as root here and the directory may belong to the
    ``UserID`` user: O_NOFOLLOW refuses a symbolic link planted at the name
    (ELOOP), and the file is truncated only once it is known to be a regular
    file with no other name (not a hard link to someone else's file; not a
    FIFO, which O_NONBLOCK keeps from blocking the open).
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise OSError(e.errno, "is a symbolic link; refusing to write through it") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            raise OSError(errno.EPERM, "not a regular file with a single name")
        os.ftruncate(fd, 0)
        os.write(fd, f"{pid}\n".encode())
    finally:
        os.close(fd)


def remove_pid_file(path: str, pid: int) -> None:
    """Remove the pid file if it still names us (a second instance may own it now)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            text = os.read(fd, 64)
        finally:
            os.close(fd)
        if text.strip() == str(pid).encode():
            os.unlink(path)
    except OSError as e:
        if e.errno != errno.ENOENT:
            log.warning("cannot remove PidFile %s: %s", path, e.strerror)


def workers_wanted(cfg: Config) -> int:
    """``Workers``, with ``auto`` as one per CPU this process may run on."""
    if cfg.workers:
        return cfg.workers
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except OSError:
        return max(1, os.cpu_count() or 1)


# -- prctl ----------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15


def _prctl(option: int, arg: int | bytes) -> None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(option, arg, 0, 0, 0)
    except (OSError, AttributeError):
        log.debug("prctl(%d) not available", option)


# -- a worker -------------------------------------------------------------------------


class Worker:
    """One process serving the shared socket (the child side of a fork)."""

    def __init__(self, path: str | None, cfg: Config, number: int):
        from .engine import Engine

        self.path = path
        self.number = number
        self.engine = Engine(cfg, isolate=True)
        self.failure: str | None = None

    def reload(self) -> None:
        try:
            new = load(self.path)
        except ConfigError as e:
            # The parent checked the file; it changed again since.
            for line in e.errors:
                log.error("worker %d: reload failed, keeping the running configuration: %s",
                          self.number, line)
            return
        setup_logging(new)
        self.engine.reload(new)
        log.info("worker %d (pid %d) uses the new configuration %s", self.number,
                 os.getpid(), _digest(new))

    def _on_signal(self, signum: int, frame: object) -> None:
        if signum in _RELOAD:
            self.reload()
            return
        import milter

        milter.stop()

    def _main_loop(self) -> None:
        import milter

        # Blocked in this thread before libmilter starts any: its signal thread,
        # connection threads and our DNS pool all inherit the mask, so only
        # the main thread (and threads started from it) ever take a signal.
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS | _RELOAD)
        try:
            milter.main()
        except milter.error as e:
            self.failure = str(e)

    def run(self) -> int:
        import Milter

        from .milter import Ipv6Milter

        for sig in _SIGNALS | _RELOAD:
            signal.signal(sig, self._on_signal)
            _no_defer(sig)
        Milter.factory = partial(Ipv6Milter, self.engine)
        loop = threading.Thread(target=self._main_loop, name="libmilter")
        loop.start()
        # Blocked since the fork (see Daemon._spawn); from now on this thread,
        # and only this one, takes them.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS | _RELOAD)
        log.debug("worker %d (pid %d) serving", self.number, os.getpid())
        try:
            while loop.is_alive():
                loop.join()  # interrupted by each signal; its handler runs here
        finally:
            self.engine.shutdown()
        if self.failure:
            log.error("worker %d: milter main loop failed: %s", self.number, self.failure)
            return 1
        return 0


def _digest(cfg: Config) -> str:
    from .metrics import config_hash

    return config_hash(cfg)


# -- the parent -----------------------------------------------------------------------

# A worker that dies sooner than this after its start counts as failing at
# once; the next start then waits (0.5 s, doubling, at most 30 s), and after
# this many such deaths in a row the milter gives up (systemd restarts it).
_QUICK_DEATH = 5.0
_MAX_QUICK_DEATHS = 8
_STOP_GRACE = 15.0


@dataclass
class _Slot:
    number: int  # 1..Workers; 0 is the metrics server
    pid: int | None = None
    started: float = 0.0
    quick_deaths: int = 0
    due: float = 0.0  # when to start the next one

    @property
    def name(self) -> str:
        return f"worker {self.number}" if self.number else "metrics server"


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


class _MetricsServer:
    """The process that serves ``/metrics``: every process's counts summed.

    A process of its own, running as ``UserID``: the parent stays free of
    threads and of network input, and a worker busy with a hostile message
    does not hold up a scrape.
    """

    def __init__(self, path: str | None, cfg: Config, listener: socket.socket, directory: str):
        from .metrics import aggregate_registry

        self.path = path
        self.cfg = cfg
        self.listener = listener
        self.registry = aggregate_registry(directory, lambda: self.cfg)

    def _on_signal(self, signum: int, frame: object) -> None:
        if signum in _RELOAD:
            with contextlib.suppress(ConfigError):
                self.cfg = load(self.path)  # the parent checked it; only the digest matters
            return
        raise SystemExit(0)

    def run(self) -> int:
        for sig in _SIGNALS | _RELOAD:
            signal.signal(sig, self._on_signal)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS | _RELOAD)
        self.listener.setblocking(True)
        with contextlib.suppress(SystemExit):
            while True:
                try:
                    conn, addr = self.listener.accept()
                except OSError:
                    continue
                try:
                    _MetricsHandler(conn, addr, self)
                except OSError as e:
                    log.debug("metrics request from %s: %s", addr, e)
                finally:
                    conn.close()
        return 0


_EX_PREFLIGHT = 78  # a child that cannot judge a message after the switch


class Daemon:
    """The running milter: binds, supervises the workers.

    With ``UserID`` and started as root, the parent stays root and runs
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
        self.metrics_dir: str | None = None
        # Held open: the directory belongs to UserID once chowned, and its path
        # in /tmp could be swapped for a symbolic link; root only ever works
        # on the entries of this very directory (os.unlink(name, dir_fd=...)).
        self._metrics_fd: int | None = None
        self.metrics: Any = None
        self.pid = os.getpid()
        self._flags: set[int] = set()
        self._socket_path: str | None = None
        self._socket_id: tuple[int, int] | None = None
        self._http: socket.socket | None = None
        self._wake: tuple[int, int] | None = None
        self._ids: tuple[int, int] | None = None  # UserID's uid and gid, when switching

    # -- signals: flags only; the loop acts on them
    def _on_signal(self, signum: int, frame: object) -> None:
        self._flags.add(signum)

    # -- start
    def _open_socket(self, milter: Any) -> bool:
        cfg = self.cfg
        spec = cfg.socket
        bind_path = None
        if spec.startswith("unix:"):
            path = spec[5:]
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                pass
            except OSError as e:
                log.error("cannot open socket %s: %s", spec, e.strerror)
                return False
            else:
                if not stat.S_ISSOCK(st.st_mode):
                    log.error("cannot open socket %s: %s exists and is not a socket", spec, path)
                    return False
            bind_path = os.path.join(os.path.dirname(path), f".ipv6milter.{os.getpid()}")
            milter.setconn(f"unix:{bind_path}")
        else:
            milter.setconn(spec)
        old_umask = os.umask(cfg.umask)
        try:
            deadline = time.monotonic() + 5
            while True:
                try:
                    milter.opensocket(True)
                    break
                except milter.error as e:
                    # The workers of an instance just killed may hold the port
                    # for a few more milliseconds.
                    if time.monotonic() < deadline and _port_busy(spec):
                        time.sleep(0.05)
                        continue
                    log.error("cannot open socket %s: %s", spec, e)
                    return False
        finally:
            os.umask(old_umask)
        if bind_path is not None:
            path = spec[5:]
            try:
                if self._ids:
                    # SPEC §4: owned by UserID's user and group, so an MTA in
                    # the group can connect (UMask 007 leaves it rw for them).
                    os.chown(bind_path, *self._ids, follow_symlinks=False)
                os.rename(bind_path, path)
                st = os.lstat(path)
            except OSError as e:
                with contextlib.suppress(OSError):
                    os.unlink(bind_path)
                log.error("cannot open socket %s: %s", spec, e)
                return False
            self._socket_path = path
            self._socket_id = (st.st_dev, st.st_ino)
        if not _non_blocking(spec, bind_path):
            log.warning("listening socket for %s not found: workers may be slow to stop", spec)
        if spec.startswith("inet"):
            _no_delay(spec)
        return True

    def _open_metrics(self) -> bool:
        from .metrics import Metrics, enable_multiprocess

        if self.cfg.metrics_listen:
            host, port = self.cfg.metrics_listen
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
            self._http = s
            # Private to this run: every process counts into its own files here.
            self.metrics_dir = tempfile.mkdtemp(prefix="ipv6milter-metrics.")
            self._metrics_fd = os.open(self.metrics_dir,
                                       os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            if self._ids:
                os.chown(self._metrics_fd, *self._ids)
            enable_multiprocess(self.metrics_dir)
            log.info("metrics on http://%s/metrics", _hostport(host, port))
        # The parent's own counts (reloads), in files the metrics server, running
        # as UserID, must be able to read whatever the umask.
        old_umask = os.umask(0o022)
        try:
            self.metrics = Metrics()
            self.metrics.loaded(self.cfg)
        finally:
            os.umask(old_umask)
        return True

    def run(self) -> int:
        import Milter
        import milter

        from .preflight import Preflight, PreflightError

        cfg = self.cfg
        # Handlers first: a SIGHUP must never find the default action (exit)
        # once the socket is open.
        for sig in _SIGNALS | _RELOAD | {signal.SIGCHLD}:
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
                self._ids = _user_ids(cfg.user_id)
            except KeyError as e:
                log.error("cannot switch to UserID %s: %s", cfg.user_id, e)
                return 1
        elif os.geteuid() == 0:
            log.warning("running as root: set UserID, or start as an unprivileged user")
        # A bug that escapes our own guard defers the message, never accepts it.
        Milter.set_exception_policy(Milter.TEMPFAIL)
        _register(milter, Milter)
        if not self._open_socket(milter):
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
        if not self._open_metrics():
            return 1
        if self._ids and not self._probe(preflight):
            return 1
        n = workers_wanted(cfg)
        self.slots = [_Slot(i + 1) for i in range(n)]
        if self._http is not None:
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

    def _switch_user(self) -> None:
        """In a child: UserID's ids, every one of them; then die with the parent
        (the parent-death signal is cleared by a change of ids, so set after it)."""
        if self._ids:
            uid, gid = self._ids
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != self.pid:
            os._exit(1)  # the parent is already gone

    def _probe(self, preflight: Any) -> bool:
        """Before any worker: one child switches to UserID and judges a message."""
        from .preflight import PreflightError

        pid = os.fork()
        if pid == 0:
            code = _EX_PREFLIGHT
            try:
                self._switch_user()
                if self.metrics_dir:
                    # The workers count into files here, as this user.
                    probe = os.path.join(self.metrics_dir, f"probe_{os.getpid()}.db")
                    try:
                        with open(probe, "xb"):
                            pass
                        os.unlink(probe)
                    except OSError as e:
                        log.error("UserID %s cannot write the metrics directory %s (%s): set "
                                  "TMPDIR to a directory that user can reach",
                                  self.cfg.user_id, self.metrics_dir, e.strerror)
                        raise SystemExit from None
                preflight.judge(self.cfg)
                code = 0
            except PreflightError as e:
                log.error("after switching to UserID %s the milter cannot judge a message "
                          "(%s): can that user read the installed package?", self.cfg.user_id, e)
            except OSError as e:
                log.error("cannot switch to UserID %s: %s", self.cfg.user_id, e)
            except SystemExit:
                pass
            finally:
                _flush_logs()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        if self._metrics_fd is not None:
            # What the check counted is not the milter's work.
            for name in os.listdir(self._metrics_fd):
                if name.endswith(f"_{pid}.db"):
                    os.unlink(name, dir_fd=self._metrics_fd)
        if not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0):
            if os.WIFSIGNALED(status):
                log.error("the check as UserID %s was killed by %s", self.cfg.user_id,
                          signal.Signals(os.WTERMSIG(status)).name)
            return False
        uid, gid = self._ids  # type: ignore[misc]
        log.info("workers running as %s (uid %d, gid %d)",
                 self.cfg.user_id.partition(":")[0], uid, gid)  # type: ignore[union-attr]
        return True

    def _spawn(self, slot: _Slot) -> None:
        if threading.active_count() != 1:
            log.warning("forking with %d threads running", threading.active_count())
        _flush_logs()
        # The child starts with our signals blocked and unblocks them once its
        # own handlers are in place: a SIGTERM sent to a new worker is never
        # taken by the parent's handler it inherited, and lost.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS | _RELOAD)
        pid = os.fork()
        if pid != 0:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        if pid == 0:  # the child
            code = 70
            try:
                code = self._child(slot)
            except BaseException:
                log.exception("%s failed", slot.name)
            finally:
                _flush_logs()
                # Never back into the parent's code; and no exit handler may
                # touch what the parent still owns.
                os._exit(code)
        slot.pid = pid
        slot.started = time.monotonic()

    def _child(self, slot: _Slot) -> int:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        if self._wake is not None:
            for fd in self._wake:
                os.close(fd)
        self._switch_user()
        if slot.number == 0:
            _prctl(_PR_SET_NAME, b"ipv6milter-metr")
            assert self._http is not None and self.metrics_dir is not None
            return _MetricsServer(self.path, self.cfg, self._http, self.metrics_dir).run()
        if self._http is not None:
            self._http.close()
        _prctl(_PR_SET_NAME, f"ipv6milter-w{slot.number}".encode())
        return Worker(self.path, self.cfg, slot.number).run()

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
            if sel.select(timeout):
                with contextlib.suppress(OSError):
                    while os.read(self._wake[0], 512):
                        pass

    def _reap(self) -> None:
        from .metrics import process_dead

        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self._metrics_fd is not None:
                process_dead(pid, self._metrics_fd)
            slot = next((s for s in self._all_slots() if s.pid == pid), None)
            if slot is None:
                continue
            slot.pid = None
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

    def reload(self) -> None:
        old = self.cfg
        try:
            new = load(self.path)
        except ConfigError as e:
            for line in e.errors:
                log.error("reload failed, keeping the running configuration: %s", line)
            self.metrics.reloads.labels("failed").inc()
            return
        restart_only = [
            k.name
            for k in config.KEYS
            if k.attr in ("socket", "user_id", "umask", "pid_file", "metrics_listen", "workers")
            and getattr(new, k.attr) != getattr(old, k.attr)
        ]
        if restart_only:
            log.warning("reload: %s change(s) need a restart to apply", ", ".join(restart_only))
        setup_logging(new)
        self.cfg = new
        self.metrics.loaded(new)
        self.metrics.reloads.labels("ok").inc()
        log.info("configuration reloaded from %s", new.source or "built-in defaults")
        for slot in self._all_slots():
            if slot.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.pid, signal.SIGHUP)

    def _stop_children(self) -> None:
        """SIGTERM to every child; SIGKILL to any still there after the grace time."""
        for slot in self._all_slots():
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
                    for slot in self._all_slots():
                        slot.pid = None
                if pid == 0:
                    break
                for slot in self._all_slots():
                    if slot.pid == pid:
                        slot.pid = None
            live = [s for s in self._all_slots() if s.pid is not None]
            if not live:
                return
            if not killed and time.monotonic() > deadline:
                for slot in live:
                    log.warning("%s (pid %d) did not stop; killing it", slot.name, slot.pid)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(slot.pid, signal.SIGKILL)  # type: ignore[arg-type]
                killed = True
            time.sleep(0.02)  # SIGCHLD would wake a select; a short poll is as good here

    def _cleanup(self) -> None:
        signal.set_wakeup_fd(-1)
        if self._socket_path and self._socket_id:
            try:
                st = os.lstat(self._socket_path)
                if (st.st_dev, st.st_ino) == self._socket_id:
                    os.unlink(self._socket_path)
            except OSError as e:
                if e.errno != errno.ENOENT:
                    log.warning("cannot remove socket %s: %s", self._socket_path, e.strerror)
        if self.cfg.pid_file:
            remove_pid_file(self.cfg.pid_file, self.pid)
        if self.metrics_dir and self._metrics_fd is not None:
            with contextlib.suppress(OSError):
                for name in os.listdir(self._metrics_fd):
                    os.unlink(name, dir_fd=self._metrics_fd)
                parent, name = os.path.split(self.metrics_dir)
                parent_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
                    if (st.st_dev, st.st_ino) == _ids_of(os.fstat(self._metrics_fd)):
                        os.rmdir(name, dir_fd=parent_fd)
                finally:
                    os.close(parent_fd)
            os.close(self._metrics_fd)


def _ids_of(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _flush_logs() -> None:
    for h in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            h.flush()


def _port_busy(spec: str) -> bool:
    """Is an inet socket's address in use (so that binding again soon may work)?"""
    if spec.startswith("unix:"):
        return False
    family = socket.AF_INET6 if spec.startswith("inet6") else socket.AF_INET
    port = int(spec.split(":", 1)[1].split("@", 1)[0])
    host = spec.split("@", 1)[1] if "@" in spec else ""
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as e:
        return e.errno == errno.EADDRINUSE
    return False


def _register(milter, Milter) -> None:  # type: ignore[no-untyped-def]
    """Wire libmilter's callbacks to the per-connection object, as
    ``Milter.runmilter`` does, but leaving socket set-up to us so that
    privileges can be dropped between binding and serving."""
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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.check_config:
        return check_config(args.config)
    if args.self_test:
        from .selftest import self_test

        try:
            cfg = load(args.config)
        except ConfigError as e:
            for line in e.errors:
                print(line, file=sys.stderr)
            return 1
        return self_test(cfg, sys.stdout)
    try:
        cfg = load(args.config)
    except ConfigError as e:
        for line in e.errors:
            print(line, file=sys.stderr)
        return 1
    setup_logging(cfg)
    _limit_malloc_arenas()
    return Daemon(args.config, cfg).run()


if __name__ == "__main__":
    sys.exit(main())
