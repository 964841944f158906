"""DKIM (RFC 6376) with dkimpy, every signature, keys fetched through our resolver.

``dkim.verify()`` looks at the first signature only and folds every error,
a DNS outage included, into False; so each signature is verified on its own
with ``DKIM.verify(idx=i, dnsfunc=...)`` and the key lookup is watched to
tell a missing or broken key (permerror) from a bad signature (fail) and
from a DNS outage (temperror).
"""

from __future__ import annotations

import binascii
import logging
import re
from collections.abc import Iterable
from typing import Any

import dkim

from .model import DkimResult
from .resolver import Budget, Resolver, TempFail

log = logging.getLogger(__name__)


class _DebugOnly(logging.LoggerAdapter):
    """dkimpy logs hostile input at error level; to us it is debug detail."""

    def log(self, level: int, msg: Any, *args: Any, **kwargs: Any) -> None:
        super().log(logging.DEBUG, msg, *args, **kwargs)


_dkimpy_log = _DebugOnly(logging.getLogger("ipv6milter.dkimpy"), {})

_TOKEN = re.compile(rb"^[A-Za-z0-9._-]{1,253}$")


def signature_tags(value: bytes) -> dict[bytes, bytes]:
    """A lenient tag=value split of a DKIM-Signature, for reporting only."""
    tags: dict[bytes, bytes] = {}
    for part in value.split(b";"):
        name, eq, v = part.partition(b"=")
        if eq:
            tags.setdefault(name.strip().lower(), re.sub(rb"\s+", b"", v))
    return tags


def describe(value: bytes, result: str, detail: str) -> DkimResult:
    tags = signature_tags(value)

    def clean(v: bytes) -> str:
        return v.decode("ascii").lower() if _TOKEN.match(v) else ""

    b = tags.get(b"b", b"")[:8]
    b_text = b.decode("ascii") if re.fullmatch(rb"[A-Za-z0-9+/=]*", b) else ""
    return DkimResult(
        result, clean(tags.get(b"d", b"")), clean(tags.get(b"s", b"")), b_text, detail
    )


def unverified(
    signatures: Iterable[bytes], detail: str, max_signatures: int
) -> tuple[DkimResult, ...]:
    """Signatures reported but not verified (a message over MaxMessageSize)."""
    return tuple(describe(v, "neutral", detail) for v in list(signatures)[:max_signatures])


class _KeyWatch:
    """A dnsfunc that remembers what the key lookup found."""

    def __init__(self, resolver: Resolver, budget: Budget):
        self._lookup = resolver.dkim_dnsfunc(budget)
        self.problem: str | None = None
        self.asked = False

    def __call__(self, name: bytes, timeout: float = 5) -> bytes | None:
        self.problem = None
        self.asked = True
        txt = self._lookup(name, timeout)
        if txt is None:
            self.problem = "no key record"
            return None
        try:
            dkim.evaluate_pk(name, txt)
        except (dkim.DKIMException, ValueError, IndexError, TypeError, binascii.Error) as e:
            self.problem = f"unusable key record: {e}"
        return txt


def check_dkim(
    resolver: Resolver, message: bytes, budget: Budget, max_signatures: int
) -> tuple[DkimResult, ...]:
    """One result per signature tried, topmost first; () when there is none."""
    try:
        d = dkim.DKIM(message, logger=_dkimpy_log)
    except (dkim.DKIMException, ValueError, IndexError, TypeError) as e:
        found = re.findall(rb"(?im)^dkim-signature:", message.split(b"\r\n\r\n", 1)[0])
        return tuple(
            DkimResult("permerror", detail=f"message cannot be parsed: {e}")
            for _ in found[:max_signatures]
        )
    sigs = [v for n, v in d.headers if n.lower() == b"dkim-signature"]
    results = []
    for idx, value in enumerate(sigs[:max_signatures]):
        watch = _KeyWatch(resolver, budget)
        try:
            ok = d.verify(idx=idx, dnsfunc=watch)
        except TempFail as e:
            results.append(describe(value, "temperror", f"key lookup: {e}"))
            continue
        except dkim.ValidationError as e:
            # Raised before the key lookup, it is the signature's own tags that
            # are missing or malformed: RFC 6376 §6.1.1 PERMFAIL, not a mismatch.
            results.append(describe(value, "fail" if watch.asked else "permerror", str(e)))
            continue
        except (
            dkim.DKIMException,
            ValueError,
            IndexError,
            KeyError,
            TypeError,
            OverflowError,
            binascii.Error,
        ) as e:
            results.append(describe(value, "permerror", f"{type(e).__name__}: {e}"))
            continue
        if ok:
            results.append(describe(value, "pass", "signature verified"))
        elif watch.problem:
            results.append(describe(value, "permerror", watch.problem))
        else:
            results.append(describe(value, "fail", "signature did not verify"))
    return tuple(results)
