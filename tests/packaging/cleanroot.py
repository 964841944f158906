"""A clean Debian 12 root for the package test: built with mmdebstrap
(variant minbase, plus systemd) from the Debian archive this machine's apt
uses, booted with ``systemd-nspawn --boot`` in a network namespace of its
own, where Knot serves the test zones on [::1]:53.

What is downloaded is kept under ``.cache/cleanroot/`` (never committed):

* ``base-KEY.tar``: the mmdebstrap root with its package lists, rebuilt
  when the sources, the package set or this recipe change (KEY) or when it
  is older than a week, so that a moving archive is followed;
* ``archives/``: the .deb files apt fetched for what the test installs in
  the root (the package's dependencies, postfix), so that a warm run
  installs without the network.

The archive's address is read from /etc/apt/sources.list* when the test
runs; nothing here names a mirror.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dns.message
import dns.query
import dns.rcode

from tests.integration.netlab import socket_in_netns
from tests.lab import stop_process, zone_file

from .conftest import REPO, SYSTEM_ENV, run

SUITE = "bookworm"
CACHE = REPO / ".cache" / "cleanroot"
ARCHIVES = CACHE / "archives"
# A minimal Debian 12 system as an administrator would have it: Essential,
# apt, and systemd as init.  Everything else comes with the package.
INCLUDE = ("systemd", "systemd-sysv")
RECIPE = "minbase+lists/1"  # change it to rebuild every cached base
MAX_AGE = 7 * 24 * 3600
NETNS_PREFIX = "v6mpkg"  # v6mpkg<pid>: this branch's namespaces, one per test run
APT_OPTS = ["-y", "-q", "-o", "DPkg::Lock::Timeout=120"]


# -- the archive -------------------------------------------------------------------------


def _deb822(text: str) -> Iterator[dict[str, str]]:
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = ""
        for line in stanza.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            if line[:1] in (" ", "\t") and key:
                fields[key] += " " + line.strip()
                continue
            key, _, value = line.partition(":")
            key = key.strip().lower()
            fields[key] = value.strip()
        if fields:
            yield fields


def debian_sources(etc: Path = Path("/etc/apt")) -> list[str]:
    """``deb URI SUITE main`` for each bookworm suite (bookworm, -updates,
    -security) this machine's apt uses, one-line style for mmdebstrap."""
    lines: list[str] = []
    files = ([etc / "sources.list"] if (etc / "sources.list").is_file() else []) + sorted(
        (etc / "sources.list.d").glob("*"))
    for f in files:
        text = f.read_text(errors="replace")
        if f.name.endswith(".sources"):
            for st in _deb822(text):
                if "deb" not in st.get("types", "").split() or st.get("enabled") == "no":
                    continue
                for uri in st.get("uris", "").split():
                    for suite in st.get("suites", "").split():
                        if suite.split("-")[0] == SUITE and "main" in st.get("components", ""):
                            lines.append(f"deb {uri} {suite} main")
        elif f.name.endswith(".list") or f == etc / "sources.list":
            for line in text.splitlines():
                m = re.match(r"\s*deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)\s+(.*)", line)
                if m and m.group(2).split("-")[0] == SUITE and "main" in m.group(3).split():
                    lines.append(f"deb {m.group(1)} {m.group(2)} main")
    lines = list(dict.fromkeys(lines))
    assert any(line.split()[2] == SUITE for line in lines), (
        f"no {SUITE} main in {etc}/sources.list*: the clean-root test installs from the "
        "Debian archive this machine uses")
    return lines


def base_tarball(log: list[str]) -> Path:
    """The cached mmdebstrap root (built now if missing, changed or old)."""
    sources = debian_sources()
    key = hashlib.sha256("\n".join([RECIPE, *INCLUDE, *sources]).encode()).hexdigest()[:16]
    tar = CACHE / f"base-{key}.tar"
    if tar.exists() and time.time() - tar.stat().st_mtime < MAX_AGE:
        log.append(f"base root: cached {tar.name}")
        return tar
    CACHE.mkdir(parents=True, exist_ok=True)
    for old in CACHE.glob("base-*.tar*"):
        old.unlink()
    start = time.monotonic()
    run(["mmdebstrap", "--quiet", "--mode=root", "--variant=minbase", "--format=tar",
         f"--include={','.join(INCLUDE)}",
         # the package lists stay, so that apt can install offline from archives/
         "--skip=cleanup/apt/lists",
         SUITE, f"{tar}.tmp", *sources], timeout=900)
    os.replace(f"{tar}.tmp", tar)
    log.append(f"base root: built {tar.name} in {time.monotonic() - start:.1f}s "
               f"({tar.stat().st_size >> 20} MiB)")
    return tar


# -- the root ----------------------------------------------------------------------------


def unpack(tar: Path, root: Path) -> None:
    root.mkdir(parents=True)
    run(["tar", "--numeric-owner", "-xpf", str(tar), "-C", str(root)], timeout=300)


def chroot(root: Path, command: str, timeout: float = 600,
           check: bool = True) -> subprocess.CompletedProcess[str]:
    """A command in the root before it boots (the host's network), as root."""
    return run(["chroot", str(root), "/bin/sh", "-c", command], timeout=timeout, check=check)


def fetch_packages(root: Path, deb_in_root: str, extra: tuple[str, ...], log: list[str]) -> None:
    """Put into the root's apt cache every .deb that installing the package
    and ``extra`` needs: from archives/ first, the rest from the archive.
    archives/ then holds exactly that set (a warm run downloads nothing)."""
    cache = root / "var/cache/apt/archives"
    cache.mkdir(parents=True, exist_ok=True)
    have = sorted(ARCHIVES.glob("*.deb")) if ARCHIVES.is_dir() else []
    for deb in have:
        shutil.copy2(deb, cache / deb.name)
    shutil.copy2("/etc/resolv.conf", root / "etc/resolv.conf")
    want = f"{deb_in_root} {' '.join(extra)}"
    cmd = f"apt-get {' '.join(APT_OPTS)} install --download-only {want}"
    r = chroot(root, cmd, check=False)
    if r.returncode != 0:  # a package superseded in the archive since the lists were read
        chroot(root, f"apt-get {' '.join(APT_OPTS)} update")
        chroot(root, cmd)
    fetched = {p.name for p in cache.glob("*.deb")}
    ARCHIVES.mkdir(parents=True, exist_ok=True)
    new = 0
    for name in fetched - {p.name for p in have}:
        shutil.copy2(cache / name, ARCHIVES / name)
        new += 1
    for deb in have:
        if deb.name not in fetched:
            deb.unlink()
    log.append(f"apt cache: {len(fetched)} packages, {new} downloaded")


# -- the network namespace and its DNS ---------------------------------------------------


def remove_leftover_netns() -> None:
    """Namespaces of ours whose test run is gone (killed half-way)."""
    for ns in Path("/run/netns").glob(f"{NETNS_PREFIX}*") if Path("/run/netns").is_dir() else []:
        pid = ns.name.removeprefix(NETNS_PREFIX)
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            run(["ip", "netns", "del", ns.name], check=False, timeout=30)


@contextlib.contextmanager
def netns(addresses: list[str]) -> Iterator[str]:
    """A network namespace named for this process: lo up, with ``addresses``."""
    remove_leftover_netns()
    name = f"{NETNS_PREFIX}{os.getpid()}"
    run(["ip", "netns", "add", name], timeout=30)
    try:
        run(["ip", "-n", name, "link", "set", "lo", "up"], timeout=30)
        for a in addresses:
            run(["ip", "-n", name, "addr", "add", f"{a}/128", "dev", "lo", "nodad"], timeout=30)
        yield name
    finally:
        run(["ip", "netns", "del", name], check=False, timeout=30)


def dns_ready(ns: str, zone: str) -> bool:
    s = socket_in_netns(ns, socket.AF_INET6, socket.SOCK_DGRAM)
    s.setblocking(False)  # dnspython waits with select() on a socket given to it
    try:
        r = dns.query.udp(dns.message.make_query(zone, "SOA"), "::1", port=53, timeout=0.5,
                          sock=s)
    except (OSError, dns.exception.Timeout):
        return False
    finally:
        s.close()
    return r.rcode() == dns.rcode.NOERROR and bool(r.answer)


@contextlib.contextmanager
def knot(ns: str, workdir: Path, zones: dict[str, list[str]]) -> Iterator[None]:
    """knotd (the host's) in namespace ``ns`` on [::1]:53, authoritative for ``zones``."""
    zonedir = workdir / "zones"
    zonedir.mkdir(parents=True)
    conf = []
    for origin, records in zones.items():
        (zonedir / f"{origin}.zone").write_text(zone_file(origin, records))
        conf.append(f"  - domain: {origin}\n    file: {origin}.zone\n")
    cfg = workdir / "knot.conf"
    cfg.write_text(
        f"server:\n    rundir: {workdir}\n    listen: [ ::1@53, 127.0.0.1@53 ]\n"
        f"database:\n    storage: {workdir}/db\n"
        f"control:\n    listen: {workdir}/knot.sock\n"
        "log:\n  - target: stderr\n    any: notice\n"
        f"template:\n  - id: default\n    storage: {zonedir}\n    zonefile-sync: -1\n"
        "    zonefile-load: whole\n    journal-content: none\n    semantic-checks: off\n"
        "zone:\n" + "".join(conf))
    knotd = shutil.which("knotd") or "/usr/sbin/knotd"
    log = workdir / "knot.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(["ip", "netns", "exec", ns, knotd, "-c", str(cfg)],
                                stdout=fh, stderr=subprocess.STDOUT, env=SYSTEM_ENV)
    try:
        wait(lambda: all(dns_ready(ns, z) for z in zones) or proc.poll() is not None, 30,
             "knotd in the namespace")
        assert proc.poll() is None, log.read_text()
        yield
    finally:
        stop_process(proc, 15)


def wait(cond: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    delay = 0.05
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not after {timeout} s")
        time.sleep(delay)
        delay = min(delay * 2, 0.5)


# -- the booted system -------------------------------------------------------------------


@dataclass
class Booted:
    root: Path
    name: str
    proc: subprocess.Popen[bytes]
    leader: int
    log: Path

    def sh(self, command: str, timeout: float = 300, check: bool = True,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """``command`` inside the booted system (all its namespaces), as root."""
        e = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/root",
             "TERM": "dumb", **(env or {})}
        return run(["nsenter", "-t", str(self.leader), "-a", "-r", "-w",
                    "/bin/sh", "-c", f"cd /root && {command}"], timeout=timeout,
                   check=check, env=e)


def _leader(nspawn: int) -> int | None:
    """The container's init: the child of systemd-nspawn running systemd."""
    for task in Path(f"/proc/{nspawn}/task").glob("*"):
        with contextlib.suppress(OSError):
            for child in (task / "children").read_text().split():
                with contextlib.suppress(OSError):
                    if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                        return int(child)
    return None


def _nspawn(root: Path, name: str, ns: str, registered: bool) -> list[str]:
    argv = ["systemd-nspawn", "--quiet", "--boot", f"--directory={root}", f"--machine={name}",
            f"--network-namespace-path=/run/netns/{ns}", "--resolv-conf=off",
            "--timezone=off", "--link-journal=no", "--console=passive"]
    if not registered:
        # No systemd (and no systemd-machined) on this machine, as in a
        # container: run in our own cgroup, without registering.
        argv[1:1] = ["--register=no", "--keep-unit"]
    return argv


@contextlib.contextmanager
def boot(root: Path, ns: str, log: Path) -> Iterator[Booted]:
    """``systemd-nspawn --boot`` of ``root`` in namespace ``ns``, until it
    is up (``systemctl is-system-running --wait``); halted afterwards."""
    name = ns
    registered = Path("/run/systemd/system").is_dir()
    attempts = [registered, False] if registered else [False]
    booted: Booted | None = None
    for reg in attempts:
        with open(log, "ab") as fh:
            proc = subprocess.Popen(_nspawn(root, name, ns, reg), stdin=subprocess.DEVNULL,
                                    stdout=fh, stderr=subprocess.STDOUT, env=SYSTEM_ENV)
        found: list[int] = []

        def up(p: subprocess.Popen[bytes] = proc, found: list[int] = found) -> bool:
            if p.poll() is not None:
                return True
            got = _leader(p.pid)
            if got:
                found.append(got)
            return bool(got)

        wait(up, 60, "systemd-nspawn --boot")
        if proc.poll() is None:
            booted = Booted(root, name, proc, found[-1], log)
            break
    assert booted is not None, log.read_text(errors="replace")[-4000:]
    try:
        # systemctl reaches PID 1 once it has created /run/systemd/private.
        wait(lambda: (booted.root / "run").exists() and booted.sh(
            "test -S /run/systemd/private", check=False).returncode == 0, 60,
            "systemd's private socket")
        r = booted.sh("systemctl is-system-running --wait", timeout=120, check=False)
        state = r.stdout.strip()
        assert state in ("running", "degraded"), (
            f"{state} {r.stderr}\n"
            f"{booted.sh('systemctl --failed --no-pager', check=False).stdout}")
        yield booted
    finally:
        if booted.proc.poll() is None:
            booted.proc.send_signal(signal.SIGTERM)  # nspawn halts the container
            try:
                booted.proc.wait(60)
            except subprocess.TimeoutExpired:
                booted.proc.kill()
                booted.proc.wait(30)
