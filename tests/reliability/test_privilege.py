"""Least privilege (issue #6).

tests/unit/test_cli.py already shows that with ``UserID`` the milter binds a
unix socket in a root-only directory and then runs as that user (real and
effective ids), that ``UMask`` sets the socket's mode, and that running as
root without ``UserID`` logs a warning.  Added here:

* every id is dropped (real, effective, saved, filesystem; no supplementary
  group) in every thread of every process that handles input (the workers),
  the root parent runs one thread and nothing else, and an inet socket on a
  privileged port works, so the bind happened before the drop;
* while serving, no process (the parent, its workers) holds a file open for
  writing but the stdout/stderr it was given;
* from a clone in a 0700 directory (as ``mktemp -d`` makes them), which the
  ``UserID`` user cannot read, the milter still judges mail after the switch
  (everything loaded lazily is loaded before it, issue #10);
* statically: the package starts no program and writes what it must only: the
  PidFile, the unix socket it renames into place and chowns, and the private
  metrics directory of its workers; it forks only its workers.
"""

from __future__ import annotations

import ast
import grp
import os
import pwd
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.harness import GOOD_IP, milter_command, tcp_open, wait_until
from tests.integration.smtpclient import make_message

from .milterclient import MilterConnection, parse_message
from .servers import Knot

PACKAGE = Path(__file__).resolve().parents[2] / "ipv6milter"
BASE_PYTHON = os.path.realpath(sys.executable)  # the interpreter our virtualenv was made from


def _privileged_port() -> int:
    for port in range(700, 1000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.fail("no free port below 1024")


@pytest.mark.timeout(60)
def test_every_id_dropped_in_every_thread_after_binding_a_privileged_port(
    tmp_path: Path, knot: Knot
) -> None:
    if os.geteuid() != 0:
        pytest.fail("needs root to drop privileges")
    user, group = pwd.getpwnam("nobody"), grp.getgrnam("nogroup")
    port = _privileged_port()
    run = tmp_path / "run"
    run.mkdir()
    conf = tmp_path / "ipv6milter.conf"
    conf.write_text(
        f"Socket inet:{port}@127.0.0.1\nUserID nobody:nogroup\nPidFile {run}/milter.pid\n"
        f"Nameservers {knot.nameserver}\nAcceptDomains example.com\nLogLevel info\n"
    )
    log = tmp_path / "milter.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([milter_command(), "-c", str(conf)], stdin=subprocess.DEVNULL,
                                stdout=fh, stderr=subprocess.STDOUT)
    try:
        wait_until("the milter", lambda: tcp_open("127.0.0.1", port), timeout=20)
        # Serve messages, so that every kind of thread (libmilter's, the DNS pool) exists.
        for n in range(4):
            _judged(port, f"priv{n}")
        # The parent stays root to clean up at the stop, and so runs nothing:
        # one thread, no message, no socket it reads (supervisor.Supervisor).  Every
        # process that handles input is a child, as UserID.
        assert [t.name for t in Path(f"/proc/{proc.pid}/task").iterdir()] == [str(proc.pid)]
        assert _files_open_for_writing(proc.pid) <= {1, 2}
        procs = _children(proc.pid)
        assert len(procs) >= 1, procs  # the workers
        tasks = [t for pid in procs for t in sorted(Path(f"/proc/{pid}/task").iterdir())]
        assert len(tasks) > len(procs) + 1
        for task in tasks:
            st = {k: v for k, _, v in (
                line.partition(":") for line in (task / "status").read_text().splitlines())}
            assert st["Uid"].split() == [str(user.pw_uid)] * 4, (task, st["Uid"])
            assert st["Gid"].split() == [str(group.gr_gid)] * 4, (task, st["Gid"])
            assert st["Groups"].strip() == "", (task, st["Groups"])
            assert st["CapEff"].strip("0\t ") == "", (task, st["CapEff"])
        for pid in procs:
            writable = _files_open_for_writing(pid)
            assert writable <= {1, 2}, (pid, writable)  # only the log we handed it
        assert (run / "milter.pid").read_text().strip() == str(proc.pid)
        assert "running as nobody" in log.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert "Traceback" not in log.read_text()


def _judged(port: int, name: str) -> None:
    with MilterConnection("127.0.0.1", port) as c:
        c.connect(GOOD_IP)
        c.helo("mail.example.com")
        msg = make_message(name, from_addr="sender@example.com", to="rcpt@example.com")
        _, eom = c.message("sender@example.com", ["rcpt@example.com"], *parse_message(msg))
        assert eom is not None and eom.ok, eom


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.mark.timeout(120)
def test_a_clone_in_a_0700_directory_still_judges_after_the_switch(
    tmp_path: Path, knot: Knot
) -> None:
    """The UserID user cannot read a byte of the code it runs: everything it
    needs was loaded before the switch, and the check after it passed."""
    if os.geteuid() != 0:
        pytest.fail("needs root to drop privileges")
    clone = Path(subprocess.run(["mktemp", "-d"], capture_output=True, text=True,
                                check=True).stdout.strip())
    try:
        assert clone.stat().st_mode & 0o777 == 0o700
        subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(PACKAGE.parent),
                        str(clone / "src")], check=True, timeout=60)
        # This branch's work, committed or not, is what runs.
        for path in PACKAGE.glob("*.py"):
            (clone / "src" / "ipv6milter" / path.name).write_bytes(path.read_bytes())
        nobody = pwd.getpwnam("nobody")
        probe = subprocess.run(
            ["python3", "-c", f"import os; os.setgid({nobody.pw_gid}); os.setuid("
             f"{nobody.pw_uid}); open({str(clone / 'src' / 'ipv6milter' / 'worker.py')!r})"],
            capture_output=True, text=True)
        assert "PermissionError" in probe.stderr, probe  # unreadable to the user, as in #10
        port = _free_port()
        conf = tmp_path / "ipv6milter.conf"
        conf.write_text(
            f"Socket inet:{port}@127.0.0.1\nUserID nobody:nogroup\nWorkers 2\n"
            f"Nameservers {knot.nameserver}\nAcceptDomains example.com\n")
        log = tmp_path / "milter.log"
        # The clone first; the libraries from our virtualenv, by PYTHONPATH so
        # that its .pth files (the editable install of this checkout) stay out.
        site = next(p for p in sys.path if p.endswith("site-packages") and sys.prefix in p)
        env = {**os.environ, "PYTHONPATH": f"{clone / 'src'}:{site}"}
        check = subprocess.run(
            [BASE_PYTHON, "-s", "-c", "import ipv6milter.engine as e; print(e.__file__)"],
            env=env, cwd=tmp_path, capture_output=True, text=True, check=True)
        assert check.stdout.startswith(str(clone)), check.stdout
        with open(log, "wb") as fh:
            proc = subprocess.Popen(
                [BASE_PYTHON, "-s", "-m", "ipv6milter.cli", "-c", str(conf)], cwd=tmp_path,
                env=env, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT)
        try:
            wait_until("the milter", lambda: tcp_open("127.0.0.1", port), timeout=30)
            # The socket listens from before the check as UserID, which logs this line.
            wait_until("the switch", lambda: "running as nobody" in log.read_text(), timeout=30)
            for n in range(6):  # over both workers, most likely; each must judge
                _judged(port, f"clone{n}")
            workers = _children(proc.pid)
            assert len(workers) == 2
            text = log.read_text()
            assert "Traceback" not in text and "4.3.0" not in text, text
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                assert proc.wait(30) == 0, log.read_text()
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    finally:
        subprocess.run(["rm", "-rf", str(clone)], check=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _files_open_for_writing(pid: int) -> set[int]:
    """File descriptors of regular files open for writing."""
    out = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
            flags = int(
                (Path(f"/proc/{pid}/fdinfo") / fd.name).read_text().split("flags:")[1].split()[0],
                8,
            )
        except (OSError, IndexError, ValueError):
            continue
        if target.startswith("/") and not target.startswith("/dev/") and flags & 0o3:
            out.add(int(fd.name))
    return out


# -- statically: no programs started, one file written ----------------------------------------

FORBIDDEN_MODULES = {"subprocess", "pty", "shutil", "tempfile", "multiprocessing"}
FORBIDDEN_CALLS = {
    "os.system", "os.popen", "os.execv", "os.execve", "os.execvp", "os.execl", "os.fork",
    "os.spawnv", "os.spawnl", "os.posix_spawn", "os.posix_spawnp", "eval", "exec", "compile",
    "__import__", "os.rename", "os.replace", "os.remove", "os.rmdir", "os.mkdir", "os.makedirs",
    "os.chmod", "os.chown", "os.mkfifo", "os.mknod", "os.symlink", "os.link", "os.truncate",
    "os.open",
}
# What the daemon must do, each in one place: write and remove the PidFile
# (opened by os.open with O_NOFOLLOW), rename its unix socket into place and
# chown it to UserID, fork its workers, make and remove the workers' private
# metrics directory.  As (file, call, first argument).
ALLOWED_WRITES = {
    ("pidfile.py", "os.unlink", "path"),  # the PidFile, if it still names us
    ("listener.py", "os.unlink", "bind_path"),  # the socket's private name, if renaming failed
    ("listener.py", "os.unlink", "self.path"),  # the socket, at a clean stop
    ("metricsserver.py", "os.unlink", "name"),  # the metrics files, by the directory's descriptor
    ("privileges.py", "open", "probe"),  # the check as UserID: can it write the metrics files?
    ("privileges.py", "os.unlink", "probe"),
    ("metrics.py", "os.unlink", "f'gauge_{mode}_{pid}.db'"),  # a dead worker's live gauges
}
ALLOWED_PRIVILEGED = {
    ("metricsserver.py", "import tempfile"),  # mkdtemp for the metrics directory
    ("pidfile.py", "os.open(path)"),  # the PidFile: written, then read back before removal
    ("metricsserver.py", "os.open(self.directory)"),  # held, O_NOFOLLOW: root works only inside
    ("metricsserver.py", "os.open(parent)"),  # the metrics directory's parent, to remove it
    ("supervisor.py", "os.fork()"),  # the workers, the metrics server
    ("privileges.py", "os.fork()"),  # the checks as UserID (at the start, at a reload)
    ("isolation.py", "os.fork()"),  # a worker's check helpers, and the zygote forking them
    ("listener.py", "os.rename(bind_path)"),
    ("listener.py", "os.chown(bind_path)"),  # the socket, to UserID (SPEC §4)
    ("metricsserver.py", "os.chown(self.fd)"),  # made by root, for UserID's processes
    ("metricsserver.py", "os.rmdir(name)"),  # the metrics directory, at the stop
}


def _name(node: ast.expr) -> str:
    return ast.unparse(node)


def _writes(tree: ast.AST, filename: str) -> tuple[set[tuple[str, str, str]], list[str]]:
    writes: set[tuple[str, str, str]] = set()
    bad: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in FORBIDDEN_MODULES:
                    bad.append(f"{filename}:{node.lineno}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.module in FORBIDDEN_MODULES:
            bad.append(f"{filename}:{node.lineno}: from {node.module} import")
        elif isinstance(node, ast.Call):
            func = _name(node.func)
            first = _name(node.args[0]) if node.args else ""
            if func in FORBIDDEN_CALLS:
                bad.append(f"{filename}:{node.lineno}: {func}({first})")
            elif func in ("os.unlink",) or func.endswith((".write_text", ".write_bytes")):
                writes.add((filename, func, first))
            elif func == "open" or func.endswith(".open"):
                mode = node.args[1] if len(node.args) > 1 else next(
                    (k.value for k in node.keywords if k.arg == "mode"), None)
                text = mode.value if isinstance(mode, ast.Constant) else ("?" if mode else "r")
                if not isinstance(text, str) or set(text) & set("wax+?"):
                    writes.add((filename, func, first))
    return writes, bad


def test_the_package_starts_no_program_and_writes_only_the_pid_file() -> None:
    writes: set[tuple[str, str, str]] = set()
    bad: list[str] = []
    files = sorted(PACKAGE.glob("*.py"))
    assert len(files) > 5
    for path in files:
        w, b = _writes(ast.parse(path.read_text(), str(path)), path.name)
        writes |= w
        bad += b
    unexpected = [b for b in bad if tuple(_unnumbered(b)) not in ALLOWED_PRIVILEGED]
    assert not unexpected, unexpected
    assert {_unnumbered(b) for b in bad} == ALLOWED_PRIVILEGED
    assert writes == ALLOWED_WRITES, writes


def _unnumbered(finding: str) -> tuple[str, str]:
    filename, _line, what = finding.split(":", 2)
    return filename, what.strip()


def test_the_static_check_sees_what_it_looks_for() -> None:
    sample = (
        "import subprocess\nopen(p, 'w')\nopen(p)\nopen(p, mode='rb')\nPath(x).write_text('')\n"
        "os.system('x')\nopen(p, m)\n"
    )
    writes, bad = _writes(ast.parse(sample), "x.py")
    assert writes == {("x.py", "open", "p"), ("x.py", "Path(x).write_text", "''")}
    assert bad == ["x.py:1: import subprocess", "x.py:6: os.system('x')"]
