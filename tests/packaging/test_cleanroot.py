"""From ``apt-get install`` to stamped mail on a clean Debian 12, exactly as
the package's README.Debian says.

A minimal bookworm root (mmdebstrap minbase, plus systemd; cleanroot.py) is
booted with ``systemd-nspawn --boot`` in a network namespace of its own,
whose lo carries the server's and the clients' IPv6 addresses and where Knot
serves the test zones on [::1]:53 (the root's resolver).  Inside it, as an
administrator would: ``apt-get install ./ipv6milter_*.deb`` (apt, offline,
from the cached archives), the commands, a reload without procps, the
self-test with the service running and stopped, Debian's Postfix wired by
each of README.Debian's three options (and the admin guide's socket
recipe), mail from IPv6 clients (the header and the three refusals), then
the removal, step by step as README.Debian gives it, after which nothing of
the package is left.

Every documented command the test runs is first looked up in the
README.Debian installed in the root (``documented``), so that the test and
the text cannot part.  The tests of this module run in order on one booted
root.
"""

from __future__ import annotations

import contextlib
import gzip
import mailbox
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dns.reversename
import pytest

from tests.integration.netlab import socket_in_netns
from tests.integration.replies import no_ptr, not_authenticated, not_opted_in
from tests.integration.smtpclient import Outcome, Session, make_message, marker
from tests.lab import txt

from . import cleanroot
from .cleanroot import Booted
from .conftest import REPO, Built, needs_root_on_debian, version

pytestmark = pytest.mark.timeout(900)

SERVER = "2001:db8:7::1"  # Postfix listens on every address of the namespace
GOOD = "2001:db8:7::25"  # PTR mail.example.com, AAAA back; SPF pass for example.com
NOPTR = "2001:db8:7::dead"  # no PTR (NXDOMAIN in the reverse zone)
REVERSE = "7.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa"
OPTED_IN = "example.net"
NOT_OPTED_IN = "example.org"
AUTHSERV_ID = "mx.example.org"  # README.Debian's example value
HOSTNAME = "mx"  # a short host name, as many machines have
CONF = "/etc/ipv6milter/ipv6milter.conf"
ZONES = {
    "example.com": [
        "mail AAAA " + GOOD,
        "@ TXT " + txt("v=spf1 ip6:2001:db8:7::/64 -all"),
        "fail TXT " + txt("v=spf1 -all"),
    ],
    REVERSE: [
        dns.reversename.from_address(GOOD).relativize(dns.name.from_text(REVERSE)).to_text()
        + " PTR mail.example.com.",
    ],
}
# What the administrator installs next to the package.
EXTRA = ("postfix",)


@dataclass
class World:
    system: Booted
    deb: str  # the package file, as the administrator names it in /root
    netns: str
    timings: list[str]

    def sh(self, command: str, **kw: object) -> str:
        return self.system.sh(command, **kw).stdout  # type: ignore[arg-type]

    def rc(self, command: str) -> tuple[int, str]:
        r = self.system.sh(command, check=False)
        return r.returncode, r.stdout + r.stderr

    def path(self, p: str) -> Path:
        """A file of the root's own file system, from outside (not /run, /tmp:
        nspawn mounts a tmpfs of the container's own there)."""
        return self.system.root / p.lstrip("/")

    def test(self, expression: str) -> bool:
        """``test EXPRESSION`` inside the booted system."""
        return self.system.sh(f"test {expression}", check=False).returncode == 0


@pytest.fixture(scope="module")
def world(built_deb: Built, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    needs_root_on_debian()
    for tool in ("mmdebstrap", "systemd-nspawn", "knotd", "ip", "nsenter"):
        assert shutil.which(tool) or Path(f"/usr/sbin/{tool}").exists(), (
            f"{tool} missing: make test installs it (APT_TEST)")
    base = tmp_path_factory.mktemp("cleanroot")
    root = base / "root"
    timings: list[str] = []
    start = time.monotonic()
    tar = cleanroot.base_tarball(timings)
    cleanroot.unpack(tar, root)
    shutil.copy2(built_deb.path, root / "root" / built_deb.path.name)
    deb = "./" + built_deb.path.name
    cleanroot.fetch_packages(root, f"/root/{deb}", EXTRA, timings)
    # The root as a machine of its own: a short host name, the test DNS.
    (root / "etc/hostname").write_text(HOSTNAME + "\n")
    (root / "etc/hosts").write_text(f"127.0.0.1 localhost\n::1 localhost\n127.0.1.1 {HOSTNAME}\n")
    (root / "etc/resolv.conf").write_text("nameserver ::1\n")
    # dpkg without an fsync per file (what mmdebstrap itself does while it
    # builds): the same packages installed, in a third of the time.
    (root / "etc/dpkg/dpkg.cfg.d/unsafe-io").write_text("force-unsafe-io\n")
    timings.append(f"root ready: {time.monotonic() - start:.1f}s")
    try:
        with cleanroot.netns([SERVER, GOOD, NOPTR]) as ns, \
                cleanroot.knot(ns, base / "knot", ZONES):
            t = time.monotonic()
            with cleanroot.boot(root, ns, base / "nspawn.log") as system:
                timings.append(f"boot: {time.monotonic() - t:.1f}s")
                w = World(system, deb, ns, timings)
                yield w
                t = time.monotonic()
            timings.append(f"halt: {time.monotonic() - t:.1f}s")
    finally:
        timings.append(f"clean-root total: {time.monotonic() - start:.1f}s")
        print("\n".join(timings))
        shutil.rmtree(base, ignore_errors=True)


def documented(w: World, *lines: str) -> None:
    """Each line is in the installed README.Debian, in this order, as a
    line of its own (leading and trailing blanks aside)."""
    text = gzip.decompress(w.path("/usr/share/doc/ipv6milter/README.Debian.gz").read_bytes())
    have = [line.strip() for line in text.decode().splitlines()]
    at = 0
    for line in lines:
        assert line in have[at:], f"README.Debian does not say (here): {line}"
        at = have.index(line, at) + 1


# -- SMTP from the namespace -----------------------------------------------------------


class _Namespace:
    """What smtpclient.Session needs of a lab: connections from the namespace."""

    def __init__(self, name: str):
        self.name = name

    def connect(self, host: str, port: int, source: str | None = None,
                timeout: float = 10.0) -> socket.socket:
        s = socket_in_netns(self.name, socket.AF_INET6)
        s.settimeout(timeout)
        if source:
            s.bind((source, 0))
        s.connect((host, port))
        return s


def send(w: World, source: str, mail_from: str, rcpt: str, mark: str) -> Outcome:
    msg = make_message(mark, from_addr=mail_from, to=rcpt)
    with Session(25, host=SERVER, netlab=_Namespace(w.netns), source=source,  # type: ignore[arg-type]
                 helo="mail.example.com") as s:
        return s.send(mail_from, [rcpt], msg)


def delivered(w: World, mark: str, timeout: float = 30) -> mailbox.mboxMessage:
    box = w.path("/var/mail/alice")
    found: list[mailbox.mboxMessage] = []

    def arrived() -> bool:
        if box.exists():
            for m in mailbox.mbox(str(box), create=False):
                if mark in (m.get("Message-ID") or ""):
                    found.append(m)
                    return True
        return False

    try:
        cleanroot.wait(arrived, timeout, f"message {mark} in /var/mail/alice")
    except AssertionError:
        raise AssertionError(logs(w)) from None
    return found[0]


def logs(w: World) -> str:
    return w.rc("journalctl --no-pager -n 80 -u postfix@- -u ipv6milter")[1]


def mail_checks(w: World) -> None:
    """The header on accepted mail and the three refusals, word for word."""
    mark = marker()
    out = send(w, GOOD, "sender@example.com", f"alice@{OPTED_IN}", mark)
    assert out.accepted, f"{out}\n{logs(w)}"
    ar = delivered(w, mark).get_all("Authentication-Results") or []
    ours = [re.sub(r"\s+", " ", v) for v in ar if v.strip().startswith(AUTHSERV_ID + ";")]
    assert len(ours) == 1, ar
    assert "iprev=pass" in ours[0] and "spf=pass" in ours[0], ours[0]

    out = send(w, GOOD, "sender@example.com", f"alice@{NOT_OPTED_IN}", marker())
    assert str(out.rcpts[0]) == not_opted_in(NOT_OPTED_IN), out
    out = send(w, NOPTR, "sender@example.com", f"alice@{OPTED_IN}", marker())
    assert str(out.rcpts[0]) == no_ptr(NOPTR), out
    out = send(w, GOOD, "someone@fail.example.com", f"alice@{OPTED_IN}", marker())
    assert out.data is not None and str(out.data) == not_authenticated(GOOD), out


def set_conf(w: World, key: str, value: str) -> None:
    """Edit ipv6milter.conf as an administrator would: the key's line, else a new one."""
    w.sh(f"grep -q '^{key} ' {CONF} && sed -i 's|^{key} .*|{key} {value}|' {CONF} "
         f"|| echo '{key} {value}' >> {CONF}")


def restart_both(w: World) -> None:
    """README.Debian: "systemctl restart ipv6milter" (after a Socket change)
    and "postfix reload"."""
    documented(w, 'then "systemctl restart ipv6milter" (after a Socket change) and')
    with postfix_reloaded(w):
        code, out = w.rc("systemctl restart ipv6milter && postfix reload")
        assert code == 0, out + w.rc("journalctl --no-pager -n 30 -u ipv6milter")[1]
    # Type=exec: systemctl returns once the milter runs, not once it listens.
    spec = w.sh(f"sed -n 's/^Socket //p' {CONF}").strip()
    try:
        cleanroot.wait(lambda: listening(w, spec), 30, f"the milter on {spec}")
    except AssertionError as e:
        raise AssertionError(f"{e}\n{logs(w)}") from None


@contextlib.contextmanager
def postfix_reloaded(w: World) -> Iterator[None]:
    """Around a "postfix reload": it only signals the master.  Until the
    master has re-read its files and the smtpd processes started before have
    gone, a connection may still be served the old way (a master.cf chroot
    change, say)."""
    old_smtpd = container_pids(w, "smtpd")
    reloads = postfix_reloads(w)
    yield
    cleanroot.wait(lambda: postfix_reloads(w) > reloads, 30, "Postfix's reload")
    cleanroot.wait(lambda: not any(Path(f"/proc/{pid}").exists() for pid in old_smtpd), 30,
                   f"the smtpd processes of before the reload ({old_smtpd})")


def postfix_reloads(w: World) -> int:
    return w.sh("journalctl --no-pager -o cat -t postfix/master").count("reload -- version")


def container_pids(w: World, comm: str) -> list[int]:
    """The processes named ``comm`` of the booted system (seen from here:
    the root has no procps)."""
    ns = os.readlink(f"/proc/{w.system.leader}/ns/pid")
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                if (d / "comm").read_text().strip() == comm and os.readlink(d / "ns/pid") == ns:
                    pids.append(int(d.name))
    return pids


def listening(w: World, spec: str) -> bool:
    if spec.startswith("unix:"):
        return w.test(f"-S {spec[5:]}")
    port = int(spec.split(":")[1].split("@")[0])
    s = socket_in_netns(w.netns, socket.AF_INET)
    try:
        s.settimeout(2)
        s.connect(("127.0.0.1", port))
    except OSError:
        return False
    finally:
        s.close()
    return True


def journal(w: World) -> str:
    return w.sh("journalctl --no-pager -o cat -u ipv6milter")


# -- install ------------------------------------------------------------------------------


def test_the_root_is_minimal(world: World) -> None:
    """What a fresh minimal Debian 12 lacks, and the docs must not assume:
    procps (/bin/kill), make, git."""
    for pkg in ("procps", "make", "git"):
        code, _ = world.rc(f"dpkg-query -W -f '${{Status}}' {pkg} | grep -q 'ok installed'")
        assert code != 0, f"{pkg} is installed in the minimal root"
    assert world.rc("command -v make")[0] != 0 and not world.path("/bin/kill").exists()
    # ... so the README's set-up says to install make first.
    setup = (REPO / "README.md").read_text().split("## Set up", 1)[1].split("\n## ", 1)[0]
    assert re.search(r"^apt-get install make\b", setup, re.M), setup[:600]


def test_apt_installs_the_package_and_starts_the_unit(world: World) -> None:
    t = time.monotonic()
    code, out = world.rc(f"DEBIAN_FRONTEND=noninteractive apt-get install -y -q {world.deb}")
    world.timings.append(f"apt-get install ./deb: {time.monotonic() - t:.1f}s")
    assert code == 0, out
    # Offline, from what cleanroot.fetch_packages cached: nothing was left to fetch.
    assert not re.search(r"^(Err|Ign):", out, re.M), out
    assert "procps" not in world.sh("dpkg-query -W -f '${Package}\\n'").split()
    assert world.sh("systemctl is-enabled ipv6milter").strip() == "enabled"
    cleanroot.wait(lambda: world.rc("systemctl is-active ipv6milter")[0] == 0, 30,
                   "ipv6milter.service active")
    cleanroot.wait(lambda: world.test("-S /run/ipv6milter/ipv6milter.sock"), 30,
                   "the packaged socket")
    assert world.sh("ipv6milter --version").strip() == f"ipv6milter {version()}"
    assert f"{CONF}: configuration OK" in world.sh("ipv6milter -n")
    for cmd in ("ipv6milter-check --help", "ipv6milter-report --help"):
        assert world.rc(cmd)[0] == 0


def test_reload_works_without_procps(world: World) -> None:
    documented(world, '"systemctl reload ipv6milter" re-reads the configuration (SIGHUP).  The log')
    pid = world.sh("systemctl show -p MainPID --value ipv6milter").strip()
    before = journal(world).count("reloaded")
    set_conf(world, "AcceptDomains", OPTED_IN)
    code, out = world.rc("systemctl reload ipv6milter")
    assert code == 0, out + world.rc("systemctl status --no-pager ipv6milter")[1]
    cleanroot.wait(lambda: journal(world).count("reloaded") > before, 20, "the reload log line")
    assert world.sh("systemctl show -p MainPID --value ipv6milter").strip() == pid


def test_self_test_passes_on_the_running_service(world: World) -> None:
    # With the short host name, the header would name just "mx": the
    # self-test says so, and README.Debian says to set AuthservID.
    code, out = world.rc("ipv6milter --self-test")
    assert code == 1 and f"FAIL authserv-id '{HOSTNAME}'" in out, out
    documented(world, "AuthservID mx.example.org", 'then "systemctl reload ipv6milter", and check:',
               "ipv6milter -n", "ipv6milter --self-test")
    set_conf(world, "AuthservID", AUTHSERV_ID)
    assert world.rc("systemctl reload ipv6milter")[0] == 0
    pid = world.sh("systemctl show -p MainPID --value ipv6milter").strip()
    for who in ("", "runuser -u ipv6milter -- "):
        code, out = world.rc(f"{who}ipv6milter --self-test")
        assert code == 0, out
        assert re.search(rf"^ok   socket unix:/run/ipv6milter/ipv6milter.sock: in use by a "
                         rf"running milter \(pid {pid}: \S*python3 /usr/bin/ipv6milter -c {CONF}\),"
                         r" which answers \(milter protocol version 6\)$", out, re.M), out


def test_unit_lets_the_milter_lower_a_helpers_priority(world: World) -> None:
    """The unit's system call filter, as installed, run by systemd: a
    process of user ipv6milter can renice its child to 19, as the isolation
    does to a helper whose check runs long (a filtered setpriority fails
    with EPERM, and the milter carries on without the demotion)."""
    unit = world.path("/lib/systemd/system/ipv6milter.service").read_text()
    filters = [line for line in unit.splitlines()
               if line.startswith(("SystemCallFilter=", "SystemCallErrorNumber=",
                                   "SystemCallArchitectures="))]
    assert filters, unit
    world.path("/var/tmp/priority.pl").write_text(
        "my $p = fork(); if ($p == 0) { sleep 5; exit 0 }\n"
        "print setpriority(0, $p, 19) ? 'nice ' . getpriority(0, $p) : 'error ' . $!;\n"
        "kill 'TERM', $p; waitpid($p, 0);\n")
    world.path("/etc/systemd/system/priority-probe.service").write_text(
        "[Service]\nType=oneshot\nUser=ipv6milter\nExecStart=/usr/bin/perl /var/tmp/priority.pl\n"
        "StandardOutput=truncate:/var/tmp/priority.out\n" + "\n".join(filters) + "\n")
    try:
        world.sh("systemctl daemon-reload && systemctl start priority-probe.service")
        assert world.path("/var/tmp/priority.out").read_text() == "nice 19"
    finally:
        world.sh("rm -f /etc/systemd/system/priority-probe.service /var/tmp/priority.* "
                 "&& systemctl daemon-reload")


# -- Postfix, as README.Debian wires it -----------------------------------------------------


def test_postfix_option_1_the_inet_socket(world: World) -> None:
    code, out = world.rc("DEBIAN_FRONTEND=noninteractive apt-get install -y -q postfix")
    assert code == 0, out
    # The test's own Postfix settings (not README.Debian's): the recipient
    # domains are local, delivered to alice's mailbox.
    world.sh("useradd -m alice && postconf -e "
             f"'mydestination = {OPTED_IN}, {NOT_OPTED_IN}, localhost' "
             "&& systemctl restart postfix")
    documented(world, "Socket inet:8894@localhost", "smtpd_milters = inet:localhost:8894",
               "No group membership is needed.", "milter_default_action = tempfail",
               "milter_protocol = 6")
    set_conf(world, "Socket", "inet:8894@localhost")
    world.sh("postconf -e 'smtpd_milters = inet:localhost:8894' "
             "'milter_default_action = tempfail' 'milter_protocol = 6'")
    restart_both(world)
    mail_checks(world)


def test_postfix_option_2_the_unix_socket_in_the_chroot(world: World) -> None:
    documented(world, "adduser postfix ipv6milter", "systemctl restart postfix")
    world.sh("adduser postfix ipv6milter && systemctl restart postfix")
    spool = "/var/spool/postfix/ipv6milter"
    documented(world, f"install -d -o ipv6milter -g ipv6milter -m 0750 {spool}",
               "systemctl edit ipv6milter", "[Service]", f"ReadWritePaths={spool}",
               f"Socket unix:{spool}/ipv6milter.sock",
               "smtpd_milters = unix:ipv6milter/ipv6milter.sock")
    world.sh(f"install -d -o ipv6milter -g ipv6milter -m 0750 {spool}")
    # "systemctl edit" (on a terminal: script(1) gives it one), with an
    # editor that writes the drop-in's text.
    world.path("/root/editor").write_text(
        f'#!/bin/sh\nprintf "[Service]\\nReadWritePaths={spool}\\n" > "$1"\n')
    world.path("/root/editor").chmod(0o755)
    world.sh("SYSTEMD_EDITOR=/root/editor script -qec 'systemctl edit ipv6milter' /dev/null")
    assert f"ReadWritePaths={spool}" in world.path(
        "/etc/systemd/system/ipv6milter.service.d/override.conf").read_text()
    set_conf(world, "Socket", f"unix:{spool}/ipv6milter.sock")
    world.sh("postconf -e 'smtpd_milters = unix:ipv6milter/ipv6milter.sock'")
    restart_both(world)
    mail_checks(world)


def test_admin_guides_socket_recipe(world: World) -> None:
    """The admin guide's "Unix socket on Debian": a directory of the
    milter's user with group postfix and the setgid bit."""
    found_guide = next(world.path("/usr/share/doc/ipv6milter").rglob("admin-guide.md*"))
    data = found_guide.read_bytes()
    guide = (gzip.decompress(data) if found_guide.suffix == ".gz" else data).decode()
    spool = "/var/spool/postfix/ipv6milter"
    found = re.search(r"install -d [^`]*?/var/spool/postfix/ipv6milter", guide)
    assert found, "the admin guide gives no directory for the socket"
    recipe = " ".join(found.group(0).split())
    world.sh(f"systemctl stop ipv6milter && rm -r {spool} && {recipe} "
             "&& gpasswd -d postfix ipv6milter && systemctl restart postfix")
    restart_both(world)
    assert world.test(f"-S {spool}/ipv6milter.sock")
    assert world.sh(f"stat -c %G {spool}/ipv6milter.sock").strip() == "postfix"
    mail_checks(world)  # postfix reaches it through group postfix alone
    # The packaged unit needs the drop-in of option 2, left in place here:
    # the guide says so too.
    assert f"ReadWritePaths={spool}" in guide
    world.sh(f"systemctl stop ipv6milter && rm -r {spool} && "
             f"install -d -o ipv6milter -g ipv6milter -m 0750 {spool} && "
             "adduser postfix ipv6milter && systemctl restart postfix")


def test_postfix_option_3_the_packaged_socket_without_chroot(world: World) -> None:
    documented(world, "smtpd_milters = unix:/run/ipv6milter/ipv6milter.sock")
    text = gzip.decompress(world.path(
        "/usr/share/doc/ipv6milter/README.Debian.gz").read_bytes()).decode()
    # The service names README.Debian gives are those of Debian 12's master.cf.
    master = world.path("/etc/postfix/master.cf").read_text()
    assert "submission and submissions" in " ".join(text.split())
    assert re.search(r"^#submissions\s+inet", master, re.M), "Debian's master.cf changed"
    world.sh("postconf -F smtp/inet/chroot=n")
    set_conf(world, "Socket", "unix:/run/ipv6milter/ipv6milter.sock")
    world.sh("postconf -e 'smtpd_milters = unix:/run/ipv6milter/ipv6milter.sock'")
    restart_both(world)
    mail_checks(world)
    assert "Traceback" not in journal(world)


# -- stop, and the self-test of a stopped service ----------------------------------------------


def test_stop_then_self_test_passes(world: World) -> None:
    assert world.rc("systemctl stop ipv6milter")[0] == 0
    assert world.rc("systemctl is-active ipv6milter")[0] != 0
    assert not world.test("-e /run/ipv6milter")  # systemd removed the RuntimeDirectory
    for who in ("", "runuser -u ipv6milter -- "):
        code, out = world.rc(f"{who}ipv6milter --self-test")
        assert code == 0, out
        # /lib is /usr/lib on a merged-/usr system (Debian 12's default)
        assert re.search(r"^ok   socket unix:/run/ipv6milter/ipv6milter.sock: directory "
                         r"/run/ipv6milter is created by systemd at start \(RuntimeDirectory="
                         r"ipv6milter in (/usr)?/lib/systemd/system/ipv6milter.service\)$",
                         out, re.M), out
    # The milter gone, milter_default_action = tempfail defers.
    out = send(world, GOOD, "sender@example.com", f"alice@{OPTED_IN}", marker())
    assert out.mail.code == 451 or (out.rcpts and out.rcpts[0].code == 451), out


# -- removal, as README.Debian gives it ---------------------------------------------------------


def readme_section(w: World, title: str) -> str:
    text = gzip.decompress(w.path("/usr/share/doc/ipv6milter/README.Debian.gz").read_bytes())
    return text.decode().split(f"\n{title}\n", 1)[1].split("\n\n\n", 1)[0]


def test_removal_leaves_nothing(world: World) -> None:
    """The commands of README.Debian's "Removing the package" (its indented
    lines), run in its order: each succeeds, Postfix takes mail all along,
    and nothing of the package is left."""
    section = readme_section(world, "Removing the package")
    steps = [line.strip() for line in section.splitlines()
             if line.startswith("    ") and not line.startswith("     ")]
    assert "apt-get purge ipv6milter" in steps, steps
    world.sh("postconf -F smtp/inet/chroot=y")  # undo option 3's master.cf change
    for step in steps:
        cmd = step.replace("apt-get purge", "DEBIAN_FRONTEND=noninteractive apt-get purge -y -q")
        with postfix_reloaded(world) if step == "postfix reload" else contextlib.nullcontext():
            code, out = world.rc(cmd)
            assert code == 0, f"{step}: exit {code}\n{out}"
        if step == "postfix reload" or step.startswith("apt-get purge"):
            # Mail flows once the milter is out of main.cf, and after the purge.
            out = send(world, GOOD, "sender@example.com", f"alice@{OPTED_IN}", marker())
            assert out.accepted, f"after {step}: {out}"
    mark = marker()
    assert send(world, GOOD, "sender@example.com", f"alice@{OPTED_IN}", mark).accepted
    delivered(world, mark)

    assert world.rc("dpkg-query -W -f '${Status}' ipv6milter")[0] != 0, "still known to dpkg"
    for gone in ("/etc/ipv6milter", "/run/ipv6milter", "/var/spool/postfix/ipv6milter",
                 "/etc/systemd/system/ipv6milter.service.d",
                 "/lib/systemd/system/ipv6milter.service",
                 "/usr/share/doc/ipv6milter", "/usr/lib/python3/dist-packages/ipv6milter"):
        assert not world.test(f"-e {gone}"), f"{gone} is left"
    for db in ("passwd", "group"):
        assert world.rc(f"getent {db} ipv6milter")[0] == 2, f"ipv6milter is left in {db}"
    left = world.sh("find / -xdev \\( -path /proc -o -path /sys -o -path /root \\) -prune "
                    "-o \\( -name '*ipv6milter*' -o -nouser -o -nogroup \\) -print").split()
    assert not left, left
    assert "ipv6milter" not in world.sh("systemctl list-units --all --no-legend 'ipv6milter*'")
    assert "ipv6milter" not in world.sh("postconf -n")
