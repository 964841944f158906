"""Acceptance on both MTAs, from real IPv6 clients: one table of cases, run
against Postfix and against Sendmail, each connection made from an address
of the lab network namespace (netlab.py) over a veth link.

Each expected reply is the SPEC §1 text; ``LabMta.rcpt_reply`` adds what
Sendmail puts in front of a RCPT reply (``<rcpt>... ``).  What is
delivered is read back from the sink both MTAs relay to.  How the milter
classified a client it left alone (authenticated, trusted, IPv4, an IPv4
peer on a dual-stack listener) is read from its decision log.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import pytest

from .harness import AUTHSERV_ID, LAB_SPF, NOT_OPTED_IN, DnsWorld, MilterProcess, Sink
from .replies import no_ptr, not_authenticated, not_opted_in
from .smtpclient import (
    LabMta,
    Outcome,
    Reply,
    auth_results,
    by_method,
    header_fields,
    make_message,
    marker,
    parse_ar,
    unfold,
)

pytestmark = pytest.mark.timeout(60)

# -- the SPEC's replies ---------------------------------------------------------------------




DNS_TEMPFAIL = "451 4.4.3 *"  # the text after the codes is free (SPEC §1)
OK = "250"

# -- Authentication-Results already in the message --------------------------------------------

# Claiming our authserv-id: mixed case, folded, unparseable.  Each must go.
FORGED = (
    "Authentication-Results: MX.Test.Example; spf=pass smtp.mailfrom=forged1@example.com",
    "Authentication-Results: mx.test.example;\r\n\tdkim=pass header.d=forged2.example\r\n"
    "\theader.s=x",
    "Authentication-Results: mx.test.example; {forged3} ==> not a result (",
)
# Another receiver's, between ours: must stay, unchanged, in place.
FOREIGN = "Authentication-Results: other.example;\r\n spf=pass smtp.mailfrom=x@example.com"


def ar_value(field_line: str) -> str:
    return unfold(field_line.split(":", 1)[1]).strip()


def with_forged(n: int) -> tuple[str, ...]:
    """``n`` forged headers around the foreign one (first forged on top)."""
    return (*FORGED[:1], FOREIGN, *FORGED[1:n]) if n else (FOREIGN,)


# -- the table ----------------------------------------------------------------------------------

Message = Callable[[str, DnsWorld], bytes]


def plain(from_addr: str, to: str, extra: tuple[str, ...] = ()) -> Message:
    return lambda mark, dns: make_message(mark, from_addr=from_addr, to=to, extra_headers=extra)


def signed(from_addr: str, to: str, domain: str) -> Message:
    return lambda mark, dns: dns.sign(make_message(mark, from_addr=from_addr, to=to), domain)


@dataclass(frozen=True)
class Tx:
    """One transaction and what must come of it.

    Replies: a 3-digit code, a full SPEC text, or a prefix ending in ``*``;
    ``{good}`` etc. stand for the lab's addresses (its slot is chosen at run
    time).
    ``stamp``: method -> result of our header (None: no header of ours);
    ``kept``: the other Authentication-Results that must arrive, in order.
    """

    mail_from: str
    rcpts: tuple[str, ...]
    message: Message
    rcpt_replies: tuple[str, ...]
    data_reply: str | None  # None: no DATA (every recipient refused)
    stamp: dict[str, str] | None = None
    kept: tuple[str, ...] = ()


@dataclass(frozen=True)
class Case:
    id: str
    client: str  # which lab address: a LabAddresses field name, or ::1
    txs: tuple[Tx, ...]  # on one connection, in order
    listener: str = "v6"
    login: bool = False  # a SASL-authenticated client
    scope: dict[str, str] = field(default_factory=dict)  # MTA -> scope the milter logs


SENDER = f"sender@{LAB_SPF}"  # SPF pass from the good (and unconfirmed) address
PASS = {"iprev": "pass", "spf": "pass", "dkim": "none"}
ACCEPTED_SPF = Tx(SENDER, ("rcpt@example.com",), plain(SENDER, "rcpt@example.com"), (OK,), OK, PASS)


def forged_case(n: int) -> Case:
    return Case(
        f"forged-{n}",
        "good",
        (
            Tx(
                SENDER,
                ("rcpt@example.com",),
                plain(SENDER, "rcpt@example.com", with_forged(n)),
                (OK,),
                OK,
                PASS,
                kept=(ar_value(FOREIGN),),
            ),
        ),
    )


def out_of_scope(client: str, listener: str, scope: dict[str, str], case_id: str) -> Case:
    """Neither judged nor stamped (SPF would fail, the domain has not opted
    in); forged headers removed all the same, the foreign one kept."""
    return Case(
        case_id,
        client,
        (
            Tx(
                "someone@spffail.test",
                (f"rcpt@{NOT_OPTED_IN}", "rcpt@example.com"),
                plain("someone@spffail.test", "rcpt@example.com", with_forged(3)),
                (OK, OK),
                OK,
                None,
                kept=(ar_value(FOREIGN),),
            ),
        ),
        listener=listener,
        scope=scope,
    )


CASES = [
    Case(
        "not-opted-in-550",
        "good",
        (
            Tx(
                SENDER,
                (f"Someone@{NOT_OPTED_IN.upper()}",),
                plain(SENDER, f"someone@{NOT_OPTED_IN}"),
                (not_opted_in(NOT_OPTED_IN),),
                None,
            ),
        ),
    ),
    Case(
        "no-ptr-450-4.7.25",
        "noptr",
        (
            Tx(
                SENDER,
                ("rcpt@example.com",),
                plain(SENDER, "rcpt@example.com"),
                (no_ptr("{noptr}"),),
                None,
            ),
        ),
    ),
    Case(
        "each-recipient-on-its-own",
        "noptr",
        (
            Tx(
                SENDER,
                (f"a@{NOT_OPTED_IN}", "b@example.com"),
                plain(SENDER, "b@example.com"),
                (not_opted_in(NOT_OPTED_IN), no_ptr("{noptr}")),
                None,
            ),
        ),
    ),
    Case(
        "no-spf-no-dkim-450-4.7.26",
        "good",
        (
            Tx(
                "someone@spffail.test",
                ("rcpt@example.com",),
                plain("someone@spffail.test", "rcpt@example.com"),
                (OK,),
                not_authenticated("{good}"),
            ),
        ),
    ),
    Case(
        "spf-temperror-451-4.4.3",
        "good",
        (
            Tx(
                "sender@tempspf.test",
                ("rcpt@example.com",),
                plain("sender@tempspf.test", "rcpt@example.com"),
                (OK,),
                DNS_TEMPFAIL,
            ),
        ),
    ),
    Case("accept-spf-pass-stamped", "good", (ACCEPTED_SPF,)),
    Case(
        "accept-dkim-pass-stamped",
        "good",
        (
            Tx(
                "someone@spffail.test",
                ("rcpt@example.com",),
                signed("someone@spffail.test", "rcpt@example.com", "spffail.test"),
                (OK,),
                OK,
                {"iprev": "pass", "spf": "fail", "dkim": "pass"},
            ),
        ),
    ),
    Case(
        "accept-unconfirmed-ptr",
        "unconfirmed",
        (
            Tx(
                SENDER,
                ("rcpt@example.net",),
                plain(SENDER, "rcpt@example.net"),
                (OK,),
                OK,
                {"iprev": "fail", "spf": "pass", "dkim": "none"},
            ),
        ),
    ),
    *(forged_case(n) for n in range(4)),
    Case(
        "several-messages-one-connection",
        "good",
        (
            ACCEPTED_SPF,
            Tx(
                "someone@spffail.test",
                ("rcpt@example.com",),
                plain("someone@spffail.test", "rcpt@example.com"),
                (OK,),
                not_authenticated("{good}"),
            ),
            Tx(
                "someone@spffail.test",
                ("rcpt@example.com",),
                signed("someone@spffail.test", "rcpt@example.com", "spffail.test"),
                (OK,),
                OK,
                {"iprev": "pass", "spf": "fail", "dkim": "pass"},
            ),
            Tx(
                SENDER,
                (f"rcpt@{NOT_OPTED_IN}",),
                plain(SENDER, f"rcpt@{NOT_OPTED_IN}"),
                (not_opted_in(NOT_OPTED_IN),),
                None,
            ),
            ACCEPTED_SPF,
        ),
    ),
    Case(
        "authenticated-exempt",
        "authenticated",  # no PTR either
        (
            Tx(
                "someone@spffail.test",
                (f"rcpt@{NOT_OPTED_IN}", "rcpt@example.com"),
                plain("someone@spffail.test", "rcpt@example.com", with_forged(1)),
                (OK, OK),
                OK,
                None,
                kept=(ar_value(FOREIGN),),
            ),
        ),
        login=True,
        scope={"postfix": "authenticated", "sendmail": "authenticated"},
    ),
    Case(
        "trusted-exempt-keeps-its-headers",
        "trusted",
        (
            Tx(
                "someone@spffail.test",
                (f"rcpt@{NOT_OPTED_IN}",),
                plain("someone@spffail.test", f"rcpt@{NOT_OPTED_IN}", with_forged(3)),
                (OK,),
                OK,
                None,
                kept=tuple(ar_value(h) for h in with_forged(3)),
            ),
        ),
        scope={"postfix": "trusted", "sendmail": "trusted"},
    ),
    Case(
        "trusted-loopback-exempt",
        "::1",
        (
            Tx(
                "someone@spffail.test",
                (f"rcpt@{NOT_OPTED_IN}",),
                plain("someone@spffail.test", f"rcpt@{NOT_OPTED_IN}"),
                (OK,),
                OK,
                None,
            ),
        ),
        listener="lo6",
        scope={"postfix": "trusted", "sendmail": "trusted"},
    ),
    out_of_scope("ipv4", "v4", {"postfix": "ipv4", "sendmail": "ipv4"}, "ipv4-untouched"),
    # Sendmail's dual-stack socket accepts the client as ::ffff:198.18.0.2 and
    # hands the milter 198.18.0.2 (AF_INET).  Postfix cannot listen on a mapped
    # address ("no local interface found for ::ffff:..."): the same client
    # reaches it on its IPv4 socket.
    out_of_scope(
        "ipv4", "mapped", {"postfix": "ipv4", "sendmail": "ipv4"}, "mapped-ipv4-untouched"
    ),
]


# -- running a case ---------------------------------------------------------------------------


def matches(reply: Reply | None, expected: str) -> bool:
    if reply is None:
        return False
    if re.fullmatch(r"\d{3}", expected):
        return reply.code == int(expected)
    if expected.endswith("*"):
        return str(reply).startswith(expected[:-1])
    return str(reply) == expected


def check_delivery(sink: Sink, mark: str, message: bytes, tx: Tx, client: str) -> None:
    raw = sink.wait_for(mark).data
    fields = header_fields(raw)
    names = [n.lower() for n, _ in fields]
    ours = [
        i
        for i, (n, v) in enumerate(fields)
        if n.lower() == "authentication-results"
        and unfold(v).strip().lower().startswith(AUTHSERV_ID + ";")
    ]
    others = [v for v in auth_results(raw) if not v.lower().startswith(AUTHSERV_ID + ";")]
    if tx.stamp is None:
        # Nothing of ours added; what is kept is exactly what is expected.
        assert auth_results(raw) == list(tx.kept), auth_results(raw)
        return
    assert len(ours) == 1, raw[:1500]
    assert others == list(tx.kept), others
    # Ours above every header the client sent (RFC 8601 §5); on both MTAs it
    # is the very first, above the MTA's own Received:.
    sent = {(n.lower(), unfold(v).strip()) for n, v in header_fields(message)}
    from_client = [i for i, (n, v) in enumerate(fields) if (n.lower(), unfold(v).strip()) in sent]
    assert ours[0] < min(from_client), names
    assert ours == [0] and names[1] == "received", names
    header = parse_ar(fields[0][1])
    assert header.authserv_id == AUTHSERV_ID
    got = {m: [r.result for r in by_method(header, m)] for m in tx.stamp}
    assert got == {m: [r] for m, r in tx.stamp.items()}, got
    (iprev,) = by_method(header, "iprev")
    assert iprev.props == {"policy.iprev": client}, iprev


def logged_scopes(milter: MilterProcess, helo: str) -> set[str]:
    lines = [ln for ln in milter.log_text().splitlines() if f" helo={helo} " in ln]
    return {m.group(1) for ln in lines if (m := re.search(r" scope=(\S+)", ln))}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_matrix(
    case: Case, lab_mta: LabMta, dns: DnsWorld, sink: Sink, lab_milter: MilterProcess
) -> None:
    mta = lab_mta
    addrs = asdict(mta.netlab.clients)
    client = addrs.get(case.client, case.client)
    helo = f"h{marker()[1:13]}.{LAB_SPF}" if case.scope else LAB_SPF
    results: list[tuple[Tx, str, bytes, Outcome]] = []
    with mta.session(
        case.listener, client, helo=helo, login="lab-user" if case.login else None
    ) as s:
        for tx in case.txs:
            mark = marker()
            message = tx.message(mark, dns)
            results.append((tx, mark, message, s.send(tx.mail_from, list(tx.rcpts), message)))
    for tx, mark, message, out in results:
        assert out.mail.code == 250, out
        expected = [
            mta.rcpt_reply(r, e.format_map(addrs))
            for r, e in zip(tx.rcpts, tx.rcpt_replies, strict=True)
        ]
        assert all(matches(g, e) for g, e in zip(out.rcpts, expected, strict=True)), (
            [str(r) for r in out.rcpts],
            expected,
        )
        if tx.data_reply is None:
            assert out.data is None, out
        else:
            data_reply = tx.data_reply.format_map(addrs)
            assert matches(out.data, data_reply), (str(out.data), data_reply)
        if out.accepted:
            check_delivery(sink, mark, message, tx, client)
    for _tx, mark, _, out in results:
        if not out.accepted:
            assert not sink.find(mark), f"refused message {mark} was delivered"
    if case.scope:
        assert logged_scopes(lab_milter, helo) == {case.scope[mta.name]}
