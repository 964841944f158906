"""Real IPv6 (and IPv4) SMTP clients: a network namespace joined to this
machine by a veth pair, so that the MTAs see connections from genuine
2001:db8:6::/64 and 198.18.0.0/30 peers instead of XCLIENT claims.

    main namespace                          lab namespace (no default route)
    v6m<pid>h  2001:db8:6::1/64   <-veth->   v6m<pid>n  2001:db8:6::25, ::26, ...
               198.18.0.1/30                            198.18.0.2/30

Safety, because this changes the machine's network configuration:

* before anything is added, every address and route of the main namespace
  is read (``ip -j addr``, ``ip -j route show table all``); a range that
  overlaps one already in use is never used (this machine's own interface
  has been seen on 192.0.2.0/24, a documentation range too).  The lab
  takes the first free slot (harness.LabAddresses: 2001:db8:6:N::/64 and
  198.18.0.4N/30), so that test sessions running at the same time do not
  clash, and refuses to start when none is free;
* the check and the set-up run under a lock file, so two sessions never
  pick the same slot;
* the only routes that appear are the two connected routes of the veth
  link, which go away with it; no other route is added or changed;
* the lab namespace has no default route: its clients reach the main
  namespace's veth addresses and nothing else;
* teardown (``ip netns del``, ``ip link del``) runs even when a test or the
  set-up failed, and leftovers of a killed run (our name, a dead pid) are
  removed before a new lab is built.

Client sockets are created inside the namespace by a short-lived thread
that calls setns(2) (a network namespace is per thread); the socket stays
in the lab namespace when the thread ends, so smtplib can use it from any
thread.  No subprocess per connection.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import ipaddress
import json
import os
import re
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .harness import LAB_SLOTS, HarnessError, LabAddresses

CLONE_NEWNET = 0x40000000
NETNS_DIR = Path("/run/netns")
LOCK = Path("/run/lock/ipv6milter-netlab.lock")
NAME_PREFIX = "v6m"  # v6m<pid>h / v6m<pid>n / netns v6m<pid>

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass
class NetLab:
    netns: str
    host_if: str
    lab_if: str
    clients: LabAddresses
    created: list[str] = field(default_factory=list)  # what teardown removes

    @property
    def host6(self) -> str:
        return self.clients.host6

    @property
    def host4(self) -> str:
        return self.clients.host4

    def socket(self, family: int, kind: int = socket.SOCK_STREAM) -> socket.socket:
        """A socket that lives in the lab namespace."""
        return socket_in_netns(self.netns, family, kind)

    def connect(
        self, host: str, port: int, source: str | None = None, timeout: float = 10.0
    ) -> socket.socket:
        """A TCP connection from the lab (from ``source`` if given) to ``host``."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        s = self.socket(family)
        try:
            s.settimeout(timeout)
            if source is not None:
                s.bind((source, 0))
            s.connect((host, port))
        except OSError:
            s.close()
            raise
        return s


# -- setns in a thread ----------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


def socket_in_netns(netns: str, family: int, kind: int = socket.SOCK_STREAM) -> socket.socket:
    """``socket.socket(family, kind)`` created inside network namespace ``netns``."""
    result: list[socket.socket | BaseException] = []

    def work() -> None:
        try:
            fd = os.open(NETNS_DIR / netns, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({netns}): {os.strerror(err)}")
            finally:
                os.close(fd)
            result.append(socket.socket(family, kind))
        except BaseException as e:  # handed to the caller's thread
            result.append(e)

    t = threading.Thread(target=work, name=f"setns-{netns}")
    t.start()
    t.join()
    got = result[0]
    if isinstance(got, BaseException):
        raise got
    return got


# -- the main namespace's network, read before anything is changed -------------------


def _ip_json(*args: str) -> list[dict]:
    out = subprocess.run(
        ["ip", "-j", *args], capture_output=True, text=True, timeout=10, check=True
    ).stdout
    return json.loads(out or "[]")


def _networks_in_use() -> list[tuple[Network, str]]:
    """Every address (as its network) and every non-default route, with where it is."""
    used: list[tuple[Network, str]] = []
    for link in _ip_json("addr", "show"):
        for a in link.get("addr_info", []):
            net = ipaddress.ip_interface(f"{a['local']}/{a['prefixlen']}").network
            used.append((net, f"address {a['local']}/{a['prefixlen']} on {link['ifname']}"))
    for fam in ("-4", "-6"):
        for r in _ip_json(fam, "route", "show", "table", "all"):
            dst = r.get("dst", "")
            if dst in ("", "default") or r.get("type") in ("multicast", "broadcast"):
                continue
            try:
                net = ipaddress.ip_network(dst, strict=False)
            except ValueError:
                continue
            if net.prefixlen == 0:  # a default route in another spelling
                continue
            where = f"route {dst} dev {r.get('dev', '?')} table {r.get('table', 'main')}"
            used.append((net, where))
    return used


def clashes(wanted: tuple[Network, ...]) -> list[str]:
    """How each wanted range overlaps a network in use (empty: all free)."""
    used = _networks_in_use()
    return [
        f"{w} overlaps {what}"
        for w in wanted
        for net, what in used
        if net.version == w.version and net.overlaps(w)
    ]


def free_slot(slots: int = LAB_SLOTS) -> LabAddresses:
    """The first lab slot whose ranges are all unused; HarnessError if none."""
    found = []
    for k in range(slots):
        lab = LabAddresses.for_slot(k)
        clash = clashes((lab.link6, lab.link4))
        if not clash:
            return lab
        found += clash
    raise HarnessError(
        "every lab network would clash with this machine's network, not touching it: "
        + "; ".join(found)
    )


# -- leftovers of a killed run ------------------------------------------------------------

_OURS = re.compile(rf"^{NAME_PREFIX}(\d+)[hn]?$")


def _dead_owner(name: str) -> bool:
    m = _OURS.match(name)
    return bool(m) and not Path(f"/proc/{m.group(1)}").exists()


def remove_leftovers() -> None:
    """Remove labs whose pytest process is gone (matched by our naming only)."""
    with contextlib.suppress(OSError):
        for ns in os.listdir(NETNS_DIR):
            if _dead_owner(ns):
                subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
    for link in _ip_json("link", "show"):
        name = link.get("ifname", "")
        if name.endswith("h") and _dead_owner(name):
            subprocess.run(["ip", "link", "del", name], capture_output=True, timeout=10)


# -- building and removing the lab -------------------------------------------------------


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if done.returncode != 0:
        raise HarnessError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def _teardown(lab: NetLab) -> list[str]:
    errors = []
    for kind, name in reversed([tuple(c.split(":", 1)) for c in lab.created]):
        cmd = ["ip", "netns", "del", name] if kind == "netns" else ["ip", "link", "del", name]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        # Deleting the namespace also deletes the veth pair: "cannot find" is fine.
        if done.returncode != 0 and "Cannot find" not in done.stderr:
            errors.append(f"{' '.join(cmd)}: {done.stderr.strip()}")
    return errors


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    with open(LOCK, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


@contextlib.contextmanager
def run_netlab() -> Iterator[NetLab]:
    if os.geteuid() != 0:
        raise HarnessError("the lab network needs root (ip netns add)")
    if not shutil.which("ip"):
        raise HarnessError("the lab network needs iproute2 (ip)")
    tag = f"{NAME_PREFIX}{os.getpid()}"
    lab: NetLab | None = None
    try:
        with _locked():
            remove_leftovers()
            lab = NetLab(netns=tag, host_if=f"{tag}h", lab_if=f"{tag}n", clients=free_slot())
            _build(lab)
        yield lab
    finally:
        errors = _teardown(lab) if lab is not None else []
        if errors:
            raise HarnessError("lab teardown: " + "; ".join(errors))


def _build(lab: NetLab) -> None:
    c = lab.clients
    _ip("netns", "add", lab.netns)
    lab.created.append(f"netns:{lab.netns}")
    _ip("link", "add", lab.host_if, "type", "veth", "peer", "name", lab.lab_if, "netns", lab.netns)
    lab.created.append(f"link:{lab.host_if}")
    _ip("addr", "add", f"{c.host6}/{c.link6.prefixlen}", "dev", lab.host_if, "nodad")
    _ip("addr", "add", f"{c.host4}/{c.link4.prefixlen}", "dev", lab.host_if)
    _ip("link", "set", lab.host_if, "up")
    _ip("-n", lab.netns, "link", "set", "lo", "up")
    for addr in c.ipv6_clients():
        _ip(
            "-n",
            lab.netns,
            "addr",
            "add",
            f"{addr}/{c.link6.prefixlen}",
            "dev",
            lab.lab_if,
            "nodad",
        )
    _ip("-n", lab.netns, "addr", "add", f"{c.ipv4}/{c.link4.prefixlen}", "dev", lab.lab_if)
    _ip("-n", lab.netns, "link", "set", lab.lab_if, "up")
