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

MAX_SIGNATURE_FIELD = 16 * 1024

# -- DNS answers (PTR, A/AAAA, MX, SPF TXT, DKIM key TXT, _dmarc TXT) ----------------------

# -- the DNS answer cache ----------------------------------------------------------------

# -- CPU: the last line of defence for what no bound above foresaw -----------------------
