"""A pymilter milter that does nothing: the cost of pymilter itself.

Every callback a content milter needs (connect, HELO, MAIL, RCPT, each header,
end of headers, each body chunk, end of message) is registered and answers
CONTINUE, with a reply round trip each (no @noreply), as a naive milter does.
It only counts messages, and prints the count when it stops, so that the
benchmark can check that every message went through it.

With ``--noreply`` every callback that may be is negotiated with
@Milter.noreply (Postfix does not wait for its answer): what round trips cost.

    python bench/noop_milter.py [--noreply] unix:/path/to.sock
"""

from __future__ import annotations

import signal
import sys
import threading

import Milter

_lock = threading.Lock()
_messages = 0


class NoopMilter(Milter.Base):
    def connect(self, hostname, family, hostaddr):  # type: ignore[no-untyped-def]
        return Milter.CONTINUE

    def hello(self, hostname):  # type: ignore[no-untyped-def]
        return Milter.CONTINUE

    def envfrom(self, mail_from, *params):  # type: ignore[no-untyped-def]
        return Milter.CONTINUE

    def envrcpt(self, rcpt, *params):  # type: ignore[no-untyped-def]
        return Milter.CONTINUE

    def header(self, name, value):  # type: ignore[no-untyped-def]
        return Milter.CONTINUE

    def eoh(self):  # type: ignore[no-untyped-def]
        return Milter.CONTINUE

    def body(self, chunk):  # type: ignore[no-untyped-def]
        return Milter.CONTINUE

    def eom(self):  # type: ignore[no-untyped-def]
        global _messages
        with _lock:
            _messages += 1
        return Milter.CONTINUE


class NoreplyMilter(NoopMilter):
    @Milter.noreply
    def connect(self, hostname, family, hostaddr):  # type: ignore[no-untyped-def]
        return Milter.CONTINUE

    @Milter.noreply
    def hello(self, hostname):  # type: ignore[no-untyped-def]
        return Milter.CONTINUE

    @Milter.noreply
    def envfrom(self, mail_from, *params):  # type: ignore[no-untyped-def]
        return Milter.CONTINUE

    @Milter.noreply
    def envrcpt(self, rcpt, *params):  # type: ignore[no-untyped-def]
        return Milter.CONTINUE

    @Milter.noreply
    def header(self, name, value):  # type: ignore[no-untyped-def]
        return Milter.CONTINUE

    @Milter.noreply
    def eoh(self):  # type: ignore[no-untyped-def]
        return Milter.CONTINUE

    @Milter.noreply
    def body(self, chunk):  # type: ignore[no-untyped-def]
        return Milter.CONTINUE


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    noreply = "--noreply" in args
    args = [a for a in args if a != "--noreply"]
    if len(args) != 1:
        print("usage: noop_milter.py [--noreply] SOCKET", file=sys.stderr)
        return 2
    # libmilter's own signal thread stops the main loop on SIGTERM.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
    Milter.factory = NoreplyMilter if noreply else NoopMilter
    print(f"noop milter{' (noreply)' if noreply else ''} listening on {args[0]}", flush=True)
    Milter.runmilter("bench-noop", args[0], timeout=240)
    print(f"noop milter stopped; messages={_messages}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
