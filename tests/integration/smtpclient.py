"""The SMTP client side of the integration tests: transactions against the
private Postfix as a sending MTA would run them, and reading back what the
sink received.

Clients on 2001:db8::/32 etc. are claimed with Postfix's XCLIENT (only
loopback is ever contacted); after XCLIENT Postfix greets anew and expects
a new EHLO, and gives the milter a second connect event.  Real IPv6 and
IPv4 clients connect from the lab network namespace (``netlab=``, from the
lab address ``source=``).
"""

from __future__ import annotations

import re
import smtplib
import socket
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import authres
import authres.core

if TYPE_CHECKING:
    from .netlab import NetLab

SMTP_TIMEOUT = 30


@dataclass(frozen=True)
class Reply:
    code: int
    text: str  # the reply text after the code, enhanced status code included

    def __str__(self) -> str:
        return f"{self.code} {self.text}"

    @classmethod
    def of(cls, pair: tuple[int, bytes]) -> Reply:
        code, msg = pair
        return cls(code, msg.decode("utf-8", "replace"))


@dataclass
class Outcome:
    """The replies one transaction got, as the SMTP client saw them."""

    mail: Reply
    rcpts: list[Reply] = field(default_factory=list)
    data: Reply | None = None  # end of DATA; None when no recipient was accepted

    @property
    def rcpt(self) -> Reply:
        assert len(self.rcpts) == 1, self.rcpts
        return self.rcpts[0]

    @property
    def accepted(self) -> bool:
        return self.data is not None and self.data.code == 250


def xtext(value: str) -> str:
    """RFC 1891 xtext, as XCLIENT attribute values must be."""
    return "".join(c if 33 <= ord(c) <= 126 and c not in "+=" else f"+{ord(c):02X}" for c in value)


class _LabSMTP(smtplib.SMTP):
    """smtplib whose connection starts in the lab network namespace."""

    def __init__(self, netlab: NetLab, *args: object, **kwargs: object):
        self.netlab = netlab
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        source = self.source_address[0] if self.source_address else None
        return self.netlab.connect(host, port, source=source, timeout=timeout)


class Session:
    """One SMTP connection, optionally claiming another client (XCLIENT
    ``addr``/``login``) or coming from the lab namespace (``netlab``, with
    ``source`` as the client address)."""

    def __init__(
        self,
        port: int,
        *,
        addr: str | None = None,
        name: str | None = None,
        helo: str = "mail.example.com",
        login: str | None = None,
        host: str = "127.0.0.1",
        netlab: NetLab | None = None,
        source: str | None = None,
    ):
        source_address = (source, 0) if source else None
        if netlab is not None:
            self.smtp: smtplib.SMTP = _LabSMTP(
                netlab, host, port, helo, SMTP_TIMEOUT, source_address
            )
        else:
            self.smtp = smtplib.SMTP(host, port, helo, SMTP_TIMEOUT, source_address)
        if addr is not None or login is not None:
            self.smtp.ehlo("client.test")
            attrs = []
            if addr is not None:
                attrs.append(f"ADDR={('IPV6:' + addr) if ':' in addr else addr}")
                attrs.append(f"NAME={xtext(name) if name else '[UNAVAILABLE]'}")
            if login is not None:
                attrs.append(f"LOGIN={xtext(login)}")
            code, msg = self.smtp.docmd("XCLIENT", " ".join(attrs))
            if code != 220:
                raise AssertionError(f"XCLIENT {' '.join(attrs)} refused: {code} {msg!r}")
        code, msg = self.smtp.ehlo(helo)
        if code != 250:
            raise AssertionError(f"EHLO {helo} refused: {code} {msg!r}")

    def send(self, mail_from: str, rcpts: Sequence[str], message: bytes) -> Outcome:
        """MAIL, each RCPT, and DATA when a recipient was accepted; RSET after
        a refusal so that the connection can carry the next transaction."""
        out = Outcome(Reply.of(self.smtp.mail(mail_from)))
        if out.mail.code != 250:
            self.smtp.rset()
            return out
        out.rcpts = [Reply.of(self.smtp.rcpt(r)) for r in rcpts]
        if any(r.code == 250 for r in out.rcpts):
            out.data = Reply.of(self.smtp.data(message))
        else:
            self.smtp.rset()
        if out.data is None or out.data.code != 250:
            self.smtp.rset()
        return out

    def close(self) -> None:
        try:
            self.smtp.quit()
        except smtplib.SMTPException:
            self.smtp.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def transaction(
    port: int,
    *,
    mail_from: str,
    rcpts: Sequence[str],
    message: bytes,
    addr: str | None = None,
    name: str | None = None,
    helo: str = "mail.example.com",
    login: str | None = None,
    host: str = "127.0.0.1",
    netlab: NetLab | None = None,
    source: str | None = None,
) -> Outcome:
    """One transaction on its own connection; the replies at MAIL, RCPT and end of DATA."""
    with Session(
        port, addr=addr, name=name, helo=helo, login=login, host=host, netlab=netlab, source=source
    ) as s:
        return s.send(mail_from, rcpts, message)


# -- one MTA of the lab, as its clients see it ------------------------------------------


@dataclass(frozen=True)
class LabMta:
    """An MTA reached from the lab namespace (or loopback), and what its
    clients see that differs between MTAs.

    ``listeners``: name -> (address, port): ``v6`` (2001:db8:6::1), ``v4``
    (198.18.0.1), ``mapped`` (the dual-stack listener reached over IPv4),
    ``lo6`` (::1, trusted).  ``echoes_rcpt``: Sendmail puts ``<rcpt>... ``
    before the text of a RCPT reply.  ``xclient_login``: Postfix emulates a
    SASL login with ``XCLIENT LOGIN=`` (Sendmail's .mc sets {auth_authen}
    for the lab's authenticated address instead).
    """

    name: str
    netlab: NetLab
    listeners: dict[str, tuple[str, int]]
    echoes_rcpt: bool
    xclient_login: bool

    def session(
        self, listener: str, source: str | None, *, helo: str, login: str | None = None
    ) -> Session:
        host, port = self.listeners[listener]
        lab = None if host in ("127.0.0.1", "::1") else self.netlab
        return Session(
            port,
            host=host,
            helo=helo,
            netlab=lab,
            source=source if lab else None,
            login=login if self.xclient_login else None,
        )

    def rcpt_reply(self, rcpt: str, reply: str) -> str:
        """A RCPT reply as this MTA's client reads it, from the SPEC's text."""
        if not self.echoes_rcpt or reply[:1] == "2":
            return reply
        code, xcode, text = reply.split(" ", 2)
        return f"{code} {xcode} <{rcpt}>... {text}"


# -- messages ------------------------------------------------------------------------


def marker() -> str:
    return "m" + uuid.uuid4().hex


def make_message(
    mark: str,
    *,
    from_addr: str,
    to: str,
    subject: str = "test",
    extra_headers: Sequence[str] = (),
    body: str = "Hello.\r\nThis is a test message.\r\n",
) -> bytes:
    """A small RFC 5322 message with CRLF line ends; ``mark`` in Subject and
    Message-ID finds it again in the sink.  ``extra_headers`` come first, as
    full lines ("Name: value", folded with CRLF + whitespace if wanted)."""
    lines = [
        *extra_headers,
        f"From: <{from_addr}>",
        f"To: <{to}>",
        f"Subject: {subject} {mark}",
        "Date: Thu, 01 Jan 2026 00:00:00 +0000",
        f"Message-ID: <{mark}@test.example>",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=us-ascii",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n" + body).encode("ascii")


# -- reading back what was delivered ----------------------------------------------------


def header_fields(raw: bytes) -> list[tuple[str, str]]:
    """The header fields of a message in order, values as received (folding kept)."""
    head = raw.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")
    fields: list[tuple[str, str]] = []
    for line in head.split("\r\n"):
        if line[:1] in (" ", "\t") and fields:
            name, value = fields[-1]
            fields[-1] = (name, value + "\r\n" + line)
        else:
            name, _, value = line.partition(":")
            fields.append((name, value))
    return fields


def unfold(value: str) -> str:
    return re.sub(r"\r?\n(?=[ \t])", "", value)


def auth_results(raw: bytes) -> list[str]:
    """The unfolded values of every Authentication-Results field, in order."""
    return [
        unfold(v).strip() for n, v in header_fields(raw) if n.lower() == "authentication-results"
    ]


def parse_ar(value: str) -> authres.core.AuthenticationResultsHeader:
    return authres.core.AuthenticationResultsHeader.parse_value(
        authres.FeatureContext(authres), unfold(value).strip()
    )


@dataclass(frozen=True)
class Result:
    method: str
    result: str
    props: dict[str, str]
    comment: str | None


def results(header: authres.core.AuthenticationResultsHeader) -> list[Result]:
    return [
        Result(
            r.method,
            r.result,
            {f"{p.type}.{p.name}": p.value for p in r.properties},
            getattr(r, "result_comment", None),
        )
        for r in header.results
    ]


def by_method(header: authres.core.AuthenticationResultsHeader, method: str) -> list[Result]:
    return [r for r in results(header) if r.method == method]
