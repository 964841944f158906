"""The listening socket: bound once by the supervisor, shared by the workers, removed at the stop.

The supervisor binds the socket with libmilter's ``opensocket``, as root
and before privileges are dropped; the workers inherit it across the fork
and each runs libmilter's main loop on it.  The socket is non-blocking:
every worker's poll() wakes on a new connection, one accept() wins and the
others get EAGAIN and poll again (with a blocking socket they would sleep in
accept() and not see a stop).

libmilter removes a unix socket's path when its main loop ends (if it runs
as a user other than root).  A worker that stops must not take the path away
from the others, so the socket is bound at a private name and renamed into
place: libmilter only knows the private name, which no longer exists.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
import time
from typing import Any

from .config import Config

log = logging.getLogger("ipv6milter")


def find_listener(spec: str, bind_path: str | None = None) -> socket.socket | None:
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


def no_delay(spec: str) -> None:
    """TCP_NODELAY on libmilter's listening socket (accepted ones inherit it).

    libmilter writes each reply in small pieces; with Nagle's algorithm meeting
    the MTA's delayed ACKs every message stalls tens of milliseconds on an
    inet socket.
    """
    s = find_listener(spec)
    if s is None:
        log.debug("listening socket for %s not found; TCP_NODELAY not set", spec)
        return
    with s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _non_blocking(spec: str, bind_path: str | None) -> bool:
    """O_NONBLOCK on the shared listening socket (see the module's docstring).
    Linux does not pass the flag on to accepted sockets."""
    s = find_listener(spec, bind_path)
    if s is None:
        return False
    with s:
        s.setblocking(False)  # a flag of the open file, shared with libmilter's descriptor
    return True


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


class Listener:
    """The socket as opened: what to remove at a clean stop (a unix socket's
    path, only while it is still the very socket we made)."""

    def __init__(self, path: str | None = None, ids: tuple[int, int] | None = None):
        self.path = path
        self.ids = ids  # (st_dev, st_ino) of the socket file

    def remove(self) -> None:
        if not (self.path and self.ids):
            return
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self.ids:
                os.unlink(self.path)
        except OSError as e:
            if e.errno != errno.ENOENT:
                log.warning("cannot remove socket %s: %s", self.path, e.strerror)


def open_socket(milter: Any, cfg: Config, owner: tuple[int, int] | None) -> Listener | None:
    """Bind ``Socket`` through libmilter (its callbacks already registered);
    a unix socket chowned to ``owner`` (UserID's uid and gid).  None when it
    cannot be opened (logged)."""
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
            return None
        else:
            if not stat.S_ISSOCK(st.st_mode):
                log.error("cannot open socket %s: %s exists and is not a socket", spec, path)
                return None
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
                return None
    finally:
        os.umask(old_umask)
    opened = Listener()
    if bind_path is not None:
        path = spec[5:]
        try:
            if owner:
                # SPEC §4: owned by UserID's user and group, so an MTA in
                # the group can connect (UMask 007 leaves it rw for them).
                os.chown(bind_path, *owner, follow_symlinks=False)
            os.rename(bind_path, path)
            st = os.lstat(path)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(bind_path)
            log.error("cannot open socket %s: %s", spec, e)
            return None
        opened = Listener(path, (st.st_dev, st.st_ino))
    if not _non_blocking(spec, bind_path):
        log.warning("listening socket for %s not found: workers may be slow to stop", spec)
    if spec.startswith("inet"):
        no_delay(spec)
    return opened
