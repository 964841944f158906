"""A private Postfix instance and an SMTP sink, both on loopback, for the package tests.

Both come from ``tests/lab.py`` (``run_postfix``, ``Sink``), as for every
other layer; what is the package tests' own is how this Postfix is set up: it
relays everything to the sink, listens on IPv4 loopback only, and *rejects*
when the milter cannot be reached or does not answer, so that delivered mail
proves that the packaged milter answered.  Needs root.
"""

from __future__ import annotations

import contextlib
import smtplib
from collections.abc import Callable
from typing import Any

from tests.lab import LabError, Postfix, base_main_cf, run_postfix, wait_until
from tests.lab import Sink as SmtpSink  # the package tests import it from here


def wait_for(pred: Callable[[], Any], timeout: float, what: str) -> None:
    """``lab.wait_until``, failing as an assertion, as the package tests report it."""
    try:
        wait_until(what, pred, timeout=timeout)
    except LabError as e:
        raise AssertionError(str(e)) from None


class PrivatePostfix:
    """``run_postfix`` with the package tests' settings; ``port`` its smtpd."""

    PREFIX = "ipv6milter-pkgtest-postfix-"

    def __init__(self, relay_port: int, milter: str, extra: dict[str, str] | None = None):
        self.main_cf = {
            **base_main_cf("mx.pkgtest.invalid", "pkgtest.invalid"),
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "relayhost": f"[127.0.0.1]:{relay_port}",
            "smtp_address_preference": "ipv4",
            "smtpd_milters": milter,
            "milter_default_action": "reject",
            **(extra or {}),
        }
        self._stack = contextlib.ExitStack()
        self._postfix: Postfix | None = None

    @property
    def port(self) -> int:
        assert self._postfix is not None, "not started"
        return self._postfix.port()

    def log(self) -> str:
        if self._postfix is None:
            return ""
        with contextlib.suppress(OSError):
            return self._postfix.log.read_text(errors="replace")
        return ""

    def __enter__(self) -> PrivatePostfix:
        self._postfix = self._stack.enter_context(run_postfix(
            None, self.main_cf, {"main": {}}, greet_hosts=("127.0.0.1",), prefix=self.PREFIX))
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()
        self._postfix = None


def send(port: int, sender: str, rcpt: str, body: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.sendmail(sender, [rcpt], body)


__all__ = ["PrivatePostfix", "SmtpSink", "send", "wait_for"]
