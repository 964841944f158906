"""Growth rows: the align inputs (see harness.py): the From field as the
alignment parser reads it (up to ``FROM_FIELD_MAX``), and the ``_dmarc`` TXT
answers of the tree walk (each record up to ``DMARC_RECORD_MAX``)."""

from __future__ import annotations

from ipv6milter import alignment
from ipv6milter.limits import DMARC_RECORD_MAX, FROM_FIELD_MAX

from .harness import KIB, Row


def _from(value: bytes) -> object:
    return alignment.author_domain([value])


def _fit(prefix: bytes, unit: bytes, suffix: bytes, n: int) -> bytes:
    """``prefix`` + ``unit`` repeated + ``suffix``, about ``n`` bytes and
    never past the From field's limit (past it nothing is parsed at all)."""
    size = min(n, FROM_FIELD_MAX)
    count = max(1, (size - len(prefix) - len(suffix)) // len(unit))
    return prefix + unit * count + suffix


_ADDR = b" <a@example.com>"


def _spellings(n: int) -> bytes:
    """Mailboxes of one IDN written with ASCII and fullwidth letters mixed:
    each spelling is a conversion of its own."""
    out, i = [], 0
    size = min(n, FROM_FIELD_MAX) - 40
    while sum(map(len, out)) + 2 * len(out) < size:
        domain = "".join(chr(ord(c) + 0xFEE0) if c.isascii() and c != "." and (i >> k) & 1
                         else c for k, c in enumerate("bücher.example"))
        out.append(f"a@{domain}".encode())
        i += 1
    value = b", ".join(out)
    assert alignment.author_domain([value])[0] == "xn--bcher-kva.example"
    return value


def _nested(n: int) -> bytes:
    depth = (min(n, FROM_FIELD_MAX) - 16) // 2
    value = b"(" * depth + b")" * depth + b" a@example.com"
    assert alignment.author_domain([value])[0] == "example.com"  # really parsed
    return value

ROWS: list[Row] = [
    Row("From field", "runs of spaces and tabs",
        lambda n: _fit(b"Name", b" \t", _ADDR, n), _from, largest=FROM_FIELD_MAX),
    Row("From field", "folded blank lines",
        lambda n: _fit(b"Name", b"\r\n \r\n\t", _ADDR, n), _from, largest=FROM_FIELD_MAX),
    Row("From field", "nested parentheses",
        lambda n: _nested(n), _from, largest=FROM_FIELD_MAX),
    Row("From field", "unclosed nested parentheses",
        lambda n: _fit(b"a@example.com ", b"(", b"", n), _from, largest=FROM_FIELD_MAX),
    Row("From field", "quoted-pairs in a quoted string",
        lambda n: _fit(b'"', b'\\" ', b'"' + _ADDR, n), _from, largest=FROM_FIELD_MAX),
    Row("From field", "repeated separators",
        lambda n: _fit(b"", b",", b"a@example.com", n), _from, largest=FROM_FIELD_MAX),
    Row("From field", "many mailboxes of one domain",
        lambda n: _fit(b"", b"a@example.com, ", b"b@example.com", n), _from,
        largest=FROM_FIELD_MAX),
    Row("From field", "many mailboxes, one U-label domain spelled many ways",
        lambda n: _spellings(n), _from, largest=FROM_FIELD_MAX),
    Row("From field", "many empty groups",
        lambda n: _fit(b"", b"g:;,", b"a@example.com", n), _from, largest=FROM_FIELD_MAX),
    Row("From field", "long label, many dots",
        lambda n: _fit(b"a@", b"a.", b"com", n), _from, largest=FROM_FIELD_MAX),
    Row("From field", "one long atom",
        lambda n: _fit(b"", b"x", b"@example.com", n), _from, largest=FROM_FIELD_MAX),
    Row("_dmarc TXT answer", "repeated separators",
        lambda n: [b"v=DMARC1" + b";" * min(n, DMARC_RECORD_MAX - 16) + b"psd=y"],
        alignment.dmarc_answer, largest=DMARC_RECORD_MAX),
    Row("_dmarc TXT answer", "runs of spaces and tabs",
        lambda n: [b"v=DMARC1;" + b" \t" * (min(n, DMARC_RECORD_MAX - 16) // 2) + b"psd=n"],
        alignment.dmarc_answer, largest=DMARC_RECORD_MAX),
    Row("_dmarc TXT answer", "many tags",
        lambda n: [b"v=DMARC1" + b"; x=y" * (min(n, DMARC_RECORD_MAX - 16) // 5)],
        alignment.dmarc_answer, largest=DMARC_RECORD_MAX),
    Row("_dmarc TXT answer", "many records",
        lambda n: [b"v=DMARC1; p=none"] * max(1, n // 16), alignment.dmarc_answer,
        largest=64 * KIB, smallest=4 * KIB),  # 256 records and up: above the timer noise
]
