"""Step cache keys: which earlier job a cached step may reuse instead of running.

Pure functions over the planned jobs (no ORM). A step's `cache` is what the
`harmont` package emits: `{"policy": "none" | "forever" | "ttl" | "on_change" |
"compose", ...}`, and, when the pipeline was rendered by the package
(`dump_registry_json`, as the render job and the `hm` CLI do), `key`: the
package's own key, which folds in the pipeline, the step key, its `builds_in`
parent's key, the TTL window and, for `on_change`, the content hashes of the
listed paths in the checkout it rendered from. That is where `on_change` is
decided: the render job hashes the files at the build's commit, so the planner
never reads the repository.

The server's key adds what the job would run with: the command, the image,
the whole job environment, and the parent's server key (so a child is reused
only on top of the same parent). A policy without the package's `key` is
resolved here the way the package resolves it (a TTL window from the build's
creation time), except `on_change`, which needs the files: such a step is not
cached. So is a policy this module does not recognise.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

NUL = "\x00"
POLICIES = ("none", "forever", "ttl", "on_change", "compose")


@dataclass(frozen=True)
class StepCache:
    """A cached step's server key and how old an entry it may reuse (seconds; None: any age)."""

    key: str
    max_age_seconds: int | None


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _env_subset(env_keys: Sequence[str], env: Mapping[str, str]) -> str:
    return "".join(f"{name}={env.get(name, '')}{NUL}" for name in sorted(env_keys))


def _valid_env_keys(policy: Mapping[str, Any]) -> list[str] | None:
    keys = policy.get("env_keys", [])
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        return None
    return keys


def _resolve(policy: Any, *, command: str, env: Mapping[str, str], now: int, depth: int = 0) -> str | None:
    """The policy part of a key without the package's `key`; None when it can't be resolved here."""
    if not isinstance(policy, Mapping) or depth > 8:
        return None
    kind = policy.get("policy")
    if kind == "none":
        return "none"
    if kind in ("forever", "ttl"):
        env_keys = _valid_env_keys(policy)
        if env_keys is None:
            return None
        inputs = _sha256(command + NUL + _env_subset(env_keys, env))
        if kind == "forever":
            return "forever-" + inputs
        duration = policy.get("duration_seconds")
        if not isinstance(duration, int) or isinstance(duration, bool) or duration <= 0:
            return None
        return f"ttl-{now // duration}-{inputs}"
    if kind == "compose":
        subs = policy.get("sub_policies")
        if not isinstance(subs, list) or not subs:
            return None
        parts = [_resolve(sub, command=command, env=env, now=now, depth=depth + 1) for sub in subs]
        if any(part is None for part in parts):
            return None
        return "compose-" + _sha256("".join(parts))  # type: ignore[arg-type]
    return None  # on_change needs the files; anything else is not a policy we know


def _max_age(policy: Any, depth: int = 0) -> int | None:
    """The shortest TTL in the policy: an entry older than that is stale, whatever key it has.

    The package's key already changes with each TTL window; this also holds
    for a key baked into a stored definition long ago.
    """
    if not isinstance(policy, Mapping) or depth > 8:
        return None
    if policy.get("policy") == "ttl":
        duration = policy.get("duration_seconds")
        return duration if isinstance(duration, int) and not isinstance(duration, bool) and duration > 0 else None
    if policy.get("policy") == "compose" and isinstance(policy.get("sub_policies"), list):
        ages = [age for sub in policy["sub_policies"] if (age := _max_age(sub, depth + 1)) is not None]
        return min(ages) if ages else None
    return None


def is_cached_policy(cache: Any) -> bool:
    """Whether the step asks to be cached at all (a policy other than `none`)."""
    return isinstance(cache, Mapping) and cache.get("policy") in POLICIES and cache.get("policy") != "none"


def step_cache(cache: Any, *, command: str, image: str | None, env: Mapping[str, str], parent: StepCache | None,
               has_parent: bool, now: int) -> StepCache | None:
    """The step's cache key, or None when the step is not cached.

    `parent` is the `builds_in` parent's (None with `has_parent`: the parent
    is not cached, so neither is the child: what it starts from is new each
    time). `now` is Unix time, the build's creation.
    """
    if not is_cached_policy(cache) or (has_parent and parent is None):
        return None
    dsl_key = cache.get("key")
    if isinstance(dsl_key, str) and dsl_key:
        policy_part = "dsl-" + dsl_key
    else:
        resolved = _resolve(cache, command=command, env=env, now=now)
        if resolved is None:
            return None
        policy_part = "server-" + resolved
    material = json.dumps({"policy": policy_part, "command": command, "image": image or "", "env": dict(env),
                           "parent": parent.key if parent is not None else None},
                          sort_keys=True, separators=(",", ":"))
    return StepCache(key=_sha256(material), max_age_seconds=_max_age(cache))
