"""``ipv6milter --self-test``: what a package's postinst or an admin runs first.

Three checks, one line each: every configured resolver answers a query, the
milter socket can be bound, and the authserv-id looks like a host name.
"""

from __future__ import annotations

import os
import re
import socket
import stat
from typing import TextIO

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


def self_test(cfg: Config, out: TextIO) -> int:
    results = [*check_resolvers(cfg), check_socket(cfg.socket), check_authserv_id(cfg)]
    for ok, line in results:
        print(f"{'ok  ' if ok else 'FAIL'} {line}", file=out)
    return 0 if all(ok for ok, _ in results) else 1
