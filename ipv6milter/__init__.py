"""ipv6milter: the anonymous-inbound-mail-over-IPv6 policy as a milter."""

__version__ = "0.1.0"
