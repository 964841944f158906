"""Hostile senders against legitimate ones (issue 10): the attacks, their DNS
data, and a DNS relay that slows down only the attacker's names.

Attacks, each from clients of its own through the real Postfix:

    rset-flood      MAIL FROM + RSET, over and over, with senders whose SPF
                    includes answer just under DNSTimeout (``*.slowinc.test``)
    oversized-key   signatures whose key record has a 16384-bit modulus and
                    a 16384-bit public exponent (one pow() of ~8 s)
    h-bomb          a signature whose h= names 12,000 absent fields, over a
                    header of 9,000 small fields (quadratic in dkimpy)
    many-fields     120,000 DKIM-Signature fields after a filler past
                    MaxMessageSize

and those of issue 16, each a super-linear step in a library or our own
code on sender data (harmless now: the step is bounded or linear, or runs
in a helper process under a CPU bound):

    spf-long-label  MAIL FROM a domain whose SPF record is
                    ``v=spf1 a:x.<60,000 letters>.y -all`` (over TCP)
    body-spaces     a body line of 200 KB of spaces ending in a letter,
                    under a relaxed-body signature
    dkim-ws         five DKIM-Signature fields of 40-60 KB of white-space
                    runs (in h=, around its colons, folded blank lines after b=)
    ar-nested       forged Authentication-Results with 60 KB of nested
                    comments in front of our authserv-id

The probes tell whether the DKIM layer already refuses oversized keys and
huge h= before it verifies (those caps live in dkimcheck.py): without them
those two attacks can only be run once, small, and reported.
"""

from __future__ import annotations

import base64
import random
import smtplib
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import dkim
import dns.message
import dns.name

from tests.dkimkeys import make_key
from tests.integration.smtpclient import make_message

from .hostile import KNOWN_REPLIES
from .servers import DnsProxy
from .zones import HOSTILE_IP, txt

SLOW = "slow.test"  # the flooder's sender domains: x<N>.slow.test
SLOW_INC = "slowinc.test"  # what their SPF records include: answered late
BIGKEY = "bigkey.test"  # the oversized key and the h= bomb's key
SPF_FAIL_SENDER = "someone@spffail.test"  # only DKIM could pass these
INCLUDES = 3
H_NAMES = 12_000
H_FIELDS = 9_000
MANY_FIELDS = 120_000
LONG_LABEL = "longlabel.test"  # its SPF record has a 60,000-letter label
LONG_LABEL_SENDER = f"a@{LONG_LABEL}"


def _der_int(n: int) -> bytes:
    body = n.to_bytes(n.bit_length() // 8 + 1, "big")
    return b"\x02" + _der_len(len(body)) + body


def _der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def oversized_key_record(bits: int = 16384, e_bits: int | None = None) -> str:
    """An RSAPublicKey (RFC 8017) with a ``bits``-bit modulus and an exponent
    as long (or ``e_bits`` long): no key pair, only the numbers that make one
    verification cost seconds."""
    rng = random.Random(10)
    e_bits = e_bits or bits
    n = rng.getrandbits(bits) | (1 << (bits - 1)) | 1
    e = rng.getrandbits(e_bits) | (1 << (e_bits - 1)) | 1
    body = _der_int(n) + _der_int(e)
    der = b"\x30" + _der_len(len(body)) + body
    return "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode()


def attack_zones() -> dict[str, list[str]]:
    includes = " ".join(f"include:i{i}.%{{d}}.{SLOW_INC}" for i in range(INCLUDES))
    return {
        SLOW: [f"* TXT {txt(f'v=spf1 {includes} -all')}"],
        SLOW_INC: [f"* TXT {txt('v=spf1 ?all')}"],
        LONG_LABEL: [f"@ TXT {txt('v=spf1 a:x.' + 'q' * 60_000 + '.y -all')}"],
        BIGKEY: [
            f"big._domainkey TXT {txt(oversized_key_record())}",
            f"probe._domainkey TXT {txt(oversized_key_record(9000, 17))}",
            f"good._domainkey TXT {txt(make_key(1024, BIGKEY)[1])}",
        ],
    }


class SlowNamesProxy(DnsProxy):
    """The reliability relay, holding back only the answers for names under
    ``slow_suffix`` (UDP), by ``slow_delay`` seconds."""

    def __init__(self, upstream_port: int, slow_suffix: str, slow_delay: float):
        super().__init__(upstream_port)
        self.suffix = dns.name.from_text(slow_suffix)
        self.slow_delay = slow_delay
        self.slowed = 0

    def _relay_udp(self, sock, data, peer, delay):  # type: ignore[no-untyped-def]
        try:
            qname = dns.message.from_wire(data).question[0].name
        except Exception:  # not for us to judge: relay it as it is
            qname = None
        if qname is not None and qname.is_subdomain(self.suffix):
            with self._lock:
                self.slowed += 1
            delay = self.slow_delay
        super()._relay_udp(sock, data, peer, delay)


# -- the attack messages ---------------------------------------------------------------------


def _signed(msg: bytes, selector: str, include: list[bytes]) -> bytes:
    return dkim.sign(msg, selector.encode(), BIGKEY.encode(), make_key(1024, BIGKEY)[0],
                     canonicalize=(b"relaxed", b"relaxed"), include_headers=include) + msg


def oversized_key_message(mark: str, signatures: int, selector: str = "big",
                          bits: int = 16384) -> bytes:
    """``signatures`` signatures (right body hash) whose key is oversized: b= is
    as long as the modulus, so dkimpy goes as far as the pow()."""
    msg = make_message(mark, from_addr=SPF_FAIL_SENDER, to="rcpt@example.com")
    out = msg
    rng = random.Random(mark)
    for _ in range(signatures):
        sig = _signed(msg, selector, [b"from", b"to", b"subject"])[: -len(msg)]
        b = base64.b64encode(bytes([1]) + rng.randbytes(bits // 8 - 1)).decode()
        head, _, _ = sig.decode().rpartition(" b=")
        out = (head + " b=" + "\r\n\t".join(b[i:i + 70] for i in range(0, len(b), 70))
               + "\r\n").encode() + out
    return out


def hbomb_message(mark: str, names: int = H_NAMES, fields: int = H_FIELDS) -> bytes:
    """Signed over a small header, then ``fields`` unsigned fields added: the
    signature still verifies, and checking it costs names x fields."""
    msg = make_message(mark, from_addr=SPF_FAIL_SENDER, to="rcpt@example.com")
    include = [b"from", b"to", b"subject", *(f"y{i}".encode() for i in range(names))]
    signed = _signed(msg, "good", include)
    extra = "".join(f"X-F{i}: {i}\r\n" for i in range(fields)).encode()
    return extra + signed


def many_fields_message(mark: str, fields: int = MANY_FIELDS, filler: int = 1100) -> bytes:
    lines = [f"X-Filler{i}: {'f' * 1000}" for i in range(filler)]
    lines += [f"DKIM-Signature: v=1; b={i}" for i in range(fields)]
    return make_message(mark, from_addr=SPF_FAIL_SENDER, to="rcpt@example.com",
                        extra_headers=lines)


def _fold(text: str, width: int = 900) -> str:
    """``text`` folded (CRLF + space) every ``width`` characters: no line
    past SMTP's 1000, and the white space stays white space once unfolded."""
    return "\r\n ".join(text[i:i + width] for i in range(0, len(text), width))


def body_spaces_message(mark: str, spaces: int = 200_000) -> bytes:
    """A relaxed-body signature over a small body, then a body line of
    ``spaces`` spaces ending in a letter, and one line with a trailing space
    (so that trailing white space must be stripped over the whole body):
    canonicalized before the hash is compared (the signature then fails)."""
    msg = make_message(mark, from_addr=SPF_FAIL_SENDER, to="rcpt@example.com")
    signed = _signed(msg, "good", [b"from", b"to", b"subject"])
    head = signed.split(b"\r\n\r\n", 1)[0]
    return head + b"\r\n\r\nx\r\n" + b" " * spaces + b"y\r\nend \r\n"


def dkim_ws_message(mark: str, signatures: int = 5, run: int = 20_000) -> bytes:
    """``signatures`` DKIM-Signature fields of 40-60 KB, mostly white-space
    runs: around h='s colons, and folded blank lines after b=."""
    msg = make_message(mark, from_addr=SPF_FAIL_SENDER, to="rcpt@example.com")
    sig = _signed(msg, "good", [b"from", b"to", b"subject"])[: -len(msg)].decode()
    value = sig.split(":", 1)[1].replace("\r\n", "")
    tags = dict(p.strip().split("=", 1) for p in value.split(";") if "=" in p)
    fields = []
    for i in range(signatures):
        ws = " " * (run + 2000 * i)
        h = f"from{ws}:{ws}to:subject"
        blank = "\r\n \r\n\t" * 1000
        body = "; ".join(f"{k}={_fold(h) if k == 'h' else v}" for k, v in tags.items()
                         if k != "b")
        fields.append(f"DKIM-Signature: {body};\r\n b={tags['b']}{blank}\r\n".encode())
    return b"".join(fields) + msg


def ar_nested_message(mark: str, depth: int = 30_000, authserv_id: str = "mx.test.example",
                      fields: int = 1) -> bytes:
    """``fields`` forged Authentication-Results fields whose authserv-id (ours)
    stands after ``depth`` nested comments (60 KB at 30,000): they must be
    deleted all the same (RFC 8601 §5)."""
    value = _fold("(" * depth + ")" * depth) + f" {authserv_id}; spf=pass"
    lines = [f"Authentication-Results: {value}"] * fields
    return make_message(mark, from_addr=SPF_FAIL_SENDER, to="rcpt@example.com",
                        extra_headers=lines)


# -- the DKIM layer's caps, as they are in this checkout ---------------------------------------


def dkim_caps() -> dict[str, bool]:
    """Whether check_dkim refuses (without verifying) an RSA key over 8192
    bits and an h= of H_NAMES entries, asked in-process, cheaply."""
    from ipv6milter.dkimcheck import check_dkim
    from ipv6milter.resolver import Budget
    from tests.unit.fakedns import FakeResolver

    zone = {
        f"probe._domainkey.{BIGKEY}": oversized_key_record(9000, 17),
        f"good._domainkey.{BIGKEY}": make_key(1024, BIGKEY)[1],
    }
    r = FakeResolver({(k, "TXT"): v for k, v in zone.items()})
    key = check_dkim(r, oversized_key_message("probe", 1, "probe", 9000), Budget(5), 5)
    small = make_message("probe", from_addr=SPF_FAIL_SENDER, to="rcpt@example.com")
    include = [b"from", b"to", b"subject", *(f"y{i}".encode() for i in range(H_NAMES))]
    h = check_dkim(r, _signed(small, "good", include), Budget(5), 5)
    return {"key size": key[0].result != "fail", "h= entries": h[0].result != "pass"}


# -- clients -----------------------------------------------------------------------------------


@dataclass
class Tally:
    """What one attack got back."""

    transactions: int = 0
    replies: list[str] = field(default_factory=list)  # each SMTP reply, "250" or "450 4.7.26"
    undefined: list[str] = field(default_factory=list)

    def add(self, reply: str, mail_stage: bool = False) -> None:
        self.replies.append(reply)
        ok = reply == "250" if mail_stage else bool(KNOWN_REPLIES.match(reply))
        if not ok or "4.3.0" in reply or "4.7.1" in reply:
            self.undefined.append(reply)


def _reply(code: int, text: bytes | str) -> str:
    t = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
    return f"{code} {t}".strip() if code != 250 else "250"


def _open(port: int, addr: str, helo: str) -> smtplib.SMTP:
    s = smtplib.SMTP("127.0.0.1", port, timeout=60)
    s.ehlo("client.test")
    code, text = s.docmd("XCLIENT", f"ADDR=IPV6:{addr} NAME=[UNAVAILABLE]")
    if code != 220:
        raise smtplib.SMTPResponseException(code, text)
    s.ehlo(helo)
    return s


def _quit(s: smtplib.SMTP) -> None:
    try:
        s.quit()
    except (smtplib.SMTPException, OSError):
        s.close()


def send_one(s: smtplib.SMTP, sender: str, message: bytes, tally: Tally) -> None:
    """MAIL, RCPT, DATA on an open session; each reply tallied."""
    tally.transactions += 1
    try:
        code, text = s.mail(sender)
        tally.add(_reply(code, text), mail_stage=True)
        if code != 250:
            s.rset()
            return
        code, text = s.rcpt("rcpt@example.com")
        tally.add(_reply(code, text))
        if code != 250:
            s.rset()
            return
        code, text = s.data(message)
        tally.add(_reply(code, text))
    except smtplib.SMTPResponseException as e:
        tally.add(_reply(e.smtp_code, e.smtp_error))
        s.rset()


class Attacker(threading.Thread):
    """Runs one attack from its own connection until ``stop`` is set."""

    def __init__(self, name: str, port: int, stop: threading.Event, tally: Tally,
                 message: bytes | None = None, flood: bool = False,
                 sender: str = SPF_FAIL_SENDER):
        super().__init__(name=name, daemon=True)
        self.sender = sender
        self.port = port
        self.stop = stop
        self.tally = tally
        self.message = message
        self.flood = flood
        self.error: BaseException | None = None
        self.once = False  # run the attack once only (an uncapped, costly one)

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                s = _open(self.port, HOSTILE_IP, "mail.hostile.test")
                try:
                    if self.flood:
                        self._flood(s)
                    else:
                        assert self.message is not None
                        send_one(s, self.sender, self.message, self.tally)
                finally:
                    _quit(s)
                if self.once:
                    return
        except BaseException as e:  # reported by the test
            self.error = e

    def _flood(self, s: smtplib.SMTP) -> None:
        """MAIL FROM + RSET until told to stop (or Postfix's junk-command
        limit closes the session), then one whole message with a slow sender."""
        n = 0
        while not self.stop.is_set() and n < 400:
            sender = f"a@x{random.getrandbits(48)}.{SLOW}"
            code, text = s.mail(sender)
            self.tally.add(_reply(code, text), mail_stage=True)
            code, text = s.rset()
            self.tally.add(_reply(code, text), mail_stage=True)
            self.tally.transactions += 1
            n += 1
        msg = make_message(f"flood{random.getrandbits(32)}", from_addr=f"a@x1.{SLOW}",
                           to="rcpt@example.com")
        send_one(s, f"a@x{random.getrandbits(48)}.{SLOW}", msg, self.tally)


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, round(p / 100 * (len(v) - 1)))]


def wait_alive(threads: list[threading.Thread], timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    return [t.name for t in threads if t.is_alive()]


# -- the last line: a super-linear step planted in each path (issue 16) ------------------------

BURN_MARK = "zzburn"  # IPV6MILTER_TEST_BURN: "<mark>spf", "<mark>dkim", "<mark>header",
# "<mark>from" trigger


def signed_example(mark: str, selector: str = "sel1", extra: list[str] | None = None,
                   from_addr: str = "sender@example.com") -> bytes:
    """A message from ``from_addr`` signed by example.com (``selector``),
    carrying an Authentication-Results field of another host (``extra``)."""
    msg = make_message(mark, from_addr=from_addr, to="rcpt@example.com",
                       extra_headers=extra or ["Authentication-Results: other.example; spf=pass"])
    key = make_key(1024, "example.com")[0]
    return dkim.sign(msg, selector.encode(), b"example.com", key,
                     canonicalize=(b"relaxed", b"relaxed"),
                     include_headers=[b"from", b"to", b"subject"]) + msg


@dataclass
class Timed:
    start: float
    end: float
    summary: str
    eom: object = None

    @property
    def seconds(self) -> float:
        return self.end - self.start


def timed_run(port: int, case: object) -> Timed:
    """One whole transaction straight to the milter (hostile.run), timed; the
    summary names the Authentication-Results fields deleted (``deleted=1``)."""
    from .hostile import run
    from .milterclient import MilterConnection

    start = time.monotonic()
    eoms = []
    with MilterConnection("127.0.0.1", port, timeout=90) as conn:
        message = conn.message

        def keep(*args: Any) -> Any:
            answers = message(*args)
            eoms.append(answers[1])
            return answers

        conn.message = keep  # type: ignore[method-assign]
        out = run(conn, case)  # type: ignore[arg-type]
    summary = out.summary + "".join(f" !{p}" for p in out.problems)
    deleted = [i for eom in eoms if eom is not None for i, name, value in eom.changed_headers()
               if name.lower() == "authentication-results" and not value]
    if deleted:
        summary += " deleted=" + ",".join(map(str, deleted))
    return Timed(start, time.monotonic(), summary)


class LegitLoop(threading.Thread):
    """Legitimate transactions (each its own connection), timed, ``pause``
    seconds apart: a steady stream, not a load that starves the machine."""

    def __init__(self, name: str, port: int, case: object, pause: float = 0.05):
        super().__init__(name=name, daemon=True)
        self.port, self.case, self.pause = port, case, pause
        self.done: list[Timed] = []
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.wait(self.pause):
                self.done.append(timed_run(self.port, self.case))
        except BaseException as e:  # reported by the test
            self.error = e


def cpu_split(pid: int) -> tuple[float, float]:
    """CPU seconds so far of a milter's workers (their own threads) and of
    their check helpers (live ones, and those reaped by the zygotes)."""
    from pathlib import Path

    from tests.lab import cpu_seconds, tree_pids

    workers = helpers = 0.0
    for p in tree_pids(pid)[1:]:
        try:
            comm = Path(f"/proc/{p}/comm").read_text().strip()
            if comm.startswith("ipv6milter-zyg"):
                helpers += cpu_seconds(p, children=True)
            elif comm.startswith("ipv6milter-chk"):
                helpers += cpu_seconds(p)
            elif comm.startswith("ipv6milter-w"):
                workers += cpu_seconds(p)
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
    return workers, helpers


def reply_mix(replies: list[str]) -> str:
    """``250 x3, 450 4.7.26 x2``: the replies to DATA (and RCPT/MAIL refusals)."""
    from collections import Counter

    kinds = Counter(" ".join(r.split()[:2]) if r != "250" else "250" for r in replies)
    return ", ".join(f"{k} x{n}" for k, n in kinds.most_common())
