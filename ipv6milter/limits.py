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
