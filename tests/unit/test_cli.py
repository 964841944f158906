"""``ipv6milter``: -n, --version, and the daemon's signals, as a real process."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipv6milter import __version__, cli

BIN = shutil.which("ipv6milter", path=os.path.dirname(sys.executable)) or "ipv6milter"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred, timeout: float = 10.0, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"ipv6milter {__version__}"


def test_check_config_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "ok.conf"
    f.write_text("# a comment\nSocket inet:9999@127.0.0.1\nMode monitor\n")
    assert cli.main(["-n", "-c", str(f)]) == 0
    out = capsys.readouterr().out
    assert "configuration OK" in out and "Mode monitor" in out


def test_check_config_reports_every_error_with_its_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "bad.conf"
    f.write_text("Socket inet:9999@127.0.0.1\nBogusKey 1\n\nReverseDNS maybe\n")
    assert cli.main(["-n", "-c", str(f)]) == 1
    err = capsys.readouterr().err
    assert f"{f}:2: unknown key 'BogusKey'" in err
    assert f"{f}:4: ReverseDNS:" in err


def test_check_config_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    assert cli.main(["-n", "-c", str(tmp_path / "absent.conf")]) == 1


def test_the_example_configuration_is_valid() -> None:
    example = Path(__file__).parents[2] / "docs" / "examples" / "ipv6milter.conf"
    assert cli.main(["-n", "-c", str(example)]) == 0


def test_start_refuses_a_bad_config(tmp_path: Path) -> None:
    f = tmp_path / "bad.conf"
    f.write_text("Mode sometimes\n")
    p = subprocess.run([BIN, "-c", str(f)], capture_output=True, text=True, timeout=30)
    assert p.returncode == 1
    assert f"{f}:1: Mode:" in p.stderr


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int, Path, Path]]:
    port = free_port()
    conf = tmp_path / "ipv6milter.conf"
    conf.write_text(f"Socket inet:{port}@127.0.0.1\nAcceptDomains example.org\n"
                    f"PidFile {tmp_path}/milter.pid\n")
    log = tmp_path / "stderr.log"
    with open(log, "wb") as fh:
        p = subprocess.Popen([BIN, "-c", str(conf)], stderr=fh)
    try:
        wait_for(lambda: accepts(port), what="the milter socket")
        yield p, port, conf, log
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.mark.timeout(60)
def test_sighup_reloads_and_keeps_serving_sigterm_stops_cleanly(daemon) -> None:  # type: ignore[no-untyped-def]
    p, port, conf, log = daemon
    pid_file = conf.parent / "milter.pid"
    assert pid_file.read_text().strip() == str(p.pid)

    # A good new configuration is taken.
    conf.write_text(conf.read_text() + "Mode monitor\n")
    p.send_signal(signal.SIGHUP)
    wait_for(lambda: log.read_text().count("configuration reloaded") == 1, what="reload")

    # A bad one is logged with its line and the running one kept.
    good = conf.read_text()
    conf.write_text(good + "NoSuchKey yes\n")
    p.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload failed" in log.read_text(), what="failed reload")
    assert f"{conf}:5: unknown key 'NoSuchKey'" in log.read_text()

    # Many more: every one lands in the signal thread, none stops the milter.
    # (One at a time: POSIX merges a signal that is already pending.)
    conf.write_text(good)
    for n in range(2, 12):
        p.send_signal(signal.SIGHUP)
        wait_for(lambda n=n: log.read_text().count("configuration reloaded") == n,
                 what=f"reload {n}")
    assert p.poll() is None and accepts(port)

    # A burst, as from a careless script: libmilter's own signal thread would
    # stop the milter on any SIGHUP it catches; none may reach it.
    for _ in range(50):
        p.send_signal(signal.SIGHUP)
    wait_for(lambda: log.read_text().count("configuration reloaded") > 11, what="burst reload")
    for _ in range(20):
        assert p.poll() is None and accepts(port)

    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=20) == 0
    assert "stopped" in log.read_text()
    assert not pid_file.exists()


@pytest.mark.timeout(60)
def test_sigint_stops_cleanly(daemon) -> None:  # type: ignore[no-untyped-def]
    p, _port, _conf, log = daemon
    p.send_signal(signal.SIGINT)
    assert p.wait(timeout=20) == 0
    # Stopped cleanly; either our handler logs it, or (rarely, when the kernel
    # hands the signal to libmilter's own thread) libmilter stops by itself.
    assert "stopped" in log.read_text()


def _status(pid: int, field: str) -> list[str]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return line.split()[1:]
    raise AssertionError(field)


@pytest.mark.timeout(60)
def test_userid_drops_privileges_after_binding_and_umask_applies(tmp_path: Path) -> None:
    # The socket directory is root's; the milter binds as root, then runs as nobody.
    sock = tmp_path / "run" / "milter.sock"
    sock.parent.mkdir()
    conf = tmp_path / "ipv6milter.conf"
    conf.write_text(f"Socket unix:{sock}\nUserID nobody:nogroup\nUMask 077\n")
    log = tmp_path / "stderr.log"
    with open(log, "wb") as fh:
        p = subprocess.Popen([BIN, "-c", str(conf)], stderr=fh)
    try:
        wait_for(lambda: "running as nobody" in log.read_text(), what="privilege drop")
        wait_for(sock.exists, what="the unix socket")
        assert _status(p.pid, "Uid")[:2] == ["65534", "65534"]
        assert _status(p.pid, "Gid")[0] == str(__import__("grp").getgrnam("nogroup").gr_gid)
        assert oct(sock.stat().st_mode & 0o777) == oct(0o700)
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(sock))  # root may still connect; the MTA's group would need 007
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=20) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.mark.timeout(60)
def test_running_as_root_without_userid_warns(daemon) -> None:  # type: ignore[no-untyped-def]
    _p, _port, _conf, log = daemon
    if os.geteuid() == 0:
        wait_for(lambda: "running as root" in log.read_text(), what="root warning")
    else:
        assert "running as root" not in log.read_text()


def test_no_delay_is_set_on_the_listening_socket() -> None:
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        port = srv.getsockname()[1]
        assert srv.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
        cli._no_delay(f"inet:{port}@127.0.0.1")
        assert srv.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
