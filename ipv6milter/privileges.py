"""``UserID``: switching a child to it, and the checks run as that user before trusting it.

With ``UserID`` and started as root, the supervisor stays root and every
process that handles input switches to ``UserID`` right after its fork
(``switch_user``).  What that user can do is only known by trying it as
that user, so two checks run in a child of their own, switched like a
worker, before the supervisor relies on them:

* at the start (``check_start``): can it judge a message (everything
  loaded before the switch, ``preflight``) and write the metrics files;
* at a reload (``check_reload``): can it read the configuration file and
  the ``AcceptDomains`` file it names.  SPEC §3: a reload that the service
  user could not read is refused and counted as failed, so that the
  file the workers run is one their own user can read, as it must be
  under systemd (``User=``, no root supervisor at all).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import grp
import logging
import os
import pwd
import signal
from collections.abc import Callable

from .config import Config, ConfigError

log = logging.getLogger("ipv6milter")

_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15
_EX_FAILED = 78  # the child could not do, as UserID, what it was asked


def user_ids(user_id: str) -> tuple[int, int]:
    user, _, group = user_id.partition(":")
    pw = pwd.getpwnam(user)
    gid = grp.getgrnam(group).gr_gid if group else pw.pw_gid
    return pw.pw_uid, gid


def _prctl(option: int, arg: int | bytes) -> None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(option, arg, 0, 0, 0)
    except (OSError, AttributeError):
        log.debug("prctl(%d) not available", option)


def set_process_name(name: str) -> None:
    """What ps and /proc/PID/comm show (15 bytes at most)."""
    _prctl(_PR_SET_NAME, name.encode()[:15])


def switch_user(ids: tuple[int, int] | None, parent: int) -> None:
    """In a child: UserID's ids, every one of them; then die with the parent
    (the parent-death signal is cleared by a change of ids, so set after it)."""
    if ids:
        uid, gid = ids
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)  # the parent is already gone


def flush_logs() -> None:
    for h in logging.getLogger().handlers:
        with contextlib.suppress(Exception):  # a log that cannot flush must not stop a fork
            h.flush()


def _as_user(user_id: str, ids: tuple[int, int], check: Callable[[], bool]) -> tuple[int, int]:
    """Run ``check`` in a child switched to ``ids``; (its pid, its wait status)."""
    parent = os.getpid()
    flush_logs()
    pid = os.fork()
    if pid == 0:
        code = _EX_FAILED
        try:
            switch_user(ids, parent)
            if check():
                code = 0
        except OSError as e:
            log.error("cannot switch to UserID %s: %s", user_id, e)
        finally:
            flush_logs()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return pid, status


def _ok(status: int) -> bool:
    return os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def check_start(cfg: Config, ids: tuple[int, int], preflight: object,
                metrics_dir: str | None) -> int | None:
    """Before any worker: one child switches to UserID and judges a message.
    The pid of that child (its metrics files are not the milter's work), or
    None when it failed, logged."""
    from .preflight import PreflightError

    def check() -> bool:
        if metrics_dir:
            # The workers count into files here, as this user.
            probe = os.path.join(metrics_dir, f"probe_{os.getpid()}.db")
            try:
                with open(probe, "xb"):
                    pass
                os.unlink(probe)
            except OSError as e:
                log.error("UserID %s cannot write the metrics directory %s (%s): set "
                          "TMPDIR to a directory that user can reach",
                          cfg.user_id, metrics_dir, e.strerror)
                return False
        try:
            preflight.judge(cfg)  # type: ignore[attr-defined]
        except PreflightError as e:
            log.error("after switching to UserID %s the milter cannot judge a message "
                      "(%s): can that user read the installed package?", cfg.user_id, e)
            return False
        return True

    pid, status = _as_user(cfg.user_id or "", ids, check)
    if not _ok(status):
        if os.WIFSIGNALED(status):
            log.error("the check as UserID %s was killed by %s", cfg.user_id,
                      signal.Signals(os.WTERMSIG(status)).name)
        return None
    log.info("workers running as %s (uid %d, gid %d)",
             (cfg.user_id or "").partition(":")[0], *ids)
    return pid


def check_reload(path: str | None, user_id: str, ids: tuple[int, int]) -> list[str]:
    """Can UserID read the configuration that root just read?  Its errors
    (empty when it can): the file, or the AcceptDomains file it names, read
    by a child switched to that user."""
    from .config import load

    r, w = os.pipe2(os.O_CLOEXEC)

    def check() -> bool:
        os.close(r)
        try:
            load(path, default_if_missing=path is None)
        except ConfigError as e:
            os.write(w, "\n".join(e.errors).encode("utf-8", "backslashreplace")[:8192])
            return False
        return True

    _pid, status = _as_user(user_id, ids, check)
    os.close(w)
    with os.fdopen(r, "rb") as fh:
        said = fh.read().decode("utf-8", "replace")
    if _ok(status):
        return []
    return [f"as UserID {user_id}: {line}" for line in said.splitlines()] or [
        f"the check as UserID {user_id} failed (status {status:#x})"]
