"""The .deb: built from a clean copy of the tree, checked by lintian,
installed with apt (Debian's python3-* libraries), run exactly as its systemd
unit would run it, answering a private Postfix through the packaged unix
socket, the unit tests run against Debian's libraries, and purged.

The tests of this module run in order and share one installation (the
``installed`` fixture); whatever happens, the package is purged, the daemon
stopped and the postfix user taken out of the ipv6milter group at the end.
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import os
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import (
    REPO,
    SYSTEM_ENV,
    Built,
    dead_links,
    install_requires,
    parse_unit,
    run,
    version,
)
from .mta import PrivatePostfix, SmtpSink, send, wait_for

UNIT_PATH = Path("/lib/systemd/system/ipv6milter.service")
CONF_PATH = Path("/etc/ipv6milter/ipv6milter.conf")
# Written while the test's own installation exists, so that a run killed
# half-way is cleaned up by the next one, and nobody else's is touched.
MARKER = Path("/var/lib/ipv6milter-pkgtest.installed")
LOCK = Path("/tmp/ipv6milter-pkgtest.lock")
# Other test suites on this machine may be installing packages too: wait for
# dpkg's lock rather than fail.
APT_OPTS = ["-y", "-q", "-o", "DPkg::Lock::Timeout=300"]

# setup.cfg's install_requires -> the Debian package that provides it.
DEBIAN = {
    "pymilter": "python3-milter",
    "dkimpy": "python3-dkim",
    "pyspf": "python3-spf",
    "authres": "python3-authres",
    "dnspython": "python3-dnspython",
    "prometheus-client": "python3-prometheus-client",
    "idna": "python3-idna",
    "cryptography": "python3-cryptography",
}


def dpkg_status(pkg: str) -> str:
    r = run(["dpkg-query", "-W", "-f", "${Status}", pkg], check=False, timeout=60)
    return r.stdout if r.returncode == 0 else "not-installed"


def purge() -> subprocess.CompletedProcess[str]:
    return run(["apt-get", *APT_OPTS, "purge", "ipv6milter"], check=False, timeout=400)


def socket_path() -> Path:
    text = CONF_PATH.read_text()
    m = re.search(r"^Socket\s+(?:unix|local):(\S+)", text, re.M)
    assert m, "the packaged configuration has no unix Socket"
    return Path(m.group(1))


# -- build ------------------------------------------------------------------------


def test_deb_builds_with_the_package_version(built_deb: Built) -> None:
    size = built_deb.path.stat().st_size
    print(f"deb built in {built_deb.seconds:.1f}s: {built_deb.path.name}, {size} bytes")
    assert built_deb.path.name == f"ipv6milter_{version()}-1_all.deb"


def test_lintian_reports_nothing(built_deb: Built, tmp_path: Path) -> None:
    changes = next(built_deb.dist.glob("ipv6milter_*.changes"))
    start = time.monotonic()
    # lintian leaves cache files in TMPDIR
    r = run(["lintian", "--fail-on", "error,warning", "--display-info", str(changes)],
            check=False, timeout=600, env={**SYSTEM_ENV, "TMPDIR": str(tmp_path)})
    print(f"lintian ({time.monotonic() - start:.1f}s): {r.stdout.strip() or 'no tags'}")
    tags = [line for line in r.stdout.splitlines() if re.match(r"^[EW]: ", line)]
    assert r.returncode == 0 and not tags, r.stdout + r.stderr


def test_deb_contents_and_dependencies(built_deb: Built) -> None:
    listing = run(["dpkg-deb", "-c", str(built_deb.path)], timeout=60).stdout
    files = {line.split()[-1].lstrip(".") for line in listing.splitlines()}
    for f in (
        "/usr/bin/ipv6milter",
        "/usr/bin/ipv6milter-check",
        "/usr/bin/ipv6milter-report",
        "/etc/ipv6milter/ipv6milter.conf",
        "/lib/systemd/system/ipv6milter.service",
        "/usr/share/man/man8/ipv6milter.8.gz",
        "/usr/share/man/man5/ipv6milter.conf.5.gz",
        "/usr/share/man/man1/ipv6milter-check.1.gz",
        "/usr/share/man/man1/ipv6milter-report.1.gz",
        "/usr/share/doc/ipv6milter/README.Debian.gz",
        "/usr/share/doc/ipv6milter/copyright",
        "/usr/lib/python3/dist-packages/ipv6milter/cli.py",
    ):
        assert f in files, f"{f} not in the package"
    top = {f.split("/")[5] for f in files if f.startswith("/usr/lib/python3/dist-packages/")
           and f.count("/") > 5}
    # Anything else (tests, bench, ...) would be a top-level module of its own
    # in dist-packages: setup.cfg's [options.packages.find] must leave it out.
    assert top == {"ipv6milter", f"ipv6milter-{version()}.dist-info"}, top
    control = run(["dpkg-deb", "-f", str(built_deb.path)], timeout=60).stdout
    depends = re.search(r"^Depends: (.*)$", control, re.M).group(1)  # type: ignore[union-attr]
    print(f"Depends: {depends}")
    names = {d.strip().split()[0] for d in depends.split(",")}
    for dist in install_requires():
        assert dist in DEBIAN, f"setup.cfg requires {dist}: map it to its Debian package"
        assert DEBIAN[dist] in names, f"no Depends on {DEBIAN[dist]} (for {dist})"
    assert "adduser" in names
    conffiles = run(["dpkg-deb", "-I", str(built_deb.path), "conffiles"], timeout=60).stdout
    assert conffiles.split() == ["/etc/ipv6milter/ipv6milter.conf"]


def test_shipped_docs_link_only_to_shipped_files(built_deb: Built, tmp_path: Path) -> None:
    """Every relative link in the guides the package ships leads to a file
    (and heading) in /usr/share/doc/ipv6milter, not to one left in the sources."""
    run(["dpkg-deb", "-x", str(built_deb.path), str(tmp_path)], timeout=60)
    assert not dead_links(tmp_path / "usr/share/doc/ipv6milter")


# -- install ------------------------------------------------------------------------


def _cleanup(remove_user: bool = True) -> None:
    """Undo everything the installation and the daemon test did."""
    # A milter left running by a killed run: its pid is in the marker.
    with contextlib.suppress(OSError):
        for word in MARKER.read_text().split()[1:]:
            with contextlib.suppress(OSError, ValueError):
                if b"/usr/bin/ipv6milter" in Path(f"/proc/{int(word)}/cmdline").read_bytes():
                    os.kill(int(word), signal.SIGKILL)
    purge()
    with contextlib.suppress(KeyError):
        if "postfix" in grp.getgrnam("ipv6milter").gr_mem:
            run(["gpasswd", "-d", "postfix", "ipv6milter"], check=False, timeout=60)
    # Kept by the package on purge (Debian practice, see README.Debian); the
    # test removes them so that the machine is left as it was.
    if remove_user:
        with contextlib.suppress(KeyError):
            pwd.getpwnam("ipv6milter")
            run(["deluser", "--system", "--quiet", "ipv6milter"], check=False, timeout=60)
        with contextlib.suppress(KeyError):
            grp.getgrnam("ipv6milter")
            run(["delgroup", "--system", "--quiet", "ipv6milter"], check=False, timeout=60)
    shutil.rmtree("/run/ipv6milter", ignore_errors=True)
    MARKER.unlink(missing_ok=True)


def _exists_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


@pytest.fixture(scope="module")
def installed(built_deb: Built) -> Iterator[Built]:
    with open(LOCK, "w") as lock:
        # One package test at a time on this machine.
        fcntl.flock(lock, fcntl.LOCK_EX)
        status = dpkg_status("ipv6milter")
        if MARKER.exists():  # left by a test run that was killed
            for conf in Path(tempfile.gettempdir()).glob(f"{PrivatePostfix.PREFIX}*/etc"):
                run(["postfix", "-c", str(conf), "abort"], check=False, timeout=60)
                shutil.rmtree(conf.parent, ignore_errors=True)
            _cleanup()
        elif "ok installed" in status or "config-files" in status:
            pytest.fail("ipv6milter is installed on this machine, not by this test: "
                        "purge it first (apt-get purge ipv6milter)")
        # A user kept from an earlier installation of the administrator's stays.
        user_existed = _exists_user("ipv6milter")
        MARKER.write_text(f"{os.getpid()}\n")
        try:
            start = time.monotonic()
            r = run(["apt-get", *APT_OPTS, "install", "--no-install-recommends",
                     str(built_deb.path)], timeout=600)
            print(f"apt-get install: {time.monotonic() - start:.1f}s")
            assert "ok installed" in dpkg_status("ipv6milter"), r.stdout
            yield built_deb
        finally:
            _cleanup(remove_user=not user_existed)


def test_install_creates_the_system_user_and_the_conffile(installed: Built) -> None:
    user = pwd.getpwnam("ipv6milter")
    group = grp.getgrnam("ipv6milter")
    assert user.pw_gid == group.gr_gid
    assert user.pw_uid < 1000, "not a system user"
    assert user.pw_shell in ("/usr/sbin/nologin", "/bin/false")
    assert not Path(user.pw_dir).exists(), f"home {user.pw_dir} should not exist"
    conffiles = run(["dpkg-query", "-W", "-f", "${Conffiles}", "ipv6milter"], timeout=60).stdout
    assert str(CONF_PATH) in conffiles
    assert (REPO / "packaging" / "systemd" / "ipv6milter.conf").read_text() == CONF_PATH.read_text()


def test_installed_commands_use_debians_python(installed: Built) -> None:
    for cmd in ("/usr/bin/ipv6milter", "/usr/bin/ipv6milter-check", "/usr/bin/ipv6milter-report"):
        first = Path(cmd).read_text().splitlines()[0]
        assert first == "#! /usr/bin/python3" or first == "#!/usr/bin/python3", first
    out = run(["ipv6milter", "--version"], timeout=60).stdout
    assert out.strip() == f"ipv6milter {version()}"
    out = run(["ipv6milter-check", "--help"], timeout=60).stdout
    assert "--explain" in out
    out = run(["ipv6milter-report", "--help"], timeout=60).stdout
    assert "--since" in out


def test_installed_conffile_checks(installed: Built) -> None:
    # Without -c: the default path is the packaged conffile.
    for args in (["-n"], ["-n", "-c", str(CONF_PATH)]):
        r = run(["ipv6milter", *args], timeout=60)
        assert f"{CONF_PATH}: configuration OK" in r.stdout, r.stdout
        assert "Socket unix:/run/ipv6milter/ipv6milter.sock" in r.stdout


def test_installed_unit_verifies(installed: Built) -> None:
    assert shutil.which("systemd-analyze"), "make test installs systemd (systemd-analyze)"
    r = run(["systemd-analyze", "verify", str(UNIT_PATH)], check=False, timeout=120)
    # Without a running systemd, verify may also complain about the unrelated
    # units of the host: only what it says about ours counts.
    ours = [line for line in (r.stdout + r.stderr).splitlines() if "ipv6milter" in line]
    assert not ours, "\n".join(ours)


def test_installed_man_pages(installed: Built) -> None:
    for page in ("ipv6milter.8", "ipv6milter.conf.5", "ipv6milter-check.1", "ipv6milter-report.1"):
        name, _, section = page.rpartition(".")
        r = run(["man", "--warnings", section, name], timeout=60,
                env={**SYSTEM_ENV, "MANWIDTH": "80"})
        assert r.stderr == "" and "SEE ALSO" in r.stdout, r.stderr


# -- run it as the unit does ----------------------------------------------------------


class Daemon:
    """The milter started as the unit's ExecStart, as User=/Group=, with the
    unit's UMask and RuntimeDirectory, and the part of its sandbox that can be
    had without systemd (no new privileges, no capabilities)."""

    def __init__(self, log: Path):
        self.unit = parse_unit(UNIT_PATH)
        self.user = self.unit["User"][0]
        self.group = self.unit["Group"][0]
        self.rundir = Path("/run") / self.unit["RuntimeDirectory"][0]
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        u = self.unit
        mode = int(u["RuntimeDirectoryMode"][0], 8)
        self.rundir.mkdir(mode=mode)
        self.rundir.chmod(mode)
        shutil.chown(self.rundir, self.user, self.group)
        argv = shlex.split(u["ExecStart"][0])
        cmd = ["setpriv", f"--reuid={self.user}", f"--regid={self.group}", "--clear-groups",
               "--no-new-privs", "--inh-caps=-all", "--bounding-set=-all", "--", *argv]
        with open(self.log, "wb") as fh:
            self.proc = subprocess.Popen(
                cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={"PATH": SYSTEM_ENV["PATH"], "LANG": "C.UTF-8"},
                umask=int(u["UMask"][0], 8), cwd="/",
            )
        with open(MARKER, "a") as fh:  # for _cleanup after a killed run
            fh.write(f"{self.proc.pid}\n")

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def reload(self) -> None:
        """The unit's ExecReload as systemd runs it: "$$" is a literal "$",
        and $MAINPID is in the environment of the command."""
        assert self.proc is not None
        argv = [a.replace("$$", "$") for a in shlex.split(self.unit["ExecReload"][0])]
        run(argv, timeout=30, env={**SYSTEM_ENV, "MAINPID": str(self.proc.pid)})

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        shutil.rmtree(self.rundir, ignore_errors=True)  # systemd removes it at stop
        return self.proc.returncode


def test_daemon_answers_postfix_through_the_unix_socket(
    installed: Built, tmp_path: Path
) -> None:
    daemon = Daemon(tmp_path / "ipv6milter.log")
    sock = socket_path()
    assert sock.parent == daemon.rundir, "the packaged socket is not in the RuntimeDirectory"
    # README.Debian: the postfix user reaches the socket through the group.
    run(["adduser", "--quiet", "postfix", daemon.group], timeout=60)
    daemon.start()
    try:
        wait_for(lambda: sock.exists() or daemon.proc.poll() is not None, 20,  # type: ignore[union-attr]
                 f"the milter's socket {sock}")
        assert daemon.proc.poll() is None, f"the milter exited:\n{daemon.text()}"  # type: ignore[union-attr]
        st, dst = sock.stat(), daemon.rundir.stat()
        assert pwd.getpwuid(st.st_uid).pw_name == daemon.user
        assert grp.getgrgid(st.st_gid).gr_name == daemon.group
        assert st.st_mode & 0o777 == 0o770, oct(st.st_mode)
        assert dst.st_mode & 0o777 == 0o750, oct(dst.st_mode)
        status = Path(f"/proc/{daemon.proc.pid}/status").read_text()  # type: ignore[union-attr]
        uid = pwd.getpwnam(daemon.user).pw_uid
        assert re.search(rf"^Uid:\s+{uid}\s+{uid}\s+{uid}\s+{uid}$", status, re.M), status

        with SmtpSink() as sink, PrivatePostfix(sink.port, f"unix:{sock}") as pf:
            body = (
                "From: a@example.com\r\nTo: b@example.net\r\n"
                "Subject: package test\r\nMessage-ID: <pkgtest@example.com>\r\n\r\nhello\r\n"
            )
            send(pf.port, "a@example.com", "b@example.net", body)
            try:
                wait_for(lambda: sink.messages, 60, "the message at the sink")
            except AssertionError:
                raise AssertionError(
                    f"not delivered\n--- postfix\n{pf.log()}\n--- milter\n{daemon.text()}"
                ) from None
            msg = sink.messages[0]
            assert msg.mail_from == "a@example.com" and msg.rcpts == ("b@example.net",)
            assert b"Message-ID: <pkgtest@example.com>" in msg.data
            # The milter saw the message: its end-of-message decision line.
            wait_for(lambda: re.search(r"decision .*stage=eom.*client=127\.0\.0\.1|"
                                       r"decision .*client=127\.0\.0\.1.*stage=eom",
                                       daemon.text()), 10, "the milter's decision line")
            assert not re.search(r"warning: .*milter", pf.log()), pf.log()

        # ExecReload: SIGHUP re-reads the configuration, the milter keeps running.
        daemon.reload()
        wait_for(lambda: "reloaded" in daemon.text(), 10, "the reload log line")
        assert daemon.proc.poll() is None  # type: ignore[union-attr]
    finally:
        code = daemon.stop()
        print(daemon.text())
    assert code == 0, f"SIGTERM: exit status {code}\n{daemon.text()}"
    assert "Traceback" not in daemon.text()


# -- the unit tests, on Debian's libraries ---------------------------------------------


def test_unit_tests_pass_with_debians_libraries(installed: Built) -> None:
    """The installed package brought python3-milter, -dkim, -spf, -authres,
    -dnspython from Debian: the project's unit tests must pass on them
    (run from the source tree with /usr/bin/python3, no virtual environment)."""
    versions = run(["dpkg-query", "-W", *sorted(set(DEBIAN.values()))], timeout=60).stdout
    print(versions)
    start = time.monotonic()
    r = run(
        ["/usr/bin/python3", "-m", "pytest", "-q", "tests/unit", "-p", "no:cacheprovider"],
        check=False, timeout=900, cwd=REPO,
        env={**SYSTEM_ENV, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"},
    )
    tail = "\n".join(r.stdout.splitlines()[-15:])
    print(f"unit tests with /usr/bin/python3 ({time.monotonic() - start:.1f}s):\n{tail}")
    assert r.returncode == 0, r.stdout[-8000:] + r.stderr[-4000:]


# -- purge ---------------------------------------------------------------------------


def test_purge_removes_the_configuration_and_keeps_the_user(installed: Built) -> None:
    r = purge()
    assert r.returncode == 0, r.stdout + r.stderr
    assert "not-installed" in dpkg_status("ipv6milter")
    for gone in (CONF_PATH.parent, UNIT_PATH, Path("/usr/bin/ipv6milter"),
                 Path("/usr/lib/python3/dist-packages/ipv6milter")):
        assert not gone.exists(), f"{gone} is left after purge"
    # Debian keeps system users on purge (files they owned may remain);
    # README.Debian says how to remove them.
    assert pwd.getpwnam("ipv6milter")
