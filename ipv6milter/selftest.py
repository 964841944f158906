"""``ipv6milter --self-test``: what a package's postinst or an admin runs first.

Four checks, one line each: every configured resolver answers a query, the
milter socket can be bound, the authserv-id looks like a host name, and
ed25519-sha256 DKIM signatures can be verified (RFC 8463 requires it of a
verifier; dkimpy needs PyNaCl for it, an optional dependency of its own).
"""

from __future__ import annotations

import os
import re
import socket
import stat
from typing import TextIO

import dkim

from .config import Config
from .resolver import probe_nameservers

_HOSTNAME = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$")


def check_resolvers(cfg: Config) -> list[tuple[bool, str]]:
    out = []
    for server, answered, detail in probe_nameservers(cfg.nameservers, cfg.dns_timeout):
        out.append((answered, f"resolver {server}: {detail}"))
    return out


def check_socket(spec: str) -> tuple[bool, str]:
    kind, _, rest = spec.partition(":")
    if kind == "unix":
        path = rest
        directory = os.path.dirname(path) or "."
        if not os.path.isdir(directory):
            return False, f"socket {spec}: directory {directory} does not exist"
        if not os.access(directory, os.W_OK | os.X_OK):
            return False, f"socket {spec}: directory {directory} is not writable"
        if os.path.exists(path):
            if not stat.S_ISSOCK(os.stat(path).st_mode):
                return False, f"socket {spec}: {path} exists and is not a socket"
            with socket.socket(socket.AF_UNIX) as s:
                try:
                    s.connect(path)
                except OSError:
                    return True, f"socket {spec}: can be bound (stale socket file will be replaced)"
                return False, f"socket {spec}: in use (is ipv6milter already running?)"
        return True, f"socket {spec}: can be bound"
    port_text, _, host = rest.partition("@")
    family = socket.AF_INET6 if kind == "inet6" else socket.AF_INET
    try:
        infos = socket.getaddrinfo(host or None, int(port_text), family, socket.SOCK_STREAM)
    except (OSError, ValueError) as e:
        return False, f"socket {spec}: cannot resolve {host!r}: {e}"
    addr = infos[0][4]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            return False, f"socket {spec}: cannot bind {addr[0]} port {addr[1]}: {e.strerror}"
    return True, f"socket {spec}: can be bound"


def check_authserv_id(cfg: Config) -> tuple[bool, str]:
    name = cfg.default_authserv_id(None)
    source = "AuthservID" if cfg.authserv_id else "host name (no AuthservID set)"
    if _HOSTNAME.match(name):
        return True, f"authserv-id {name} ({source}): looks like a host name"
    return False, f"authserv-id {name!r} ({source}): not a fully qualified host name"


# RFC 8463 Appendix A.3: the example message, as far as its ed25519 signature
# covers it, and (A.2) the key record of selector brisbane.
RFC8463_KEY_NAME = b"brisbane._domainkey.football.example.com."
RFC8463_KEY = b"v=DKIM1; k=ed25519; p=11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="
RFC8463_ED25519_SIGNATURE = (
    b"DKIM-Signature: v=1; a=ed25519-sha256; c=relaxed/relaxed;\r\n"
    b" d=football.example.com; i=@football.example.com;\r\n"
    b" q=dns/txt; s=brisbane; t=1528637909; h=from : to :\r\n"
    b" subject : date : message-id : from : subject : date;\r\n"
    b" bh=2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=;\r\n"
    b" b=/gCrinpcQOoIfuHNQIbq4pgh9kyIK3AQUdt9OdqQehSwhEIug4D11Bus\r\n"
    b" Fa3bT3FY5OsU7ZbnKELq+eXdp1Q1Dw==\r\n"
)
RFC8463_UNSIGNED = (
    b"From: Joe SixPack <joe@football.example.com>\r\n"
    b"To: Suzie Q <suzie@shopping.example.net>\r\n"
    b"Subject: Is dinner ready?\r\n"
    b"Date: Fri, 11 Jul 2003 21:00:37 -0700 (PDT)\r\n"
    b"Message-ID: <20030712040037.46341.5F8J@football.example.com>\r\n"
    b"\r\n"
    b"Hi.\r\n"
    b"\r\n"
    b"We lost the game.  Are you hungry yet?\r\n"
    b"\r\n"
    b"Joe.\r\n"
)


def check_ed25519() -> tuple[bool, str]:
    """Verify RFC 8463's ed25519 example with dkimpy, the key given directly."""

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
        return RFC8463_KEY if name == RFC8463_KEY_NAME else None

    try:
        ok = dkim.DKIM(RFC8463_ED25519_SIGNATURE + RFC8463_UNSIGNED).verify(dnsfunc=dnsfunc)
    except dkim.DKIMException as e:  # NaClNotFoundError without PyNaCl
        return False, (f"ed25519 verification: not available ({type(e).__name__}: {e}); "
                       "install PyNaCl (Debian: python3-nacl)")
    if not ok:
        return False, "ed25519 verification: RFC 8463's example does not verify"
    return True, "ed25519 verification: available (RFC 8463's example verifies)"


def self_test(cfg: Config, out: TextIO) -> int:
    results = [*check_resolvers(cfg), check_socket(cfg.socket), check_authserv_id(cfg),
               check_ed25519()]
    for ok, line in results:
        print(f"{'ok  ' if ok else 'FAIL'} {line}", file=out)
    return 0 if all(ok for ok, _ in results) else 1
