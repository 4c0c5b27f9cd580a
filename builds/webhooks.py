"""GitHub webhooks, the pure parts: signatures, payload → event facts, trigger matching.

Nothing here touches the database; `builds.services.webhooks` does the writes
and `builds.webhook_views` the HTTP. The trigger format is what the `harmont`
package writes (`hm.push(...)`, `hm.pull_request(...)`, see its `triggers.py`):

    {"event": "push", "branches": ["main", "release/*"]}
    {"event": "push", "tags": ["v*"]}
    {"event": "pull_request", "branches": ["main"], "types": ["opened", "synchronize"]}
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Union

SIGNATURE_PREFIX = "sha256="
# What `hm.pull_request()` selects when no types are given (it mirrors GitHub Actions).
DEFAULT_PULL_REQUEST_TYPES = ("opened", "synchronize", "reopened")
# validate_build_request accepts messages up to this length; a longer commit message
# is cut rather than refusing the build.
MESSAGE_MAX_LENGTH = 100_000
_ZERO_SHA = re.compile(r"^0+$")


class PayloadError(ValueError):
    """The payload lacks a field its event needs (or has one of the wrong kind)."""


# ---------------------------------------------------------------- signature

def sign(secret: str, body: bytes) -> str:
    """The `X-Hub-Signature-256` value GitHub sends for `body` signed with `secret`."""
    return SIGNATURE_PREFIX + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def signature_valid(*, secret: str, body: bytes, header: str | None) -> bool:
    """Whether `header` is the HMAC-SHA256 of the raw `body` under `secret`.

    An empty secret never verifies: a repository without one has not opted in to
    webhooks, and an HMAC under the empty key is something anyone can compute.
    """
    if not secret or not header:
        return False
    # Bytes, not str: compare_digest refuses non-ASCII strings, and header values can be anything.
    return hmac.compare_digest(sign(secret, body).encode(), header.strip().encode("utf-8", "replace"))


# ---------------------------------------------------------------- globs

@lru_cache(maxsize=1024)
def glob_regex(pattern: str) -> re.Pattern[str]:
    """`*` → any characters including `/`, `?` → one character, everything else literal.

    Written out instead of fnmatch, which would read `[...]` as a character class
    (the harmont globs have none) and differs between platforms in case handling.
    """
    parts = []
    for char in pattern:
        if char == "*":
            parts.append(".*")
        elif char == "?":
            parts.append(".")
        else:
            parts.append(re.escape(char))
    return re.compile("".join(parts), re.DOTALL)


def glob_match(pattern: str, name: str) -> bool:
    """Whether the whole of `name` matches the glob `pattern` (case-sensitive, like git refs)."""
    return glob_regex(pattern).fullmatch(name) is not None


def any_glob_matches(patterns: Any, name: str) -> bool:
    """Whether any glob of a trigger's list matches; a malformed list matches nothing."""
    if isinstance(patterns, str):  # hand-written triggers sometimes carry one glob, not a list
        patterns = [patterns]
    if not isinstance(patterns, list):
        return False
    return any(isinstance(p, str) and glob_match(p, name) for p in patterns)


# ---------------------------------------------------------------- events

@dataclass(frozen=True)
class PushEvent:
    """A `push`: to a branch (`ref_type="branch"`), a tag, or some other ref (`None`)."""

    ref_type: str | None
    ref_name: str
    commit: str
    message: str | None
    deleted: bool

    name = "push"


@dataclass(frozen=True)
class PullRequestEvent:
    """A `pull_request` delivery; `action` is the GitHub action (`opened`, `closed`, ...)."""

    action: str
    number: int | None
    base_branch: str
    head_branch: str
    commit: str
    title: str | None
    # The head branch lives in another repository than the one the delivery is for.
    fork: bool = False

    name = "pull_request"


Event = Union[PushEvent, PullRequestEvent]
SUPPORTED_EVENTS = frozenset({PushEvent.name, PullRequestEvent.name})


@dataclass(frozen=True)
class BuildFacts:
    """What a build made for an event carries."""

    branch: str
    commit: str
    message: str | None
    env: dict[str, str]


def repository_full_name(payload: Any) -> str | None:
    """`repository.full_name` (`owner/repo`), or None when the payload has none."""
    return _full_name(payload.get("repository") if isinstance(payload, dict) else None)


def _full_name(repository: Any) -> str | None:
    name = repository.get("full_name") if isinstance(repository, dict) else None
    return name if isinstance(name, str) and name.strip() else None


def _text(container: Any, key: str, where: str) -> str:
    value = container.get(key) if isinstance(container, dict) else None
    if not isinstance(value, str) or not value:
        raise PayloadError(f"The payload has no {where}.")
    return value


def _optional_text(container: Any, key: str) -> str | None:
    value = container.get(key) if isinstance(container, dict) else None
    return value if isinstance(value, str) else None


def parse_event(event_name: str, payload: Any) -> Event:
    """The facts of a `push` or `pull_request` payload; PayloadError when a needed field is missing."""
    if not isinstance(payload, dict):
        raise PayloadError("The payload is not a JSON object.")
    if event_name == PushEvent.name:
        return _parse_push(payload)
    if event_name == PullRequestEvent.name:
        return _parse_pull_request(payload)
    raise PayloadError(f"Event {event_name!r} is not one this server builds from.")


def _parse_push(payload: dict[str, Any]) -> PushEvent:
    ref = _text(payload, "ref", "`ref`")
    commit = _text(payload, "after", "`after` commit")
    if ref.startswith("refs/heads/"):
        ref_type, ref_name = "branch", ref[len("refs/heads/"):]
    elif ref.startswith("refs/tags/"):
        ref_type, ref_name = "tag", ref[len("refs/tags/"):]
    else:  # refs/notes/..., refs/pull/...: nothing a trigger names
        ref_type, ref_name = None, ref
    # A deleted ref points at the all-zero commit; GitHub also says so in `deleted`.
    deleted = payload.get("deleted") is True or _ZERO_SHA.match(commit) is not None
    return PushEvent(ref_type=ref_type, ref_name=ref_name, commit=commit,
                     message=_optional_text(payload.get("head_commit"), "message"), deleted=deleted)


def _parse_pull_request(payload: dict[str, Any]) -> PullRequestEvent:
    action = _text(payload, "action", "`action`")
    pull = payload.get("pull_request")
    if not isinstance(pull, dict):
        raise PayloadError("The payload has no `pull_request` object.")
    number = payload.get("number", pull.get("number"))
    head = pull.get("head")
    head_repo = _full_name(head.get("repo") if isinstance(head, dict) else None)
    base_repo = repository_full_name(payload)
    return PullRequestEvent(
        action=action,
        number=number if isinstance(number, int) and not isinstance(number, bool) else None,
        base_branch=_text(pull.get("base"), "ref", "`pull_request.base.ref`"),
        head_branch=_text(pull.get("head"), "ref", "`pull_request.head.ref`"),
        commit=_text(pull.get("head"), "sha", "`pull_request.head.sha`"),
        title=_optional_text(pull, "title"),
        # GitHub names are case-insensitive. A head without a repository (the fork was
        # deleted) is a fork too: what can't be shown to be ours is treated as foreign.
        fork=head_repo is None or base_repo is None or head_repo.casefold() != base_repo.casefold(),
    )


def build_facts(event: Event) -> BuildFacts | None:
    """The branch, commit, message and env of the builds `event` asks for; None when it asks for none.

    A tag push builds with the tag as its branch (as Buildkite does), so the
    history's branch column and filter show it; `HARMONT_TAG` says it was a tag.
    A pull request builds its head branch at its head commit; the base branch is
    only what triggers match on, and reaches the jobs as `HARMONT_PULL_REQUEST_BASE_BRANCH`.
    """
    if isinstance(event, PushEvent):
        if event.deleted or event.ref_type is None:
            return None
        env = {"HARMONT_TAG": event.ref_name} if event.ref_type == "tag" else {}
        return BuildFacts(branch=event.ref_name, commit=event.commit, message=_cut(event.message), env=env)
    env = {"HARMONT_PULL_REQUEST_BASE_BRANCH": event.base_branch}
    if event.number is not None:
        env["HARMONT_PULL_REQUEST"] = str(event.number)
    return BuildFacts(branch=event.head_branch, commit=event.commit, message=_cut(event.title), env=env)


def _cut(message: str | None) -> str | None:
    return message[:MESSAGE_MAX_LENGTH] if message else None


# ---------------------------------------------------------------- triggers

def trigger_matches(trigger: Any, event: Event) -> bool:
    """Whether one trigger, as the harmont package writes it, fires for `event`.

    A push trigger names either `branches` or `tags`: a branch push matches only
    its `branches`, a tag push only its `tags`. A pull-request trigger matches
    the PR's *base* (target) branch against `branches` (absent: any branch) and
    the action against `types` (absent: opened, synchronize, reopened). Anything
    malformed matches nothing rather than building unexpectedly.
    """
    if not isinstance(trigger, dict) or trigger.get("event") != event.name:
        return False
    if isinstance(event, PushEvent):
        if event.deleted or event.ref_type is None:
            return False
        key = "branches" if event.ref_type == "branch" else "tags"
        return key in trigger and any_glob_matches(trigger[key], event.ref_name)
    types = trigger.get("types", list(DEFAULT_PULL_REQUEST_TYPES))
    if isinstance(types, str):
        types = [types]
    if not isinstance(types, list) or event.action not in types:
        return False
    return "branches" not in trigger or any_glob_matches(trigger["branches"], event.base_branch)


def triggers_match(triggers: Any, event: Event) -> bool:
    """Whether any of a pipeline's triggers fires; a pipeline without triggers never builds from webhooks."""
    return isinstance(triggers, list) and any(trigger_matches(t, event) for t in triggers)
