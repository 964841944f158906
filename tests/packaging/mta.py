"""A private Postfix instance and an SMTP sink, both on loopback, for the
package tests.

The Postfix instance has its own configuration and queue directory in a
temporary directory, smtpd on a free loopback port without chroot, and
relays everything to the sink.  It is started with ``postfix -c DIR start``
and must be run as root.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import socketserver
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from tests.integration.harness import MASTER_CF


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _alive(pid: int) -> bool:
    """A process that exists and is not a zombie (a container's init may not reap)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class _SinkHandler(socketserver.StreamRequestHandler):
    """Just enough SMTP for Postfix's smtp client: EHLO, MAIL, RCPT, DATA, QUIT."""

    def _send(self, line: str) -> None:
        self.wfile.write(line.encode() + b"\r\n")
        self.wfile.flush()

    def handle(self) -> None:
        sink: SmtpSink = self.server.sink  # type: ignore[attr-defined]
        self._send("220 sink.test ESMTP")
        mail_from, rcpts = "", []
        while True:
            raw = self.rfile.readline()
            if not raw:
                return
            cmd = raw.decode("ascii", "replace").strip()
            verb = cmd.split(" ", 1)[0].upper()
            if verb == "EHLO":
                self._send("250-sink.test")
                self._send("250 8BITMIME")
            elif verb == "HELO":
                self._send("250 sink.test")
            elif verb == "MAIL":
                mail_from, rcpts = cmd[10:].strip(), []
                self._send("250 ok")
            elif verb == "RCPT":
                rcpts.append(cmd[8:].strip())
                self._send("250 ok")
            elif verb == "DATA":
                self._send("354 go ahead")
                lines = []
                while True:
                    line = self.rfile.readline()
                    if not line or line in (b".\r\n", b".\n"):
                        break
                    lines.append(line[1:] if line.startswith(b"..") else line)
                sink.messages.append((mail_from, rcpts, b"".join(lines)))
                self._send("250 queued")
            elif verb in ("RSET", "NOOP"):
                self._send("250 ok")
            elif verb == "QUIT":
                self._send("221 bye")
                return
            else:
                self._send("502 not implemented")


class SmtpSink:
    """A threaded SMTP server on 127.0.0.1 that keeps every message it gets."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _SinkHandler)
        self.server.daemon_threads = True
        self.server.sink = self  # type: ignore[attr-defined]
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> SmtpSink:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


class PrivatePostfix:
    """``postfix -c DIR`` with its queue in a temporary directory."""

    PREFIX = "ipv6milter-pkgtest-postfix-"

    def __init__(self, relay_port: int, milter: str, extra: dict[str, str] | None = None):
        # Postfix's own processes (user postfix) walk to the queue directory:
        # a pytest tmp_path (mode 0700) would stop them.
        self.base = Path(tempfile.mkdtemp(prefix=self.PREFIX))
        self.base.chmod(0o755)
        self.conf = self.base / "etc"
        self.queue = self.base / "queue"
        self.data = self.base / "data"
        self.maillog = self.base / "maillog"
        for d in (self.conf, self.queue, self.data):
            d.mkdir()
            d.chmod(0o755)  # whatever the umask
        shutil.chown(self.data, "postfix", "postfix")
        self.port = free_port()
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue),
            "data_directory": str(self.data),
            "meta_directory": "/etc/postfix",
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "syslog_name": "postfix-pkgtest",
            "maillog_file": str(self.maillog),
            "maillog_file_prefixes": f"/var, /dev/stdout, {self.base}",
            "myhostname": "mx.pkgtest.invalid",
            "mydomain": "pkgtest.invalid",
            "mydestination": "",
            "local_recipient_maps": "",
            "alias_maps": "",
            "alias_database": "",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks, reject",
            "relayhost": f"[127.0.0.1]:{relay_port}",
            "smtp_tls_security_level": "none",
            "smtpd_tls_security_level": "none",
            "smtp_address_preference": "ipv4",
            "smtpd_milters": milter,
            # A milter that cannot be reached or does not answer makes
            # Postfix reject: delivered mail proves that the milter answered.
            "milter_default_action": "reject",
            "milter_protocol": "6",
            "biff": "no",
        }
        settings.update(extra or {})
        (self.conf / "main.cf").write_text(
            "".join(f"{k} = {v}\n" for k, v in settings.items())
        )
        (self.conf / "master.cf").write_text(
            MASTER_CF.format(smtpd_services=f"127.0.0.1:{self.port} inet n - n - - smtpd")
        )

    def postfix(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["postfix", "-c", str(self.conf), *args],
            capture_output=True, text=True, timeout=60,
        )

    def start(self) -> None:
        r = self.postfix("start")
        if r.returncode != 0:
            raise AssertionError(f"postfix start failed:\n{r.stdout}{r.stderr}\n{self.log()}")
        wait_for(self._listening, 20, f"Postfix smtpd on 127.0.0.1:{self.port}")

    def _listening(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.recv(100)
            return True
        except OSError:
            return False

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return self.maillog.read_text(errors="replace")
        return ""

    def stop(self) -> None:
        pid = None
        with contextlib.suppress(OSError, ValueError):
            pid = int((self.queue / "pid" / "master.pid").read_text().split()[0])
        if pid is not None:
            r = self.postfix("stop")
            if r.returncode != 0:
                self.postfix("abort")
            # "postfix stop" returns before the master has gone.
            with contextlib.suppress(AssertionError):
                wait_for(lambda: not _alive(pid), 10, "postfix stop")
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> PrivatePostfix:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def send(port: int, sender: str, rcpt: str, body: str) -> None:
    import smtplib

    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.sendmail(sender, [rcpt], body)

