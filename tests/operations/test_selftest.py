"""``ipv6milter --self-test`` against a working and a dead resolver."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.integration.harness import blackhole_dns, free_port, milter_command
from tests.operations.conftest import Ops

pytestmark = pytest.mark.timeout(60)


def self_test(tmp_path: Path, **keys: str) -> subprocess.CompletedProcess[str]:
    conf = tmp_path / "self-test.conf"
    conf.write_text("".join(f"{k} {v}\n" for k, v in keys.items()))
    return subprocess.run([milter_command(), "--self-test", "-c", str(conf)],
                          capture_output=True, text=True, timeout=30)


def test_all_good(ops: Ops, tmp_path: Path) -> None:
    p = self_test(tmp_path, Nameservers=ops.dns.nameserver, AuthservID="mx.example.org",
                  Socket=f"inet:{free_port()}@127.0.0.1")
    assert p.returncode == 0, p.stdout + p.stderr
    lines = p.stdout.splitlines()
    assert len(lines) == 4 and all(line.startswith("ok ") for line in lines), lines
    assert f"resolver {ops.dns.nameserver}: answered" in lines[0]
    assert lines[3] == "ok   ed25519 verification: available (RFC 8463's example verifies)"


def test_dead_resolver_fails(tmp_path: Path) -> None:
    with blackhole_dns() as port:
        p = self_test(tmp_path, Nameservers=f"127.0.0.1:{port}", DNSTimeout="1",
                      AuthservID="mx.example.org", Socket=f"inet:{free_port()}@127.0.0.1")
    assert p.returncode == 1
    assert p.stdout.startswith(f"FAIL resolver 127.0.0.1:{port}: no answer")


def test_socket_in_use_and_bad_authserv_id_fail(ops: Ops, tmp_path: Path) -> None:
    running = ops.milters["enforce"]
    p = self_test(tmp_path, Nameservers=ops.dns.nameserver, AuthservID="mx",
                  Socket=f"inet:{running.port}@127.0.0.1")
    assert p.returncode == 1
    assert f"FAIL socket inet:{running.port}@127.0.0.1: cannot bind" in p.stdout
    assert "FAIL authserv-id 'mx'" in p.stdout


def test_unix_socket_directory_checked(ops: Ops, tmp_path: Path) -> None:
    p = self_test(tmp_path, Nameservers=ops.dns.nameserver, AuthservID="mx.example.org",
                  Socket=f"unix:{tmp_path}/missing/milter.sock")
    assert p.returncode == 1 and "does not exist" in p.stdout
    p = self_test(tmp_path, Nameservers=ops.dns.nameserver, AuthservID="mx.example.org",
                  Socket=f"unix:{tmp_path}/milter.sock")
    assert p.returncode == 0, p.stdout
