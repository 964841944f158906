"""ipv6milter-report on a 1 GiB log through a pipe: peak memory stays bounded.

The log is a mail.log as syslog writes it: Postfix's lines, and one
ipv6milter decision line in ten, each decision from a sender domain and a
/64 of its own, so that a report that kept every sender would need hundreds
of megabytes.  The peak RSS of the report process (``ru_maxrss`` from
wait4) is asserted under 100 MiB; the throughput is printed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(300)

SIZE = 1 << 30
LIMIT_KIB = 100 * 1024
POSTFIX = [
    b"Dec  1 15:09:05 mx postfix/smtpd[4242]: connect from unknown[2001:db8::25]\n",
    b"Dec  1 15:09:05 mx postfix/smtpd[4242]: 4XyZ1k2: client=unknown[2001:db8::25]\n",
    b"Dec  1 15:09:05 mx postfix/cleanup[4243]: 4XyZ1k2: message-id=<m1@example.com>\n",
    b"Dec  1 15:09:05 mx postfix/qmgr[4244]: 4XyZ1k2: from=<a@example.com>, size=1234,"
    b" nrcpt=1 (queue active)\n",
    b"Dec  1 15:09:05 mx postfix/smtp[4245]: 4XyZ1k2: to=<b@example.org>, relay=mx.example.org"
    b"[2001:db8::1]:25, delay=0.2, delays=0.1/0/0.05/0.05, dsn=2.0.0, status=sent (250 ok)\n",
    b"Dec  1 15:09:05 mx postfix/qmgr[4244]: 4XyZ1k2: removed\n",
    b"Dec  1 15:09:05 mx postfix/smtpd[4242]: disconnect from unknown[2001:db8::25] ehlo=1"
    b" mail=1 rcpt=1 data=1 quit=1 commands=5\n",
    b"Dec  1 15:09:06 mx postfix/anvil[4246]: statistics: max connection rate 1/60s for"
    b" (smtp:2001:db8::25) at Dec  1 15:09:05\n",
    b"Dec  1 15:09:06 mx postfix/smtpd[4242]: connect from unknown[2001:db8::26]\n",
]
OTHER = b"".join(POSTFIX)


def decision(i: int) -> bytes:
    if i % 2:
        return (b'Dec  1 15:%02d:%02d mx ipv6milter[123]: decision stage=eom qid=Q%X'
                b' client=2001:db8:%x:%x::25 scope=ipv6 helo=mail.d%d.example'
                b' from_domain=d%d.example rcpt_domain=example.org iprev=permerror ptr=-'
                b' spf=fail dkim=none reply="450 4.7.26" mode=enforce elapsed_ms=9\n'
                % (i // 60 % 60, i % 60, i, i >> 16, i & 0xFFFF, i, i))
    return (b"Dec  1 15:%02d:%02d mx ipv6milter[123]: decision stage=eom qid=Q%X"
            b" client=2001:db8:%x:%x::25 scope=ipv6 helo=mail.example.com"
            b" from_domain=example.com rcpt_domain=example.org iprev=pass ptr=mail.example.com"
            b" spf=pass dkim=pass reply=accept mode=enforce elapsed_ms=4\n"
            % (i // 60 % 60, i % 60, i, i >> 16, i & 0xFFFF))


def report_command() -> str:
    beside = Path(sys.executable).parent / "ipv6milter-report"
    assert beside.exists(), "pip install -e . installs ipv6milter-report"
    return str(beside)


# ru_maxrss survives exec(): a child forked from this (large) pytest process
# would report pytest's peak, not its own.  A small wrapper process forks the
# report and prints the peak of its only child.
_WRAPPER = (
    "import resource, subprocess, sys\n"
    "rc = subprocess.call(sys.argv[1:])\n"
    "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
    "print(f'peak_kib={peak}', file=sys.stderr)\n"
    "sys.exit(rc)\n"
)


def test_a_gigabyte_of_log_in_bounded_memory() -> None:
    proc = subprocess.Popen([sys.executable, "-I", "-c", _WRAPPER, report_command(),
                             "--format", "json", "-"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    sent = {"bytes": 0, "lines": 0, "decisions": 0}

    def feed() -> None:
        assert proc.stdin is not None
        i = 0
        try:
            while sent["bytes"] < SIZE:
                chunk = b"".join(OTHER + decision(i + k) for k in range(500))
                proc.stdin.write(chunk)
                i += 500
                sent["bytes"] += len(chunk)
                sent["lines"] += 500 * (len(POSTFIX) + 1)
                sent["decisions"] += 500
        finally:
            proc.stdin.close()

    start = time.monotonic()
    writer = threading.Thread(target=feed)
    writer.start()
    assert proc.stderr is not None
    out = proc.stdout.read()  # the report writes little to stderr: no deadlock
    writer.join()
    err = proc.stderr.read()
    proc.wait()
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, err
    got = json.loads(out)
    peak_kib = int(err.decode().rsplit("peak_kib=", 1)[1])  # KiB on Linux
    print(f"\n{sent['bytes'] / 2**20:.0f} MiB, {sent['lines']:,} lines "
          f"({sent['decisions']:,} decisions) in {elapsed:.1f} s: "
          f"{sent['bytes'] / 2**20 / elapsed:.1f} MiB/s, "
          f"{sent['decisions'] / elapsed:,.0f} decisions/s; peak RSS {peak_kib / 1024:.1f} MiB")
    assert got["lines"] == sent["lines"]
    assert got["messages"] == sent["decisions"] and got["unparsed"] == 0
    assert got["accepted"] == sent["decisions"] // 2
    assert sum(r["count"] for r in got["replies"]) == sent["decisions"] // 2
    # Every refused sender is distinct: the table had to fold, totals stay exact.
    assert got["folded_rows"]["senders"] > 100_000
    assert sum(s["count"] for s in got["senders"]) + got["senders_not_shown"] == \
        sent["decisions"] // 2
    assert peak_kib < LIMIT_KIB, f"peak RSS {peak_kib} KiB"
