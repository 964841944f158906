"""``ipv6milter --self-test``: what a package's postinst or an admin runs first.

Four checks, one line each: every configured resolver answers a query, the
milter socket is usable, the authserv-id looks like a host name, and
ed25519-sha256 DKIM signatures can be verified (RFC 8463 requires it of a
verifier; dkimpy needs PyNaCl for it, an optional dependency of its own).

The socket check means something whether the milter runs or not: a socket
in use must answer the milter protocol (a real option negotiation, the
first thing an MTA sends), and a socket that is free must be one the milter
could create -- its directory exists, or is the unit's RuntimeDirectory=,
which systemd creates at each start and removes at stop.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import stat
import struct
from pathlib import Path
from typing import TextIO

import dkim

from .config import Config
from .resolver import probe_nameservers

_HOSTNAME = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$")

# The packaged unit, and where systemd looks for it and its drop-ins, most
# important first (systemd.unit(5), "Unit File Load Path"); SYSTEMD_UNIT_PATH
# replaces the list as it does for systemd itself (a trailing ":" appends it).
UNIT = "ipv6milter.service"
UNIT_DIRS = ("/etc/systemd/system", "/run/systemd/system", "/usr/local/lib/systemd/system",
             "/usr/lib/systemd/system", "/lib/systemd/system")

# The milter protocol (libmilter's mfdef.h): each packet is a 4-byte
# big-endian length, a command byte and its data.  SMFIC_OPTNEG offers a
# protocol version, the actions the MTA allows and the protocol steps it can
# leave out; the milter answers with SMFIC_OPTNEG too.  Offer what Postfix
# offers (version 6, every action, every protocol bit), so that the milter
# negotiates as it does behind the MTA, then say SMFIC_QUIT.
MILTER_VERSION = 6
ALL_ACTIONS = 0x1FF
ALL_PROTOCOL = 0x1FFFFF
# Bound on what is read back: a negotiation reply is 13 bytes plus, from a
# version 6 milter, its macro lists (a few hundred bytes).
MAX_REPLY = 65536
PROBE_TIMEOUT = 5.0


def check_resolvers(cfg: Config) -> list[tuple[bool, str]]:
    out = []
    for server, answered, detail in probe_nameservers(cfg.nameservers, cfg.dns_timeout):
        out.append((answered, f"resolver {server}: {detail}"))
    return out


def unit_dirs() -> list[str]:
    value = os.environ.get("SYSTEMD_UNIT_PATH")
    if value is None:
        return list(UNIT_DIRS)
    dirs = [d for d in value.split(":") if d]
    return dirs + list(UNIT_DIRS) if value.endswith(":") else dirs


def runtime_directories(unit: str = UNIT) -> tuple[str | None, list[str]]:
    """The unit file systemd would load and its RuntimeDirectory= entries
    (absolute, under /run), the drop-ins (``unit.d/*.conf``) applied in
    systemd's order: by file name, a name in a more important directory
    hiding the same name in a lesser one; an empty assignment resets."""
    dirs = unit_dirs()
    main = next((Path(d) / unit for d in dirs if (Path(d) / unit).is_file()), None)
    if main is None:
        return None, []
    dropins: dict[str, Path] = {}
    for d in reversed(dirs):
        for f in sorted((Path(d) / f"{unit}.d").glob("*.conf")):
            dropins[f.name] = f
    entries: list[str] = []
    for f in [main, *(dropins[name] for name in sorted(dropins))]:
        try:
            lines = f.read_text(errors="replace").splitlines()
        except OSError:
            continue
        section = ""
        for line in lines:
            line = line.strip()
            if line.startswith("["):
                section = line
            elif section == "[Service]" and line.startswith("RuntimeDirectory="):
                value = line.partition("=")[2].split()
                entries = entries + value if value else []
    return str(main), ["/run/" + e.strip("/") for e in entries]


def milter_answers(sock: socket.socket) -> tuple[bool, str]:
    """One SMFIC_OPTNEG exchange on a connected socket: does the peer speak
    the milter protocol?  (True, its version) or (False, what went wrong)."""
    sock.settimeout(PROBE_TIMEOUT)
    try:
        sock.sendall(struct.pack("!IcIII", 13, b"O", MILTER_VERSION, ALL_ACTIONS, ALL_PROTOCOL))
        head = _recv_exact(sock, 4)
        (length,) = struct.unpack("!I", head)
        if not 13 <= length <= MAX_REPLY:
            return False, f"no milter negotiation reply (packet length {length})"
        body = _recv_exact(sock, length)
        if body[:1] != b"O":
            return False, f"no milter negotiation reply (command {body[:1]!r})"
        version = struct.unpack("!I", body[1:5])[0]
        # SMFIC_QUIT: the connection ends as an MTA would end it.
        sock.sendall(struct.pack("!Ic", 1, b"Q"))
    except TimeoutError:
        return False, f"no milter negotiation reply within {PROBE_TIMEOUT:g} s"
    except (OSError, EOFError) as e:
        return False, f"no milter negotiation reply ({e})"
    return True, f"milter protocol version {version}"


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        part = sock.recv(n - len(buf))
        if not part:
            raise EOFError("connection closed")
        buf += part
    return bytes(buf)


def _peer(sock: socket.socket) -> str:
    """Which process listens on a unix socket: SO_PEERCRED gives the pid of
    the process that called listen(); its command line when /proc shows it."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid = struct.unpack("3i", creds)[0]
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").replace(b"\0", b" ")
    except OSError:
        return f"pid {pid}"
    return f"pid {pid}: {cmdline.decode(errors='replace')[:200]}"


def check_socket(spec: str) -> tuple[bool, str]:
    kind, _, rest = spec.partition(":")
    if kind == "unix":
        return _check_unix(spec, rest)
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
            if e.errno != errno.EADDRINUSE:
                return False, f"socket {spec}: cannot bind {addr[0]} port {addr[1]}: {e.strerror}"
        else:
            return True, f"socket {spec}: can be bound"
    # In use: by the running milter, or by something else.
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(PROBE_TIMEOUT)
        try:
            s.connect(addr)
        except OSError as e:
            return False, (f"socket {spec}: cannot bind {addr[0]} port {addr[1]} (in use), "
                           f"and cannot connect to it: {e.strerror or e}")
        ok, detail = milter_answers(s)
    if ok:
        return True, f"socket {spec}: in use by a running milter, which answers ({detail})"
    return False, f"socket {spec}: in use by something else: {detail}"


def _check_unix(spec: str, path: str) -> tuple[bool, str]:
    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory):
        unit, runtime = runtime_directories()
        if os.path.normpath(os.path.abspath(directory)) in runtime:
            name = directory.removeprefix("/run/")
            return True, (f"socket {spec}: directory {directory} is created by systemd at start "
                          f"(RuntimeDirectory={name} in {unit})")
        return False, f"socket {spec}: directory {directory} does not exist"
    if not os.path.exists(path):
        if not os.access(directory, os.W_OK | os.X_OK):
            return False, f"socket {spec}: directory {directory} is not writable"
        return True, f"socket {spec}: can be bound"
    if not stat.S_ISSOCK(os.stat(path).st_mode):
        return False, f"socket {spec}: {path} exists and is not a socket"
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(PROBE_TIMEOUT)
        try:
            s.connect(path)
        except ConnectionRefusedError:
            # Nobody listens: the milter removes the file at start.
            if not os.access(directory, os.W_OK | os.X_OK):
                return False, f"socket {spec}: directory {directory} is not writable"
            return True, f"socket {spec}: can be bound (stale socket file will be replaced)"
        except OSError as e:
            return False, f"socket {spec}: cannot connect: {e.strerror or e}"
        peer = _peer(s)
        ok, detail = milter_answers(s)
    if ok:
        return True, f"socket {spec}: in use by a running milter ({peer}), which answers ({detail})"
    return False, f"socket {spec}: in use ({peer}) by something else: {detail}"


def check_authserv_id(cfg: Config) -> tuple[bool, str]:
    name = cfg.default_authserv_id(None)
    source = "AuthservID" if cfg.authserv_id else "host name (no AuthservID set)"
    if _HOSTNAME.match(name):
        return True, f"authserv-id {name} ({source}): looks like a host name"
    return False, (f"authserv-id {name!r} ({source}): not a fully qualified host name; "
                   "set AuthservID to this server's name (e.g. mx.example.org)")


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
