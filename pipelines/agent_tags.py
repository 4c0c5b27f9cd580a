"""Agent tags and the selectors that pick agents by them (Buildkite's agent targeting).

Pure functions, no Django: the planner (a step's `agents`), the pipeline's
`default_agents`, agent registration and the waiting-reason read all use them.

- An agent's tags are a `{key: value}` map it registers with
  (`runagent --tags queue=arm64,os=linux`). Values are plain text: no glob
  characters, so a tag never matches a selector by accident of its own.
- A selector is a `{key: value-or-glob}` map (`*` any run of characters, `?`
  one character, everything else literal, case-sensitive), or Buildkite's list
  of `"key=value"` strings, normalised to the map. A job matches an agent when
  every rule of its selector matches one of the agent's tags.
- Buildkite's default-queue rule: an agent without a `queue` tag is in queue
  `default`, and a job whose selector names no queue wants `queue=default`.
  So agents on dedicated queues don't take general work, and untagged agents
  keep taking untagged jobs.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from typing import Any

QUEUE = "queue"
DEFAULT_QUEUE = "default"
KEY = re.compile(r"[A-Za-z0-9_.-]{1,64}")
VALUE_MAX_LENGTH = 255
MAX_TAGS = 32
GLOB_CHARACTERS = frozenset("*?[]")


def _value_problem(value: Any, *, glob: bool) -> str | None:
    if not isinstance(value, str):
        return "must be a string"
    if not value:
        return "must not be empty"
    if len(value) > VALUE_MAX_LENGTH:
        return f"has {len(value)} characters; at most {VALUE_MAX_LENGTH}"
    if not value.isprintable():
        return "must hold printable characters only"
    if not glob and GLOB_CHARACTERS.intersection(value):
        return "must not contain the glob characters * ? [ ]"
    return None


def _key_problem(key: Any) -> str | None:
    if not isinstance(key, str) or not KEY.fullmatch(key):
        return "is not a tag name: 1 to 64 of A-Z a-z 0-9 _ . -"
    return None


def tag_problems(tags: Any) -> list[str]:
    """Why `tags` is no agent's tag map (empty list: it is one)."""
    if not isinstance(tags, dict):
        return ["Must be an object of tag name to value."]
    if len(tags) > MAX_TAGS:
        return [f"Has {len(tags)} tags; at most {MAX_TAGS}."]
    problems = []
    for key, value in tags.items():
        if problem := _key_problem(key):
            problems.append(f"{str(key)[:80]!r} {problem}.")
        elif problem := _value_problem(value, glob=False):
            problems.append(f"Tag {key!r} {problem}.")
    return problems


class SelectorError(ValueError):
    """A selector that can't be read; the message names the culprit."""


def read_selector(value: Any) -> dict[str, str] | None:
    """A step's or pipeline's `agents` as a `{key: pattern}` map (None for null); SelectorError when malformed.

    A list is Buildkite's other spelling, `["queue=arm64", "os=linux"]`; a key
    given twice in it is an error rather than a silent last-one-wins.
    """
    if value is None:
        return None
    if isinstance(value, list):
        rules: dict[str, Any] = {}
        for item in value:
            if not isinstance(item, str) or "=" not in item:
                raise SelectorError(f"list entries must be \"key=value\" strings, got {str(item)[:80]!r}")
            key, _, pattern = item.partition("=")
            if key in rules:
                raise SelectorError(f"names {key[:80]!r} twice")
            rules[key] = pattern
    elif isinstance(value, dict):
        rules = value
    else:
        raise SelectorError("must be an object of tag name to value or glob, or a list of \"key=value\" strings")
    if len(rules) > MAX_TAGS:
        raise SelectorError(f"has {len(rules)} rules; at most {MAX_TAGS}")
    for key, pattern in rules.items():
        if problem := _key_problem(key):
            raise SelectorError(f"{str(key)[:80]!r} {problem}")
        if problem := _value_problem(pattern, glob=True):
            raise SelectorError(f"rule {key!r} {problem}")
    return dict(rules)


def effective_selector(step: Mapping[str, str] | None, *, default: Mapping[str, str] | None,
                       runner: str | None) -> dict[str, str]:
    """What a job asks of its agent: the step's selector, else the pipeline's default; then the queue.

    As Buildkite does, a step's own `agents` replaces the pipeline's default
    whole (not key by key). A `runner` stands for `queue=<runner>` when the
    selector names no queue; with neither, the job wants `queue=default`.
    """
    selector = dict(step if step is not None else default or {})
    if QUEUE not in selector:
        selector[QUEUE] = runner if runner else DEFAULT_QUEUE
    return selector


def job_selector(stored: Mapping[str, str] | None) -> dict[str, str]:
    """A job's stored `agents`; NULL (a job from before selectors existed) is what a job without one wants."""
    return dict(stored) if stored is not None else effective_selector(None, default=None, runner=None)


def effective_tags(tags: Mapping[str, str] | None) -> dict[str, str]:
    """An agent's tags with its queue: `default` when it registered none."""
    return {QUEUE: DEFAULT_QUEUE, **(tags or {})}


def selector_matches(selector: Mapping[str, str], tags: Mapping[str, str] | None) -> bool:
    """Whether an agent with `tags` may take a job with `selector` (the claim's SQL says the same)."""
    have = effective_tags(tags)
    return all(key in have and glob_match(have[key], pattern) for key, pattern in selector.items())


def glob_match(value: str, pattern: str) -> bool:
    """`*` and `?` as globs, every other character (also `[`) literal, case-sensitive."""
    return fnmatch.fnmatchcase(value, pattern.replace("[", "[[]"))


def describe(selector: Mapping[str, str]) -> str:
    """`queue=arm64, os=linux`, for messages: the queue first, then by name (PostgreSQL's jsonb keeps no order)."""
    return ", ".join(f"{key}={selector[key]}" for key in sorted(selector, key=lambda key: (key != QUEUE, key)))
