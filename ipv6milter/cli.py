"""The ``ipv6milter`` command line: arguments, logging set-up, ``-n``, ``--self-test``.

``main(argv=None)`` is what the installed command runs and what tests call.
Running the milter itself is the supervisor's (``supervisor``), which forks
the workers (``worker``); this module only reads the configuration once,
sets up logging, and hands over.
"""

from __future__ import annotations

import argparse
import logging
import logging.handlers
import sys

from . import __version__, config, logfmt
from .config import Config, ConfigError

log = logging.getLogger("ipv6milter")

SYSLOG_ADDRESS = "/dev/log"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ipv6milter",
        description="Milter for the anonymous-inbound-email-over-IPv6 policy.",
    )
    p.add_argument(
        "-c", "--config", metavar="FILE", help=f"configuration file (default {config.DEFAULT_PATH})"
    )
    p.add_argument(
        "-n", "--check-config", action="store_true", help="check the configuration and exit"
    )
    p.add_argument("--self-test", action="store_true",
                   help="check the resolvers, the socket and AuthservID, then exit")
    p.add_argument("--version", action="version", version=f"ipv6milter {__version__}")
    return p


class _Escaping(logging.Formatter):
    """A formatter whose lines every destination can take: a sender's bytes
    that are not UTF-8 (pymilter hands them over as lone surrogates) come
    out escaped as ``\\xNN`` instead of making the handler fail and drop the
    line (SysLogHandler encodes to UTF-8 strictly; SPEC §4)."""

    def format(self, record: logging.LogRecord) -> str:
        return logfmt.printable(super().format(record))


def setup_logging(cfg: Config, syslog_address: str | None = None) -> None:
    level = getattr(logging, cfg.log_level.upper())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setFormatter(_Escaping("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(stderr)
    if cfg.syslog:
        address = syslog_address or SYSLOG_ADDRESS
        try:
            sh = logging.handlers.SysLogHandler(
                address, facility=logging.handlers.SysLogHandler.LOG_MAIL
            )
        except OSError as e:
            log.warning("Syslog yes, but %s is not usable: %s", address, e)
        else:
            sh.setFormatter(_Escaping("ipv6milter[%(process)d]: %(message)s"))
            root.addHandler(sh)
    root.setLevel(level)
    logfmt.lean_records()  # neither format above prints a caller or a thread


def load(path: str | None) -> Config:
    return config.load(path, default_if_missing=path is None)


def _load_or_report(path: str | None) -> Config | None:
    try:
        return load(path)
    except ConfigError as e:
        for line in e.errors:
            print(line, file=sys.stderr)
        return None


def check_config(path: str | None) -> int:
    cfg = _load_or_report(path)
    if cfg is None:
        return 1
    print(f"{cfg.source or 'built-in defaults'}: configuration OK")
    for line in config.describe(cfg):
        print(f"  {line}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.check_config:
        return check_config(args.config)
    cfg = _load_or_report(args.config)
    if cfg is None:
        return 1
    if args.self_test:
        from .selftest import self_test

        return self_test(cfg, sys.stdout)
    setup_logging(cfg)
    from .supervisor import Supervisor

    return Supervisor(args.config, cfg).run()


if __name__ == "__main__":
    sys.exit(main())
