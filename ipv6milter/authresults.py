"""Our Authentication-Results header (RFC 8601), and the forged ones to delete.

The header is built from typed ``authres`` result objects, so that ``authres``
parses it back.  Values from the network are sanitised first: a PTR name or
a HELO argument must never smuggle a ``;`` or a comment into the header.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence

import authres
from authres.core import AuthenticationResultProperty

from .model import Aligned, Alignment, DkimResult, IPAddress, IprevResult, SpfResult
from .policy import address_text

FIELD = "Authentication-Results"

_ADDR_SPEC = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}@[A-Za-z0-9._-]{1,253}$")
_DOMAIN = re.compile(r"^[A-Za-z0-9._-]{1,253}$")
_HELO = re.compile(r"^[A-Za-z0-9._:\[\]-]{1,255}$")
_B = re.compile(r"^[A-Za-z0-9+/=]{1,64}$")
_REASON = re.compile(r"[A-Za-z0-9][A-Za-z0-9 .,=^/+-]{0,99}")


def _token(value: str) -> str | None:
    """A domain, selector or PTR name, written only when it is plainly one.

    The checks already clean what they report (iprev.safe_name,
    dkimcheck.describe); this keeps the header well-formed whatever a
    result holds.
    """
    return value if _DOMAIN.fullmatch(value) else None


def _helo_value(helo: str) -> str | None:
    """``smtp.helo``: a domain name or an address literal, else nothing.

    authres leaves a value containing ``@`` unquoted (a ``;`` in it would end
    the clause) and does not unescape quoted-pairs when parsing, so anything
    beyond these characters could not be written faithfully.
    """
    return helo if _HELO.fullmatch(helo) else None


def _mailfrom_value(identity: str) -> str | None:
    """``smtp.mailfrom``: the address, or its domain when the local part is odd.

    authres leaves any value containing ``@`` unquoted, so only a plain
    addr-spec may be written whole.
    """
    if _ADDR_SPEC.fullmatch(identity):
        return identity
    domain = identity.rpartition("@")[2]
    return domain if _DOMAIN.fullmatch(domain) else None


def _reason(r: DkimResult) -> str | None:
    """The comment after ``dkim=policy`` or ``dkim=permerror``: why it did not pass.

    ``detail`` starts with a fixed phrase of ours (dkimaccept's reasons,
    "no key record", ...), optionally followed by ``": "`` and what a library
    said about hostile input; only the phrase is written, and only when it is
    plain text that cannot end the comment or the clause.
    """
    if r.result not in ("policy", "permerror"):
        return None
    phrase = r.detail.split(": ", 1)[0]
    return phrase if _REASON.fullmatch(phrase) else None


def alignment_comment(alignment: Alignment | None, state: Aligned) -> str | None:
    """The comment on a passing ``spf`` or ``dkim`` result in From-aligned
    mode (SPEC §2), naming the From domain; None with ``Alignment off``.
    No ``dmarc=`` result is written: no DMARC policy was evaluated."""
    if alignment is None:
        return None
    domain = _token(alignment.from_domain) if alignment.from_domain else None
    if domain is None:
        return "not aligned: no single From domain"
    if state is Aligned.UNKNOWN:
        return "alignment unknown: temporary DNS failure"
    return f"{state.value} with {domain}"


def results_for(
    addr: IPAddress | None,
    iprev: IprevResult | None,
    spf: SpfResult | None,
    dkim: Sequence[DkimResult],
    alignment: Alignment | None = None,
) -> list[authres.core.BaseAuthenticationResult]:
    out: list[authres.core.BaseAuthenticationResult] = []
    if iprev is not None and addr is not None:
        out.append(_iprev_result(iprev.result.value, address_text(addr), iprev.names[:5]))
    if spf is not None:
        out.append(_spf_result(spf, _spf_comment(spf, alignment)))
    out.extend(_dkim_results(dkim, alignment))
    return out


def _iprev_result(result: str, addr: str,
                  names: Sequence[str]) -> authres.core.BaseAuthenticationResult:
    tokens = [n for n in map(_token, names) if n]
    return authres.IPRevAuthenticationResult(
        result=result, policy_iprev=addr, policy_iprev_comment=", ".join(tokens) or None)


def _spf_comment(spf: SpfResult, alignment: Alignment | None) -> str | None:
    return (alignment_comment(alignment, alignment.spf)
            if alignment is not None and spf.result == "pass" else None)


def _spf_result(spf: SpfResult, comment: str | None) -> authres.core.BaseAuthenticationResult:
    if spf.scope == "helo":
        return authres.SPFAuthenticationResult(
            result=spf.result, result_comment=comment, smtp_helo=_helo_value(spf.identity))
    return authres.SPFAuthenticationResult(
        result=spf.result, result_comment=comment, smtp_mailfrom=_mailfrom_value(spf.identity))


def _dkim_results(dkim: Sequence[DkimResult],
                  alignment: Alignment | None) -> list[authres.core.BaseAuthenticationResult]:
    if not dkim:
        return [authres.DKIMAuthenticationResult(result="none")]
    out: list[authres.core.BaseAuthenticationResult] = []
    for i, r in enumerate(dkim):
        comment = _reason(r)
        if alignment is not None and r.result == "pass":
            comment = alignment_comment(alignment, alignment.of_dkim(i))
        res = authres.DKIMAuthenticationResult(
            result=r.result,
            result_comment=comment,
            header_d=_token(r.domain),
            header_s=_token(r.selector),
        )
        if _B.fullmatch(r.b):
            # Last: authres 1.2.0 drops a quoted value that another property follows.
            res.properties.append(AuthenticationResultProperty("header", "b", r.b))
        out.append(res)
    return out


# The iprev and SPF clauses of one client and sender are the same from one
# message to the next: each is rendered by authres once and its text kept
# (a DKIM clause carries its signature's header.b=, so it is rendered each time).
_CLAUSES = 1024


@functools.lru_cache(maxsize=_CLAUSES)
def _iprev_clause(result: str, addr: str, names: tuple[str, ...]) -> str:
    return str(_iprev_result(result, addr, names))


@functools.lru_cache(maxsize=_CLAUSES)
def _spf_clause(spf: SpfResult, comment: str | None) -> str:
    return str(_spf_result(spf, comment))


@functools.cache
def _flat_layout() -> bool:
    """Whether authres writes a header as its authserv-id and its clauses
    joined by ``"; "`` (authres 1.2: ``header_value``).  Its layout is code,
    not data: asked once per process, on a header of two clauses, instead
    of rendering every clause a second time for each message."""
    probe = [authres.DKIMAuthenticationResult(result="pass", header_d="a.example"),
             authres.SPFAuthenticationResult(result="none")]
    hdr = authres.AuthenticationResultsHeader(authserv_id="mx.example", results=probe)
    return hdr.header_value() == "; ".join([hdr.authserv_id, *map(str, hdr.results)])


def header_value(authserv_id: str, results: Iterable[authres.core.BaseAuthenticationResult]) -> str:
    """The folded value for ``addheader``: one result clause per line."""
    hdr = authres.AuthenticationResultsHeader(authserv_id=authserv_id, results=list(results))
    if not hdr.results or not _flat_layout():  # authres's own layout (none result, or changed)
        return hdr.header_value()
    return ";\n\t".join([hdr.authserv_id, *map(str, hdr.results)])


def build(
    authserv_id: str,
    addr: IPAddress | None,
    iprev: IprevResult | None,
    spf: SpfResult | None,
    dkim: Sequence[DkimResult],
    alignment: Alignment | None = None,
) -> str:
    if not _flat_layout():  # authres's own layout, whatever it has become
        return header_value(authserv_id, results_for(addr, iprev, spf, dkim, alignment))
    clauses = [authserv_id]
    if iprev is not None and addr is not None:
        clauses.append(_iprev_clause(iprev.result.value, address_text(addr), iprev.names[:5]))
    if spf is not None:
        clauses.append(_spf_clause(spf, _spf_comment(spf, alignment)))
    clauses.extend(map(str, _dkim_results(dkim, alignment)))
    return ";\n\t".join(clauses)


def unfold(value: str) -> str:
    return re.sub(r"\r?\n(?=[ \t])", "", value)


# White space (Unicode, as str.split sees it) and what ends the authserv-id.
_SPACE = re.compile(r"\s*")
_TOKEN = re.compile(r"[^\s;(]*")
# What changes the depth of a comment (a run of parentheses at a time), or
# a quoted-pair (RFC 5322 §3.2.1) whose character does not count.  Written
# to start with one character class, so that the search between two marks
# runs at C speed.
_COMMENT_MARK = re.compile(r"[()\\](?:(?<=\()\(*|(?<=\))\)*|(?<=\\).?)", re.DOTALL)
# What ends a quoted-string, or escapes the next character.
_QUOTE_MARK = re.compile(r'["\\]')
_QUOTED_PAIR = re.compile(r"\\(.)", re.DOTALL)


def _after_comment(v: str, i: int) -> int:
    """Where the comment that opens at ``v[i]`` ends (RFC 5322 §3.2.2:
    comments nest, ``\\`` escapes), or ``len(v)`` when it never closes.
    One pass with a depth counter, jumping from one run of parentheses or
    quoted-pair to the next."""
    depth, j = 0, i
    while (m := _COMMENT_MARK.search(v, j)) is not None:
        run, j = m.group(), m.end()
        if run[0] == "(":
            depth += len(run)
        elif run[0] == ")":
            depth -= len(run)
            if depth <= 0:
                return j + depth  # where the depth reached 0, inside the run
    return len(v)


def _end(m: re.Match[str] | None, default: int) -> int:
    return m.end() if m is not None else default


def _skip_cfws(v: str, i: int) -> int:
    """Past the white space and comments at ``v[i]`` (RFC 5322 CFWS)."""
    while True:
        i = _end(_SPACE.match(v, i), i)
        if not v.startswith("(", i):
            return i
        i = _after_comment(v, i)


def _quoted(v: str, i: int) -> str:
    """The quoted-string that opens at ``v[i]``, unescaped; "" if it never closes."""
    j = i + 1
    while (m := _QUOTE_MARK.search(v, j)) is not None:
        if m.group() == '"':
            return _QUOTED_PAIR.sub(r"\1", v[i + 1 : m.start()])
        j = m.end() + 1  # a quoted-pair: the next character is taken as it is
    return ""


def authserv_id_of(value: str) -> str:
    """The authserv-id of a received header, read leniently.

    A forged header need not parse: the first token after any white space
    and comments (a quoted-string unquoted), up to white space, ``;`` or a
    comment, is compared, so a broken header that claims our name is removed
    too.  One pass that stops at the authserv-id: linear whatever precedes
    it, comments nested to any depth; nothing is cut, so our id after a
    comment of any length is still found (RFC 8601 §5: it must be deleted).
    A comment that never closes runs to the end of the field (no id).
    """
    i = _skip_cfws(value, 0)
    if value.startswith('"', i):
        return _quoted(value, i).lower()
    return value[i : _end(_TOKEN.match(value, i), i)].lower()


def forged_indexes(values: Sequence[str], authserv_id: str) -> list[int]:
    """1-based indexes (among Authentication-Results fields) to delete, highest first.

    Deleting from the top would renumber the rest under Postfix and not
    under Sendmail; from the bottom up is right on both.
    """
    return matching_indexes([authserv_id_of(v) for v in values], authserv_id)


def matching_indexes(ids: Sequence[str], authserv_id: str) -> list[int]:
    """``forged_indexes`` from authserv-ids already read with ``authserv_id_of``."""
    ours = authserv_id.lower()
    return sorted((i for i, v in enumerate(ids, 1) if v == ours), reverse=True)


def parse(value: str) -> authres.AuthenticationResultsHeader:
    """Parse a header value with authres (unfolding it first)."""
    return authres.AuthenticationResultsHeader.parse_value(unfold(value))
