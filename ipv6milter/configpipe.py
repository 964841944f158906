"""The pipe that carries the checked configuration from the supervisor to each child.

A reload reaches the workers (and the metrics server) as the ``Config`` the
supervisor checked, pickled, never as a signal and never as a path to read
again: every child runs exactly what was checked, whatever the file holds a
moment later or whether the child's user may read it (SPEC §3), and no
SIGHUP is ever aimed at a worker, where libmilter's own signal thread would
take it and stop the milter.

One pipe per child, written only by the supervisor (root, when ``UserID`` is
set): a child trusts what comes out of it as it trusts the fork it was born
of.  A frame is a 4-byte length and the pickle.  The supervisor writes
without blocking (a worker frozen by a hostile message must not stall it):
what does not fit waits in ``Sender``, and a configuration not yet begun
is replaced by a newer one, so a slow child gets the latest, not a queue.
"""

from __future__ import annotations

import os
import pickle
import struct

from .config import Config

_LENGTH = struct.Struct("!I")


def frame(cfg: Config) -> bytes:
    data = pickle.dumps(cfg, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(data)) + data


class Sender:
    """The supervisor's end of one child's pipe."""

    def __init__(self, fd: int):
        self.fd = fd
        os.set_blocking(fd, False)
        self._out = memoryview(b"")  # the frame being written
        self._next: bytes | None = None  # a newer one, not begun

    def send(self, cfg: Config) -> None:
        if self._out:
            self._next = frame(cfg)
        else:
            self._out = memoryview(frame(cfg))
        self.flush()

    @property
    def pending(self) -> bool:
        return bool(self._out)

    def flush(self) -> None:
        """Write what the pipe takes now; the rest when it is writable again."""
        while self._out:
            try:
                n = os.write(self.fd, self._out)
            except BlockingIOError:
                return
            except BrokenPipeError:
                self._out, self._next = memoryview(b""), None  # the child is gone
                return
            self._out = self._out[n:]
            if not self._out and self._next is not None:
                self._out, self._next = memoryview(self._next), None

    def close(self) -> None:
        os.close(self.fd)


class Receiver:
    """A child's end: whole configurations out of what the pipe delivers."""

    def __init__(self, fd: int):
        self.fd = fd
        self._buf = bytearray()

    def read(self) -> list[Config] | None:
        """The configurations completed by one read; None at end of file
        (the supervisor is gone)."""
        chunk = os.read(self.fd, 65536)
        if not chunk:
            return None
        self._buf += chunk
        out = []
        while len(self._buf) >= _LENGTH.size:
            (size,) = _LENGTH.unpack_from(self._buf)
            if len(self._buf) < _LENGTH.size + size:
                break
            data = bytes(self._buf[_LENGTH.size:_LENGTH.size + size])
            del self._buf[:_LENGTH.size + size]
            out.append(pickle.loads(data))  # written by our supervisor only
        return out
