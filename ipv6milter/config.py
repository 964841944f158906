"""The configuration file (SPEC §4): ``Key value`` per line, OpenDKIM style.

One table, ``KEYS``, lists every key with its parser and default.  Parsing
collects every error with its line number instead of stopping at the first,
so ``ipv6milter -n`` can show them all at once.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import os
import re
import socket
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import idna

from .model import IPAddress

DEFAULT_PATH = "/etc/ipv6milter/ipv6milter.conf"


class ConfigError(Exception):
    """One or more errors, each naming its source and line."""

    def __init__(self, errors: list[str]):
        super().__init__("\n".join(errors))
        self.errors = errors


class ValueProblem(ValueError):
    """A bad value; the caller adds file and line."""


# -- domains -----------------------------------------------------------------


def a_labels(domain: str) -> str:
    """The A-label form of ``domain``: lower case, no trailing dot.

    IDNA 2008 with UTS #46 non-transitional mapping, as browsers and mail
    software use today: ``faß.de`` is ``xn--fa-hia.de``, a domain of its own,
    not ``fass.de`` (Python's built-in ``idna`` codec is IDNA 2003 and maps
    one to the other).  ASCII labels are only lower-cased, so names such as
    ``_spf.example.com`` pass.  Raises UnicodeError (idna.IDNAError) for a
    name that is not valid IDNA.
    """
    d = domain.strip().rstrip(".")
    if d.isascii():
        return d.lower()
    mapped = idna.uts46_remap(d, std3_rules=False, transitional=False).rstrip(".")
    return ".".join(
        label.lower() if label.isascii() else idna.alabel(label).decode("ascii")
        for label in mapped.split(".")
    )


def normalise_domain(domain: str) -> str:
    """Lower-case A-label form without the trailing dot, for comparisons.

    Opt-in matching must treat U-labels and A-labels alike (an IDN recipient
    may arrive in either form with SMTPUTF8).
    """
    d = domain.strip().rstrip(".").lower()
    if not d:
        return d
    try:
        return a_labels(d)
    except UnicodeError:
        # Not valid IDNA (e.g. a label over 63 characters): compare it as is.
        return d


def _parents(d: str) -> Iterator[str]:
    """What follows each dot of ``d``, from the root down, while no longer
    than a domain can be (253): an entry is never longer, and a recipient
    of many labels costs linear time, not one copy of itself per label."""
    i = d.rfind(".")
    while i >= 0 and len(d) - i - 1 <= 253:
        yield d[i + 1 :]
        i = d.rfind(".", 0, i)


@dataclass(frozen=True)
class DomainSet:
    """The opted-in recipient domains of ``AcceptDomains``.

    ``except_exact`` and ``except_parents`` are the ``!`` entries: an
    exception wins over every other entry, ``*`` included, so that
    ``* !legacy.example.com`` reads "every domain but this one" (EOP's rule
    since October 2024: on by default, opted out per domain).
    """

    exact: frozenset[str] = frozenset()
    parents: frozenset[str] = frozenset()  # ".example.com": subdomains only
    everything: bool = False
    except_exact: frozenset[str] = frozenset()
    except_parents: frozenset[str] = frozenset()

    def matches(self, domain: str) -> bool:
        d = normalise_domain(domain)
        if not d:
            return False
        suffixes = list(_parents(d))
        if d in self.except_exact or any(s in self.except_parents for s in suffixes):
            return False
        if self.everything or d in self.exact:
            return True
        return any(s in self.parents for s in suffixes)

    @classmethod
    def from_entries(cls, entries: Iterable[str]) -> DomainSet:
        sets: dict[str, set[str]] = {"exact": set(), "parents": set(), "x_exact": set(),
                                     "x_parents": set()}
        everything = False
        for raw in entries:
            e = raw.strip()
            negated = e.startswith("!")
            if negated:
                e = e[1:]
                if e in ("", "*"):
                    raise ValueProblem(f"an exception names a domain (!example.com): {raw!r}")
            prefix = "x_" if negated else ""
            if e == "*":
                everything = True
            elif e.startswith("."):
                sets[prefix + "parents"].add(_checked_domain(e[1:], raw))
            else:
                sets[prefix + "exact"].add(_checked_domain(e, raw))
        return cls(frozenset(sets["exact"]), frozenset(sets["parents"]), everything,
                   frozenset(sets["x_exact"]), frozenset(sets["x_parents"]))

    def entries(self) -> str:
        """The entries in the form the file takes: parses back to this set."""
        items = (["*"] if self.everything else []) + sorted(self.exact)
        items += sorted("." + p for p in self.parents)
        items += sorted("!" + d for d in self.except_exact)
        items += sorted("!." + p for p in self.except_parents)
        return ", ".join(items)

    def __str__(self) -> str:
        """The effective rule in words, for ``ipv6milter -n`` and the startup line."""
        opted = [*sorted(self.exact), *(f"subdomains of {p}" for p in sorted(self.parents))]
        excepted = [*sorted(self.except_exact),
                    *(f"subdomains of {p}" for p in sorted(self.except_parents))]
        if self.everything:
            rule = "all domains"
        elif opted:
            rule = ", ".join(opted)
        else:
            return "no domains (every in-scope recipient gets the 550)"
        return rule + (" except " + ", ".join(excepted) if excepted else "")


_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")
# The MTA's j macro as an authserv-id (default_authserv_id), compiled once.
_J_MACRO = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]*")


def _checked_domain(text: str, raw: str) -> str:
    d = normalise_domain(text)
    if not d or len(d) > 253 or not all(_LABEL.match(label) for label in d.split(".")):
        raise ValueProblem(f"not a domain name: {raw!r}")
    return d


# -- value parsers -----------------------------------------------------------


def _split_list(value: str) -> list[str]:
    return [v for v in re.split(r"[,\s]+", value) if v]


def parse_bool(value: str) -> bool:
    v = value.lower()
    if v in ("yes", "true", "1", "on"):
        return True
    if v in ("no", "false", "0", "off"):
        return False
    raise ValueProblem(f"expected yes/no/true/false/1/0, got {value!r}")


def parse_socket(value: str) -> str:
    """libmilter's socket: what ``milter.opensocket`` really accepts.

    ``inet:`` binds IPv4 only: an IPv4 address (bare or in brackets) or a
    host name with an A record; ``inet6:`` binds IPv6 only: an IPv6 address
    (bare or in brackets) or a host name with an AAAA record.  libmilter
    refuses ``inet:PORT@::1`` and ``inet6:PORT@127.0.0.1`` only when the
    daemon starts, so ``-n`` refuses them here.
    """
    m = re.fullmatch(r"(inet6?):(\d+)(?:@(\S+))?", value, re.IGNORECASE)
    if m:
        family = m.group(1).lower()
        port = int(m.group(2))
        if not 0 < port < 65536:
            raise ValueProblem(f"port out of range in {value!r}")
        raw = m.group(3) or ("::1" if family == "inet6" else "localhost")
        host = raw[1:-1] if raw.startswith("[") and raw.endswith("]") else raw
        try:
            addr: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
        except ValueError:
            addr = None
            if ":" in host or "[" in host or "]" in host:
                raise ValueProblem(f"not an address or host name: {raw!r} in {value!r}") from None
        if family == "inet" and addr is not None and addr.version == 6:
            raise ValueProblem(
                f"inet: takes an IPv4 address or a host name; for {host} write "
                f"inet6:{port}@{host}")
        if family == "inet6" and addr is not None and addr.version == 4:
            raise ValueProblem(
                f"inet6: takes an IPv6 address or a host name; for {host} write "
                f"inet:{port}@{host}")
        return f"{family}:{port}@{host}"
    m = re.fullmatch(r"(?:unix|local):(/\S+)", value, re.IGNORECASE)
    if m:
        # sun_path holds 108 bytes, the final NUL included.
        if len(m.group(1).encode()) > 107:
            raise ValueProblem(f"a unix socket path is at most 107 bytes: {value!r}")
        return f"unix:{m.group(1)}"
    raise ValueProblem(f"expected inet:PORT@HOST, inet6:PORT@HOST or unix:/path, got {value!r}")


def parse_workers(value: str) -> int:
    """``auto`` (0: one per usable CPU, decided at start) or a number."""
    if value.lower() == "auto":
        return 0
    return int(_number(int, 1, 256)(value))


def parse_hostport(value: str, default_port: int | None = None) -> tuple[str, int]:
    """``ADDR``, ``ADDR:PORT``, ``[V6]`` or ``[V6]:PORT``."""
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::(\d+))?", value)
    if m:
        host, port = m.group(1), m.group(2)
    elif value.count(":") == 1:
        host, port = value.split(":")
    else:
        host, port = value, None
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise ValueProblem(f"not an IP address: {value!r}") from None
    if port is None:
        if default_port is None:
            raise ValueProblem(f"a port is required: {value!r}")
        return str(addr), default_port
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueProblem(f"bad port in {value!r}")
    return str(addr), int(port)


def parse_nameservers(value: str) -> tuple[tuple[str, int], ...]:
    return tuple(parse_hostport(v, 53) for v in value.replace(",", " ").split())


def parse_networks(value: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    nets = []
    for v in _split_list(value):
        try:
            net = ipaddress.ip_network(v, strict=False)
        except ValueError:
            raise ValueProblem(f"not an address or network: {v!r}") from None
        nets.append(_unmapped(net))
    return tuple(nets)


_MAPPED = ipaddress.ip_network("::ffff:0:0/96")


def _unmapped(
    net: ipaddress.IPv4Network | ipaddress.IPv6Network,
) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """An IPv4-mapped network (``::ffff:192.0.2.5``, ``::ffff:192.0.2.0/120``)
    means its IPv4 form: a mapped client counts as IPv4 (SPEC §1) and is
    matched by its IPv4 address."""
    if isinstance(net, ipaddress.IPv6Network) and net.subnet_of(_MAPPED):
        v4 = net.network_address.ipv4_mapped
        assert v4 is not None
        return ipaddress.ip_network(f"{v4}/{net.prefixlen - 96}")
    return net


def _number(kind: Callable[[str], Any], low: float, high: float) -> Callable[[str], Any]:
    def parse(value: str) -> Any:
        try:
            n = kind(value)
        except ValueError:
            raise ValueProblem(f"expected a number, got {value!r}") from None
        if not low <= n <= high:
            raise ValueProblem(f"{value} is out of range {low}..{high}")
        return n

    return parse


def _choice(*words: str) -> Callable[[str], str]:
    def parse(value: str) -> str:
        v = value.lower()
        if v not in words:
            raise ValueProblem(f"expected one of {', '.join(words)}, got {value!r}")
        return v

    return parse


def parse_share(value: str) -> int:
    """``EnforceShare``: a whole percentage, ``%`` allowed after it."""
    v = value.removesuffix("%").strip()
    if not v.isdigit() or not 0 <= int(v) <= 100:
        raise ValueProblem(f"expected a whole percentage 0..100, got {value!r}")
    return int(v)


def parse_umask(value: str) -> int:
    if not re.fullmatch(r"0?[0-7]{1,3}", value):
        raise ValueProblem(f"expected an octal mask such as 007, got {value!r}")
    return int(value, 8)


def parse_userid(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*(:[A-Za-z0-9_][A-Za-z0-9_.-]*)?", value):
        raise ValueProblem(f"expected user or user:group, got {value!r}")
    return value


def parse_path(value: str) -> str:
    if not value.startswith("/"):
        raise ValueProblem(f"expected an absolute path, got {value!r}")
    if "\0" in value:  # open() would raise ValueError, not OSError
        raise ValueProblem(f"a path cannot contain a NUL character: {value!r}")
    return value


def parse_authserv_id(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.-]*", value):
        raise ValueProblem(f"expected a host name, got {value!r}")
    return value.lower()


def parse_metrics(value: str) -> tuple[str, int] | None:
    if value.lower() in ("off", "no", "none", ""):
        return None
    return parse_hostport(value)


def numbered_lines(text: str) -> list[str]:
    """The lines of a file as ``grep -n``, ``sed`` and editors number them.

    Only LF ends a line (a CR before it is whitespace to ``strip``);
    ``str.splitlines`` would also split at form feeds, NEL, U+2028 and other
    characters and make error messages name the wrong line.
    """
    return text.split("\n")


def read_domain_file(path: str) -> DomainSet:
    """One entry a line, ``#`` comments; errors name the file's own line."""
    errors = []
    entries = []
    if "\0" in path:
        raise ValueProblem(f"cannot read domain list {path!r}: a path cannot contain NUL")
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            lines = numbered_lines(fh.read())
    except (OSError, UnicodeDecodeError) as e:
        raise ValueProblem(f"cannot read domain list {path}: {e}") from None
    for no, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        for entry in _split_list(text):
            try:
                DomainSet.from_entries([entry])
            except ValueProblem as e:
                errors.append(f"{path}:{no}: {e}")
            else:
                entries.append(entry)
    if errors:
        raise ValueProblem("; ".join(errors))
    return DomainSet.from_entries(entries)


def parse_domains(value: str) -> DomainSet:
    if value.startswith("file:"):
        return read_domain_file(value[5:])
    if value.startswith("/"):
        return read_domain_file(value)
    return DomainSet.from_entries(_split_list(value))


# -- the table ---------------------------------------------------------------


@dataclass(frozen=True)
class Key:
    name: str  # as documented (case-insensitive in files)
    attr: str
    parse: Callable[[str], Any]
    doc: str


KEYS: tuple[Key, ...] = (
    Key("Socket", "socket", parse_socket, "libmilter socket"),
    Key("AuthservID", "authserv_id", parse_authserv_id, "authserv-id of our header"),
    Key("AcceptDomains", "accept_domains", parse_domains, "opted-in recipient domains"),
    Key("TrustedHosts", "trusted_hosts", parse_networks, "addresses and networks out of scope"),
    Key("SkipAuthenticated", "skip_authenticated", parse_bool, "SASL clients out of scope"),
    Key("ReverseDNS", "reverse_dns", _choice("ptr", "fcrdns"), "what a valid PTR means"),
    Key("Mode", "mode", _choice("enforce", "monitor"), "refuse, or only stamp and log"),
    Key("EnforceShare", "enforce_share", parse_share, "percent of clients enforced"),
    Key("StampAll", "stamp_all", parse_bool, "stamp out-of-scope mail too"),
    Key("Nameservers", "nameservers", parse_nameservers, "resolvers to ask"),
    Key("DNSTimeout", "dns_timeout", _number(float, 0.1, 300), "seconds per DNS lookup"),
    Key("StageTimeout", "stage_timeout", _number(float, 0.1, 3600), "seconds per SMTP stage"),
    Key("MaxSignatures", "max_signatures", _number(int, 1, 100), "DKIM signatures tried"),
    Key("Alignment", "alignment", _choice("off", "relaxed", "strict"),
        "SPF's or DKIM's passing domain aligned with the From domain"),
    Key("SPFVoidLookupLimit", "spf_void_lookup_limit", _number(int, 2, 20),
        "void DNS lookups allowed in one SPF evaluation (RFC 7208 4.6.4)"),
    Key("MaxMessageSize", "max_message_size", _number(int, 1024, 2**40), "bytes kept for DKIM"),
    Key("UserID", "user_id", parse_userid, "user[:group] after binding"),
    Key("UMask", "umask", parse_umask, "umask for a unix socket"),
    Key("PidFile", "pid_file", parse_path, "write the pid here"),
    Key("Syslog", "syslog", parse_bool, "also log to syslog"),
    Key("LogLevel", "log_level", _choice("debug", "info", "warning", "error"), "log level"),
    Key("MetricsListen", "metrics_listen", parse_metrics, "Prometheus endpoint"),
    Key("Workers", "workers", parse_workers, "processes serving the socket (auto: one per CPU)"),
)
_BY_NAME = {k.name.lower(): k for k in KEYS}

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Config:
    socket: str = "inet:8894@localhost"
    authserv_id: str | None = None
    accept_domains: DomainSet = field(default_factory=DomainSet)
    trusted_hosts: tuple[Network, ...] = (
        ipaddress.ip_network("127.0.0.1/32"),
        ipaddress.ip_network("::1/128"),
    )
    skip_authenticated: bool = True
    reverse_dns: str = "ptr"
    mode: str = "enforce"
    enforce_share: int = 100  # percent of in-scope /64 networks whose refusals are enforced
    stamp_all: bool = False
    nameservers: tuple[tuple[str, int], ...] = ()
    dns_timeout: float = 5.0
    stage_timeout: float = 20.0
    max_signatures: int = 5
    alignment: str = "off"  # From-aligned mode (SPEC §1): off, relaxed, strict
    spf_void_lookup_limit: int = 2  # RFC 7208 §4.6.4's recommended two
    max_message_size: int = 67108864
    user_id: str | None = None
    umask: int = 0o007
    pid_file: str | None = None
    syslog: bool = False
    log_level: str = "info"
    metrics_listen: tuple[str, int] | None = None
    source: str | None = None  # the file this came from, for messages
    workers: int = 0  # 0: auto, one per usable CPU

    @property
    def monitor(self) -> bool:
        return self.mode == "monitor"

    def is_trusted(self, addr: IPAddress) -> bool:
        a = int(addr)
        return any(a & mask == net for net, mask in self._trusted_by_version[addr.version])

    @functools.cached_property
    def _trusted_by_version(self) -> dict[int, tuple[tuple[int, int], ...]]:
        """TrustedHosts as (network, mask) integers by IP version: a
        connection's check is then a few integer operations."""
        return {v: tuple((int(n.network_address), int(n.netmask))
                         for n in self.trusted_hosts if n.version == v) for v in (4, 6)}

    def default_authserv_id(self, j_macro: str | None) -> str:
        """SPEC §4: ``AuthservID``, else the MTA's ``j`` macro, else our FQDN."""
        if self.authserv_id:
            return self.authserv_id
        if j_macro and _J_MACRO.fullmatch(j_macro):
            return j_macro.lower()
        return socket.getfqdn().lower()


def parse(text: str, source: str = "<config>") -> Config:
    """Parse the text of a configuration file; raise ConfigError listing every problem."""
    values: dict[str, Any] = {}
    seen: dict[str, int] = {}
    errors: list[str] = []
    for no, line in enumerate(numbered_lines(text), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        # A '#' after whitespace starts a comment; inside a value it is kept.
        stripped = re.split(r"\s+#", stripped, maxsplit=1)[0]
        parts = stripped.split(None, 1)
        name = parts[0]
        key = _BY_NAME.get(name.lower())
        where = f"{source}:{no}"
        if key is None:
            errors.append(f"{where}: unknown key {name!r}")
            continue
        if key.attr in seen:
            errors.append(f"{where}: {key.name} already set on line {seen[key.attr]}")
            continue
        seen[key.attr] = no
        raw = parts[1].strip() if len(parts) > 1 else ""
        if not raw and key.attr not in ("accept_domains", "trusted_hosts", "nameservers"):
            errors.append(f"{where}: {key.name} needs a value")
            continue
        try:
            values[key.attr] = key.parse(raw)
        except ValueProblem as e:
            errors.append(f"{where}: {key.name}: {e}")
    if "stage_timeout" in values or "dns_timeout" in values:
        dns_t = values.get("dns_timeout", Config.dns_timeout)
        stage_t = values.get("stage_timeout", Config.stage_timeout)
        if stage_t < dns_t:
            line = seen.get("stage_timeout", seen.get("dns_timeout"))
            errors.append(
                f"{source}:{line}: StageTimeout ({stage_t:g}) is shorter than "
                f"DNSTimeout ({dns_t:g})"
            )
    if errors:
        raise ConfigError(errors)
    return dataclasses.replace(Config(), source=source, **values)


def load(path: str | None, *, default_if_missing: bool = False) -> Config:
    """Read a configuration file.

    ``default_if_missing``: the default path may be absent (SPEC §3: built-in
    defaults); a file named on the command line must exist.
    """
    path = path or DEFAULT_PATH
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            text = fh.read()
    except FileNotFoundError:
        if default_if_missing:
            return Config()
        raise ConfigError([f"{path}: no such file"]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([f"{path}: cannot read: {e}"]) from None
    return parse(text, os.path.abspath(path))


# What each Alignment mode asks of a message, for ``ipv6milter -n``.
ALIGNMENT_RULES = {
    "off": "any SPF or DKIM pass is enough (EOP's rule)",
    "relaxed": "the passing SPF or DKIM domain must share the From domain's organizational "
               "domain (RFC 9989 DNS tree walk over _dmarc records)",
    "strict": "the passing SPF or DKIM domain must be the From domain itself",
}


def _show(attr: str, v: Any) -> str:
    if v is None or v == "" or v == ():
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if attr == "accept_domains":
        # The entries parse back; the comment is the rule they make.
        return f"{v.entries()}  # {v}"
    if attr == "umask":
        return f"{v:03o}"
    if attr == "nameservers":
        return ", ".join(_hostport(h, p) for h, p in v)
    if attr == "metrics_listen":
        return _hostport(*v)
    if attr == "alignment":
        return f"{v}  # {ALIGNMENT_RULES[v]}"
    if attr == "workers":
        return str(v) if v else "auto"
    if isinstance(v, tuple):
        return ", ".join(str(x) for x in v)
    return f"{v:g}" if isinstance(v, float) else str(v)


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def describe(cfg: Config) -> list[str]:
    """``Key value`` lines of the effective configuration, for -n and debug logs."""
    return [f"{k.name} {_show(k.attr, getattr(cfg, k.attr))}" for k in KEYS]
