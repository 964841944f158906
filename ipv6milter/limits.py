"""Every bound on what a sender controls, in one place (SPEC §1, "One sender
never harms another's mail").

Each constant says why it has its value and what happens past it; the
admin guide's "Limits" table lists the same values.  A parser that reads
sender data takes its bound from here, never a number of its own.
"""

from __future__ import annotations

# -- SMTP arguments ----------------------------------------------------------------------
#
# RFC 5321 §4.5.3.1: the longest objects a server must accept.  The milter
# bounds each argument before any parser (address, domain, IDNA, opt-in
# matching, SPF) sees it; past a bound the result is defined (milter.py).

# §4.5.3.1.1: a local part.
SMTP_LOCAL_PART = 64
# §4.5.3.1.2: a domain (and so the HELO/EHLO argument).  Past it a HELO is
# not a domain name: SPF for the null sender is "none", %{h} is "unknown".
SMTP_DOMAIN = 255
# §4.5.3.1.3: a reverse-path or forward-path, brackets included.  A MAIL
# FROM past it gets SPF "none" without a lookup (RFC 7208 §4.3: no usable
# domain); a RCPT TO past it is read as its first SMTP_LOCAL_PART characters
# of local part and its last SMTP_DOMAIN characters of domain (the labels
# nearest the root, which the opt-in match reads): longer than any domain,
# so an exact AcceptDomains entry never matches it (550 5.2.1), while a
# parent entry (.example.com) may.
SMTP_PATH = 256

# -- header fields the milter parses (DKIM-Signature, Authentication-Results, From) ------

# -- message body as canonicalization sees it --------------------------------------------

# -- DKIM signatures and keys ------------------------------------------------------------

# -- DNS answers (PTR, A/AAAA, MX, SPF TXT, DKIM key TXT, _dmarc TXT) ----------------------

# -- the DNS answer cache ----------------------------------------------------------------

# -- From-aligned mode: the From field and the _dmarc TXT records ------------------------

# Bytes of one From field value the alignment parser reads (RFC 5322 §3.6.2).
# A From field names one author in nearly all mail and is well under RFC 5322's
# 998-octet line; 16 KiB leaves room for a long folded list of mailboxes.  Past
# it the field is malformed input: there is no From domain (nothing aligned),
# and the parser never sees the field.
FROM_FIELD_MAX = 16 * 1024

# From fields kept per message.  One is the rule (RFC 5322 §3.6: exactly one);
# a second means "no single From domain", so nothing more is worth keeping.
FROM_FIELDS_KEPT = 2

# Bytes of one _dmarc TXT record (its strings joined) read for the tree walk
# (RFC 9989 §4.10).  Real DMARC records are a few hundred bytes (a policy and
# a handful of report addresses) and fit a UDP answer; a longer one is not
# read: it is not a DMARC record (no data), never a temporary failure.
DMARC_RECORD_MAX = 8 * 1024

# _dmarc queries of one tree walk: RFC 9989 §4.10's own bound, whatever the
# number of labels of the name walked.
DMARC_WALK_QUERIES = 8

# -- CPU: the last line of defence for what no bound above foresaw -----------------------
#
# A check that parses a sender's data (SPF evaluation, DKIM verification,
# the authserv-id of Authentication-Results fields) runs in a helper process
# that the kernel stops at this much CPU (isolation.py); the check is then
# permerror (the sender's own data: asking again costs the same), and no
# other connection of the worker waited.  Real checks cost milliseconds: an
# SPF evaluation with ten includes ~5 ms, a DKIM verification of a 4 KiB
# message ~1 ms; the bound is hundreds of times that, and a sender reaches
# it only with input that is super-linear somewhere.

# CPU seconds of one SPF evaluation, and of one message's DKIM verification
# (plus the allowance below).
CHECK_CPU_SECONDS = 2.0
# DKIM hashes and canonicalizes the whole body, once per signature: a
# MaxMessageSize message (64 MiB) with five signatures costs about 1.5 s on
# a 2020 core; the allowance keeps it ~2x under the bound at every size.
DKIM_CPU_SECONDS_PER_MIB = 0.05
# CPU seconds for the authserv-ids of all Authentication-Results fields of
# one message together; a field not read within it is deleted as ours.
HEADER_CPU_SECONDS = 2.0
