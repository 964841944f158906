"""From-aligned mode (SPEC §1, ``Alignment relaxed|strict``): the From domain,
and whether SPF's and DKIM's domains are aligned with it (RFC 9989).

Three parts, each bounded in what a sender controls:

* ``author_domain``: the From domain of a message.  Exactly one From field,
  whose addresses are parsed strictly (RFC 5322 §3.4, RFC 6854 group syntax,
  RFC 6532 UTF-8), each address being a contiguous slice of the field as
  written, and exactly one domain among them that is not an address literal.
  The parser is a single left-to-right pass: every step consumes input, no
  pattern can backtrack, and the field is cut at ``FROM_FIELD_MAX`` first.
  A parser that accepts more (``email.utils.getaddresses`` before the fix of
  CVE-2023-27043 read ``alice@example.org)<bob@example.org>`` as two
  addresses) would let a sender show one author and have another checked.
* ``Walk``: RFC 9989 §4.10's DNS tree walk over ``_dmarc`` TXT records,
  which finds a domain's organizational domain without a Public Suffix
  List: at most eight queries a walk, ``psd=y``/``psd=n`` honoured, and a
  domain with no DMARC record above it is its own organizational domain.
  Its lookups go through the shared resolver and spend the end-of-message
  ``Budget``; a temporary failure leaves the organizational domain unknown.
* ``evaluate``: the facts the policy decides from (``model.Alignment``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from .config import a_labels
from .limits import DMARC_RECORD_MAX, DMARC_WALK_QUERIES, FROM_FIELD_MAX
from .model import Aligned, Alignment, DkimResult, SpfResult
from .policy import aligned_summary
from .resolver import Budget, Resolver, TempFail

MODES = ("off", "relaxed", "strict")

# -- domains ---------------------------------------------------------------------------

_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")


def normalise(domain: str, *, drop_dot: bool = True) -> str | None:
    """``domain`` as SPEC §1 compares it: A-label, lower case, and (for
    ``d=``, the MAIL FROM domain and the HELO name: ``drop_dot``) without a
    trailing dot; None when it is not a domain name (not valid IDNA, a label
    or the name too long, characters no host name has)."""
    if drop_dot and domain.endswith("."):
        domain = domain[:-1]
    if not domain or len(domain) > 253 or domain.endswith("."):
        return None
    # A label longer than 63 characters cannot become a valid A-label;
    # refusing it first keeps IDNA's work bounded by the label limit.
    if any(len(label) > 63 for label in domain.split(".")):
        return None
    try:
        d = a_labels(domain)
    except UnicodeError:
        return None
    if len(d) > 253 or not all(_LABEL.fullmatch(label) for label in d.split(".")):
        return None
    return d


# -- the From field (RFC 5322 §3.4, §3.6.2) ---------------------------------------------


class _Malformed(ValueError):
    """The From field does not parse: there is no From domain."""


# atext (RFC 5322 §3.2.3) and UTF8-non-ascii (RFC 6532 §3.2), and "." so that
# a dot-atom or an obs-phrase is one run; a character class with a single
# "+" cannot backtrack.
_ATOM_RUN = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.\-\u0080-\U0010ffff]+")
_WSP_RUN = re.compile(r"[ \t\r\n]+")
_QTEXT_RUN = re.compile(r'[^"\\]+')
_CTEXT_RUN = re.compile(r"[^()\\]+")
_DTEXT_RUN = re.compile(r"[^\[\]\\]*")
# Controls other than the white space of folding: never part of a From field.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_SPECIALS = frozenset("<>:;@,")

_Token = tuple[str, int, int]  # kind ("atom", "quoted", "literal" or a special), start, end


def _comment_end(s: str, i: int) -> int:
    """The end of the comment opening at ``s[i]`` (nested, RFC 5322 §3.2.2),
    with a depth counter: one pass, never a nested pattern."""
    depth, n = 0, len(s)
    while i < n:
        c = s[i]
        if c == "(":
            depth += 1
            i += 1
        elif c == ")":
            depth -= 1
            i += 1
            if depth == 0:
                return i
        elif c == "\\":
            i += 2
        else:
            i = _CTEXT_RUN.match(s, i).end()  # type: ignore[union-attr]
    raise _Malformed("a comment is not closed")


def _quoted_end(s: str, i: int) -> int:
    i, n = i + 1, len(s)
    while i < n:
        c = s[i]
        if c == '"':
            return i + 1
        if c == "\\":
            i += 2
        else:
            i = _QTEXT_RUN.match(s, i).end()  # type: ignore[union-attr]
    raise _Malformed("a quoted string is not closed")


def _tokens(s: str) -> list[_Token]:
    if _CONTROL.search(s):
        raise _Malformed("a control character")
    out: list[_Token] = []
    i, n = 0, len(s)
    while i < n:
        c = s[i]
        if c in " \t\r\n":
            i = _WSP_RUN.match(s, i).end()  # type: ignore[union-attr]
        elif c == "(":
            i = _comment_end(s, i)
        elif c == '"':
            j = _quoted_end(s, i)
            out.append(("quoted", i, j))
            i = j
        elif c == "[":
            j = _DTEXT_RUN.match(s, i + 1).end()  # type: ignore[union-attr]
            if j >= n or s[j] != "]":
                raise _Malformed("an address literal is not closed")
            out.append(("literal", i, j + 1))
            i = j + 1
        elif c in _SPECIALS:
            out.append((c, i, i + 1))
            i += 1
        else:
            m = _ATOM_RUN.match(s, i)
            if m is None:
                raise _Malformed(f"{c!r} where no address syntax allows it")
            out.append(("atom", i, m.end()))
            i = m.end()
    return out


def _addr_spec(s: str, toks: list[_Token], k: int) -> tuple[str, bool, int]:
    """The addr-spec starting at token ``k``: (domain, is a literal, next
    token).  Local part, ``@`` and domain must touch: the address is then
    written literally in the field, with no comment or space inside it."""
    if k + 2 >= len(toks):
        raise _Malformed("an address is cut short")
    local, at, dom = toks[k], toks[k + 1], toks[k + 2]
    if local[0] not in ("atom", "quoted") or at[0] != "@" or dom[0] not in ("atom", "literal"):
        raise _Malformed("not an address")
    if local[2] != at[1] or at[2] != dom[1]:
        raise _Malformed("an address with space or a comment inside it")
    text = s[dom[1]:dom[2]]
    if dom[0] == "atom" and "" in text.split("."):
        raise _Malformed("a domain with an empty label")
    return text, dom[0] == "literal", k + 3


def from_addresses(field: str) -> list[tuple[str, bool]]:
    """The (domain, is a literal) of every mailbox of a From field value.

    ``address-list`` (RFC 5322 §3.4; RFC 6854 lets From carry groups), with
    the obsolete empty list elements; raises ``_Malformed`` for anything
    else, so that no address is ever guessed.
    """
    toks = _tokens(field)
    out: list[tuple[str, bool]] = []
    k, n = 0, len(toks)
    in_group = False
    while k < n:
        kind = toks[k][0]
        if kind == ",":
            k += 1
            continue
        if kind == ";" and in_group:
            in_group = False
            k += 1
            if k < n and toks[k][0] != ",":
                raise _Malformed("text after a group")
            continue
        start = k
        while k < n and toks[k][0] in ("atom", "quoted"):
            k += 1
        nxt = toks[k][0] if k < n else ""
        if nxt == "<":  # [display-name] angle-addr
            domain, literal, k = _addr_spec(field, toks, k + 1)
            if k >= n or toks[k][0] != ">":
                raise _Malformed("an angle address is not closed")
            k += 1
        elif nxt == ":":  # group: display-name ":" [group-list] ";"
            if in_group or k == start:
                raise _Malformed("a group without a name, or inside a group")
            in_group = True
            k += 1
            continue
        elif nxt == "@" and k - start == 1:  # addr-spec
            domain, literal, k = _addr_spec(field, toks, start)
        else:
            raise _Malformed("not a mailbox")
        out.append((domain, literal))
        if k < n:
            if toks[k][0] == ",":
                k += 1
            elif not (in_group and toks[k][0] == ";"):
                raise _Malformed("text after a mailbox")
    if in_group:
        raise _Malformed("a group is not closed")
    return out


def author_domain(values: Sequence[bytes]) -> tuple[str | None, str]:
    """The From domain of a message whose From field values are ``values``
    (as the MTA hands them over), and why there is none (SPEC §1)."""
    if not values:
        return None, "no From field"
    if len(values) > 1:
        return None, "more than one From field"
    raw = values[0]
    if len(raw) > FROM_FIELD_MAX:
        return None, f"the From field is longer than {FROM_FIELD_MAX} bytes"
    # RFC 6532: UTF-8 in header fields; other 8-bit bytes stay in display
    # names (as surrogates) and make any domain they touch invalid IDNA.
    field = raw.decode("utf-8", "surrogateescape")
    try:
        mailboxes = from_addresses(field)
    except _Malformed as e:
        return None, f"the From field does not parse: {e}"
    if not mailboxes:
        return None, "no address in the From field"
    if any(literal for _, literal in mailboxes):
        return None, "an address literal in the From field"
    # Each spelling is converted once (IDNA is the costly step), and the
    # second domain ends the search.
    spellings: dict[str, str | None] = {}
    found = None
    for text, _ in mailboxes:
        key = text.lower()
        if key not in spellings:
            spellings[key] = normalise(key, drop_dot=False)
        d = spellings[key]
        if d is None:
            return None, "a From address whose domain is not a domain name"
        if found is not None and d != found:
            return None, "more than one domain in the From field"
        found = d
    assert found is not None
    return found, ""


# -- the DNS tree walk (RFC 9989 §4.10) --------------------------------------------------


def dmarc_psd(record: bytes) -> str | None:
    """A ``_dmarc`` TXT record's ``psd`` (``y``, ``n``, or ``u`` when absent
    or unknown), or None when it is not a DMARC record: it must start with
    ``v=DMARC1`` (RFC 9989 §4.7: ``dmarc-version``, ``DMARC1`` case
    sensitive).  One split on ``;``: linear in the record's length."""
    if len(record) > DMARC_RECORD_MAX or record[:1] not in (b"v", b"V"):
        return None
    tags = record.split(b";")
    name, eq, value = tags[0].partition(b"=")
    if not eq or name.rstrip(b" \t").lower() != b"v" or value.strip(b" \t") != b"DMARC1":
        return None
    for tag in tags[1:]:
        name, eq, value = tag.partition(b"=")
        if eq and name.strip(b" \t").lower() == b"psd":
            v = value.strip(b" \t").lower()
            return v.decode("ascii") if v in (b"y", b"n") else "u"
    return "u"


def dmarc_answer(records: Sequence[bytes]) -> str | None:
    """The ``psd`` of the one DMARC record among a name's TXT records; None
    when there is none, or more than one (RFC 9989 §4.10 step 2: several
    DMARC records at one name are all discarded)."""
    found = [psd for psd in map(dmarc_psd, records) if psd is not None]
    return found[0] if len(found) == 1 else None


def walk_targets(domain: str) -> list[str]:
    """The names a tree walk from ``domain`` asks, in order (RFC 9989 §4.10
    steps 3, 4, 7): the domain itself; then, past seven labels, straight to
    its last seven; then one label less at a time, down to the top-level
    domain.  Never more than eight."""
    labels = domain.split(".")
    x = len(labels)
    targets = [domain]
    keep = x - 1 if x < DMARC_WALK_QUERIES else DMARC_WALK_QUERIES - 1
    while keep >= 1:
        targets.append(".".join(labels[x - keep:]))
        keep -= 1
    return targets


_FAILED = "temporary failure"


class Walk:
    """The tree walks of one message, sharing its lookups: a ``_dmarc`` name
    is asked once per message, whichever walk needs it first."""

    def __init__(self, resolver: Resolver, budget: Budget):
        self._resolver = resolver
        self._budget = budget
        # target -> psd, None (no DMARC record) or _FAILED (a temporary failure)
        self._records: dict[str, str | None] = {}
        self._orgs: dict[str, str | None] = {}  # domain -> organizational domain, None: unknown
        self.queries = 0

    def _psd(self, target: str) -> str | None:
        if target not in self._records:
            self.queries += 1
            try:
                records = self._resolver.txt("_dmarc." + target, self._budget)
            except TempFail:
                self._records[target] = _FAILED
                raise
            psd = self._records[target] = dmarc_answer(records)
            if self._budget.trace is not None:  # --explain only
                self._budget.note(f"  _dmarc.{target}: " + (
                    "no DMARC record (none, or several: RFC 9989 §4.10 step 2)" if psd is None
                    else f"a DMARC record, psd={psd}"))
        psd = self._records[target]
        if psd == _FAILED:
            raise TempFail(f"_dmarc.{target} TXT failed earlier in this message")
        return psd

    def organizational(self, domain: str) -> str | None:
        """``domain``'s organizational domain; None when a temporary DNS
        failure (or the spent budget) leaves it unknown."""
        if domain not in self._orgs:
            try:
                org, why = self._walk(domain)
            except TempFail as e:
                self._budget.note(f"organizational domain of {domain}: unknown ({e})")
                self._orgs[domain] = None
            else:
                self._budget.note(f"organizational domain of {domain}: {org} ({why})")
                self._orgs[domain] = org
        return self._orgs[domain]

    def _walk(self, domain: str) -> tuple[str, str]:
        found: list[tuple[str, str]] = []
        for target in walk_targets(domain):
            psd = self._psd(target)
            if psd is not None:
                found.append((target, psd))
                if psd in ("y", "n"):
                    break  # steps 2 and 6: a psd tag ends the walk
        labels = domain.split(".")
        # §4.10.2, from the longest name to the shortest.
        for target, psd in found:
            if psd == "n":
                return target, f"psd=n at _dmarc.{target}"
            if psd == "y" and target != domain:
                below = ".".join(labels[len(labels) - target.count(".") - 2:])
                return below, f"psd=y at _dmarc.{target}: the name one label below it"
        if found:
            return found[-1][0], f"the DMARC record with the fewest labels, _dmarc.{found[-1][0]}"
        return domain, "no DMARC record: the domain is its own"


# -- the facts for the policy -------------------------------------------------------------


def _spf_domain(spf: SpfResult) -> str | None:
    """SPF's domain: the MAIL FROM domain, or the HELO name for ``<>``."""
    if spf.scope == "helo":
        return normalise(spf.identity) if spf.identity else None
    domain = spf.identity.rpartition("@")[2]
    return normalise(domain) if domain else None


def judge(mode: str, walk: Walk, from_domain: str, domain: str | None) -> Aligned:
    """Whether ``domain`` is aligned with ``from_domain`` (RFC 9989 §4.10.2)."""
    if domain is None:
        return Aligned.NO
    if domain == from_domain:
        return Aligned.YES
    if mode == "strict" or domain.rpartition(".")[2] != from_domain.rpartition(".")[2]:
        # An organizational domain is the name itself or one of its parents:
        # names without a common top-level domain never share one.
        return Aligned.NO
    mine, theirs = walk.organizational(domain), walk.organizational(from_domain)
    if mine is None or theirs is None:
        return Aligned.UNKNOWN
    return Aligned.YES if mine == theirs else Aligned.NO


def evaluate(resolver: Resolver, mode: str, from_values: Sequence[bytes],
             spf: SpfResult | None, dkim: Sequence[DkimResult], budget: Budget) -> Alignment:
    """The alignment of every identifier that passed or failed temporarily.

    Passing identifiers first; temporary failures only when no pass is
    aligned (only then can they decide, SPEC §1), so that mail whose pass is
    aligned costs no walk for them.
    """
    from_domain, problem = author_domain(from_values)
    budget.note(f"From domain: {from_domain}" if from_domain else
                f"no single From domain: {problem}")
    if from_domain is None:
        return Alignment(mode, None, problem, Aligned.NO, tuple(Aligned.NO for _ in dkim))
    walk = Walk(resolver, budget)
    spf_state = Aligned.NO
    dkim_states = [Aligned.NO] * len(dkim)

    def spf_judged() -> Aligned:
        assert spf is not None
        if spf.result == "temperror" and not spf.identity:
            return Aligned.UNKNOWN  # the check never finished: its domain is not known
        return judge(mode, walk, from_domain, _spf_domain(spf))

    def dkim_judged(r: DkimResult) -> Aligned:
        d = normalise(r.domain) if r.domain else None
        if d is None and r.result == "temperror":
            return Aligned.UNKNOWN  # never turn a DNS failure into a refusal
        return judge(mode, walk, from_domain, d)

    if spf is not None and spf.result == "pass":
        spf_state = spf_judged()
    for i, r in enumerate(dkim):
        if r.result == "pass":
            dkim_states[i] = dkim_judged(r)
    passed_aligned = spf_state is Aligned.YES or Aligned.YES in dkim_states
    if not passed_aligned:
        if spf is not None and spf.result == "temperror":
            spf_state = spf_judged()
        for i, r in enumerate(dkim):
            if r.result == "temperror":
                dkim_states[i] = dkim_judged(r)
    if walk.queries:
        budget.note(f"alignment: {walk.queries} _dmarc queries")
    return Alignment(mode, from_domain, "", spf_state, tuple(dkim_states))


def log_fields(mode: str, facts: Alignment | None, spf: SpfResult | None,
               dkim: Sequence[DkimResult]) -> dict[str, str | None]:
    """The end-of-message line's alignment fields (SPEC §4); none with
    ``Alignment off``.  Unjudged mail (out of scope, not stamped) has ``-``."""
    if mode == "off":
        return {}
    return {
        "alignment": mode,
        "aligned": aligned_summary(spf, dkim, facts) if facts is not None else None,
        "header_from": facts.from_domain if facts is not None else None,
    }
