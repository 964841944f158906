"""Every bound on what a sender controls, in one place (SPEC §1, "One sender
never harms another's mail").

Each constant says why it has its value and what happens past it; the
admin guide's "Limits" table lists the same values.  A parser that reads
sender data takes its bound from here, never a number of its own.
"""

from __future__ import annotations

# -- SMTP arguments ----------------------------------------------------------------------

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
