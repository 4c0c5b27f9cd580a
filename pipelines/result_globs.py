"""A pipeline's `test_results_glob`: which of a job's artifacts are JUnit XML reports.

Pure functions over strings, shared by the pipeline services (validation), the
admin (the model field's validator) and the builds app (matching an artifact's
path when it is stored).

The setting is one or more patterns separated by commas, matched against the
artifact's path relative to `$HARMONT_ARTIFACTS` (`/`-separated, as stored):
`*` and `?` stay within one path segment, `**/` spans any number of
directories (none included), a trailing `**` matches everything below. An
empty setting parses nothing.
"""

from __future__ import annotations

import functools
import re

from django.core.exceptions import ValidationError

DEFAULT_TEST_RESULTS_GLOB = "test-results/**/*.xml"
GLOB_MAX_CHARS = 500
GLOB_MAX_PATTERNS = 20


def split_globs(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def glob_errors(value: object) -> list[str]:
    """What is wrong with a `test_results_glob` (empty: nothing)."""
    if not isinstance(value, str):
        return ["Must be a string of glob patterns separated by commas."]
    if len(value) > GLOB_MAX_CHARS:
        return [f"At most {GLOB_MAX_CHARS} characters."]
    patterns = split_globs(value)
    if len(patterns) > GLOB_MAX_PATTERNS:
        return [f"At most {GLOB_MAX_PATTERNS} patterns."]
    errors = []
    for pattern in patterns:
        if pattern.startswith("/"):
            errors.append(f"{pattern!r} is absolute; artifact paths are relative to $HARMONT_ARTIFACTS.")
        elif ".." in pattern.split("/"):
            errors.append(f"{pattern!r} has a `..` segment; artifact paths never do.")
    return errors


def validate_glob(value: object) -> None:
    errors = glob_errors(value)
    if errors:
        raise ValidationError(errors)


def _translate(pattern: str) -> str:
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:[^/]*/)*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return "".join(out)


@functools.lru_cache(maxsize=256)
def _compiled(value: str) -> re.Pattern[str] | None:
    # Cached: every artifact a job uploads is matched against its pipeline's setting,
    # and a pipeline's setting rarely changes.
    patterns = split_globs(value)
    if not patterns:
        return None
    return re.compile("|".join(f"(?:{_translate(p)})" for p in patterns))


def matches(value: str, path: str) -> bool:
    """Whether the artifact at `path` is a report under the pipeline's `test_results_glob` `value`."""
    compiled = _compiled(value or "")
    return compiled is not None and compiled.fullmatch(path) is not None
