"""The v0 IR: parse, validate and plan a pipeline definition into jobs.

A pipeline definition arrives in one of two shapes (SPEC §6):

* the graph form the `harmont` package emits today: petgraph-style
  ``{"graph": {"nodes": [...], "edges": [[from, to, kind], ...]}}``;
* the flat form older clients send: ``{"steps": [...]}`` where ``wait`` steps
  are barriers and ``builds_in`` / ``depends_on`` name other steps by key.

Both reduce to one internal shape (validated steps plus a set of
``(prerequisite, dependant, kind)`` edges), so ordering, cycle detection and
job assembly exist once.

Pure functions over dicts (no Django); the build service turns a :class:`Plan`
into rows. The first problem raises :class:`PlanError`, whose message locates
the culprit by path (``steps[2]``, ``graph.edges[0]``), 0-based like the node
indexes in graph edges.

Decisions the spec leaves open:

* ``null`` for an optional field means the same as leaving it out.
* A flat step without ``type`` (or with ``"type": null``) is ``invalid_ir``:
  the flat form names every step's type, and guessing "command" would run
  whatever a malformed entry happens to hold.
* Consecutive flat ``wait`` steps act as one barrier: steps after the second
  wait still depend on the steps before the first.
* A step naming itself (graph self-edge or flat self-reference) is
  ``invalid_ir``; longer loops are ``cycle``.
* A step's ``agents`` (map, or Buildkite's ``["key=value"]`` list) replaces
  the pipeline's ``default_agents`` whole, as in Buildkite; every job gets
  its effective selector, queue included (``runner``, else ``default``;
  pipelines.agent_tags). ``concurrency_group`` and ``concurrency`` come
  together or not at all (Buildkite requires both).
* Fields we don't know are ignored, so newer clients keep working; in the
  graph form that includes top-level ``env`` / ``default_image``, which only
  the flat form defines.

What one build may hold is capped (:class:`Limits`, ``limit_exceeded``), and
each cap is checked before the work it bounds: a list's length before it is
read, so no document costs more than the largest one allowed. A flat ``wait``
is kept as one barrier (the steps before it form a *segment*, the steps after
it wait for that segment) rather than N×M edges, which is also how the build
stores it.
"""

from __future__ import annotations

import copy
import heapq
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from pipelines import agent_tags

IR_VERSION = "0"
BUILDS_IN = "builds_in"
DEPENDS_ON = "depends_on"
EDGE_KINDS = (BUILDS_IN, DEPENDS_ON)

# Every job gets these first so tools like apt never block on a prompt or
# emit terminal control codes into the log; any layer of the IR may override.
BASE_JOB_ENV: dict[str, str] = {"DEBIAN_FRONTEND": "noninteractive", "TERM": "dumb"}

# (prerequisite node index, dependant node index, edge kind)
_Edge = tuple[int, int, str]

LIMIT_EXCEEDED = "limit_exceeded"
# Deeper than any real `cache` or `runner_args`; it keeps copying and storing a document
# (json, deepcopy, the database's JSON encoder) far from Python's recursion limit.
MAX_NESTING = 64
# What the job's columns hold (builds.models.Job); longer values would fail at insert.
KEY_MAX_LENGTH = 255
LABEL_MAX_LENGTH = 500
IMAGE_MAX_LENGTH = 500
RUNNER_MAX_LENGTH = 255
# Timeouts are stored as PostgreSQL integers.
TIMEOUT_MAX = 2**31 - 1
CONCURRENCY_GROUP_MAX_LENGTH = 255
# Each unit of a group's `concurrency` is a slot row (builds.models.ConcurrencySlot).
CONCURRENCY_MAX = 1000


@dataclass(frozen=True)
class Limits:
    """What one build may hold; the defaults are the settings' defaults (harmont/settings.py)."""

    jobs: int = 1000  # HARMONT_MAX_BUILD_JOBS
    edges: int = 10_000  # HARMONT_MAX_BUILD_EDGES
    command_bytes: int = 64 * 1024  # HARMONT_MAX_COMMAND_BYTES
    env_value_bytes: int = 64 * 1024  # HARMONT_MAX_ENV_VALUE_BYTES
    env_bytes: int = 1024 * 1024  # HARMONT_MAX_ENV_BYTES
    # Every job's command and environment together: a pipeline-wide env is copied into
    # each job, so this, not the document's size, bounds what a build stores.
    build_bytes: int = 64 * 1024 * 1024  # HARMONT_MAX_BUILD_SPEC_BYTES

    @classmethod
    def from_settings(cls) -> "Limits":
        """The configured limits (the defaults where Django isn't configured, as in a bare script)."""
        try:
            from django.conf import settings

            return cls(jobs=settings.MAX_BUILD_JOBS, edges=settings.MAX_BUILD_EDGES,
                       command_bytes=settings.MAX_COMMAND_BYTES, env_value_bytes=settings.MAX_ENV_VALUE_BYTES,
                       env_bytes=settings.MAX_ENV_BYTES, build_bytes=settings.MAX_BUILD_SPEC_BYTES)
        except Exception:  # ImproperlyConfigured, or settings without these names
            return cls()


class PlanError(Exception):
    """The IR was rejected; ``code`` is the stable machine-readable reason."""

    def __init__(self, code: str, message: str) -> None:
        # Both in args so the error survives pickling and reprs usefully.
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class PlannedJob:
    """One job to create, with its prerequisites as indexes into ``Plan.jobs``."""

    index: int
    key: str
    label: str | None
    command: str
    image: str | None
    env: dict[str, str]
    timeout_seconds: int | None
    cache: dict | None
    runner: str | None
    runner_args: dict | None
    builds_in: int | None
    depends_on: tuple[int, ...]
    # A flat `wait` as stored: `segment` is the run of steps (between waits) this job
    # belongs to when a later step waits for it; `after_segment`, the segment whose every
    # job this one waits for. Those prerequisites are in `depends_on` too.
    segment: int | None = None
    after_segment: int | None = None
    # Normalised `retry` and `soft_fail` (see `normalise_retry`, `normalise_soft_fail`); None: none.
    retry_policy: dict | None = None
    soft_fail_policy: dict | None = None
    # What the job asks of its agent's tags (pipelines.agent_tags): the step's own `agents`
    # until `_assemble` makes it the effective selector, queue included.
    agents: dict[str, str] | None = None
    # At most `concurrency` jobs of the organization with this group run at once.
    concurrency_group: str | None = None
    concurrency: int | None = None


@dataclass(frozen=True)
class Plan:
    """Jobs in dependency order plus the pipeline-wide timeout, if any."""

    jobs: tuple[PlannedJob, ...]
    timeout_seconds: int | None


@dataclass(frozen=True)
class _Step:
    """A validated command step before ordering.

    ``job`` still has placeholder ``index``/``builds_in``/``depends_on`` and
    only the IR's own env layers; ``_assemble`` fills in the rest.
    ``location`` is its path in the document, for error messages.
    """

    location: str
    job: PlannedJob
    has_retry: bool = False  # the step set `retry` itself (else the pipeline's default applies)

    @property
    def where(self) -> str:
        return f"{self.location} ({self.job.key!r})"


# --- entry points -----------------------------------------------------------


def load_ir(raw: str | bytes | dict) -> dict:
    """Decode ``raw`` into the IR object; anything but a JSON object is ``invalid_json``."""
    if isinstance(raw, dict):
        return raw
    if isinstance(raw, (str, bytes, bytearray)):
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            # ValueError covers both bad JSON and bytes that aren't UTF-8;
            # RecursionError is absurdly deep nesting, still just bad input.
            raise PlanError("invalid_json", f"The pipeline IR is not valid JSON: {exc}.") from None
    else:
        doc = raw
    if not isinstance(doc, dict):
        raise PlanError("invalid_json", f"The pipeline IR must be a JSON object, got {_show(doc)}.")
    return doc


def plan_ir(raw: str | bytes | dict, *, build_env: dict[str, str] | None = None,
            limits: Limits | None = None, default_retry: Any = None, default_agents: Any = None) -> Plan:
    """Validate the IR and order its steps into jobs; raise PlanError on the first problem.

    ``build_env`` (the build's own ``env``) is applied last, so it overrides
    every env layer the pipeline defines. ``limits``: what one build may hold
    (default: the configured ones). ``default_retry``: the pipeline's
    ``default_retry``, the policy of every step without a ``retry`` of its own
    (a step's ``retry`` replaces it whole, it is not merged). ``default_agents``:
    the pipeline's selector for steps without their own ``agents`` (map or list form).
    """
    limits = limits or Limits.from_settings()
    default_policy = normalise_retry(default_retry, "The pipeline's 'default_retry'")
    default_agents = _optional_selector(default_agents, "The pipeline's 'default_agents'")
    doc = load_ir(raw)
    check_storable(doc)
    _check_version(doc)
    timeout = _optional_timeout(doc.get("timeout_seconds"), "The top-level 'timeout_seconds'")
    graph, flat = doc.get("graph"), doc.get("steps")
    if graph is not None and flat is not None:
        raise _invalid("The IR has both 'graph' and 'steps'; send exactly one of the two forms.")
    waits = _Waits()
    if graph is not None:
        steps, edges = _read_graph(graph, limits)
    elif flat is not None:
        steps, edges, waits = _read_flat(doc, flat, limits)
    else:
        steps, edges = [], set()
    order = _dependency_order(steps, edges, waits)
    if default_policy is not None:
        steps = [step if step.has_retry else replace(step, job=replace(step.job, retry_policy=default_policy))
                 for step in steps]
    return Plan(jobs=_assemble(steps, edges, waits, order, build_env or {}, limits, default_agents),
                timeout_seconds=timeout)


def check_storable(doc: Any) -> None:
    """Refuse what no JSON column can hold: nesting past MAX_NESTING, NUL characters, lone surrogates, NaN.

    Iterative, so a document nested thousands deep is refused instead of
    exhausting the stack (copy.deepcopy, json.dumps and the database's encoder
    all recurse); PostgreSQL refuses `\\u0000` in text and jsonb, and UTF-8 has
    no lone surrogates.
    """
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            _check_text(value)
        elif isinstance(value, float) and not math.isfinite(value):
            # Python's json reads NaN and Infinity; JSON (and jsonb) has neither.
            raise _invalid(f"The IR contains the number {value}, which JSON does not have.")
        elif isinstance(value, (dict, list)):
            if depth > MAX_NESTING:
                raise PlanError(LIMIT_EXCEEDED,
                                f"The IR nests objects and arrays deeper than {MAX_NESTING} levels.")
            if isinstance(value, dict):
                for key, item in value.items():
                    _check_text(key)
                    stack.append((item, depth + 1))
            else:
                stack.extend((item, depth + 1) for item in value)


def _check_text(text: Any) -> None:
    if not isinstance(text, str):
        return
    if "\x00" in text:
        raise _invalid("The IR contains a NUL character (\\u0000), which no command, name or value may hold.")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise _invalid("The IR contains a lone UTF-16 surrogate, which is not text.") from None


def _too_many(what: str, count: int | str, limit: int, setting: str) -> PlanError:
    return PlanError(LIMIT_EXCEEDED, f"The pipeline has {count} {what}; a build may have at most {limit} "
                                     f"({setting}).")


# --- shared field checks ----------------------------------------------------


def _invalid(message: str) -> PlanError:
    """The error for a structurally broken document, by far the most common kind."""
    return PlanError("invalid_ir", message)


def _check_version(doc: dict) -> None:
    if "version" not in doc:
        raise PlanError("bad_version", 'The IR has no \'version\'; expected "0".')
    if doc["version"] != IR_VERSION:
        raise PlanError("bad_version", f"IR 'version' {_show(doc['version'])} is not \"0\".")


def _show(value: Any) -> str:
    """Quote a value for a message as JSON, truncated so a huge value can't flood it."""
    if isinstance(value, str) and len(value) > 80:
        value = value[:80]  # no need to encode megabytes to show 77 characters
    try:
        text = json.dumps(value, default=repr, ensure_ascii=False)
    except (RecursionError, ValueError):
        text = f"a {type(value).__name__}"
    return text if len(text) <= 80 else text[:77] + "..."


def _is_int(value: Any) -> bool:
    # bool subclasses int in Python, but `true` is never a count or an index.
    return isinstance(value, int) and not isinstance(value, bool)


def _optional_timeout(value: Any, what: str) -> int | None:
    if value is None:
        return None
    if not _is_int(value) or value <= 0:
        raise _invalid(f"{what} must be a positive whole number of seconds, got {_show(value)}.")
    if value > TIMEOUT_MAX:
        raise PlanError(LIMIT_EXCEEDED, f"{what} is {value}; at most {TIMEOUT_MAX} seconds.")
    return value


def _optional_list(container: dict, field: str, where: str) -> list:
    value = container.get(field)
    if value is None:
        return []
    if not isinstance(value, list):
        raise _invalid(f"{where}.{field} must be an array, got {_show(value)}.")
    return value


def _optional_object(value: Any, what: str) -> dict | None:
    if value is not None and not isinstance(value, dict):
        raise _invalid(f"{what} must be an object, got {_show(value)}.")
    # Deep-copied so a plan never aliases (or lets callers mutate) the document;
    # check_storable bounded its depth already.
    return copy.deepcopy(value)


def _optional_text(value: Any, what: str, max_length: int | None = None) -> str | None:
    # Only the type is checked: the DSL passes e.g. `label=""` through as is.
    if value is not None and not isinstance(value, str):
        raise _invalid(f"{what} must be a string, got {_show(value)}.")
    if value is not None and max_length is not None and len(value) > max_length:
        raise PlanError(LIMIT_EXCEEDED, f"{what} has {len(value)} characters; at most {max_length}.")
    return value


def _env_map(value: Any, what: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _invalid(f"{what} must be an object, got {_show(value)}.")
    for name, item in value.items():
        if not isinstance(item, str):
            raise _invalid(
                f"{what} sets {name!r} to {_show(item)}; env values must be strings."
            )
    return dict(value)


def _required_text(step: dict, field: str, where: str) -> str:
    value = step.get(field)
    if not isinstance(value, str) or not value:
        problem = f"has no {field!r}" if value is None else f"has {field!r} {_show(value)}"
        raise PlanError("missing_field", f"{where} {problem}; it must be a non-empty string.")
    return value


def _utf8_size(text: str) -> int:
    # Cheap for ASCII, which nearly every command and value is.
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def _read_command_step(
    step: dict, location: str, *, outer_env: dict[str, str], limits: Limits, default_image: str | None = None
) -> _Step:
    """Validate one CommandStep; the same fields exist in both IR forms."""
    key = _required_text(step, "key", location)
    if len(key) > KEY_MAX_LENGTH:
        raise PlanError(LIMIT_EXCEEDED, f"{location} has a key of {len(key)} characters; at most {KEY_MAX_LENGTH}.")
    where = f"{location} ({key!r})"
    command = _required_text(step, "cmd", where)
    if (size := _utf8_size(command)) > limits.command_bytes:
        raise PlanError(LIMIT_EXCEEDED, f"{where} has a 'cmd' of {size} bytes; at most {limits.command_bytes} "
                                        "(HARMONT_MAX_COMMAND_BYTES).")
    image = _optional_text(step.get("image"), f"{where} 'image'", IMAGE_MAX_LENGTH)
    job = PlannedJob(
        index=-1,
        key=key,
        label=_optional_text(step.get("label"), f"{where} 'label'", LABEL_MAX_LENGTH),
        command=command,
        image=image if image is not None else default_image,
        env={**outer_env, **_env_map(step.get("env"), f"{where} 'env'")},
        timeout_seconds=_optional_timeout(
            step.get("timeout_seconds"), f"{where} 'timeout_seconds'"
        ),
        cache=_optional_object(step.get("cache"), f"{where} 'cache'"),
        runner=_optional_text(step.get("runner"), f"{where} 'runner'", RUNNER_MAX_LENGTH),
        runner_args=_optional_object(step.get("runner_args"), f"{where} 'runner_args'"),
        builds_in=None,
        depends_on=(),
        retry_policy=normalise_retry(step.get("retry"), f"{where} 'retry'"),
        soft_fail_policy=normalise_soft_fail(step.get("soft_fail"), f"{where} 'soft_fail'"),
        agents=_optional_selector(step.get("agents"), f"{where} 'agents'"),
        **_concurrency(step, where),
    )
    return _Step(location=location, job=job, has_retry=step.get("retry") is not None)


# --- retry and soft_fail (Buildkite's shapes) --------------------------------

# Buildkite's bounds and default for an automatic retry rule's `limit`.
RETRY_LIMIT_MAX = 10
RETRY_LIMIT_DEFAULT = 2
# The exit status that stands for "the agent was lost" (Buildkite's -1).
AGENT_LOST_EXIT_STATUS = -1
ANY_EXIT_STATUS = "*"


def normalise_retry(value: Any, what: str) -> dict | None:
    """A step's `retry` (or a pipeline's `default_retry`) in one shape; None when absent.

    Accepts Buildkite's forms: `automatic` is `true` (= `[{"exit_status": "*",
    "limit": 2}]`), `false`, one rule or a list of rules; a rule's `exit_status`
    is an int, `"*"` or a list of ints (-1: the agent was lost) and `limit`
    1..10 (default 2). `manual` is `true`, `false` or `{"allowed": bool,
    "reason": str}`. Returns `{"automatic": [{"exit_status": "*" | [int, ...],
    "limit": int}] | false, "manual": {"allowed": bool, "reason": str | None}}`,
    which this function accepts again unchanged. `automatic: false` is kept as
    such: it turns off every automatic retry, the one a lost agent gets without
    a rule too, where no rules (absent, or `[]`) leave that one on. Keys Buildkite has but this server
    can't honour (`signal`, `permit_on_passed`, ...) are refused rather than
    silently ignored.
    """
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _invalid(f"{what} must be an object with 'automatic' and/or 'manual', got {_show(value)}.")
    _only_keys(value, ("automatic", "manual"), what)
    automatic = value.get("automatic")
    rules: list | bool
    if automatic is None:
        rules = []
    elif automatic is False:
        rules = False
    elif automatic is True:
        rules = [{"exit_status": ANY_EXIT_STATUS, "limit": RETRY_LIMIT_DEFAULT}]
    elif isinstance(automatic, dict):
        rules = [_retry_rule(automatic, f"{what}.automatic")]
    elif isinstance(automatic, list):
        if len(automatic) > 100:
            raise PlanError(LIMIT_EXCEEDED, f"{what}.automatic has {len(automatic)} rules; at most 100.")
        rules = [_retry_rule(rule, f"{what}.automatic[{i}]") for i, rule in enumerate(automatic)]
    else:
        raise _invalid(f"{what}.automatic must be true, false, a rule object or a list of rules, "
                       f"got {_show(automatic)}.")
    manual = value.get("manual")
    if manual is None or manual is True:
        allowed, reason = True, None
    elif manual is False:
        allowed, reason = False, None
    elif isinstance(manual, dict):
        _only_keys(manual, ("allowed", "reason"), f"{what}.manual")
        allowed = manual.get("allowed", True)
        if not isinstance(allowed, bool):
            raise _invalid(f"{what}.manual.allowed must be true or false, got {_show(allowed)}.")
        reason = _optional_text(manual.get("reason"), f"{what}.manual.reason", LABEL_MAX_LENGTH)
    else:
        raise _invalid(f"{what}.manual must be true, false or {{\"allowed\": bool, \"reason\": str}}, "
                       f"got {_show(manual)}.")
    return {"automatic": rules, "manual": {"allowed": allowed, "reason": reason}}


def _retry_rule(rule: Any, what: str) -> dict:
    if not isinstance(rule, dict):
        raise _invalid(f"{what} must be an object with 'exit_status' and 'limit', got {_show(rule)}.")
    _only_keys(rule, ("exit_status", "limit"), what)
    limit = rule.get("limit", RETRY_LIMIT_DEFAULT)
    if limit is None:
        limit = RETRY_LIMIT_DEFAULT
    if not _is_int(limit) or not 1 <= limit <= RETRY_LIMIT_MAX:
        raise _invalid(f"{what}.limit must be a whole number from 1 to {RETRY_LIMIT_MAX}, got {_show(limit)}.")
    return {"exit_status": _exit_statuses(rule.get("exit_status", ANY_EXIT_STATUS), f"{what}.exit_status"),
            "limit": limit}


def _exit_statuses(value: Any, what: str) -> str | list[int]:
    if value == ANY_EXIT_STATUS:
        return ANY_EXIT_STATUS
    values = value if isinstance(value, list) else [value]
    if not values or not all(_is_int(v) and AGENT_LOST_EXIT_STATUS <= v <= 255 for v in values):
        raise _invalid(f"{what} must be \"*\", an exit status (-1 to 255; -1: the agent was lost) or a "
                       f"non-empty list of them, got {_show(value)}.")
    return sorted(set(values))


def normalise_soft_fail(value: Any, what: str) -> dict | None:
    """A step's `soft_fail` in one shape: None (hard failures), or `{"exit_status": "*" | [int, ...]}`.

    `true` is `{"exit_status": "*"}`; `false` (or absent) is None; Buildkite's
    list of `{"exit_status": int | "*"}` objects becomes one object with every
    status listed (`"*"` if one of them is). This function accepts its own
    result again unchanged.
    """
    if value is None or value is False:
        return None
    if value is True:
        return {"exit_status": ANY_EXIT_STATUS}
    rules = [value] if isinstance(value, dict) else value
    if not isinstance(rules, list) or not rules:
        raise _invalid(f"{what} must be true, false or a non-empty list of {{\"exit_status\": ...}}, "
                       f"got {_show(value)}.")
    if len(rules) > 100:
        raise PlanError(LIMIT_EXCEEDED, f"{what} has {len(rules)} rules; at most 100.")
    statuses: set[int] = set()
    for i, rule in enumerate(rules):
        where = what if isinstance(value, dict) else f"{what}[{i}]"
        if not isinstance(rule, dict) or "exit_status" not in rule:
            raise _invalid(f"{where} must be an object with 'exit_status', got {_show(rule)}.")
        _only_keys(rule, ("exit_status",), where)
        matched = _exit_statuses(rule["exit_status"], f"{where}.exit_status")
        if matched == ANY_EXIT_STATUS:
            return {"exit_status": ANY_EXIT_STATUS}
        statuses.update(matched)
    return {"exit_status": sorted(statuses)}


def _only_keys(value: dict, allowed: tuple[str, ...], what: str) -> None:
    unknown = sorted(str(key) for key in value if key not in allowed)
    if unknown:
        raise _invalid(f"{what} has unknown field {_show(unknown[0])}; expected {' and '.join(map(repr, allowed))}.")


def _optional_selector(value: Any, what: str) -> dict[str, str] | None:
    try:
        return agent_tags.read_selector(value)
    except agent_tags.SelectorError as exc:
        raise _invalid(f"{what} {exc}.") from None


def _concurrency(step: dict, where: str) -> dict[str, Any]:
    """`concurrency_group` and `concurrency`, both or neither (as Buildkite requires)."""
    group, limit = step.get("concurrency_group"), step.get("concurrency")
    if group is None and limit is None:
        return {}
    if group is None or limit is None:
        given, missing = ("concurrency", "concurrency_group") if group is None else ("concurrency_group", "concurrency")
        raise _invalid(f"{where} has {given!r} without {missing!r}; give both or neither.")
    if not isinstance(group, str) or not group:
        raise _invalid(f"{where} 'concurrency_group' must be a non-empty string, got {_show(group)}.")
    if len(group) > CONCURRENCY_GROUP_MAX_LENGTH:
        raise PlanError(LIMIT_EXCEEDED, f"{where} 'concurrency_group' has {len(group)} characters; at most "
                                        f"{CONCURRENCY_GROUP_MAX_LENGTH}.")
    if not _is_int(limit) or not 1 <= limit <= CONCURRENCY_MAX:
        raise _invalid(f"{where} 'concurrency' must be a whole number from 1 to {CONCURRENCY_MAX}, "
                       f"got {_show(limit)}.")
    return {"concurrency_group": group, "concurrency": limit}


def _check_unique_key(step: _Step, seen: dict[str, _Step]) -> None:
    if step.job.key in seen:
        raise PlanError(
            "duplicate_key",
            f"{step.location} repeats the key {step.job.key!r} of {seen[step.job.key].location}; "
            "step keys must be unique.",
        )
    seen[step.job.key] = step


# --- graph form -------------------------------------------------------------


def _read_graph(graph: Any, limits: Limits) -> tuple[list[_Step], set[_Edge]]:
    if not isinstance(graph, dict):
        raise _invalid(f"'graph' must be an object, got {_show(graph)}.")
    nodes = _optional_list(graph, "nodes", "graph")
    edges = _optional_list(graph, "edges", "graph")
    if _optional_list(graph, "node_holes", "graph"):
        # Holes are left by deleted nodes; the DSL never emits them and
        # renumbering around them would silently change what edges mean.
        raise _invalid("graph.node_holes is not empty; graphs with node holes are not supported.")
    direction = graph.get("edge_property", "directed")
    if direction != "directed":
        raise _invalid(f"graph.edge_property must be \"directed\", got {_show(direction)}.")
    # Counted before either list is read: past a limit, nothing of it is worth reading.
    if len(nodes) > limits.jobs:
        raise _too_many("jobs (graph.nodes)", len(nodes), limits.jobs, "HARMONT_MAX_BUILD_JOBS")
    if len(edges) > limits.edges:
        raise _too_many("dependency edges (graph.edges)", len(edges), limits.edges, "HARMONT_MAX_BUILD_EDGES")
    steps: list[_Step] = []
    seen: dict[str, _Step] = {}
    for i, node in enumerate(nodes):
        where = f"graph.nodes[{i}]"
        if not isinstance(node, dict) or not isinstance(node.get("step"), dict):
            raise _invalid(f"{where} must be an object with a 'step' object.")
        outer_env = _env_map(node.get("env"), f"{where} 'env'")
        step = _read_command_step(node["step"], f"{where}.step", outer_env=outer_env, limits=limits)
        _check_unique_key(step, seen)
        steps.append(step)
    return steps, _read_edges(edges, steps)


def _read_edges(edges: list, steps: list[_Step]) -> set[_Edge]:
    result: set[_Edge] = set()
    parent_of: dict[int, int] = {}
    for i, edge in enumerate(edges):
        where = f"graph.edges[{i}]"
        if not isinstance(edge, list) or len(edge) != 3:
            raise _invalid(f"{where} must be an array [from, to, kind], got {_show(edge)}.")
        source, target, kind = edge
        if kind not in EDGE_KINDS:
            raise _invalid(
                f"{where} has kind {_show(kind)}; expected \"builds_in\" or \"depends_on\"."
            )
        for end in (source, target):
            _check_node_index(end, where, len(steps))
        if source == target:
            raise _invalid(f"{where} links {steps[source].where} to itself.")
        if kind == BUILDS_IN:
            previous = parent_of.setdefault(target, source)
            if previous != source:
                raise _invalid(
                    f"{where} gives {steps[target].where} a second builds_in parent "
                    f"({steps[source].where}, besides {steps[previous].where}); "
                    "a step builds in at most one parent."
                )
        result.add((source, target, kind))  # a set: repeated edges collapse
    return result


def _check_node_index(end: Any, where: str, node_count: int) -> None:
    if _is_int(end) and 0 <= end < node_count:
        return
    valid = f"node indexes run from 0 to {node_count - 1}" if node_count else "there are no nodes"
    if not _is_int(end):
        raise _invalid(f"{where} has {_show(end)} where a node index belongs; {valid}.")
    raise _invalid(f"{where} refers to node {end}, but {valid}.")


# --- flat form --------------------------------------------------------------


@dataclass
class _Waits:
    """The flat form's waits, by node: the segment a step belongs to and the segment it waits for.

    A segment is the run of command steps between two waits; a step after a
    wait depends on every step of the segment before it, which is kept as
    these two numbers instead of an edge per pair.
    """

    segment: dict[int, int] = field(default_factory=dict)  # only steps some later step waits for
    after: dict[int, int] = field(default_factory=dict)
    members: dict[int, list[int]] = field(default_factory=dict)  # segment -> its nodes, document order


def _read_flat(doc: dict, entries: Any, limits: Limits) -> tuple[list[_Step], set[_Edge], _Waits]:
    if not isinstance(entries, list):
        raise _invalid(f"'steps' must be an array, got {_show(entries)}.")
    outer_env = _env_map(doc.get("env"), "The top-level 'env'")
    default_image = _optional_text(doc.get("default_image"), "The top-level 'default_image'", IMAGE_MAX_LENGTH)
    steps: list[_Step] = []
    seen: dict[str, _Step] = {}
    edges: set[_Edge] = set()
    references: list[tuple[int, str, str]] = []  # (node, kind, key named)
    segments: list[list[int]] = [[]]  # command steps between waits; the last one is open
    barrier: int | None = None  # the segment the last wait makes later steps wait for
    waits = _Waits()
    for i, entry in enumerate(entries):
        where = f"steps[{i}]"
        if not isinstance(entry, dict):
            raise _invalid(f"{where} must be an object, got {_show(entry)}.")
        step_type = entry.get("type")
        if step_type is None:
            raise _invalid(f"{where} has no 'type'; a flat step is {{\"type\": \"command\", ...}} or "
                           f"{{\"type\": \"wait\"}}.")
        if step_type == "wait":
            # An empty segment (two waits in a row) keeps the earlier barrier
            # rather than dropping the ordering it promised.
            if segments[-1]:
                barrier = len(segments) - 1
                segments.append([])
            continue
        if step_type != "command":
            raise PlanError(
                "unknown_step_type",
                f"{where} has unknown type {_show(step_type)}; expected \"command\" or \"wait\".",
            )
        if len(steps) == limits.jobs:
            raise _too_many("jobs (command steps)", f"more than {limits.jobs}", limits.jobs,
                            "HARMONT_MAX_BUILD_JOBS")
        step = _read_command_step(entry, where, outer_env=outer_env, limits=limits, default_image=default_image)
        _check_unique_key(step, seen)
        node = len(steps)
        steps.append(step)
        references.extend((node, kind, key) for kind, key in _flat_references(entry, step.where))
        if len(references) > limits.edges:
            raise _too_many("dependency edges (builds_in and depends_on)", f"more than {limits.edges}",
                            limits.edges, "HARMONT_MAX_BUILD_EDGES")
        if barrier is not None:
            waits.after[node] = barrier
        segments[-1].append(node)
    for barrier in set(waits.after.values()):
        waits.members[barrier] = segments[barrier]
        waits.segment.update((node, barrier) for node in segments[barrier])
    # A wait is stored as one edge per step before it and one per step after it.
    stored = len(references) + len(waits.after) + len(waits.segment)
    if stored > limits.edges:
        raise _too_many("dependency edges (builds_in, depends_on and waits)", stored, limits.edges,
                        "HARMONT_MAX_BUILD_EDGES")
    index_of = {step.job.key: node for node, step in enumerate(steps)}
    for node, kind, key in references:
        if key not in index_of:
            raise PlanError(
                "unknown_dependency",
                f"{steps[node].where} has {kind} {key!r}, but no step has that key.",
            )
        if index_of[key] == node:
            raise _invalid(f"{steps[node].where} names itself in {kind}.")
        edges.add((index_of[key], node, kind))
    return steps, edges, waits


def _flat_references(entry: dict, where: str) -> Iterable[tuple[str, str]]:
    """Yield the (kind, key) pairs a flat step uses to name its prerequisites."""
    parent = entry.get("builds_in")
    if parent is not None:
        if not isinstance(parent, str):
            raise _invalid(f"{where} 'builds_in' must be a step key, got {_show(parent)}.")
        yield BUILDS_IN, parent
    needs = entry.get("depends_on")
    if needs is None:
        return
    if not isinstance(needs, list) or not all(isinstance(key, str) for key in needs):
        raise _invalid(f"{where} 'depends_on' must be an array of step keys, got {_show(needs)}.")
    for key in needs:
        yield DEPENDS_ON, key


# --- ordering and assembly --------------------------------------------------


def _dependency_order(steps: list[_Step], edges: set[_Edge], waits: _Waits) -> list[int]:
    """Kahn's algorithm, always taking the earliest ready step in document order.

    So a document that is already in a valid order comes back unchanged, and
    any other one changes as little as possible. A wait is one extra node
    (numbered after the steps) between its segment and the steps after it: it
    is placed, unseen, the moment its last member is.
    """
    count = len(steps)
    barrier_node = {segment: count + i for i, segment in enumerate(sorted(waits.members))}
    children: list[list[int]] = [[] for _ in range(count + len(barrier_node))]
    waiting = [0] * len(children)  # unplaced prerequisites per node
    for source, target in _links(edges, waits, barrier_node):
        children[source].append(target)
        waiting[target] += 1
    ready = [node for node in range(count) if waiting[node] == 0]
    heapq.heapify(ready)
    order: list[int] = []
    placed = 0
    while ready:
        node = heapq.heappop(ready)
        order.append(node)
        placed += 1
        pending = [node]
        while pending:
            for child in children[pending.pop()]:
                waiting[child] -= 1
                if waiting[child] == 0:
                    if child >= count:
                        placed += 1
                        pending.append(child)
                    else:
                        heapq.heappush(ready, child)
    if placed < len(children):
        raise _cycle_error(steps, children, set(range(len(children))) - set(order) - {
            node for node in range(count, len(children)) if waiting[node] == 0})
    return order


def _links(edges: set[_Edge], waits: _Waits, barrier_node: dict[int, int]) -> set[tuple[int, int]]:
    """Every (prerequisite, dependant) pair of nodes, a wait through its barrier node."""
    links = {(source, target) for source, target, _kind in edges}
    links.update((node, barrier_node[segment]) for node, segment in waits.segment.items())
    links.update((barrier_node[segment], node) for node, segment in waits.after.items())
    return links


def _cycle_error(steps: list[_Step], children: list[list[int]], stuck: set[int]) -> PlanError:
    """Describe one concrete cycle among the nodes Kahn's algorithm could not place."""
    # Every stuck node still waits on some stuck prerequisite, so walking
    # prerequisites from any of them must eventually revisit a node.
    parents: dict[int, list[int]] = {node: [] for node in stuck}
    for source in stuck:
        for target in children[source]:
            if target in stuck:
                parents[target].append(source)
    path: list[int] = []
    seen_at: dict[int, int] = {}
    node = min(stuck)
    while node not in seen_at:
        seen_at[node] = len(path)
        path.append(node)
        node = min(parents[node])
    # Reversed: we walked towards prerequisites; a wait's barrier node is not shown.
    loop = [n for n in path[seen_at[node]:][::-1] if n < len(steps)]
    # Start at the earliest step so the message reads in document order.
    start = loop.index(min(loop))
    loop = loop[start:] + loop[:start]
    names = " -> ".join(steps[n].job.key for n in [*loop, loop[0]])
    return PlanError("cycle", f"The step dependencies form a cycle: {names}.")


def _assemble(steps: list[_Step], edges: set[_Edge], waits: _Waits, order: list[int], build_env: dict[str, str],
              limits: Limits, default_agents: dict[str, str] | None = None) -> tuple[PlannedJob, ...]:
    position = {node: index for index, node in enumerate(order)}
    prerequisites: dict[int, set[int]] = {node: set() for node in order}
    builds_in: dict[int, int] = {}
    for source, target, kind in edges:
        prerequisites[target].add(position[source])
        if kind == BUILDS_IN:
            builds_in[target] = position[source]
    # A segment's positions once, shared by every step waiting for it.
    members = {segment: tuple(sorted(position[node] for node in nodes)) for segment, nodes in waits.members.items()}
    sizes: dict[str, int] = {}
    stored = 0
    jobs = []
    for node in order:
        explicit, segment = prerequisites[node], waits.after.get(node)
        if segment is None:
            depends_on = tuple(sorted(explicit))
        elif explicit - set(members[segment]):
            depends_on = tuple(sorted(explicit.union(members[segment])))
        else:
            depends_on = members[segment]
        env = {**BASE_JOB_ENV, **steps[node].job.env, **build_env}
        stored += _check_env(env, steps[node].where, limits, sizes) + _utf8_size(steps[node].job.command)
        if stored > limits.build_bytes:
            raise PlanError(LIMIT_EXCEEDED, f"The jobs' commands and environments come to more than "
                                            f"{limits.build_bytes} bytes (HARMONT_MAX_BUILD_SPEC_BYTES).")
        jobs.append(replace(
            steps[node].job,
            index=position[node],
            env=env,
            builds_in=builds_in.get(node),
            depends_on=depends_on,
            segment=waits.segment.get(node),
            after_segment=segment,
            agents=agent_tags.effective_selector(steps[node].job.agents, default=default_agents,
                                                 runner=steps[node].job.runner),
        ))
    return tuple(jobs)


def _check_env(env: dict[str, str], where: str, limits: Limits, sizes: dict[str, int]) -> int:
    """A job's environment must fit what a process can be started with: each value, and all of it (its bytes)."""
    total = 0
    for name, value in env.items():
        # Layers are shared by many jobs: each string's size is computed once.
        size = sizes.get(value)
        if size is None:
            size = sizes[value] = _utf8_size(value)
        if size > limits.env_value_bytes:
            raise PlanError(LIMIT_EXCEEDED, f"{where} sets env {name[:80]!r} to {size} bytes; a value may have at "
                                            f"most {limits.env_value_bytes} (HARMONT_MAX_ENV_VALUE_BYTES).")
        total += size + _utf8_size(name)
    if total > limits.env_bytes:
        raise PlanError(LIMIT_EXCEEDED, f"{where} has an env of {total} bytes (names and values); at most "
                                        f"{limits.env_bytes} in all (HARMONT_MAX_ENV_BYTES).")
    return total
