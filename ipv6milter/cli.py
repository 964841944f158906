"""``ipv6milter``: run the milter in the foreground, or check a configuration.

The only module that starts libmilter.

Signals.  libmilter starts a thread of its own that ``sigwait``s for SIGHUP,
SIGTERM and SIGINT and *stops the milter* on any of them, SIGHUP included.
A kill(2) aimed at the process goes to the main thread whenever the main
thread does not block the signal (Linux looks there first), so libmilter's
main loop runs in a second thread, every thread but the main one blocks the
three signals, and the main thread stays in Python where its handlers run:
SIGHUP reloads, SIGTERM/SIGINT ask libmilter to stop.  While a handler runs
the kernel would block its signal in the main thread and hand the next one to
libmilter's thread, so the handlers are installed with SA_NODEFER.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import grp
import logging
import logging.handlers
import os
import pwd
import signal
import socket
import stat
import sys
import threading
from functools import partial

from . import __version__, config
from .config import Config, ConfigError
from .engine import Engine

log = logging.getLogger("ipv6milter")

_SIGNALS = {signal.SIGHUP, signal.SIGTERM, signal.SIGINT}


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


def _no_delay(spec: str) -> None:
    """TCP_NODELAY on libmilter's listening socket (accepted ones inherit it).

    libmilter writes each reply in small pieces; with Nagle's algorithm meeting
    the MTA's delayed ACKs every message stalls tens of milliseconds on an
    inet socket.  libmilter does not expose the socket: find it among our
    descriptors by its port.
    """
    port = int(spec.split(":", 1)[1].split("@", 1)[0])
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            for family in (socket.AF_INET6, socket.AF_INET):
                try:
                    s = socket.socket(family, socket.SOCK_STREAM, fileno=os.dup(fd))
                except OSError:
                    continue
                with s:
                    if (s.family in (socket.AF_INET, socket.AF_INET6)
                            and s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
                            and s.getsockname()[1] == port):
                        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                        return
                break
        except OSError:
            continue
    log.debug("listening socket for %s not found; TCP_NODELAY not set", spec)


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _drop_privileges(user_id: str) -> None:
    user, _, group = user_id.partition(":")
    pw = pwd.getpwnam(user)
    gid = grp.getgrnam(group).gr_gid if group else pw.pw_gid
    os.setgroups([])
    os.setgid(gid)
    os.setuid(pw.pw_uid)
    log.info("running as %s (uid %d, gid %d)", user, pw.pw_uid, gid)


class Daemon:
    """The running milter: configuration, engine, signals."""

    def __init__(self, path: str | None, cfg: Config):
        self.path = path
        self.engine = Engine(cfg)
        self.failure: str | None = None

    def reload(self) -> None:
        old = self.engine.cfg
        try:
            new = load(self.path)
        except ConfigError as e:
            for line in e.errors:
                log.error("reload failed, keeping the running configuration: %s", line)
            self.engine.metrics.reloads.labels("failed").inc()
            return
        restart_only = [
            k.name
            for k in config.KEYS
            if k.attr in ("socket", "user_id", "umask", "pid_file", "metrics_listen")
            and getattr(new, k.attr) != getattr(old, k.attr)
        ]
        if restart_only:
            log.warning("reload: %s change(s) need a restart to apply", ", ".join(restart_only))
        setup_logging(new)
        self.engine.reload(new)
        self.engine.metrics.reloads.labels("ok").inc()
        log.info("configuration reloaded from %s", new.source or "built-in defaults")

    def _on_signal(self, signum: int, frame: object) -> None:
        if signum == signal.SIGHUP:
            self.reload()
            return
        import milter

        log.info("%s received, stopping", signal.Signals(signum).name)
        milter.stop()

    def _main_loop(self) -> None:
        import milter

        # Blocked in this thread before libmilter starts any: its signal thread,
        # connection threads and our DNS pool all inherit the mask, so only
        # the main thread (and threads started from it) ever take a signal.
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            milter.main()
        except milter.error as e:
            self.failure = str(e)

    def run(self) -> int:
        import Milter
        import milter

        from .milter import Ipv6Milter

        cfg = self.engine.cfg
        # Handlers first: a SIGHUP must never find the default action (exit)
        # once the socket is open.
        for sig in _SIGNALS:
            signal.signal(sig, self._on_signal)
            if not _no_defer(sig):
                log.warning("could not set SA_NODEFER for %s: a burst of them may stop the "
                            "milter", signal.Signals(sig).name)
        Milter.factory = partial(Ipv6Milter, self.engine)
        # A bug that escapes our own guard defers the message, never accepts it.
        Milter.set_exception_policy(Milter.TEMPFAIL)
        _register(milter, Milter)
        sock = cfg.socket
        milter.setconn(sock)
        old_umask = os.umask(cfg.umask)
        try:
            milter.opensocket(True)
        except milter.error as e:
            log.error("cannot open socket %s: %s", sock, e)
            return 1
        finally:
            os.umask(old_umask)
        if sock.startswith("inet"):
            _no_delay(sock)
        if cfg.pid_file:
            with open(cfg.pid_file, "w") as fh:
                fh.write(f"{os.getpid()}\n")
        # Bound before privileges are dropped, as the milter socket is.
        if cfg.metrics_listen:
            host, port = cfg.metrics_listen
            try:
                self.engine.metrics.serve(host, port)
            except OSError as e:
                log.error("cannot serve metrics on %s port %d: %s", host, port, e)
                return 1
            log.info("metrics on http://%s/metrics", _hostport(host, port))
        if cfg.user_id:
            try:
                _drop_privileges(cfg.user_id)
            except (KeyError, OSError) as e:
                log.error("cannot switch to UserID %s: %s", cfg.user_id, e)
                return 1
        elif os.geteuid() == 0:
            log.warning("running as root: set UserID, or start as an unprivileged user")
        loop = threading.Thread(target=self._main_loop, name="libmilter")
        loop.start()
        log.info(
            "ipv6milter %s listening on %s (mode %s, AcceptDomains %s)",
            __version__,
            sock,
            cfg.mode,
            cfg.accept_domains,
        )
        try:
            while loop.is_alive():
                loop.join()  # interrupted by each signal; its handler runs here
        finally:
            self.engine.shutdown()
            if cfg.pid_file:
                with contextlib.suppress(OSError):
                    os.unlink(cfg.pid_file)
        if self.failure:
            log.error("milter main loop failed: %s", self.failure)
            return 1
        log.info("stopped")
        return 0


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
