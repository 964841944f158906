"""Every bound on what a sender controls, in one place (SPEC §1, "One sender
never harms another's mail").

Each constant says why it has its value and what happens past it; the
admin guide's "Limits" table lists the same values.  A parser that reads
sender data takes its bound from here, never a number of its own.
"""

from __future__ import annotations

# -- SMTP arguments ----------------------------------------------------------------------

# -- header fields the milter parses (DKIM-Signature, Authentication-Results, From) ------

# Header fields of one message handed to DKIM verification.  Real mail has
# tens, a long mailing-list trail about a hundred; the engine keeps no more
# fields than this (each one costs ~150 bytes of Python objects).  Past it:
# every signature is permerror ("more than 1000 header fields", the message's
# own fault) and the header is not parsed at all.
MAX_HEADER_FIELDS = 1000

# DKIM-Signature: MAX_SIGNATURE_FIELD below (DKIM section).
#
# Authentication-Results: no size limit of its own, on purpose.  RFC 8601 §5
# says every field claiming our authserv-id is deleted; a bound past which the
# field were not read would let a forged field hide our id behind a long
# comment and survive.  Only its authserv-id is read, in one pass that stops
# there (authresults.authserv_id_of: linear, comments nested to any depth);
# the field itself is bounded by MaxMessageSize and the MTA's line limits.
#
# From: the alignment section's (rows_align).

# -- message body as canonicalization sees it --------------------------------------------

# Body lines have no length limit of their own: RFC 5322's 998 characters is
# broken by real mail (long HTML lines), and a limit would make such a message
# unverifiable.  Canonicalization is linear in the body (dkimcanon: each run
# of white space scanned once), and the body is bounded by MaxMessageSize.
#
# A body that ends in more empty (relaxed: blank) lines than this many bytes
# has them cut to one before dkimpy sees it: both canonicalizations ignore
# trailing empty lines (RFC 6376 §3.4.3, §3.4.4), so the body hash is
# unchanged, while dkimpy strips them one Python step at a time.
BODY_EMPTY_TAIL = 4096

# -- DKIM signatures and keys ------------------------------------------------------------

# Bytes of one DKIM-Signature value.  How chosen: the largest a real signer
# writes is a few KB -- b= of an 8192-bit key (the largest accepted) is 1,366
# characters, h= with MAX_SIGNED_FIELDS names under 2 KB, the other tags a
# few hundred bytes, and z= (copies of the signed fields, a diagnostic tag
# few signers add) a few KB more; common signatures are 0.5 to 1 KB.
# 16 KiB leaves several times the largest.
# Past it the signature is permerror ("signature cannot be used: field over
# 16384 bytes", RFC 6376 §6.1.1: a malformed signature), before any tag is
# read, without a key lookup.  Every step over the value is linear anyway;
# the bound keeps five such signatures a message cheap.
MAX_SIGNATURE_FIELD = 16 * 1024

# Names in one signature's h=.  Real signers name 10 to 40 fields
# (oversigning included); dkimpy's own default signs fewer than 30.  Past it:
# permerror ("h= names more than 64 fields"), no key lookup.
MAX_SIGNED_FIELDS = 64

# RSA keys: RFC 8301 §3.2 forbids keys under 1024 bits; over 8192 bits, or an
# exponent over 2^32 (real keys use 65537), one verification cost seconds of
# CPU.  Past them: policy ("RSA key of N bits is not acceptable ..."), the
# key is never handed to the crypto code.
RSA_MIN_BITS = 1024
RSA_MAX_BITS = 8192
RSA_MAX_EXPONENT = 2**32

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
