"""The packaging files themselves, without building anything: the systemd
unit, the packaged configuration file, the man pages, the version numbers."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess

import pytest

from ipv6milter import checkcli, cli, config, report

from .conftest import CONFFILE, REPO, UNIT, parse_unit, version

MAN = REPO / "docs" / "man"
PAGES = {"ipv6milter.8": cli, "ipv6milter.conf.5": None, "ipv6milter-check.1": checkcli,
         "ipv6milter-report.1": report}

# -- the systemd unit ----------------------------------------------------------

HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    "CapabilityBoundingSet": "",
    "SystemCallFilter": "@system-service",
    "SystemCallArchitectures": "native",
    "RestrictNamespaces": "yes",
    "RestrictSUIDSGID": "yes",
    "LockPersonality": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectControlGroups": "yes",
}


def test_unit_runs_the_milter_in_the_foreground_as_its_user() -> None:
    u = parse_unit(UNIT)
    assert u["ExecStart"] == ["/usr/bin/ipv6milter -c /etc/ipv6milter/ipv6milter.conf"]
    assert u["ExecReload"] == ["/bin/sh -c 'kill -HUP \"$$MAINPID\"'"]
    assert u["Type"] == ["exec"]  # foreground: no forking, no PIDFile
    assert u["User"] == ["ipv6milter"] and u["Group"] == ["ipv6milter"]
    assert u["RuntimeDirectory"] == ["ipv6milter"]
    # The MTA's user, in group ipv6milter, must be able to enter the directory.
    assert int(u["RuntimeDirectoryMode"][0], 8) & 0o050 == 0o050
    assert u["WantedBy"] == ["multi-user.target"]


def test_unit_reloads_with_what_every_debian_system_has() -> None:
    """ExecReload's program comes from an Essential package: a minimal
    system has no procps, whose /bin/kill would fail with 203/EXEC."""
    program = shlex.split(parse_unit(UNIT)["ExecReload"][0])[0]
    owner = subprocess.run(["dpkg-query", "-S", program], capture_output=True, text=True,
                           timeout=60)
    assert owner.returncode == 0, f"no package ships {program}"
    package = owner.stdout.splitlines()[-1].split(":")[0].strip()
    essential = subprocess.run(["dpkg-query", "-W", "-f", "${Essential}", package],
                               capture_output=True, text=True, timeout=60).stdout
    assert essential == "yes", f"{program} is {package}'s, which is not Essential"


@pytest.mark.parametrize(("key", "value"), HARDENING.items())
def test_unit_is_hardened(key: str, value: str) -> None:
    assert value in parse_unit(UNIT).get(key, []), f"{key}={value} missing"


def test_unit_exposure_score() -> None:
    assert shutil.which("systemd-analyze"), "make test installs systemd (systemd-analyze)"
    r = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(UNIT)],
        capture_output=True, text=True, timeout=60,
    )
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", r.stdout)
    assert m is not None, f"systemd-analyze security --offline: {r.stderr.strip()}"
    print(m.group(0))
    assert float(m.group(1)) <= 2.0, r.stdout


# -- the packaged configuration file ---------------------------------------------


def test_conffile_is_valid_and_uses_the_runtime_directory_socket() -> None:
    cfg = config.parse(CONFFILE.read_text(), str(CONFFILE))
    rundir = "/run/" + parse_unit(UNIT)["RuntimeDirectory"][0] + "/"
    assert cfg.socket.startswith("unix:" + rundir)
    assert cfg.umask & 0o070 == 0, "the socket's group (the MTA) must be able to connect"
    assert cfg.user_id is None, "systemd starts the milter as its user; UserID would fail"


def test_conffile_shows_every_key_with_its_default() -> None:
    text = CONFFILE.read_text()
    defaults = config.Config()
    for key in config.KEYS:
        lines = re.findall(rf"^#? ?{key.name} (.*)$", text, re.M)
        assert lines, f"{key.name} is not shown in {CONFFILE.name}"
        default = getattr(defaults, key.attr)
        if key.attr == "socket":
            assert default in text, "the built-in Socket default is not mentioned"
        elif default not in (None, "", ()) and key.attr != "accept_domains":
            # the commented line is the default: it parses to the default value
            shown = getattr(config.parse(f"{key.name} {lines[0]}"), key.attr)
            assert shown == default, f"{key.name}: shown {lines[0]!r}, default {default!r}"


# -- man pages ------------------------------------------------------------------


@pytest.mark.parametrize("page", PAGES)
def test_man_page_renders_without_warnings(page: str) -> None:
    assert shutil.which("groff"), "make test installs groff-base"
    path = MAN / page
    r = subprocess.run(
        ["groff", "-ww", "-z", "-man", str(path)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0 and r.stderr == "", r.stderr
    if shutil.which("man"):
        r = subprocess.run(
            ["man", "--warnings", "-l", str(path)],
            capture_output=True, text=True, timeout=60,
            env={"PATH": "/usr/bin:/bin", "MANWIDTH": "80", "LANG": "C.UTF-8"},
        )
        assert r.returncode == 0 and r.stderr == "", r.stderr
        assert "NAME" in r.stdout and "SEE ALSO" in r.stdout


@pytest.mark.parametrize("page", ["ipv6milter.8", "ipv6milter-check.1", "ipv6milter-report.1"])
def test_man_page_documents_every_command_line_option(page: str) -> None:
    parser = PAGES[page]._parser()  # type: ignore[union-attr]
    text = re.sub(r"\\f[BIRP]", " ", (MAN / page).read_text()).replace("\\-", "-")
    for action in parser._actions:
        for opt in action.option_strings:
            assert re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", text), f"{opt} missing"


def test_conf_man_page_documents_every_key() -> None:
    text = (MAN / "ipv6milter.conf.5").read_text()
    for key in config.KEYS:
        assert re.search(rf"^\.BI {key.name} ", text, re.M), f"{key.name} missing"


def test_man_pages_carry_the_version() -> None:
    for page in PAGES:
        th = next(line for line in (MAN / page).read_text().splitlines() if line.startswith(".TH"))
        assert f'"ipv6milter {version()}"' in th, th


# -- versions -------------------------------------------------------------------


def test_debian_changelog_and_rpm_spec_carry_the_package_version() -> None:
    first = (REPO / "packaging" / "debian" / "changelog").read_text().splitlines()[0]
    assert first.startswith(f"ipv6milter ({version()}-1) "), first
    spec = (REPO / "packaging" / "rpm" / "ipv6milter.spec").read_text()
    assert re.search(rf"^Version:\s+{re.escape(version())}$", spec, re.M)
