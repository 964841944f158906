"""Hostile and malformed inputs, each with the outcome it must have.

Every case is one transaction sent straight to the milter with the
milter-protocol client (so that bytes no MTA would pass, CR/LF in a HELO
say, reach it too), against the real Knot zones of zones.py.  ``Outcome``
is what the milter answered, summarised; ``Case.expect`` what it must be.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import authres
import dkim

from tests.integration.harness import AUTHSERV_ID, GOOD_IP

from .milterclient import MilterConnection, Response, parse_message
from .zones import HOSTILE, HOSTILE_IP, hostile_key, weak_key

# The replies the milter may give at all (SPEC §1); anything else is a bug.
KNOWN_REPLIES = re.compile(
    r"^(250|550 5\.2\.1 Service unavailable, \[|450 4\.7\.25 Service unavailable, sending IPv6"
    r"|450 4\.7\.26 Service unavailable, message sent|451 4\.4\.3 Temporary DNS failure)"
)


@dataclass
class Case:
    name: str
    expect: str  # "rcpt=... eom=... <method>=<results>", see Outcome.summary
    client: str = GOOD_IP
    helo: str | bytes = "mail.example.com"
    sender: str | bytes = "sender@example.com"
    rcpts: list[str | bytes] = field(default_factory=lambda: ["rcpt@example.com"])
    message: bytes = b""
    raw: tuple[list[tuple[bytes, bytes]], bytes] | None = None  # headers, body as sent


@dataclass
class Outcome:
    rcpt: list[str]
    eom: str | None
    header: str | None  # our Authentication-Results value, unfolded
    results: list[tuple[str, str, dict[str, str]]]
    problems: list[str]

    def observed(self) -> dict[str, str]:
        """``rcpt``, ``eom`` and each method's results, as Case.expect writes them."""
        parts = dict(p.split("=", 1) for p in self.summary.split())
        return parts

    @property
    def summary(self) -> str:
        parts = ["rcpt=" + ",".join(r.split(" ")[0] for r in self.rcpt)]
        parts.append(f"eom={self.eom.split(' ')[0] if self.eom else '-'}")
        if self.eom and self.eom.startswith("450 4.7.26"):
            parts[-1] = "eom=4.7.26"
        if self.eom and self.eom.startswith("451 4.4.3"):
            parts[-1] = "eom=4.4.3"
        methods: dict[str, list[str]] = {}
        for method, result, _ in self.results:
            methods.setdefault(method, []).append(result)
        parts += [f"{m}={','.join(r)}" for m, r in methods.items()]
        return " ".join(parts)


def run(conn: MilterConnection, case: Case) -> Outcome:
    conn.connect(case.client)
    conn.helo(case.helo)
    headers, body = case.raw if case.raw is not None else parse_message(case.message)
    rcpts, eom = conn.message(case.sender, case.rcpts, headers, body)
    problems: list[str] = []
    replies = [r.smtp for r in rcpts if r is not None]
    if eom is not None:
        replies.append(eom.smtp)
    for reply in replies:
        if not KNOWN_REPLIES.match(reply):
            problems.append(f"unexpected reply {reply!r}")
    header, results = _our_header(eom, problems) if eom is not None and eom.ok else (None, [])
    return Outcome(
        [r.smtp if r is not None else "250" for r in rcpts],
        eom.smtp if eom is not None else None,
        header,
        results,
        problems,
    )


def _our_header(
    eom: Response, problems: list[str]
) -> tuple[str | None, list[tuple[str, str, dict[str, str]]]]:
    added = eom.added_headers()
    if len(added) != 1 or added[0][:2] != (0, "Authentication-Results"):
        problems.append(f"not exactly one header at the top: {added}")
        return None, []
    value = added[0][2]
    if "\r" in value or "\0" in value or re.search(r"\n(?!\t)", value):
        problems.append(f"header value not cleanly folded: {value!r}")
    unfolded = value.replace("\n\t", " ").strip()
    try:
        parsed = authres.AuthenticationResultsHeader.parse_value(unfolded)
    except authres.SyntaxError as e:
        problems.append(f"header does not parse: {e}: {unfolded!r}")
        return unfolded, []
    if parsed.authserv_id != AUTHSERV_ID:
        problems.append(f"authserv-id {parsed.authserv_id!r}")
    results = [
        (r.method, r.result, {f"{p.type}.{p.name}": p.value for p in r.properties})
        for r in parsed.results
    ]
    for method, _, props in results:
        if method not in ("iprev", "spf", "dkim"):
            problems.append(f"injected method {method!r} in {unfolded!r}")
        for k, v in props.items():
            if not re.fullmatch(r"[\x21-\x7e]+", v or "x"):
                problems.append(f"{k} carries {v!r}")
    return unfolded, results


# -- building the hostile messages -----------------------------------------------------------


def plain(
    sender: str = "someone@spffail.test", extra: list[bytes] | None = None, body: bytes = b"Hi.\r\n"
) -> bytes:
    head = [
        *(extra or []),
        f"From: <{sender}>".encode(),
        b"To: <rcpt@example.com>",
        b"Subject: hostile",
        b"Message-ID: <hostile@test.example>",
    ]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def sign(message: bytes, selector: str = "good", domain: str = HOSTILE, weak: bool = False,
         canonicalize: tuple[bytes, bytes] = (b"relaxed", b"simple"), **kw: object) -> bytes:
    key = weak_key()[0] if weak else hostile_key()[0]
    sig = dkim.sign(message, selector.encode(), domain.encode(), key,
                    canonicalize=canonicalize, include_headers=[b"from", b"to", b"subject"],
                    **kw)  # type: ignore[arg-type]
    return sig + message


def signature_of(signed: bytes) -> bytes:
    """The DKIM-Signature field (name, colon and folded value) at the top."""
    m = re.match(rb"(DKIM-Signature:.*?\r\n)(?![ \t])", signed, re.S)
    assert m is not None
    return m.group(1)


def retag(signed: bytes, drop: str | None = None, **tags: str) -> bytes:
    """The signed message with tags of its signature removed or replaced."""
    field_ = signature_of(signed)
    value = field_.split(b":", 1)[1].replace(b"\r\n", b"")
    parts = [p.strip() for p in value.split(b";") if p.strip()]
    out = []
    for p in parts:
        name = p.split(b"=", 1)[0].strip().decode()
        if name == drop:
            continue
        if name in tags:
            out.append(f"{name}={tags.pop(name)}".encode())
        else:
            out.append(p)
    out += [f"{k}={v}".encode() for k, v in tags.items()]
    return b"DKIM-Signature: " + b"; ".join(out) + b"\r\n" + signed[len(field_):]


def _top(many: bytes, good: bytes) -> bytes:
    """49 bad signatures above the good one (only the top 5 are tried)."""
    return many.replace(plain(), b"") + good


def _second(many: bytes, good: bytes) -> bytes:
    first = signature_of(many)
    return first + signature_of(good) + many[len(first):]


SPF_FAIL = "someone@spffail.test"  # SPF fails: DKIM alone decides


def dkim_case(name: str, expect: str, message: bytes) -> Case:
    return Case(f"dkim: {name}", expect, sender=SPF_FAIL, message=message)


def spf_case(name: str, label: str, expect: str) -> Case:
    sender = f"a@{label}.{HOSTILE}"
    return Case(f"spf: {name}", expect, client=HOSTILE_IP, helo=f"mail.{HOSTILE}",
                sender=sender, message=plain(sender))


def cases() -> list[Case]:
    base = plain()
    good = sign(base)
    many = base
    for i in range(49):
        many = sign(many, selector="revoked" if i % 2 else "nop")
    refused = "rcpt=250 eom=4.7.26"
    return [
        dkim_case("a good signature (control)", "rcpt=250 eom=250 iprev=pass spf=fail dkim=pass",
                  good),
        *(dkim_case(f"signature without {tag}=", refused, retag(good, drop=tag))
          for tag in ("b", "bh", "d", "s", "h", "v", "a")),
        dkim_case("b= not base64", refused, retag(good, b="!!!not*base64!!!")),
        dkim_case("bh= not base64", refused, retag(good, bh="%%%")),
        dkim_case("b= of 60 kB", refused, retag(good, b="QUFB" * 15000)),
        dkim_case("l= of 400 digits", refused, retag(good, l="9" * 400)),
        dkim_case("l= negative", refused, retag(good, l="-5")),
        dkim_case("l= beyond the body", refused, retag(sign(base, length=True), l="100000")),
        dkim_case("l=0, text appended after signing", "rcpt=250 eom=250 dkim=pass",
                  sign(base, length=True) + b"appended\r\n"),
        dkim_case("a=rsa-sha512 (unknown)", refused, retag(good, a="rsa-sha512")),
        dkim_case("a=foo-bar", refused, retag(good, a="foo-bar")),
        dkim_case("a=ed25519-sha256 over an RSA key", refused, retag(good, a="ed25519-sha256")),
        dkim_case("c=bogus/simple", refused, retag(good, c="bogus/simple")),
        dkim_case("x= long past", refused, retag(good, x="1000")),
        dkim_case("d= not a domain", refused, retag(good, d='a;b (c) "d"')),
        dkim_case("512-bit RSA key", refused, sign(base, selector="weak", weak=True)),
        *(dkim_case(f"key record {sel}", refused, sign(base, selector=sel))
          for sel in ("revoked", "badb64", "notakey", "unknownk", "nop", "badv", "garbage",
                      "absent")),
        dkim_case("key record through a CNAME", "rcpt=250 eom=250", sign(base, selector="cname")),
        # A CNAME loop is what a resolver answers SERVFAIL to: temporary.
        dkim_case("key record in a CNAME loop", "rcpt=250 eom=4.4.3 dkim=temperror",
                  sign(base, selector="kloop")),
        dkim_case("50 signatures, the good one lowest", refused, _top(many, good)),
        dkim_case("50 signatures, the good one second", "rcpt=250 eom=250", _second(many, good)),
        spf_case("pass (control)", "mail", "rcpt=250 eom=250 iprev=pass spf=pass"),
        spf_case("more than 10 DNS lookups", "toomany", refused + " iprev=pass spf=permerror"),
        spf_case("include loop", "loop", refused + " iprev=pass spf=permerror"),
        spf_case("include loop through a second record", "loopa",
                 refused + " iprev=pass spf=permerror"),
        spf_case("two SPF records", "two", refused + " iprev=pass spf=permerror"),
        spf_case("more than two void lookups", "void", refused + " iprev=pass spf=permerror"),
        spf_case("900 characters in 255-byte strings (TCP)", "long",
                 "rcpt=250 eom=250 iprev=pass spf=pass"),
        spf_case("a chain of 5 CNAMEs", "chain", "rcpt=250 eom=250 iprev=pass spf=pass"),
        # Knot follows so long a chain only part of the way: no TXT, so "none".
        spf_case("a chain of 24 CNAMEs", "deep", refused + " iprev=pass spf=none"),
        spf_case("a CNAME loop", "cloop", "rcpt=250 eom=4.4.3 spf=temperror"),
        spf_case("an include of a CNAME loop", "incloop", "rcpt=250 eom=4.4.3 spf=temperror"),
        spf_case("exp= with CR LF and a fake result", "exp", refused + " iprev=pass spf=fail"),
        spf_case("IDN sender, U-label", "Bücher", "rcpt=250 eom=250 spf=pass"),
        spf_case("IDN sender, A-label upper case, trailing dot", "XN--BCHER-KVA",
                 "rcpt=250 eom=250 spf=pass"),
        spf_case("IDNA 2008: faß is not fass", "faß", "rcpt=250 eom=250 spf=pass"),
        spf_case("IDNA 2008: fass itself fails", "fass", refused + " iprev=pass spf=fail"),
        *envelope_cases(good),
        *recipient_cases(),
        *message_cases(),
    ]


NO_INJECTION = "rcpt=250 eom=4.7.26 iprev=pass spf=none dkim=none"


def envelope_cases(good: bytes) -> list[Case]:
    """HELO and MAIL FROM values that try to write into our header."""
    ok = plain("sender@example.com")
    return [
        Case("helo: '; dkim=pass' with the null sender", NO_INJECTION,
             helo=b"mail.example.com; dkim=pass header.d=evil.example", sender=b"<>",
             message=ok),
        Case("helo: CR LF and a header with the null sender", NO_INJECTION,
             helo=b"mail.example.com\r\nAuthentication-Results: mx.test.example; dkim=pass",
             sender=b"<>", message=ok),
        Case("helo: '(' and '\"' with the null sender", NO_INJECTION,
             helo=b'mail(example).com"', sender=b"<>", message=ok),
        Case("helo: [IPv6:2001:db8::1] with the null sender", NO_INJECTION,
             helo=b"[IPv6:2001:db8::1]", sender=b"<>", message=ok),
        Case("helo: [IPv6:2001:db8::1] with the null sender, DKIM-signed",
             "rcpt=250 eom=250 iprev=pass spf=none dkim=pass",
             helo=b"[IPv6:2001:db8::1]", sender=b"<>", message=good),
        Case("helo: empty, null sender", NO_INJECTION, helo=b"", sender=b"<>", message=ok),
        # (under hostile.test: a name outside Knot's zones would be REFUSED, temperror)
        Case("helo: 8-bit bytes, null sender", NO_INJECTION, helo=f"maïl\xff.{HOSTILE}",
             sender=b"<>", message=ok),
        Case("mail from: local part with '; dkim=pass'",
             "rcpt=250 eom=250 iprev=pass spf=pass dkim=none",
             sender=b"<a;dkim=pass@example.com>", message=ok),
        Case("mail from: quoted local part with '(' and '\"'",
             "rcpt=250 eom=250 iprev=pass spf=pass dkim=none",
             sender=b'<"a (b) \\"c\\""@example.com>', message=ok),
        Case("mail from: CR LF in the local part",
             "rcpt=250 eom=250 iprev=pass spf=pass dkim=none",
             sender=b"<a\r\nX-Injected: yes@example.com>", message=ok),
        Case("mail from: '; dkim=pass' after the domain", NO_INJECTION,
             sender=b"<a@example.com;dkim=pass>", message=ok),
        Case("mail from: SMTPUTF8 local part", "rcpt=250 eom=250 iprev=pass spf=pass dkim=none",
             sender="üser@example.com".encode(), message=ok),
        Case("mail from: source route", "rcpt=250 eom=250 iprev=pass spf=pass dkim=none",
             sender=b"<@relay.example:sender@example.com>", message=ok),
        Case("mail from: no angle brackets, ESMTP parameters",
             "rcpt=250 eom=250 iprev=pass spf=pass dkim=none",
             sender=b"sender@example.com", message=ok),
    ]


def recipient_cases() -> list[Case]:
    """Opt-in matching: U-label and A-label alike, any case, trailing dot ignored
    (the main milter opts in bücher.example, xn--fa-hia.example and .xn--p1ai)."""
    ok = plain("sender@example.com")

    def rcpt(address: str, expect: str) -> Case:
        return Case(f"rcpt: {address}", expect, rcpts=[address.encode()], message=ok)

    accepted = "rcpt=250 eom=250 iprev=pass spf=pass"
    return [
        rcpt("<x@bücher.example>", accepted),
        rcpt("<x@BÜCHER.EXAMPLE.>", accepted),
        rcpt("<x@Xn--Bcher-Kva.Example>", accepted),
        rcpt("<x@faß.example>", accepted),
        rcpt("<x@FASS.example>", "rcpt=550"),  # IDNA 2008: not faß.example
        rcpt("<x@пример.рф>", accepted),
        rcpt("<x@рф>", "rcpt=550"),  # ".xn--p1ai" opts in subdomains only
        rcpt("<x;y@example.com>", accepted),
        rcpt("<x@example.com;dkim=pass>", "rcpt=550"),
        rcpt("<x@☃.example>", "rcpt=550"),  # not IDNA 2008: compared as is, never matches
        rcpt("<postmaster>", "rcpt=250 eom=250"),
    ]


def message_cases() -> list[Case]:
    """Odd header folding, bare LF, 8-bit bytes, NUL, no body, no header."""
    ok = plain("sender@example.com")
    accepted = "rcpt=250 eom=250 iprev=pass spf=pass"
    heads, body = parse_message(ok)
    signed = sign(plain())
    refolded = signed.replace(b"; b=", b";\r\n \r\n\t  b=", 1)
    return [
        Case("header folded with an all-blank line", accepted,
             raw=([*heads, (b"Subject", b"\n \n\t folded")], body)),
        Case("header with an empty value", accepted, raw=([*heads, (b"X-Empty", b"")], body)),
        Case("header of 60 kB on one line", accepted,
             raw=([*heads, (b"X-Long", b" " + b"x" * 60000)], body)),
        Case("header name with 8-bit bytes (UTF-8)", accepted,
             raw=([*heads, ("X-été".encode(), b" v")], body)),
        Case("5,000 header fields", accepted, raw=([*heads, *[(b"X-H", b" v")] * 5000], body)),
        Case("DKIM-Signature refolded with blank lines (relaxed headers)",
             "rcpt=250 eom=250 iprev=pass spf=fail dkim=pass", sender=SPF_FAIL, message=refolded),
        Case("bare LF line ends in the body", accepted, raw=(heads, b"one\ntwo\n\nthree\n")),
        Case("bare LF line ends, DKIM-signed over CRLF",
             "rcpt=250 eom=250 iprev=pass spf=fail dkim=pass", sender=SPF_FAIL,
             raw=(parse_message(sign(plain(body=b"one\r\ntwo\r\n")))[0], b"one\ntwo\n")),
        Case("8-bit bytes in headers and body", accepted,
             raw=([*heads, (b"Subject", b" caf\xe9 \xff\xfe")], b"\x80\x81\xff\r\n")),
        Case("NUL bytes in the body", accepted, raw=(heads, b"a\x00b\r\n\x00\r\n")),
        Case("no body at all", accepted, raw=(heads, b"")),
        Case("no header at all", accepted, raw=([], b"just a body\r\n")),
        Case("nothing at all", accepted, raw=([], b"")),
        Case("a body of a million empty lines, DKIM-signed",
             "rcpt=250 eom=250 iprev=pass spf=fail dkim=pass", sender=SPF_FAIL,
             message=sign(plain(body=b"x\r\n" + b"\r\n" * 1_000_000))),
        Case("a body of a million blank lines, relaxed, DKIM-signed",
             "rcpt=250 eom=250 iprev=pass spf=fail dkim=pass", sender=SPF_FAIL,
             message=sign(plain(body=b"x\r\n" + b" \t\r\n" * 1_000_000),
                          canonicalize=(b"relaxed", b"relaxed"))),
    ]
