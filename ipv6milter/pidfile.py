"""``PidFile``: written at the start, never through a symbolic link; removed at a clean stop."""

from __future__ import annotations

import errno
import logging
import os
import stat

log = logging.getLogger("ipv6milter")


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
