"""Least privilege (issue #6).

tests/unit/test_cli.py already shows that with ``UserID`` the milter binds a
unix socket in a root-only directory and then runs as that user (real and
effective ids), that ``UMask`` sets the socket's mode, and that running as
root without ``UserID`` logs a warning.  Added here:

* every id is dropped (real, effective, saved, filesystem; no supplementary
  group) in every thread, and an inet socket on a privileged port works,
  so the bind happened before the drop;
* while serving, the process holds no file open for writing but the
  stdout/stderr it was given;
* statically: the package starts no program and writes one file, the PidFile.
"""

from __future__ import annotations

import ast
import grp
import os
import pwd
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from tests.integration.harness import GOOD_IP, milter_command, tcp_open, wait_until
from tests.integration.smtpclient import make_message

from .milterclient import MilterConnection, parse_message
from .servers import Knot, proc_status

PACKAGE = Path(__file__).resolve().parents[2] / "ipv6milter"


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
        # Serve a message, so that every kind of thread (libmilter's, the DNS pool) exists.
        with MilterConnection("127.0.0.1", port) as c:
            c.connect(GOOD_IP)
            c.helo("mail.example.com")
            msg = make_message("priv", from_addr="sender@example.com", to="rcpt@example.com")
            _, eom = c.message("sender@example.com", ["rcpt@example.com"], *parse_message(msg))
            assert eom is not None and eom.ok, eom
            tasks = sorted(Path(f"/proc/{proc.pid}/task").iterdir())
            assert len(tasks) > 2
            for task in tasks:
                st = proc_status(proc.pid) if task.name == str(proc.pid) else {
                    k: v for k, _, v in (
                        line.partition(":") for line in (task / "status").read_text().splitlines()
                    )
                }
                assert st["Uid"].split() == [str(user.pw_uid)] * 4, (task, st["Uid"])
                assert st["Gid"].split() == [str(group.gr_gid)] * 4, (task, st["Gid"])
                assert st["Groups"].strip() == "", (task, st["Groups"])
                assert st["CapEff"].strip("0\t ") == "", (task, st["CapEff"])
            writable = _files_open_for_writing(proc.pid)
            assert writable <= {1, 2}, writable  # only the log we handed it
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
# The one write (the PidFile) and its removal at exit, as (file, call, first argument).
ALLOWED_WRITES = {("cli.py", "open", "cfg.pid_file"), ("cli.py", "os.unlink", "cfg.pid_file")}


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
                bad.append(f"{filename}:{node.lineno}: {func}()")
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
    assert not bad, bad
    assert writes == ALLOWED_WRITES, writes


def test_the_static_check_sees_what_it_looks_for() -> None:
    sample = (
        "import subprocess\nopen(p, 'w')\nopen(p)\nopen(p, mode='rb')\nPath(x).write_text('')\n"
        "os.system('x')\nopen(p, m)\n"
    )
    writes, bad = _writes(ast.parse(sample), "x.py")
    assert writes == {("x.py", "open", "p"), ("x.py", "Path(x).write_text", "''")}
    assert bad == ["x.py:1: import subprocess", "x.py:6: os.system()"]
