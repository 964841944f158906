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

# RFC 1035 §2.3.4: a label is at most 63 octets, a name at most 255 on the wire,
# which is 253 characters of text without the final dot.  Names from the wire are
# held to this by dnspython; names written in text (an SPF domain-spec) are held to
# it before pyspf reads them: its domain-spec check (RE_TOPLAB) backtracks
# quadratically over a long label (a 60,000-letter label: ~40 s of CPU in one
# regex call).  Past it: SPF permerror (RFC 7208 §4.6: the record is malformed; the
# openspf suite's invalid-domain-long accepts permerror).
DNS_LABEL_CHARS = 63
DNS_NAME_CHARS = 253

# Records in one answer.  Real answers hold tens (a busy domain's apex TXT set,
# a round-robin address set); a 64 KiB TCP answer holds up to ~2,300 AAAA or
# ~65,000 TXT strings.  Past it the answer is no data (no PTR, no address, no
# SPF record) -- never a temporary failure: asking again gives the same answer.
DNS_ANSWER_RECORDS = 256

# Bytes of record data in one answer (TXT strings with their length octets,
# names and addresses as on the wire).  Real answers hold a few KiB; past it,
# no data, as above.
DNS_ANSWER_BYTES = 32 * 1024

# DNS messages parsed for one SMTP stage (the wire bytes of every response,
# all sections, cache misses only).  dnspython parses a 64 KiB response in
# ~0.1 s of CPU whatever the answer holds (padding in the additional section
# too), and one SPF evaluation may make ~110 lookups (10 mx terms of 10 names
# each): 16 s of CPU for one MAIL FROM.  Real stages parse a few KiB to a few
# tens of KiB (SPF includes of big senders, a DKIM key); 128 KiB lets a hostile
# zone make at most three such responses parsed (~0.4 s).  Past it the stage asks
# nothing more: SPF is permerror (RFC 7208 §4.6.4 lets a verifier limit its
# processing), any other lookup is no data.
DNS_STAGE_BYTES = 128 * 1024

# One TXT record (its character-strings joined, RFC 7208 §3.3, RFC 6376 §3.6.2.2):
# an 8192-bit DKIM key is ~1,500 bytes, an SPF record SHOULD fit 450 (RFC 7208
# §3.4) and real ones stay under 1 KiB; 8 KiB leaves room for keys with notes
# (dkimaccept remembers records up to 4 KiB and reads larger ones each time).
# Strings: a record split in the usual 255-byte strings needs 33 for 8 KiB; 128
# leaves room for odd splitting, where a TXT of 65,000 one-byte strings cost
# ~0.5 MiB of Python objects.  Past either: a record starting "v=spf1" is SPF
# permerror (malformed); any other record is left out of the answer (a DKIM key
# so is "no key", permerror; an exp= text so is "no explanation", RFC 7208 §6.2).
TXT_RECORD_BYTES = 8192
TXT_RECORD_STRINGS = 128

# Text handed to pyspf's macro expansion (a domain-spec, an exp= explanation,
# an unknown modifier's value): its syntax check searches the whole text once per
# dot, O(dots x length), and its macro pattern scans to the end from every
# unclosed "%{".  At 512 characters that is at most ~0.1 ms; past it: SPF
# permerror for a term of the record (malformed), no explanation for exp= text.
SPF_MACRO_STRING_CHARS = 512

# -- the DNS answer cache ----------------------------------------------------------------

# The answer cache of one worker process (resolver._AnswerCache), in bytes of
# Python objects as estimated from each answer (resolver.estimated_bytes, which
# tests hold above tracemalloc's measure).  With long TTLs and SPF macros one
# sender can make a worker ask for any number of distinct names, each answer up to
# the bounds above: the budget caps what they keep alive.  32 MiB holds ~30,000
# ordinary answers (about 1 KiB each), several hours of a busy MX's lookups; past
# it the least recently used answers are dropped.
DNS_CACHE_BYTES = 32 * 1024 * 1024

# One answer's share of it: a larger answer is used but not kept (asked again
# next time).  Ordinary answers estimate at 0.5-15 KiB (an 8192-bit DKIM key
# ~2.5 KiB, a large apex TXT set ~15 KiB); the largest allowed answer above
# estimates near 100 KiB.
DNS_CACHE_ENTRY_BYTES = 64 * 1024

# Entries, whatever their size: each costs a dict slot besides its own estimate.
DNS_CACHE_ENTRIES = 20000

# Results computed from cached answers, kept as long as the soonest answer they
# used (resolver.ExpiringLRU in the Engine): a sender's mail from one address comes in runs, and
# its SPF and iprev results stay what they are while their answers do.  Each
# entry is small and bounded: an SPF result's key is the client address, the
# MAIL FROM and the HELO (each within the SMTP bounds above) and its detail
# text at most SPF_RESULT_DETAIL characters (a longer one is not kept): under
# 1.5 KiB; an iprev result keeps at most IPREV_RESULT_NAMES PTR names (a
# result with more is not kept): under 3 KiB.  At most 6 + 12 MiB a worker
# even when every entry is the largest one; ordinary entries are ~0.3 KiB.
SPF_RESULTS = 4096
SPF_RESULT_DETAIL = 512
IPREV_RESULTS = 4096
IPREV_RESULT_NAMES = 10

# A check helper's copies of the worker's answers (isolation._ProxyResolver):
# at most HELPER_ANSWERS answers of at most HELPER_ANSWER_RECORDS records and
# HELPER_ANSWER_TEXT bytes of TXT each (an SPF record or a DKIM key fits):
# about 600 KiB a helper at most.
HELPER_ANSWERS = 128
HELPER_ANSWER_RECORDS = 8
HELPER_ANSWER_TEXT = 4096

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
