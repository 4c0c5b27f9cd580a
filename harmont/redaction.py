"""Credentials written into URLs (`https://user:token@host/repo.git`), kept out of what people read.

A repository URL may carry a token for the agents' checkout. Job logs, git's error messages
and what members see of a pipeline show `https://***@host/repo.git` instead. No Django here:
the agent program uses it too.
"""

from __future__ import annotations

import re

# scheme://userinfo@ — userinfo can't hold "/", "@" or whitespace unescaped, so this stops at the host.
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@]+@")
REDACTED = "***"


def redact_url_credentials(text: str) -> str:
    """`text` with the user and password of every URL in it replaced by ***."""
    return _USERINFO.sub(lambda match: f"{match['scheme']}{REDACTED}@", text)
