"""pymilter's TestCtx, extended to record what a real MTA would see.

TestCtx.chgheader ignores the index and TestCtx.addheader appends; this
context keeps the message's header list and applies each call by index,
either renumbering after a deletion (Postfix) or not (Sendmail), so the
tests can check the header list the recipient would get.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from socket import AF_INET, AF_INET6, AF_UNIX
from typing import Any

import Milter
from Milter.testctx import TestCtx


class RecordingCtx(TestCtx):
    def __init__(self, factory: Callable[[], Milter.Base], opts: Sequence[int] | None = None):
        super().__init__()
        self.factory = factory
        self.opts = list(opts or TestCtx.default_opts)
        self.calls: list[tuple[Any, ...]] = []
        self.headers: list[tuple[str, bytes]] = []
        self.replies: list[tuple[Any, ...]] = []

    # -- negotiation without Milter.factory (no module global to reassign) --------

    def _negotiate(self) -> int:
        self._body = None
        self._bodyreplaced = False
        self._stage = -1
        m = self.factory()
        m._setctx(self)
        self._opts = list(self.opts)
        rc = m.negotiate(self._opts)
        self._protocol = self._opts[1]
        return rc

    def connect(self, ip: str | None, helo: str = "mail.example.com", family: int | None = None,
                hostaddr: Any = None) -> int:
        """A connect as a real MTA sends it: ``hostaddr`` a tuple, not a string."""
        if self._priv is None:
            self._negotiate()
        if family is None:
            family = AF_UNIX if ip is None else (AF_INET6 if ":" in ip else AF_INET)
        if hostaddr is None:
            hostaddr = (ip, 25, 0, 0) if family == AF_INET6 else (ip, 25) if ip else "/sock"
        self._stage = Milter.M_CONNECT
        rc = self._priv.connect(f"[{ip}]", family, hostaddr)
        self._stage = None
        if rc not in (Milter.CONTINUE, Milter.NOREPLY):
            return rc
        return self._helo(helo)

    def _helo(self, helo: str) -> int:
        self._stage = Milter.M_HELO
        rc = self._priv.hello(helo)
        self._stage = None
        return Milter.CONTINUE if rc == Milter.NOREPLY else rc

    def macro(self, name: str, value: str | None) -> None:
        self._macros[name] = value

    # -- one transaction -----------------------------------------------------------

    def transaction(self, sender: str, rcpts: Sequence[str], message: bytes,
                    chunk: int = 65536) -> dict[str, Any]:
        """MAIL, RCPT..., DATA; returns each stage's return code and reply."""
        out: dict[str, Any] = {"rcpt": []}
        self.calls.clear()
        self._reply = None
        rc = self._envfrom(f"<{sender}>")
        out["mail"] = Milter.CONTINUE if rc == Milter.NOREPLY else rc
        if rc not in (Milter.CONTINUE, Milter.NOREPLY):
            return out
        accepted = 0
        for r in rcpts:
            self._reply = None
            rc = self._envrcpt(f"<{r}>")
            out["rcpt"].append((rc, self._reply))
            accepted += rc == Milter.CONTINUE
        if not accepted:
            return out
        head, _, body = message.partition(b"\r\n\r\n")
        self.headers = []
        for line in _unfolded_lines(head):
            name, _, value = line.partition(b":")
            if not self._protocol & Milter.P_HDR_LEADSPC:
                value = value[1:] if value.startswith(b" ") else value
                value = value.replace(b"\r\n", b"\n")
            self.headers.append((name.decode(), value))
            self._stage = Milter.M_EOH
            rc = self._priv.header_bytes(name.decode(), value)
            if rc not in (Milter.CONTINUE, Milter.NOREPLY):
                out["eom"] = rc
                return out
        for i in range(0, len(body), chunk):
            rc = self._priv.body(body[i : i + chunk])
            if rc == Milter.SKIP:
                break
            if rc != Milter.CONTINUE:
                out["eom"] = rc
                return out
        self._reply = None
        self._body = True  # TestCtx's "in eom" marker for the header actions
        self._stage = Milter.M_EOM
        out["eom"] = self._priv.eom()
        out["eom_reply"] = self._reply
        self._stage = None
        self._body = None
        return out

    # -- actions, recorded ------------------------------------------------------------

    def setreply(self, rcode: str, xcode: str, *msg: str) -> None:
        self._reply = (rcode, xcode, *msg)
        self.replies.append(self._reply)

    def addheader(self, field: str, value: str, idx: int) -> None:
        self.calls.append(("add", field, value, idx))

    def chgheader(self, field: str, idx: int, value: str) -> None:
        self.calls.append(("chg", field, idx, value))

    def result_headers(self, renumber: bool = True) -> list[tuple[str, str]]:
        """The header list after our calls; ``renumber``: Postfix, else Sendmail.

        Postfix renumbers the remaining fields after a deletion; Sendmail
        keeps counting the deleted one.
        """
        rows = [[n, v.decode(), False] for n, v in self.headers]
        for call in self.calls:
            if call[0] == "chg":
                _, field, idx, value = call
                live = [r for r in rows
                        if r[0].lower() == field.lower() and (not renumber or not r[2])]
                if idx <= len(live) and value == "":
                    live[idx - 1][2] = True
            else:
                _, field, value, idx = call
                rows.insert(idx, [field, value, False])
        return [(r[0], r[1]) for r in rows if not r[2]]


def _unfolded_lines(head: bytes) -> list[bytes]:
    lines: list[bytes] = []
    for raw in head.split(b"\r\n"):
        if raw[:1] in (b" ", b"\t") and lines:
            lines[-1] += b"\r\n" + raw
        else:
            lines.append(raw)
    return lines
