"""The builds app's raw SQL, in one place (see harmont/rows.py for when and how SQL is written).

What the ORM can't say: the claim (`UPDATE ... RETURNING` over a
`FOR UPDATE SKIP LOCKED` subquery), a job's end that also reads its build's
other jobs (a data-modifying `WITH`), storing log chunks while learning which
were new (`INSERT ... ON CONFLICT DO NOTHING RETURNING`), and the log hub's poll
(a join against `unnest`ed arrays). And the reads every agent and API request
starts with, where the ORM's query building cost several times what the
database spends answering (numbers in bench/README.md).
"""

from __future__ import annotations

import functools
import hashlib
import json
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.db import connection, models

from builds import notices
from builds.models import (
    Agent,
    Build,
    ConcurrencySlot,
    EdgeKind,
    Job,
    JobDependency,
    JobState,
    LogChunk,
    WebhookEndpoint,
)
from harmont import claim_notices, prepared
from harmont.rows import Columns, Table, db_value, first_row
from organizations.models import AgentToken, Membership, Organization, User
from pipelines import agent_tags
from pipelines.models import Pipeline, Repository, Secret
from pipelines.secrets import SECRET_ROW

J = JobState
# builds.states.LIVE_JOB_STATES and TERMINAL_JOB_STATES (which imports this module).
_LIVE = frozenset({J.ASSIGNED, J.RUNNING, J.CANCELING, J.TIMING_OUT})
_ENDED = frozenset({J.PASSED, J.FAILED, J.SKIPPED, J.CANCELED, J.TIMED_OUT})


def _placeholders(count: int) -> str:
    return ", ".join(["%s"] * count)


# ------------------------------------------------------------------ job updates


@dataclass(frozen=True)
class Add:
    """A job column's new value: the column plus `amount` (for output counted without the job's row lock)."""

    amount: int


_JOB = Table(Job)
_ENDPOINT = Table(WebhookEndpoint, "w")
_EDGE = Table(JobDependency, "e")
_CHUNK, _CHUNK_C = Table(LogChunk), Table(LogChunk, "c")
# Unqualified job columns, for SET and WHERE of an UPDATE of the job table.
_JOB_COLUMNS = {field.name: _JOB.bare(field.name) for field in Job._meta.concrete_fields}


def _job_assignments(values: Mapping[str, object]) -> tuple[str, list[Any]]:
    """`col = %s, ...` and its parameters for an UPDATE of the job table, from field names and values."""
    assignments, params = [], []
    for name, value in values.items():
        column = _JOB_COLUMNS[name]
        if isinstance(value, Add):
            assignments.append(f"{column} = {column} + %s")
            params.append(value.amount)
        else:
            assignments.append(f"{column} = %s")
            params.append(db_value(Job, name, value.pk if isinstance(value, models.Model) else value))
    return ", ".join(assignments), params


def update_jobs(job_ids: Sequence[uuid.UUID], values: Mapping[str, object], *,
                only_from: Iterable[str] | None = None) -> int:
    """Set `values` on the given jobs (only those in one of the `only_from` states); returns rows changed.

    SQL rather than QuerySet.update(): every start, log shipment and finish of a
    job runs this, and the ORM's UPDATE cost 0.4 ms more CPU per job start
    (bench/README.md, "The house in order").
    """
    assignments, params = _job_assignments(values)
    where = f"{_JOB_COLUMNS['id']} IN ({_placeholders(len(job_ids))})"
    params += [db_value(Job, "id", job_id) for job_id in job_ids]
    if only_from is not None:
        sources = sorted(only_from)
        where += f" AND {_JOB_COLUMNS['state']} IN ({_placeholders(len(sources))})"
        params += sources
    with connection.cursor() as cursor:
        cursor.execute(f"UPDATE {_JOB} SET {assignments} WHERE {where}", params)
        return cursor.rowcount


@dataclass(frozen=True)
class JobEnd:
    changed: bool
    others: set[str]  # the distinct states of the build's other jobs
    # Whether a webhook endpoint of the job's organization subscribes to `listened_for`; None: not asked.
    listened: bool | None = None


def end_job(*, job_id: uuid.UUID, build_id: uuid.UUID, values: Mapping[str, object],
            sources: Sequence[str], unchanged: Mapping[str, object] | None = None,
            retried_as: str = "retried", soft_failed_as: str = "soft_failed",
            listened_for: str | None = None) -> JobEnd:
    """Compare-and-set one job (from one of `sources`) to `values`, and the states of its build's other jobs.

    `unchanged`: columns that must still hold the values the caller read (none may be NULL).
    A retried job's state is read as `retried_as`, a soft-failed one's as `soft_failed_as`
    (what builds.states.counted_state counts them as).

    The caller holds the build's lock, so the states read are every other
    job's as of now. Every end of one of the build's jobs queues for that
    lock: on PostgreSQL a data-modifying WITH does both in one round trip
    (its read sees the other jobs, not this statement's own update, which is
    why the job itself is left out of it). With `listened_for` (an event), the same
    statement also says whether any webhook endpoint of the organization wants it,
    which spares the job's end a query under the build's lock when none does.
    """
    t = _JOB
    assignments, params = _job_assignments(values)
    job, build = db_value(Job, "id", job_id), db_value(Job, "build", build_id)
    guards = "".join(f" AND {_JOB_COLUMNS[name]} = %s" for name in (unchanged or {}))
    update = (f"UPDATE {t} SET {assignments} WHERE {_JOB_COLUMNS['id']} = %s"
              f" AND {_JOB_COLUMNS['state']} IN ({_placeholders(len(sources))}){guards}")
    guard_values = [db_value(Job, name, value) for name, value in (unchanged or {}).items()]
    # soft_failed is only ever set on a failed job, so the CASE needs no test of the state.
    others = (f"SELECT DISTINCT CASE WHEN {t.retried} THEN %s WHEN {t.soft_failed} THEN %s ELSE {t.state} END"
              f" FROM {t} WHERE {t.build} = %s AND {t.id} <> %s")
    others_params = [retried_as, soft_failed_as, build, job]
    with prepared.cursor() as cursor:
        if connection.vendor == "postgresql":
            listens, listens_params = "NULL", []
            if listened_for is not None:
                w = _ENDPOINT
                listens = (f"EXISTS(SELECT 1 FROM {w} WHERE {w.organization} = (SELECT {t.organization} FROM {t}"
                           f" WHERE {t.id} = %s) AND {w.events} @> %s::jsonb)")
                listens_params = [job, json.dumps([listened_for])]
            cursor.execute(f"WITH ended AS ({update} RETURNING 1)"
                           f" SELECT (SELECT COUNT(*) FROM ended), ARRAY({others}), {listens}",
                           [*params, job, *sources, *guard_values, *others_params, *listens_params])
            changed, other_states, listened = cursor.fetchone()
            return JobEnd(bool(changed), set(other_states), listened)
        cursor.execute(update, [*params, job, *sources, *guard_values])
        if not cursor.rowcount:
            return JobEnd(False, set())
        cursor.execute(others, others_params)
        return JobEnd(True, {row[0] for row in cursor.fetchall()})


# ------------------------------------------------------------------ who hears of a build's event

_ER = Table(Repository, "r")


@functools.cache
def _event_receivers_sql(vendor: str) -> str:
    w = _ENDPOINT
    if vendor == "postgresql":
        subscribed = f"{w.events} @> %s::jsonb"
    else:
        subscribed = f"EXISTS (SELECT 1 FROM json_each({w.events}) e WHERE e.value = %s)"
    # The repository a build's commit statuses go to: as builds.services.notifications matches it.
    repository = (f"SELECT 1 FROM {_ER} WHERE {_ER.organization} = {_CP.organization}"
                  f" AND LOWER({_ER.repo_name}) = LOWER({_CP.repo_name}) AND {_ER.github_token_encrypted} <> ''")
    return (f"SELECT EXISTS (SELECT 1 FROM {w} WHERE {w.organization} = {_CP.organization} AND {subscribed}),"
            f" EXISTS ({repository})"
            f" FROM {_CB} JOIN {_CP} ON {_CP.id} = {_CB.pipeline} WHERE {_CB.id} = %s")


def build_event_receivers(build_id: uuid.UUID, event: str) -> tuple[bool, bool] | None:
    """Whether a webhook endpoint of the build's organization subscribes to `event`, and whether the
    build's commit statuses have a repository to go to (None: no such build).

    Every start and end of a build asks; nearly always nobody listens, and
    this one statement then spares the two queries that build the messages.
    """
    subscribed = json.dumps([event]) if connection.vendor == "postgresql" else event
    cells = first_row(_event_receivers_sql(connection.vendor), [subscribed, db_value(Build, "id", build_id)],
                      prepared=True)
    return None if cells is None else (bool(next(cells)), bool(next(cells)))


# ------------------------------------------------------------------ the build's lock

_RB = Table(Build, "b")
# What a job's end reads of its build under the build's lock (builds.states.RollUpInputs).
ROLL_UP_BUILD = Columns(Build, ("id", "state", "cancel_requested_at", "error_code", "started_at", "finished_at",
                                "reuses_jobs"))


@functools.cache
def _lock_build_sql(locks: bool) -> str:
    return f"SELECT {ROLL_UP_BUILD.select(_RB)} FROM {_RB} WHERE {_RB.id} = %s{' FOR UPDATE' if locks else ''}"


def lock_build_for_roll_up(build_id: uuid.UUID) -> dict[str, Any]:
    """Take the build's row lock (where the database has row locks) and read ROLL_UP_BUILD's columns.

    SQL: every end of a job runs it, under the lock it takes; building the ORM's
    `select_for_update().values_list().get()` cost more than the statement.
    """
    cells = first_row(_lock_build_sql(connection.features.has_select_for_update), [db_value(Build, "id", build_id)],
                      prepared=True)
    if cells is None:
        raise Build.DoesNotExist(f"no build {build_id}")
    return dict(zip(ROLL_UP_BUILD.attnames, ROLL_UP_BUILD.values(cells, connection)))


# ------------------------------------------------------------------ the claim


@dataclass(frozen=True)
class Assigned:
    job_id: Any
    builds_in_parent_id: uuid.UUID | None  # the job whose files this one starts from
    builds_in_children: bool  # some job starts from this one's files
    # On PostgreSQL the claim's statement also reads what `claimed_job` would; elsewhere None.
    job: Job | None = None


# Jobs stored before selectors existed (agents NULL) want what a job without one wants.
_NO_SELECTOR = json.dumps(agent_tags.job_selector(None))
_DEFAULT_TAGS = json.dumps(agent_tags.effective_tags(None))
_SLOT = Table(ConcurrencySlot, "s")
_HOLDER = Table(Job, "h")
_PARENT = Table(Job, "pj")


def _selector_matches(t: Table) -> str:
    """SQL: every rule of job `t`'s selector matches one of the claiming agent's tags (the CTE/subquery `me`).

    PostgreSQL: `LIKE` over the glob translated (backslash, `%`, `_` escaped, then
    `*` → `%`, `?` → `_`); SQLite: `GLOB`, with `[` made literal. Both are
    case-sensitive, as agent_tags.glob_match. Per job row read, so the claim
    stays a range scan of the claim index that stops at the first match.
    """
    if connection.vendor == "postgresql":
        like = ("replace(replace(replace(replace(replace(r.value, '\\', '\\\\'), '%%', '\\%%'), '_', '\\_'),"
                " '*', '%%'), '?', '_')")
        # Most jobs want exactly queue=default: for them one comparison and the agent's answer,
        # worked out once per statement, instead of expanding both maps for every row read.
        return (f"CASE WHEN {t.agents} = '{_NO_SELECTOR}'::jsonb THEN (SELECT tags FROM me) @> '{_NO_SELECTOR}'::jsonb"
                f" ELSE NOT EXISTS (SELECT 1 FROM jsonb_each_text(COALESCE({t.agents}, '{_NO_SELECTOR}'::jsonb)) r"
                f" WHERE NOT EXISTS (SELECT 1 FROM jsonb_each_text((SELECT tags FROM me)) a"
                f" WHERE a.key = r.key AND a.value LIKE {like} ESCAPE '\\')) END")
    return (f"NOT EXISTS (SELECT 1 FROM json_each(COALESCE({t.agents}, '{_NO_SELECTOR}')) r"
            f" WHERE NOT EXISTS (SELECT 1 FROM json_each((SELECT tags FROM me)) a"
            f" WHERE a.key = r.key AND a.value GLOB replace(r.value, '[', '[[]')))")


def _live(t: Table) -> str:
    return f"{t.state} IN ({', '.join(repr(str(state)) for state in sorted(_LIVE))})"


def _slot_free(s: Table) -> str:
    """SQL: slot `s` has no holder or its holder has ended.

    "Ended", not "not live": a holder read as scheduled in this statement's
    snapshot may have been claimed (into this very slot) by a racer that
    committed since. When PostgreSQL re-checks a row locked FOR UPDATE, it
    re-reads the slot but judges its new holder from the old snapshot, where
    that holder is still scheduled: "not live" would call the slot free again.
    An ended job never runs again, whichever snapshot says so.

    A job handed back to `scheduled` (assigned → scheduled) keeps its slot from
    other jobs until it is claimed again, when it may take that same slot
    (the claim also accepts a slot whose holder is the job itself).
    """
    h = _HOLDER
    ended = ", ".join(repr(str(state)) for state in sorted(_ENDED))
    # A scalar subquery, not EXISTS: PostgreSQL turns `OR EXISTS (...)` into a hash of every
    # ended job's id; this stays one primary-key lookup per slot read.
    return f"({s.holder} IS NULL OR (SELECT {h.state} FROM {h} WHERE {h.id} = {s.holder}) IN ({ended}))"


@functools.cache
def _claim_sql(fresh: bool) -> str:
    """The claim's statement (see `assign_next_job`), built once per form."""
    t, e, c = _JOB, _EDGE, _JOB_COLUMNS
    held = f"SELECT {t.id} FROM {t} WHERE {t.claim_key} = %s AND {t.agent} = %s AND {t.state} = %s LIMIT 1"
    assign = ", ".join(f"{c[name]} = %s" for name in ("state", "agent", "credential_hash", "claim_key",
                                                       "assigned_at", "last_heartbeat_at"))
    guard = f" AND ({c['state']} = %s OR ({c['state']} = %s AND {c['claim_key']} = %s AND {c['agent']} = %s))"
    # The parent a child starts from: the job a step cache hit reuses, when its parent is one.
    pj = _PARENT
    links = (f"(SELECT COALESCE({pj.reused_job}, {e.prerequisite}) FROM {e} JOIN {pj} ON {pj.id} = {e.prerequisite}"
             f" WHERE {e.job} = {t.id} AND {e.kind} = %s LIMIT 1) AS parent,"
             f" EXISTS (SELECT 1 FROM {e} WHERE {e.prerequisite} = {t.id} AND {e.kind} = %s) AS children")
    # PostgreSQL answers the job's CLAIMED_JOB columns as the update left them (see _claimed_read).
    returning = f" RETURNING {t.id}, {links}"
    claimed_returning = f" RETURNING {CLAIMED_JOB.select(t)}, {links}"
    if not fresh:
        retry = f"UPDATE {t} SET {assign} WHERE {c['id']} = ({held}){guard}"
        if connection.vendor != "postgresql":
            return retry + returning
        return f"WITH claimed AS ({retry}{claimed_returning}){_claimed_read('FALSE')}"
    a, s, j = Table(Agent, "ag"), _SLOT, Table(Job, "j")
    me = f"SELECT json_patch(%s, {a.tags}) AS tags FROM {a} WHERE {a.id} = %s"
    waiting = f"{j.organization} = %s AND {j.state} = %s AND {_selector_matches(j)}"
    order = f" ORDER BY {j.scheduled_at}, {j.position} LIMIT 1"
    if connection.vendor != "postgresql":
        # SQLite runs one writing statement at a time, and this one reads the live jobs of the
        # group as of now: a plain count is exact here.
        h = _HOLDER
        room = (f"({j.concurrency_group} IS NULL OR (SELECT COUNT(*) FROM {h} WHERE {h.organization} = {j.organization}"
                f" AND {h.concurrency_group} = {j.concurrency_group} AND {_live(h)}) < {j.concurrency})")
        oldest = f"SELECT {j.id} FROM {j} WHERE {waiting} AND {room}{order}"
        # COALESCE evaluates the oldest-job subquery only when no held job answers.
        return (f"WITH me AS ({me}) UPDATE {t} SET {assign} WHERE {c['id']} = COALESCE(({held}), ({oldest}))"
                f"{guard}{returning}")
    # PostgreSQL. Counting the group's live jobs here would not be safe: under READ COMMITTED
    # two claimers each miss the other's uncommitted claim and both take a job. Instead the
    # statement takes a slot row of the group (ConcurrencySlot) and the job only together.
    me = f"SELECT %s::jsonb || {a.tags} AS tags FROM {a} WHERE {a.id} = %s"
    room = (f"({j.concurrency_group} IS NULL OR EXISTS (SELECT 1 FROM {s} WHERE {s.organization} = {j.organization}"
            f" AND {s.group} = {j.concurrency_group} AND {s.index} < {j.concurrency}"
            f" AND ({_slot_free(s)} OR {s.holder} = {j.id})))")
    slot_table = connection.ops.quote_name(ConcurrencySlot._meta.db_table)
    holder, slot_id = _SLOT.bare("holder"), _SLOT.bare("id")
    return (
        f"WITH held AS ({held}), me AS ({me}),"
        # The oldest waiting job this agent may take whose group (if any) looks to have room;
        # skipping rows other claimers hold, as before.
        f" candidate AS (SELECT {j.id} AS id, {j.concurrency_group} AS grp, {j.concurrency} AS n FROM {j}"
        f" WHERE NOT EXISTS (SELECT 1 FROM held) AND {waiting} AND {room}{order} FOR UPDATE OF j SKIP LOCKED),"
        # A free slot of its group below its own concurrency, locked so a racer skips it. After
        # the lock the row is re-checked: a slot a racer took meanwhile is no longer free.
        f" free AS (SELECT {s.id} AS id FROM {s} JOIN candidate ON {s.group} = candidate.grp"
        f" WHERE {s.organization} = %s AND {s.index} < candidate.n AND ({_slot_free(s)} OR {s.holder} = candidate.id)"
        f" ORDER BY {s.index} LIMIT 1 FOR UPDATE OF s SKIP LOCKED),"
        f" taken AS (UPDATE {slot_table} SET {holder} = (SELECT id FROM candidate)"
        f" WHERE {slot_id} = (SELECT id FROM free) RETURNING 1),"
        # The job only with its slot: if every free slot went to racers, nothing is claimed.
        f" target AS (SELECT id FROM held UNION ALL"
        f" SELECT id FROM candidate WHERE grp IS NULL OR EXISTS (SELECT 1 FROM taken)),"
        f" claimed AS (UPDATE {t} SET {assign} WHERE {c['id']} = (SELECT id FROM target LIMIT 1){guard}"
        f"{claimed_returning})"
        + _claimed_read("EXISTS (SELECT 1 FROM candidate)")
    )


def _claimed_read(picked: str) -> str:
    """PostgreSQL: the claim's answer, one row always: the claimed job (or NULLs), whether a job was
    picked at all (`picked`: false after a lost slot race), and what `claimed_job` reads with the job.

    The build and the pipeline are read in the claim's own statement: a round trip less per claim.
    """
    build = _JOB.bare("build")
    return (f" SELECT claimed.*, {picked}, {CLAIMED_BUILD.select(_CB)}, {CLAIMED_PIPELINE.select(_CP)},"
            f" {_claimed_secrets('postgresql')}"
            f" FROM (SELECT 1) one LEFT JOIN claimed ON TRUE LEFT JOIN {_CB} ON {_CB.id} = claimed.{build}"
            f" LEFT JOIN {_CP} ON {_CP.id} = {_CB.pipeline}")


# A claim that lost every free slot of its job's group to racers tries again, this often.
CLAIM_ATTEMPTS = 5


def assign_next_job(*, organization_id: int, agent_id: uuid.UUID, credential_hash: str, now: datetime,
                    claim_key: str | None = None, fresh: bool = True) -> Assigned | None:
    """scheduled → assigned for the oldest scheduled job of the organization the agent may take (None: none).

    The answer also carries the job's `builds_in` links, which its spec needs.

    One statement, autocommitted, so the claimed row is locked for no longer
    than the statement itself. On PostgreSQL `FOR UPDATE SKIP LOCKED` lets racing
    agents each take a different row instead of queueing on the oldest one; the
    locked row's state is checked again under the lock, so it is still
    `scheduled`. SQLite runs one writing statement at a time, so there the
    statement alone decides. Either way one job goes to exactly one agent.

    A job is taken only by an agent whose tags match its selector (`Job.agents`,
    read with the agent's own tags inside the statement), and a job of a
    concurrency group only while fewer than `concurrency` of the group are
    live: on PostgreSQL by taking one of the group's slot rows in the same
    statement (a data-modifying WITH). Jobs that can't be taken are passed over,
    oldest first. A claim whose free slots all went to racers claims nothing
    and is tried again, up to CLAIM_ATTEMPTS statements.

    `claim_key` makes a retried claim safe: a job this agent already holds under
    the same key (its answer was lost on the way) is answered again, with a new
    credential that replaces the lost one, instead of a second job being taken.
    With `fresh=False` only that re-answer is possible.
    """
    agent = db_value(Job, "agent", agent_id)
    held = [claim_key, agent, J.ASSIGNED]
    params = [J.ASSIGNED, agent, credential_hash, claim_key, db_value(Job, "assigned_at", now),
              db_value(Job, "last_heartbeat_at", now)]
    guard = [J.SCHEDULED, J.ASSIGNED, claim_key, agent, EdgeKind.BUILDS_IN, EdgeKind.BUILDS_IN]
    waiting = [organization_id, J.SCHEDULED]
    me = [_DEFAULT_TAGS, agent]
    if not fresh:
        params = [*params, *held, *guard]
    elif connection.vendor == "postgresql":
        params = [*held, *me, *waiting, organization_id, *params, *guard]
    else:
        params = [*me, *params, *held, *waiting, *guard]
    if connection.vendor == "postgresql":
        return _assign_on_postgresql(params, fresh)
    with connection.cursor() as cursor:
        cursor.execute(_claim_sql(fresh), params)
        row = cursor.fetchone()
    if row is None or row[0] is None:
        return None
    job_id, parent_id, children = row[:3]
    return Assigned(job_id, None if parent_id is None else uuid.UUID(str(parent_id)), bool(children))


def _assign_on_postgresql(params: list[Any], fresh: bool) -> Assigned | None:
    with prepared.cursor() as cursor:
        for _attempt in range(CLAIM_ATTEMPTS):
            cursor.execute(_claim_sql(fresh), params)
            cells = iter(cursor.fetchone())
            job = CLAIMED_JOB.load(cells, connection)
            parent_id, children, picked = next(cells), next(cells), next(cells)
            if job.pk is not None:
                break
            if not (fresh and picked):
                return None  # nothing this agent may take (not a lost race)
        else:
            return None
    _attach_claimed_build(job, cells)
    return Assigned(job.pk, None if parent_id is None else uuid.UUID(str(parent_id)), bool(children), job)


# What the job spec reads of the build and the pipeline (builds.services.job_specs),
# read along with the job; anything else loads on first use. The job's large JSON
# columns are left out too.
_CJ, _CB, _CP = Table(Job, "j"), Table(Build, "b"), Table(Pipeline, "p")
CLAIMED_JOB = Columns(Job, [f.name for f in Job._meta.concrete_fields
                            if f.name not in ("cache", "runner_args", "retry_policy", "soft_fail_policy",
                                              "automatic_retries")])
CLAIMED_BUILD = Columns(Build, ("id", "pipeline", "number", "state", "branch", "commit", "source_archive",
                                "source_url", "source_sha256", "fork", "secret_access", "discovers_pipelines"))
CLAIMED_PIPELINE = Columns(Pipeline, ("id", "organization", "slug", "repository", "source_slug"))
_CS = Table(Secret, "s")


def _claimed_secrets(vendor: str) -> str:
    # The secrets of the organization and the pipeline ride along as one JSON array of SECRET_ROW
    # arrays (a job that may not have them ignores them): one round trip less per claim.
    row = ", ".join(getattr(_CS, name.removesuffix("_id")) for name in SECRET_ROW)
    array, aggregate = ("json_build_array", "json_agg") if vendor == "postgresql" else ("json_array", "json_group_array")
    return (f"(SELECT {aggregate}({array}({row})) FROM {_CS} WHERE {_CS.organization} = {_CP.organization}"
            f" AND ({_CS.pipeline} IS NULL OR {_CS.pipeline} = {_CP.id}))")


@functools.cache
def _claimed_job_sql(vendor: str) -> str:
    return (f"SELECT {CLAIMED_JOB.select(_CJ)}, {CLAIMED_BUILD.select(_CB)}, {CLAIMED_PIPELINE.select(_CP)},"
            f" {_claimed_secrets(vendor)}"
            f" FROM {_CJ} JOIN {_CB} ON {_CB.id} = {_CJ.build} JOIN {_CP} ON {_CP.id} = {_CB.pipeline}"
            f" WHERE {_CJ.id} = %s")


def claimed_job(job_id: Any) -> Job:
    """The job with the columns of its build and pipeline that the spec reads, and the secrets it may get
    (`secret_rows`, for pipelines.secrets.compose_secrets), in one query.

    SQL, because building the ORM's three-table query was a sixth of a busy
    server's CPU.
    """
    cells = first_row(_claimed_job_sql(connection.vendor), [db_value(Job, "id", job_id)], prepared=True)
    assert cells is not None, "a job just claimed exists"
    job = CLAIMED_JOB.load(cells, connection)
    _attach_claimed_build(job, cells)
    return job


def _attach_claimed_build(job: Job, cells: Iterator[Any]) -> None:
    """The rest of a claimed job's row: its build, its pipeline and the secrets it may get."""
    job.build = CLAIMED_BUILD.load(cells, connection)
    job.build.pipeline = CLAIMED_PIPELINE.load(cells, connection)
    secrets = next(cells)
    if isinstance(secrets, str):  # SQLite answers the JSON as text
        secrets = json.loads(secrets)
    job.secret_rows = [tuple(row) for row in secrets or ()]


# ------------------------------------------------------------------ agent credentials

# Every agent request starts with one of the two lookups below: building the same
# query with the ORM cost three to four times as much CPU as running it.
_SA, _ST = Table(Agent, "a"), Table(AgentToken, "t")
# The tags: a long-poll claim that finds nothing says them (builds.claim_waits).
SESSION_AGENT = Columns(Agent, ("id", "organization", "name", "last_seen_at", "tags"))
AGENT_FOR_SESSION_SQL = (
    f"SELECT {SESSION_AGENT.select(_SA)} FROM {_SA} JOIN {_ST} ON {_ST.id} = {_SA.token}"
    f" WHERE {_SA.session_hash} = %s AND {_SA.stopped_at} IS NULL AND {_ST.revoked_at} IS NULL"
)


@functools.cache
def _session_sql(vendor: str) -> str:
    """The session lookup; on PostgreSQL it also refreshes the agent's last-seen time.

    An idle agent's claims come 30 s apart, so each would find its last-seen time
    stale and pay a second statement to write it (about a fifth of an idle claim's
    CPU). On PostgreSQL a data-modifying WITH writes it in the lookup itself, for a
    serving agent whose time is older than the cutoff; the lookup answers the new
    time, so builds.services.agents.agent_seen finds nothing to do. SQLite has no
    such WITH: there agent_seen writes it.
    """
    if vendor != "postgresql":
        return AGENT_FOR_SESSION_SQL
    agents, tokens = Table(Agent), Table(AgentToken)
    seen = (f"UPDATE {agents} SET {agents.bare('last_seen_at')} = %s WHERE {agents.session_hash} = %s"
            f" AND {agents.stopped_at} IS NULL AND {agents.last_seen_at} < %s"
            f" AND {agents.token} IN (SELECT {tokens.id} FROM {tokens} WHERE {tokens.revoked_at} IS NULL)"
            f" RETURNING {agents.last_seen_at}")
    fresh = f"COALESCE((SELECT {agents.bare('last_seen_at')} FROM seen), {_SA.last_seen_at})"
    columns = SESSION_AGENT.select(_SA).replace(_SA.last_seen_at, fresh)
    return f"WITH seen AS ({seen}) {AGENT_FOR_SESSION_SQL.replace(SESSION_AGENT.select(_SA), columns, 1)}"


def agent_for_session(session_hash: str, *, now: datetime, stale_before: datetime) -> Agent | None:
    """The agent whose session hashes to `session_hash` (None: unknown, stopped, or its agent token was revoked).

    On PostgreSQL, also sets its last-seen time to `now` if it is older than `stale_before`.
    """
    if connection.vendor == "postgresql":
        params = [db_value(Agent, "last_seen_at", now), session_hash, db_value(Agent, "last_seen_at", stale_before),
                  session_hash]
    else:
        params = [session_hash]
    cells = first_row(_session_sql(connection.vendor), params, prepared=True)
    return None if cells is None else SESSION_AGENT.load(cells, connection)


_CrJ, _CrB, _CrA, _CrT = Table(Job, "j"), Table(Build, "b"), Table(Agent, "a"), Table(AgentToken, "t")
# The retry and soft-fail columns decide what a finish report does (builds.services.retries).
CREDENTIAL_JOB = Columns(Job, ("id", "build", "organization", "kind", "state", "timeout_seconds", "error_code",
                               "error_message", "log_bytes", "log_truncated", "agent", "retry_policy",
                               "soft_fail_policy", "automatic_retries", "attempt", "cache_key"))
JOB_FOR_CREDENTIAL_SQL = (
    f"SELECT {CREDENTIAL_JOB.select(_CrJ)}, {_CrA.last_seen_at} >= %s, {_CrA.stopped_at} IS NULL,"
    f" {_CrB.started_at} IS NOT NULL"
    f" FROM {_CrJ} JOIN {_CrB} ON {_CrB.id} = {_CrJ.build}"
    f" LEFT JOIN {_CrA} ON {_CrA.id} = {_CrJ.agent} LEFT JOIN {_CrT} ON {_CrT.id} = {_CrA.token}"
    f" WHERE {_CrJ.credential_hash} = %s AND ({_CrJ.agent} IS NULL OR {_CrT.revoked_at} IS NULL)"
    # Every terminal transition sets finished_at (and nothing else does): an ended job's
    # credential opens nothing once its grace is over.
    f" AND ({_CrJ.finished_at} IS NULL OR {_CrJ.finished_at} >= %s)"
)


def job_for_credential(credential_hash: str, *, seen_since: datetime, ended_since: datetime) -> Job | None:
    """The job a job credential opens (None: unknown, its agent's token was revoked, or it ended before `ended_since`).

    Also, as plain attributes: `agent_seen_recently` (its agent was seen since
    `seen_since`), `agent_serving` (the agent has not stopped) and
    `build_started` (its build has a start time).
    """
    cells = first_row(JOB_FOR_CREDENTIAL_SQL, [db_value(Agent, "last_seen_at", seen_since), credential_hash,
                                               db_value(Job, "finished_at", ended_since)], prepared=True)
    if cells is None:
        return None
    job = CREDENTIAL_JOB.load(cells, connection)
    job.agent_seen_recently, job.agent_serving, job.build_started = (bool(next(cells)), bool(next(cells)),
                                                                      bool(next(cells)))
    return job


# ------------------------------------------------------------------ the build behind an API URL

# What the Build serializer shows (plus what cancel and the log routes use).
SCOPED_BUILD_FIELDS = ("id", "number", "state", "branch", "commit", "message", "source", "fork", "secret_access",
                       "error_code", "error_message", "rebuild_of", "created_at", "scheduled_at", "started_at",
                       "finished_at", "cancel_requested_at", "waiting_reason", "pipeline")
# Every build-scoped request runs it: the ORM spent about 1 ms of CPU building and
# compiling this four-table join, PostgreSQL about 0.3 ms planning and answering it.
# It loads what `select_related("pipeline__organization").only(*SCOPED_BUILD_FIELDS,
# "pipeline__slug", "pipeline__organization__slug")` would, plus the caller's role; the
# pages' variant also the pipeline's name and who triggered the build (a left join the
# API, which shows neither, doesn't pay for).
_B, _P, _O, _M, _U = (Table(Build, "b"), Table(Pipeline, "p"), Table(Organization, "o"), Table(Membership, "m"),
                      Table(User, "u"))


@dataclass(frozen=True)
class _ScopedBuildRead:
    build: Columns[Build]
    pipeline: Columns[Pipeline]
    organization: Columns[Organization]
    creator: Columns[User] | None
    sql: str


def _scoped_build_read(*, for_page: bool) -> _ScopedBuildRead:
    build = Columns(Build, SCOPED_BUILD_FIELDS + (("created_by",) if for_page else ()))
    pipeline = Columns(Pipeline, ("id", "organization", "slug") + (("name",) if for_page else ()))
    organization = Columns(Organization, ("id", "slug"))
    creator = Columns(User, ("id", "email")) if for_page else None
    select = f"{build.select(_B)}, {pipeline.select(_P)}, {organization.select(_O)}"
    joins = (f" JOIN {_P} ON {_P.id} = {_B.pipeline} JOIN {_O} ON {_O.id} = {_P.organization}"
             f" JOIN {_M} ON {_M.organization} = {_O.id}")
    if creator is not None:
        select += f", {creator.select(_U)}"
        joins += f" LEFT JOIN {_U} ON {_U.id} = {_B.created_by}"
    return _ScopedBuildRead(build, pipeline, organization, creator, (
        f"SELECT {select}, {_M.role} FROM {_B}{joins}"
        f" WHERE {_O.slug} = %s AND {_M.user} = %s AND {_P.slug} = %s AND {_P.archived_at} IS NULL"
        f" AND {_B.number} = %s"))


SCOPED_BUILD_READS = {for_page: _scoped_build_read(for_page=for_page) for for_page in (False, True)}


def scoped_build(*, org_slug: str, pipeline_slug: str, number: int, user_id: int,
                 for_page: bool = False) -> Build | None:
    """Build `number` of an unarchived pipeline of an organization user `user_id` belongs to, or None.

    The build comes with `pipeline` and `pipeline.organization` loaded and the
    caller's role as `caller_role` (with `for_page`, also the pipeline's name
    and `created_by`); its other columns are deferred.
    """
    read = SCOPED_BUILD_READS[for_page]
    cells = first_row(read.sql, [org_slug, user_id, pipeline_slug, number], prepared=True)
    if cells is None:
        return None
    build = read.build.load(cells, connection)
    build.pipeline = read.pipeline.load(cells, connection)
    build.pipeline.organization = read.organization.load(cells, connection)
    if read.creator is not None:
        creator = read.creator.load(cells, connection)
        build.created_by = creator if creator.pk is not None else None
    build.caller_role = next(cells)
    return build


# ------------------------------------------------------------------ log chunks

# Rows per INSERT: 6 parameters each stays far below SQLite's limit on parameters.
INSERT_BATCH = 500
# Batches of up to this many chunks are inserted with a prepared statement (one per size).
PREPARED_CHUNK_ROWS = 8
_INSERT_CHUNKS = (f"INSERT INTO {_CHUNK} ("
                  + ", ".join(_CHUNK.bare(name) for name in ("job", "seq", "stream_kind", "content", "ts", "created_at"))
                  + ") VALUES ")
_SKIP_STORED_CHUNKS = (f" ON CONFLICT ({_CHUNK.bare('job')}, {_CHUNK.bare('seq')}) DO NOTHING"
                       f" RETURNING {_CHUNK.bare('seq')}")


def insert_chunks(job_id: uuid.UUID, rows: Sequence[tuple[int, int, str, int]], now: datetime) -> set[int]:
    """Insert (seq, stream kind, content, ts in ns) rows unless their seq is stored; returns the seqs inserted.

    SQL because the ORM's insert that skips conflicts can't tell which rows it
    skipped; `RETURNING` does (PostgreSQL, and SQLite since 3.35).
    """
    inserted: set[int] = set()
    job = db_value(LogChunk, "job", job_id)
    created = db_value(LogChunk, "created_at", now)
    for start in range(0, len(rows), INSERT_BATCH):
        part = rows[start:start + INSERT_BATCH]
        params: list[Any] = []
        for seq, stream_kind, content, ts in part:
            params += [job, seq, int(stream_kind), content, ts, created]
        # A few rows, what a quick job's finish carries, come often enough to keep prepared (and
        # bound by the server: no quoting of the output into the statement's text).
        with (prepared.cursor() if len(part) <= PREPARED_CHUNK_ROWS else connection.cursor()) as cursor:
            cursor.execute(
                _INSERT_CHUNKS + ", ".join(["(%s, %s, %s, %s, %s, %s)"] * len(part)) + _SKIP_STORED_CHUNKS,
                params,
            )
            inserted.update(seq for (seq,) in cursor.fetchall())
    return inserted


_UPDATES_J = Table(Job, "j")
_UPDATES_SQL = (
    f"SELECT {_UPDATES_J.id}, {_UPDATES_J.state}, {_CHUNK_C.seq}, {_CHUNK_C.stream_kind}, {_CHUNK_C.content},"
    f" {_CHUNK_C.ts} FROM unnest(%s::uuid[], %s::integer[]) AS w(job_id, seq)"
    f" JOIN {_UPDATES_J} ON {_UPDATES_J.id} = w.job_id"
    f" LEFT JOIN {_CHUNK_C} ON {_CHUNK_C.job} = w.job_id AND {_CHUNK_C.seq} > w.seq"
    f" ORDER BY {_UPDATES_J.id}, {_CHUNK_C.seq}"
)


def updates_after(cursors: Mapping[uuid.UUID, int]) -> tuple[dict[uuid.UUID, str], list[tuple]]:
    """PostgreSQL: the watched jobs' states, and (job id, seq, stream kind, content, ts) of every chunk
    past its job's cursor, in order.

    One statement, so one snapshot: a job seen ended here has every chunk it stored in the same
    answer. Hundreds of watched jobs: one join against two array parameters (the ORM's OR of per-job
    conditions costs the process far more to build than the database to answer).
    """
    with connection.cursor() as cursor:
        cursor.execute(_UPDATES_SQL, [list(cursors), list(cursors.values())])
        rows = cursor.fetchall()
    states = {job_id: state for job_id, state, *_ in rows}
    return states, [(job_id, seq, kind, content, ts) for job_id, _, seq, kind, content, ts in rows if seq is not None]


# ------------------------------------------------------------------ waking long-polling claims (PostgreSQL)

# What builds.claim_waits listens to (harmont.claim_notices). The triggers post `j <organization>
# <selector JSON or empty>`: a job with this selector may be claimable now.
_TRIGGER_FUNCTIONS = ("harmont_claims_jobs_inserted", "harmont_claims_job_scheduled", "harmont_claims_slot_freed")
_TRIGGERS = ("harmont_claims_on_insert", "harmont_claims_on_schedule", "harmont_claims_on_group_end")


def claim_notification_sql() -> list[str]:
    """The triggers that tell waiting claims about claimable jobs, whichever code path made them so.

    Triggers rather than calls beside every transition: jobs become scheduled
    in a build's insert, the settle, admission, retries and the reaper's hand
    backs, and one missed path would leave an agent asleep beside a job. A
    NOTIFY is delivered when its transaction commits, and identical payloads of
    one transaction are delivered once. The insert trigger is per statement (a
    1,000-job build notifies once per selector); the update triggers are per row
    but filtered by their WHEN, which PostgreSQL checks without calling the
    function, so heartbeats and log appends cost nothing here.
    """
    jobs, t = Table(Job), Table(Job, "w")
    state, org, agents, group = (jobs.bare(name) for name in ("state", "organization", "agents", "concurrency_group"))
    ended = ", ".join(f"'{s}'" for s in sorted(_ENDED))
    notify = f"pg_notify('{claim_notices.CHANNEL}', 'j ' || %s || ' ' || COALESCE(%s::text, ''))"
    return [
        f"CREATE OR REPLACE FUNCTION harmont_claims_jobs_inserted() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
        f" PERFORM {notify % ('r.org', 'r.agents')}"
        f" FROM (SELECT DISTINCT {org} AS org, {agents} AS agents FROM inserted_jobs WHERE {state} = '{J.SCHEDULED}') r;"
        f" RETURN NULL; END $$",
        f"CREATE TRIGGER harmont_claims_on_insert AFTER INSERT ON {jobs} REFERENCING NEW TABLE AS inserted_jobs"
        f" FOR EACH STATEMENT EXECUTE FUNCTION harmont_claims_jobs_inserted()",
        f"CREATE OR REPLACE FUNCTION harmont_claims_job_scheduled() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
        f" PERFORM {notify % (f'NEW.{org}', f'NEW.{agents}')}; RETURN NULL; END $$",
        f"CREATE TRIGGER harmont_claims_on_schedule AFTER UPDATE OF {state} ON {jobs} FOR EACH ROW"
        f" WHEN (NEW.{state} = '{J.SCHEDULED}' AND OLD.{state} <> '{J.SCHEDULED}')"
        f" EXECUTE FUNCTION harmont_claims_job_scheduled()",
        # A concurrency group's live job ended: the group's waiting jobs may have room now.
        f"CREATE OR REPLACE FUNCTION harmont_claims_slot_freed() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
        f" PERFORM {notify % ('NEW.' + org, 'r.agents')}"
        f" FROM (SELECT DISTINCT {t.agents} AS agents FROM {t} WHERE {t.organization} = NEW.{org}"
        f" AND {t.concurrency_group} = NEW.{group} AND {t.state} = '{J.SCHEDULED}') r;"
        f" RETURN NULL; END $$",
        f"CREATE TRIGGER harmont_claims_on_group_end AFTER UPDATE OF {state} ON {jobs} FOR EACH ROW"
        f" WHEN (NEW.{group} IS NOT NULL AND NEW.{state} IN ({ended}) AND OLD.{state} NOT IN ({ended}))"
        f" EXECUTE FUNCTION harmont_claims_slot_freed()",
    ]


_LOG_TRIGGER_FUNCTIONS = ("harmont_logs_appended", "harmont_logs_job_ended")
_LOG_TRIGGERS = (("harmont_logs_on_append", LogChunk), ("harmont_logs_on_end", Job))


def log_notification_sql() -> list[str]:
    """The triggers that tell live log streams (builds.stream) a job has news: chunks appended, or its end.

    Per statement for the appends (one notice per job an append's batch wrote,
    however many chunks), per row but filtered by WHEN for a job's end, so
    heartbeats and other updates of the jobs table cost nothing here.
    """
    chunks, jobs = Table(LogChunk), Table(Job)
    state = jobs.bare("state")
    ended = ", ".join(f"'{s}'" for s in sorted(_ENDED))
    return [
        f"CREATE OR REPLACE FUNCTION harmont_logs_appended() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
        f" PERFORM pg_notify('{notices.LOG_CHANNEL}', r.job::text)"
        f" FROM (SELECT DISTINCT {chunks.bare('job')} AS job FROM appended_chunks) r;"
        f" RETURN NULL; END $$",
        f"CREATE TRIGGER harmont_logs_on_append AFTER INSERT ON {chunks} REFERENCING NEW TABLE AS appended_chunks"
        f" FOR EACH STATEMENT EXECUTE FUNCTION harmont_logs_appended()",
        f"CREATE OR REPLACE FUNCTION harmont_logs_job_ended() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
        f" PERFORM pg_notify('{notices.LOG_CHANNEL}', NEW.{jobs.bare('id')}::text); RETURN NULL; END $$",
        f"CREATE TRIGGER harmont_logs_on_end AFTER UPDATE OF {state} ON {jobs} FOR EACH ROW"
        f" WHEN (NEW.{state} IN ({ended}) AND OLD.{state} NOT IN ({ended}))"
        f" EXECUTE FUNCTION harmont_logs_job_ended()",
    ]


def drop_log_notification_sql() -> list[str]:
    return ([f"DROP TRIGGER IF EXISTS {name} ON {Table(model)}" for name, model in _LOG_TRIGGERS]
            + [f"DROP FUNCTION IF EXISTS {name}()" for name in _LOG_TRIGGER_FUNCTIONS])


def drop_claim_notification_sql() -> list[str]:
    jobs = Table(Job)
    return ([f"DROP TRIGGER IF EXISTS {name} ON {jobs}" for name in _TRIGGERS]
            + [f"DROP FUNCTION IF EXISTS {name}()" for name in _TRIGGER_FUNCTIONS])



# ------------------------------------------------------------------ test results


def lock_commit_test_results(*, pipeline_id: int, commit: str) -> None:
    """Serialise the writers of one pipeline's test results for one commit (callers are inside a transaction).

    Flaky marking (builds.services.test_results) reads the other reports of the
    commit and writes its own: two at once would each miss the other's rows. A
    transaction-scoped advisory lock on PostgreSQL, so no row that builds and
    jobs lock on their hot paths is held; SQLite's IMMEDIATE transactions
    serialise writers already.
    """
    if connection.vendor != "postgresql":
        return
    digest = hashlib.sha256(f"test-results\x00{pipeline_id}\x00{commit}".encode()).digest()
    key = int.from_bytes(digest[:8], "big", signed=True)
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_xact_lock(%s)", [key])


# ------------------------------------------------------------------ a pipeline's build list

# The API's busiest list (builds.api.PipelineBuildsView, unfiltered). Through the ORM a 50-build
# page spent most of its CPU building and compiling the query and on its 200 timestamps, which
# psycopg parsed from text, Django moved to UTC and the serializer formatted back into text. On
# PostgreSQL the statement writes the ids and times as the JSON shows them: the whole request
# went from about 4.8 to 2.1 ms of CPU, first page or 9,000 deep alike. The pipeline is a
# scalar subquery, not a join: PostgreSQL then walks the (pipeline, number) index backwards for
# one page, where the join sorted every build of the pipeline (0.2 against 11 ms for 10,000).
_LB, _LP = Table(Build, "b"), Table(Pipeline, "p")
# The API's strftime patterns for times, as to_char says them; `US` is %f's six digits, leading
# zeros kept. Any other pattern is applied in Python, to times loaded as the ORM loads them.
TO_CHAR_FORMATS = {"%Y-%m-%dT%H:%M:%S.%fZ": 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'}


@dataclass(frozen=True)
class _BuildListRead:
    sql: str
    loaded: Columns[Build] | None  # what to convert the cells with; None: the statement gave them as text


def _text_cell(name: str, to_char: str) -> str:
    column, field = getattr(_LB, name), Build._meta.get_field(name)
    if isinstance(field, models.DateTimeField):
        return f"to_char({column} AT TIME ZONE 'UTC', '{to_char}')"
    return f"{column}::text" if isinstance(field, models.UUIDField) else column


@functools.cache
def _build_list_read(columns: tuple[str, ...], to_char: str | None, after: bool) -> _BuildListRead:
    loaded: Columns[Build] | None = None
    if to_char is None:
        loaded = Columns(Build, columns)
        select = loaded.select(_LB)
    else:
        select = ", ".join(_text_cell(name, to_char) for name in columns)
    pipeline = (f"SELECT {_LP.id} FROM {_LP} WHERE {_LP.organization} = %s AND {_LP.slug} = %s"
                f" AND {_LP.archived_at} IS NULL")
    return _BuildListRead(
        f"SELECT {select} FROM {_LB} WHERE {_LB.pipeline} = ({pipeline})"
        f"{f' AND {_LB.number} < %s' if after else ''} ORDER BY {_LB.number} DESC LIMIT %s", loaded)


@dataclass(frozen=True)
class BuildListRows:
    # formatted: tuples of the cells of `columns` as the JSON shows them (the statement wrote them);
    # else dicts of the values as the ORM loads them, which the serializers format.
    rows: list[Any]
    formatted: bool


def pipeline_builds(*, columns: tuple[str, ...], organization_id: int, pipeline_slug: str, before: int | None,
                    limit: int, time_format: str) -> BuildListRows:
    """The cells of `columns` of up to `limit` builds of the organization's unarchived pipeline `pipeline_slug`.

    Newest first, numbers below `before` if given. On PostgreSQL, for a `time_format`
    (strftime pattern) it can say, the statement writes the UUIDs as text and the times
    as text in UTC; elsewhere the values come as the ORM loads them.
    """
    to_char = TO_CHAR_FORMATS.get(time_format) if connection.vendor == "postgresql" else None
    read = _build_list_read(columns, to_char, before is not None)
    params = [organization_id, pipeline_slug, *(() if before is None else (before,)), limit]
    with connection.cursor() as cursor:
        cursor.execute(read.sql, params)
        rows = cursor.fetchall()
    if read.loaded is None:
        return BuildListRows(rows, formatted=True)
    attnames = read.loaded.attnames
    return BuildListRows([dict(zip(attnames, read.loaded.values(iter(row), connection))) for row in rows],
                         formatted=False)
