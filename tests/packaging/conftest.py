"""Shared pieces of the package tests: the source tree, the systemd unit,
and the builds (``make deb`` / ``make rpm`` into a temporary directory).

Tests that build or install packages need root on Debian (``make test`` runs
them so); set IPV6MILTER_SKIP_PACKAGING=1 to skip them.
"""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "packaging" / "systemd" / "ipv6milter.service"
CONFFILE = REPO / "packaging" / "systemd" / "ipv6milter.conf"
# Debian's tools with Debian's python: not a virtual environment's.
SYSTEM_ENV = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/root",
    "DEBIAN_FRONTEND": "noninteractive",
}


def version() -> str:
    text = (REPO / "ipv6milter" / "__init__.py").read_text()
    m = re.search(r'^__version__ = "([^"]+)"', text, re.M)
    assert m, "no __version__ in ipv6milter/__init__.py"
    return m.group(1)


def install_requires() -> list[str]:
    """Distribution names of setup.cfg's install_requires, lower case."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    names = []
    for line in cfg["options"]["install_requires"].splitlines():
        m = re.match(r"\s*([A-Za-z0-9_.-]+)", line)
        if m:
            names.append(m.group(1).lower().replace("_", "-"))
    return names


def parse_unit(path: Path) -> dict[str, list[str]]:
    """``Key=value`` lines of a unit file, every value of a repeated key kept."""
    keys: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        k, _, v = line.partition("=")
        keys.setdefault(k.strip(), []).append(v.strip())
    return keys


def run(
    cmd: list[str], timeout: float = 600, check: bool = True, **kw: Any
) -> subprocess.CompletedProcess[str]:
    """Run a command with the system's environment; on failure show its output."""
    kw.setdefault("env", SYSTEM_ENV)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {r.returncode}\n--- stdout\n{r.stdout[-6000:]}"
            f"\n--- stderr\n{r.stderr[-6000:]}"
        )
    return r


SHIPPED_GUIDES = {"README.md", "docs/admin-guide.md", "docs/configuration.md",
                  "docs/operations.md"}


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to '-'."""
    return {re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            for m in re.finditer(r"^#+\s+(.*)$", markdown, re.M)}


def dead_links(doc: Path) -> list[str]:
    """The relative links of the guides in ``doc`` (a package's documentation
    directory, unpacked) that lead to no file, or no heading, in ``doc``;
    the guides must all be there, in the source tree's layout."""
    pages = sorted(doc.rglob("*.md"))
    have = {p.relative_to(doc).as_posix() for p in pages}
    assert have >= SHIPPED_GUIDES, f"missing from {doc}: {SHIPPED_GUIDES - have}"
    dead = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # an absolute URL
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.is_file() or not dest.is_relative_to(doc.resolve()):
                dead.append(f"{page.relative_to(doc)}: {target}")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest.read_text()):
                dead.append(f"{page.relative_to(doc)}: {target} (no such heading)")
    assert not dead, "\n".join(dead)
    return dead


def needs_root_on_debian() -> None:
    if os.environ.get("IPV6MILTER_SKIP_PACKAGING"):
        pytest.skip("IPV6MILTER_SKIP_PACKAGING is set")
    if os.geteuid() != 0:
        pytest.fail("building and installing packages needs root (make test runs as root)")
    if not Path("/etc/debian_version").exists() or not shutil.which("dpkg"):
        pytest.fail("the package tests run on Debian")


@dataclass
class Built:
    path: Path  # the package
    seconds: float  # how long the build took
    dist: Path


@pytest.fixture(scope="session")
def built_deb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    """``make deb`` from a clean copy of the working tree, into a temporary dist/."""
    needs_root_on_debian()
    base = tmp_path_factory.mktemp("deb")
    start = time.monotonic()
    run(["make", "-C", str(REPO), "deb", f"PKGBUILD={base}/build", f"DIST={base}/dist"])
    seconds = time.monotonic() - start
    debs = sorted((base / "dist").glob(f"ipv6milter_{version()}-*_all.deb"))
    assert len(debs) == 1, debs
    yield Built(debs[0], seconds, base / "dist")
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def built_rpm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    """``make rpm`` (rpmbuild --nodeps) from a clean copy of the working tree."""
    needs_root_on_debian()
    base = tmp_path_factory.mktemp("rpm")
    start = time.monotonic()
    run(["make", "-C", str(REPO), "rpm", f"PKGBUILD={base}/build", f"DIST={base}/dist"])
    seconds = time.monotonic() - start
    rpms = sorted((base / "dist").glob(f"ipv6milter-{version()}-*.noarch.rpm"))
    assert len(rpms) == 1, rpms
    yield Built(rpms[0], seconds, base / "dist")
    shutil.rmtree(base, ignore_errors=True)
