"""Labels as people write them: Buildkite/Slack emoji shortcodes (`:wave: hello`) shown as emoji.

Done on the server, for every page and the admin, with the `emoji` package's
alias set (the GitHub/Slack names: `:+1:`, `:rocket:`, `:white_check_mark:`).
A code it doesn't know (`:shipit:`, a custom Buildkite emoji) stays text, as
it was written. The stored label never changes: the API answers it as sent.
"""

from __future__ import annotations

import emoji


def with_emoji(label: str | None) -> str:
    """`label` with its known shortcodes replaced by emoji; plain text in, plain text out (escape it as text)."""
    if not label or ":" not in label:
        return label or ""
    return emoji.emojize(label, language="alias")
