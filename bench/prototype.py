"""ipv6milter with proposed optimizations applied at start-up, to measure them
before they are implemented.  An experiment of the benchmark, not the product:
nothing in ipv6milter/ is changed; the patches below are applied to the
running process only.

    IPV6MILTER_BENCH_PATCHES=noreply,dkimfast python -m bench.prototype -c FILE

Patches (docs/performance.md explains each):

noreply   header and body callbacks negotiated with @Milter.noreply: Postfix sends
          the headers and body chunks without waiting for a reply to each
          (body then never answers SKIP: only valid while all mail is in scope,
          as in the benchmark; the real change must keep SKIP's case apart).
dkimfast  dkimpy's hot spots replaced by equivalent faster code: relaxed body
          canonicalization that skips its regexes when they cannot match and
          never rewrites a lone space (dkimpy rewrites every space), the message
          parse without splitting and re-joining the body, int<->bytes with
          int.to_bytes instead of a byte loop, parsed keys cached by record.
nopool    the early PTR and SPF checks run inline in the callback thread
          instead of through the thread pool (fine while answers are cached).
"""

from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any


def _dkimfast() -> None:
    import dkim
    import dkim.canonicalization as canon
    import dkim.crypto as crypto

    # Equivalent to dkimpy's [\t ]+ -> " ", but a lone space (nearly every
    # match in ordinary text) is not rewritten; skipped when nothing can match.
    blanks = re.compile(rb"\t[\t ]*| [\t ]+")
    trailing = re.compile(rb"[\t ]+\r\n")

    def compress_whitespace(content: bytes) -> bytes:
        if b"\t" in content or b"  " in content:
            return blanks.sub(b" ", content)
        return content

    def strip_trailing_whitespace(content: bytes) -> bytes:
        if b" \r\n" in content or b"\t\r\n" in content:
            return trailing.sub(b"\r\n", content)
        return content

    original_parse = dkim.rfc822_parse

    def rfc822_parse(message: bytes) -> tuple[list[list[bytes]], bytes]:
        # With CRLF line ends only (as the milter rebuilds the message), the
        # body is the rest after the blank line: no split and re-join of it.
        end = message.find(b"\r\n\r\n")
        if end < 0 or message.startswith(b"\r\n") or message.count(b"\n") != message.count(
                b"\r\n"):
            return original_parse(message)
        headers, _ = original_parse(message[: end + 2])
        return headers, message[end + 4 :]

    def int2str(n: int, length: int = -1) -> bytes:
        assert n >= 0
        if length < 0:
            length = max(1, (n.bit_length() + 7) // 8)
        return n.to_bytes(length, "big")

    def str2int(s: bytes) -> int:
        return int.from_bytes(s, "big")

    canon.compress_whitespace = compress_whitespace
    canon.strip_trailing_whitespace = strip_trailing_whitespace
    dkim.rfc822_parse = rfc822_parse
    crypto.int2str = int2str
    crypto.str2int = str2int
    # The parsed key depends only on the record's text: cache it.
    dkim.evaluate_pk = functools.lru_cache(maxsize=1024)(dkim.evaluate_pk)


def _noreply() -> None:
    import Milter

    from ipv6milter.milter import Ipv6Milter

    for name, mask in (("header", Milter.P_NR_HDR), ("body", Milter.P_NR_BODY)):
        method = getattr(Ipv6Milter, name)
        if not getattr(method, "milter_protocol", 0) & mask:  # not already @noreply
            setattr(Ipv6Milter, name, Milter.noreply(method))


def _nopool() -> None:
    from ipv6milter.engine import Engine

    def start(self: Engine, fn: Callable[..., Any], *args: object) -> Future[Any]:
        f: Future[Any] = Future()
        try:
            f.set_result(fn(*args))
        except Exception as e:  # as the pool would: raised again by wait()
            f.set_exception(e)
        return f

    Engine.start = start  # type: ignore[method-assign]


PATCHES = {"dkimfast": _dkimfast, "noreply": _noreply, "nopool": _nopool}


def main() -> int:
    wanted = [p for p in os.environ.get("IPV6MILTER_BENCH_PATCHES", "").split(",") if p]
    for name in wanted:
        PATCHES[name]()
    print(f"bench.prototype: patches {wanted or 'none'}", file=sys.stderr, flush=True)
    from ipv6milter.cli import main as cli_main

    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
