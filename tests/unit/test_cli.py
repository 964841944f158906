"""``ipv6milter``: -n, --version, and the daemon's signals, as a real process."""

from __future__ import annotations

import grp
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipv6milter import __version__, cli, config
from ipv6milter.listener import no_delay
from ipv6milter.pidfile import write_pid_file
from ipv6milter.supervisor import _MAX_QUICK_DEATHS, Supervisor, _Slot, workers_wanted

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


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _workers(pid: int) -> list[int]:
    return sorted(c for c in _children(pid)
                  if Path(f"/proc/{c}/comm").read_text().startswith("ipv6milter-w"))


@pytest.mark.timeout(60)
def test_userid_chowns_the_socket_workers_switch_and_both_files_go_at_stop(
        tmp_path: Path, request: pytest.FixtureRequest) -> None:
    # The socket directory is root's; the milter binds as root, then its
    # workers run as nobody, and the parent (still root) cleans up.  (Not
    # under pytest's 0700 tree: the MTA's user must reach the socket.)
    run = Path(tempfile.mkdtemp(prefix="ipv6milter-run-"))
    run.chmod(0o755)
    request.addfinalizer(lambda: shutil.rmtree(run, ignore_errors=True))
    sock = run / "milter.sock"
    pid_file = run / "milter.pid"
    conf = tmp_path / "ipv6milter.conf"
    mport = free_port()
    conf.write_text(f"Socket unix:{sock}\nUserID nobody:nogroup\nUMask 007\nWorkers 2\n"
                    f"PidFile {pid_file}\nMetricsListen 127.0.0.1:{mport}\n")
    log = tmp_path / "stderr.log"
    nogroup = grp.getgrnam("nogroup").gr_gid
    tmp = run / "tmp"  # the metrics directory goes here
    tmp.mkdir()
    tmp.chmod(0o1777)
    with open(log, "wb") as fh:
        p = subprocess.Popen([BIN, "-c", str(conf)], stderr=fh,
                             env={**os.environ, "TMPDIR": str(tmp)})
    try:
        wait_for(lambda: "workers running as nobody" in log.read_text(), what="privilege drop")
        wait_for(lambda: len(_workers(p.pid)) == 2, what="two workers")
        for w in _workers(p.pid):
            assert _status(w, "Uid") == ["65534"] * 4
            assert _status(w, "Gid") == [str(nogroup)] * 4
        # SPEC §4: owned by the user and group, rw for the group (UMask 007).
        st = sock.stat()
        assert (st.st_uid, st.st_gid) == (65534, nogroup)
        assert oct(st.st_mode & 0o777) == oct(0o770)
        assert pid_file.read_text().strip() == str(p.pid)
        # A member of the group, as an MTA would be, connects.
        probe = subprocess.run(
            [sys.executable, "-c", "import os, socket; os.setgroups([]); "
             f"os.setgid({nogroup}); os.setuid(1); s = socket.socket(socket.AF_UNIX); "
             f"s.connect({str(sock)!r}); print('connected')"], capture_output=True, text=True)
        assert probe.stdout.strip() == "connected", probe.stderr
        # The workers' metrics directory: private, the user's, served by a process as nobody.
        (mdir,) = tmp.iterdir()
        assert (mdir.stat().st_uid, oct(mdir.stat().st_mode & 0o777)) == (65534, oct(0o700))
        wait_for(lambda: accepts(mport), what="the metrics endpoint")
        metrics_proc = [c for c in _children(p.pid)
                        if Path(f"/proc/{c}/comm").read_text().strip() == "ipv6milter-metr"]
        assert len(metrics_proc) == 1 and _status(metrics_proc[0], "Uid") == ["65534"] * 4
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=30) == 0
        assert not sock.exists() and not pid_file.exists()
        assert list(tmp.iterdir()) == []
        assert list(run.iterdir()) == [tmp]
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.mark.timeout(90)
def test_workers_share_the_socket_a_stopped_worker_leaves_it_a_dead_one_is_replaced(
        tmp_path: Path) -> None:
    """libmilter removes a unix socket's path when its main loop ends (when not
    root): a worker that stops must not take the path from the others."""
    run = tmp_path / "run"
    run.mkdir()
    os.chown(run, 65534, 65534)  # the user may remove the socket here
    sock = run / "milter.sock"
    conf = tmp_path / "ipv6milter.conf"
    conf.write_text(f"Socket unix:{sock}\nUserID nobody:nogroup\nWorkers 2\n")
    log = tmp_path / "stderr.log"
    with open(log, "wb") as fh:
        p = subprocess.Popen([BIN, "-c", str(conf)], stderr=fh)
    try:
        wait_for(lambda: len(_workers(p.pid)) == 2, what="two workers")
        first, second = _workers(p.pid)
        # Stopped cleanly, through libmilter's own stop: the path stays.
        os.kill(first, signal.SIGTERM)
        wait_for(lambda: first not in _workers(p.pid) and len(_workers(p.pid)) == 2,
                 timeout=30, what="the stopped worker replaced")
        assert sock.exists()
        for _ in range(4):
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(sock))
        assert second in _workers(p.pid)
        # Killed: replaced as well, the other untouched.
        os.kill(second, signal.SIGKILL)
        wait_for(lambda: second not in _workers(p.pid) and len(_workers(p.pid)) == 2,
                 what="the killed worker replaced")
        assert f"(pid {second}) killed by SIGKILL" in log.read_text()
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=30) == 0
        assert not sock.exists()
        assert list(run.iterdir()) == []  # nor the private name it was bound at
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.mark.timeout(60)
def test_workers_auto_is_one_per_usable_cpu(daemon) -> None:  # type: ignore[no-untyped-def]
    p, _port, _conf, log = daemon
    n = len(os.sched_getaffinity(0))
    wait_for(lambda: len(_workers(p.pid)) == n, what=f"{n} workers")
    assert f"{n} worker" in log.read_text()


def test_pid_file_is_never_written_through_a_symlink(tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.write_text("keep me\n")
    link = tmp_path / "milter.pid"
    link.symlink_to(target)
    with pytest.raises(OSError, match="symbolic link"):
        write_pid_file(str(link), 1234)
    assert target.read_text() == "keep me\n"
    # Nor into a file with a second name (a hard link to someone else's file).
    hard = tmp_path / "hard.pid"
    os.link(target, hard)
    with pytest.raises(OSError, match="single name"):
        write_pid_file(str(hard), 1234)
    assert target.read_text() == "keep me\n"
    # A plain file: written, mode 0644 at most.
    plain = tmp_path / "plain.pid"
    write_pid_file(str(plain), 1234)
    assert plain.read_text() == "1234\n"
    assert plain.stat().st_mode & 0o777 & ~0o644 == 0


def test_the_daemon_refuses_a_symlinked_pid_file(tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.write_text("keep me\n")
    (tmp_path / "milter.pid").symlink_to(target)
    port = free_port()
    conf = tmp_path / "ipv6milter.conf"
    conf.write_text(f"Socket inet:{port}@127.0.0.1\nPidFile {tmp_path}/milter.pid\n")
    p = subprocess.run([BIN, "-c", str(conf)], capture_output=True, text=True, timeout=30)
    assert p.returncode == 1
    assert f"cannot write PidFile {tmp_path}/milter.pid" in p.stderr
    assert "symbolic link" in p.stderr
    assert target.read_text() == "keep me\n"
    assert not accepts(port)


@pytest.mark.parametrize("spec, ok", [
    ("inet:{port}@127.0.0.1", True),
    ("inet:{port}@[127.0.0.1]", True),
    ("inet:{port}@localhost", True),
    ("inet6:{port}@::1", True),
    ("inet6:{port}@[::1]", True),
    ("inet:{port}@::1", False),
    ("inet:{port}@[::1]", False),
    ("inet6:{port}@127.0.0.1", False),
    ("inet6:{port}@[127.0.0.1]", False),
])
def test_socket_validation_agrees_with_what_libmilter_opens(
        spec: str, ok: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = spec.format(port=free_port())
    f = tmp_path / "s.conf"
    f.write_text(f"# a comment\nSocket {spec}\n")
    assert (cli.main(["-n", "-c", str(f)]) == 0) is ok
    if not ok:
        err = capsys.readouterr().err
        other = "inet6:" if spec.startswith("inet:") else "inet:"
        assert f"{f}:2: Socket:" in err and other in err, err
    # libmilter itself, in a process of its own (it keeps the socket in a global).
    opened = subprocess.run(
        [sys.executable, "-c", "import milter, sys; milter.register('t'); "
         f"milter.setconn({spec!r}); milter.opensocket(True)"],
        capture_output=True, text=True, timeout=30)
    assert (opened.returncode == 0) is ok, opened.stderr


def test_a_metrics_directory_userid_cannot_write_stops_the_start(tmp_path: Path) -> None:
    """pytest's own temporary tree is root's, 0700: nobody cannot reach it."""
    port = free_port()
    conf = tmp_path / "ipv6milter.conf"
    conf.write_text(f"Socket inet:{port}@127.0.0.1\nUserID nobody\n"
                    f"MetricsListen 127.0.0.1:{free_port()}\n")
    p = subprocess.run([BIN, "-c", str(conf)], capture_output=True, text=True, timeout=30,
                       env={**os.environ, "TMPDIR": str(tmp_path)})
    assert p.returncode == 1, p.stderr
    assert "nobody cannot write the metrics directory" in p.stderr, p.stderr
    assert not accepts(port)
    assert [x.name for x in tmp_path.iterdir()] == ["ipv6milter.conf"]  # nothing left


def test_a_dead_workers_live_gauges_leave_the_sums_its_counts_stay(tmp_path: Path) -> None:
    from ipv6milter.metrics import process_dead

    names = ["gauge_livesum_41.db", "gauge_livesum_42.db", "counter_42.db", "histogram_42.db"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        process_dead(42, fd)
        process_dead(43, fd)  # nothing of it: no error
    finally:
        os.close(fd)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "counter_42.db", "gauge_livesum_41.db", "histogram_42.db"]


def test_a_worker_dying_at_once_is_restarted_later_and_later_then_given_up(
        tmp_path: Path) -> None:
    d = Supervisor(None, config.Config())
    slot = _Slot(1)
    d.slots = [slot]
    delays = []
    for _ in range(_MAX_QUICK_DEATHS):
        pid = os.fork()
        if pid == 0:
            os._exit(3)
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)  # dead, not yet reaped
        slot.pid, slot.started = pid, time.monotonic()
        d._reap()
        assert slot.pid is None
        delays.append(round(slot.due - time.monotonic(), 1))
        if d.failure:
            break
    assert delays[:6] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0]
    assert d.failure and "exited with status 3 8 times in a row" in d.failure
    # A worker that lived is replaced at once, and its count starts again.
    d.failure = None
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
    slot.pid, slot.started, slot.quick_deaths = pid, time.monotonic() - 60, 5
    d._reap()
    assert slot.quick_deaths == 0 and slot.due <= time.monotonic()


def test_workers_key() -> None:
    assert config.parse("Workers auto").workers == 0
    assert config.parse("Workers 3").workers == 3
    for bad in ("Workers 0", "Workers many", "Workers 1000"):
        with pytest.raises(config.ConfigError, match="Workers"):
            config.parse(bad)
    assert workers_wanted(config.parse("Workers 3")) == 3
    assert workers_wanted(config.parse("")) == len(os.sched_getaffinity(0))


def test_a_judgement_that_cannot_work_stops_the_start(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """As after a switch to a user that cannot load dnspython's AAAA module:
    the answer is parsed as GenericRdata, the check fails, the milter does not start."""
    import dns.rdata

    generic = dns.rdata.GenericRdata
    real = dns.rdata.get_rdata_class

    # Any signature: Debian's dnspython 2.3 takes (rdclass, rdtype) only.
    def no_aaaa(rdclass, rdtype, *rest, **kw):  # type: ignore[no-untyped-def]
        return generic if int(rdtype) == 28 else real(rdclass, rdtype, *rest, **kw)

    from ipv6milter.preflight import Preflight, PreflightError

    preflight = Preflight()  # its answers made while everything loads
    assert preflight.judge(config.Config()).startswith("preflight.invalid;")
    monkeypatch.setattr(dns.rdata, "get_rdata_class", no_aaaa)
    with pytest.raises(PreflightError, match="address"):
        preflight.judge(config.Config())
    port = free_port()
    conf = tmp_path / "ipv6milter.conf"
    conf.write_text(f"Socket inet:{port}@127.0.0.1\n")
    with caplog.at_level(logging.ERROR):
        assert Supervisor(str(conf), config.load(str(conf))).run() == 1
    assert "cannot judge a message" in caplog.text
    assert not accepts(port)


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
        no_delay(f"inet:{port}@127.0.0.1")
        assert srv.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_a_decision_with_bytes_that_are_not_utf8_reaches_syslog_escaped(
        tmp_path: Path) -> None:
    """SPEC §4: escape, never drop.  pymilter hands a MAIL FROM or RCPT that
    is not UTF-8 over with lone surrogates; SysLogHandler encodes strictly,
    and used to drop the line.  A real datagram socket stands for /dev/log."""
    from functools import partial

    from ipv6milter import logfmt
    from ipv6milter.engine import Engine
    from ipv6milter.milter import Ipv6Milter
    from tests.unit.fakedns import FakeResolver
    from tests.unit.milterctx import RecordingCtx

    path = str(tmp_path / "log")
    syslog = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    syslog.bind(path)
    syslog.settimeout(5)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    c = config.parse("AcceptDomains example.org\nSyslog yes\nMode monitor\n")
    try:
        cli.setup_logging(c, syslog_address=path)
        ctx = RecordingCtx(partial(Ipv6Milter, Engine(c, FakeResolver({}), workers=1)))
        ctx.connect("2001:db8::99")
        # As pymilter's envfrom_bytes/envrcpt_bytes decode them (surrogateescape).
        sender = b"<a@b\xff\xfe.example>".decode("utf-8", "surrogateescape")
        rcpt = b"<x@r\xe9fus\xc3.example>".decode("utf-8", "surrogateescape")
        ctx._envfrom(sender)
        ctx._envrcpt(rcpt)
        logging.getLogger("ipv6milter.test").warning("a line naming %s", sender)
        lines = []
        while len(lines) < 2:
            lines.append(syslog.recv(65536).decode("utf-8"))  # strict: must be UTF-8
    finally:
        for h in root.handlers[:]:
            root.removeHandler(h)
            h.close()
        for h in saved[0]:
            root.addHandler(h)
        root.setLevel(saved[1])
        syslog.close()
    decision = next(line for line in lines if "decision " in line)
    assert decision.startswith("<22>ipv6milter[")  # facility mail, level info
    fields = logfmt.find_decision(decision)
    assert fields is not None, decision
    assert fields["from_domain"] == "b\\xff\\xfe.example"
    assert fields["rcpt_domain"] == "r\\xe9fus\\xc3.example"
    assert fields["would_reply"].startswith("550 5.2.1")
    assert any("a line naming <a@b\\xff\\xfe.example>" in line for line in lines), lines


@pytest.mark.timeout(30)
def test_the_config_pipe_never_blocks_the_supervisor_and_delivers_the_latest() -> None:
    """A child that does not read (frozen by a hostile message) must not stall
    the supervisor; when it reads again it gets the configuration in progress,
    then the newest, not every one in between."""
    from ipv6milter.configpipe import Receiver, Sender

    # AcceptDomains large enough that one frame does not fit in the pipe.
    big = " ".join(f"d{i}.example" for i in range(12000))
    configs = [config.parse(f"AcceptDomains {big}\nDNSTimeout {n}\n") for n in (1, 2, 3)]
    r, w = os.pipe2(os.O_CLOEXEC)
    sender, receiver = Sender(w), Receiver(r)
    try:
        for cfg in configs:
            sender.send(cfg)  # returns at once, though nobody reads
        assert sender.pending
        got: list[config.Config] = []
        while len(got) < 2:  # a third would be a bug; a missing one times the test out
            got += receiver.read() or []
            sender.flush()
        assert [c.dns_timeout for c in got] == [1, 3]
        assert got[-1] == configs[-1]
        assert not sender.pending
    finally:
        sender.close()
    assert receiver.read() is None  # the supervisor gone: end of file
    os.close(r)
