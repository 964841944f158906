"""The RPM, built here with Debian's rpmbuild (--nodeps: Fedora's packages
cannot be installed on Debian) and inspected with ``rpm -qp``."""

from __future__ import annotations

import re

from .conftest import Built, dead_links, install_requires, run, version

# setup.cfg's install_requires -> the Fedora/EL package that provides it.
FEDORA = {
    "pymilter": "python3-pymilter",
    "dkimpy": "python3-dkimpy",
    "pyspf": "python3-pyspf",
    "authres": "python3-authres",
    "dnspython": "python3-dns",
    "prometheus-client": "python3-prometheus_client",
    "idna": "python3-idna",
    "cryptography": "python3-cryptography",
}


def rpmq(built: Built, *args: str) -> str:
    return run(["rpm", "-qp", *args, str(built.path)], timeout=60).stdout


def test_rpm_is_noarch_with_the_package_version(built_rpm: Built) -> None:
    print(f"rpm built in {built_rpm.seconds:.1f}s: {built_rpm.path.name}, "
          f"{built_rpm.path.stat().st_size} bytes")
    fields = rpmq(built_rpm, "--qf", "%{NAME} %{VERSION} %{RELEASE} %{ARCH} %{LICENSE}")
    assert fields.split()[:4] == ["ipv6milter", version(), "1", "noarch"], fields


def test_rpm_file_list(built_rpm: Built) -> None:
    files = set(rpmq(built_rpm, "-l").split())
    expected = {
        "/usr/bin/ipv6milter",
        "/usr/bin/ipv6milter-check",
        "/usr/bin/ipv6milter-report",
        "/etc/ipv6milter",
        "/etc/ipv6milter/ipv6milter.conf",
        "/usr/lib/systemd/system/ipv6milter.service",
        "/usr/lib/sysusers.d/ipv6milter.conf",
        "/usr/share/man/man8/ipv6milter.8",
        "/usr/share/man/man5/ipv6milter.conf.5",
        "/usr/share/man/man1/ipv6milter-check.1",
        "/usr/share/man/man1/ipv6milter-report.1",
    }
    assert expected <= {re.sub(r"\.(gz|xz|bz2|zst)$", "", f) for f in files}, files
    sitelib = [f for f in files if re.search(r"/site-packages/ipv6milter/cli\.py$", f)]
    assert sitelib, "the ipv6milter module is not in site-packages"
    assert any(f.endswith(f"/ipv6milter-{version()}.dist-info/entry_points.txt") for f in files)
    assert not any("/tests/" in f for f in files), "the test suite is packaged"


def test_rpm_docs_link_only_to_shipped_files(built_rpm: Built, tmp_path) -> None:  # type: ignore[no-untyped-def]
    run(["sh", "-c", f"cd {tmp_path} && rpm2cpio {built_rpm.path} | cpio -id --quiet "
         "'./usr/share/doc/*'"], timeout=60)
    assert not dead_links(tmp_path / "usr/share/doc/ipv6milter")


def test_rpm_config_file_is_noreplace(built_rpm: Built) -> None:
    assert rpmq(built_rpm, "-c").split() == ["/etc/ipv6milter/ipv6milter.conf"]
    # rpm's file flags: %config = 1, %config(noreplace) adds 16
    out = rpmq(built_rpm, "--qf", "[%{FILENAMES} %{FILEFLAGS}\n]")
    flags = dict(line.split() for line in out.splitlines())
    assert int(flags["/etc/ipv6milter/ipv6milter.conf"]) & 0x11 == 0x11


def test_rpm_requires_fedora_packages_for_every_install_requires(built_rpm: Built) -> None:
    requires = rpmq(built_rpm, "--requires")
    print(requires)
    for dist in install_requires():
        assert dist in FEDORA, f"setup.cfg requires {dist}: add it to the spec and to FEDORA"
        assert re.search(rf"(^|\(){re.escape(FEDORA[dist])}\b", requires, re.M), (
            f"no Requires on {FEDORA[dist]} (for {dist})"
        )
    assert "python3-dkim " in requires  # Fedora's dkimpy is packaged under either name
    assert "shadow-utils" in requires or "systemd-sysusers" in requires


def test_rpm_scriptlets_create_the_user_and_handle_the_unit(built_rpm: Built) -> None:
    scripts = rpmq(built_rpm, "--scripts")
    pre = scripts.split("postinstall scriptlet")[0]
    assert "ipv6milter" in pre and ("useradd" in pre or "sysusers" in pre), pre
    assert "ipv6milter.service" in scripts.split("postinstall scriptlet")[1]


def test_rpm_sysusers_file_creates_the_user(built_rpm: Built, tmp_path) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "sysusers").mkdir()
    rpm2cpio = run(["sh", "-c", f"cd {root}/sysusers && rpm2cpio {built_rpm.path} | cpio -id "
                    "./usr/lib/sysusers.d/ipv6milter.conf"], timeout=60)
    assert rpm2cpio.returncode == 0
    conf = root / "sysusers" / "usr" / "lib" / "sysusers.d" / "ipv6milter.conf"
    out = run(["systemd-sysusers", f"--root={root}", "--dry-run", str(conf)], timeout=60)
    text = out.stdout + out.stderr
    assert "Creating group 'ipv6milter'" in text and "Creating user 'ipv6milter'" in text, text
