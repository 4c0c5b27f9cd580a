"""Reads of builds and jobs used in more than one place; no writes here (those are builds.services)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db.models import Count, Prefetch, Q, QuerySet
from django.db.models.fields.files import FieldFile
from django.utils import timezone

from builds import sql, states
from builds.models import Agent, Artifact, Build, EdgeKind, Job, JobDependency, JobState
from harmont.errors import ApiError
from harmont.serializers import parse_uuid
from harmont.tokens import hash_secret
from organizations.models import Organization, User
from pipelines import agent_tags
from pipelines.models import Visibility

# "Last seen" is shown to the second at best; refreshing it on every request of a busy
# agent would be a write per request for nothing (builds.services.agents).
AGENT_SEEN_RESOLUTION = timedelta(seconds=2)
# The longest a claim is held waiting for a job (builds.claim_waits): under the idle timeouts of
# common load balancers.
MAX_CLAIM_WAIT_SECONDS = 30
# The agents list (API and page) shows agents seen this recently.
AGENT_LIST_WINDOW = timedelta(days=1)


def agent_for_session(raw: str) -> Agent | None:
    """The agent an agent session belongs to (None: unknown, stopped, or its agent token was revoked).

    The request counts as seen: on PostgreSQL the lookup writes the last-seen time
    itself (see builds.sql.agent_for_session), elsewhere builds.services.agents.agent_seen does.
    """
    now = timezone.now()
    return sql.agent_for_session(hash_secret(raw), now=now, stale_before=now - AGENT_SEEN_RESOLUTION)


def job_for_credential(raw: str, *, now: datetime | None = None) -> Job | None:
    """The job a job credential opens (None: unknown, its agent's token was revoked, or the job ended).

    A job that ended keeps its credential for JOB_CREDENTIAL_GRACE_SECONDS after
    `finished_at`, so that an agent whose finish report's answer was lost can
    send it again (and be told the same); after that the credential is dead.

    Also, as plain values: `agent_seen_recently` (the job's agent was seen
    within AGENT_SEEN_RESOLUTION of `now`) and `build_started` (its build has
    a start time), which spare `agent_seen_by` and `start_job` a write, and
    `agent_serving` (the agent has not stopped, so it may claim more jobs).
    """
    now = now or timezone.now()
    return sql.job_for_credential(hash_secret(raw), seen_since=now - AGENT_SEEN_RESOLUTION,
                                  ended_since=now - timedelta(seconds=settings.JOB_CREDENTIAL_GRACE_SECONDS))


# Build numbers are PostgreSQL integers; a larger number in a URL is simply no build.
MAX_BUILD_NUMBER = 2**31 - 1


def scoped_build(*, org_slug: str, pipeline_slug: str, number: int, user: User,
                 for_page: bool = False) -> Build | None:
    """Build `number` of an unarchived pipeline of an organization `user` belongs to, or None.

    The one lookup behind every build-scoped API route and page: the build
    comes with `pipeline` and `pipeline.organization` loaded and the caller's
    role as `caller_role` (`for_page`: also what the pages show of the
    pipeline and of who triggered it); its other columns are deferred.
    """
    if not 0 <= number <= MAX_BUILD_NUMBER:
        return None
    return sql.scoped_build(org_slug=org_slug, pipeline_slug=pipeline_slug, number=number, user_id=user.pk,
                            for_page=for_page)


def pipeline_builds(*, org: Organization, pipeline_slug: str, before: int | None, limit: int,
                    columns: tuple[str, ...], time_format: str) -> sql.BuildListRows:
    """The cells of `columns` of up to `limit` builds of the org's pipeline, newest first, below `before` if given.

    As the API's JSON shows them (see builds.sql.pipeline_builds); an unknown
    pipeline has no builds.
    """
    if before is not None:
        # A cursor's key beyond either end of the numbers means what that end means, as a value
        # every database takes (SQLite refuses integers past 64 bits).
        before = min(max(before, 0), MAX_BUILD_NUMBER + 1)
    return sql.pipeline_builds(columns=columns, organization_id=org.pk, pipeline_slug=pipeline_slug, before=before,
                               limit=limit, time_format=time_format)


def public_build(*, org_slug: str, pipeline_slug: str, number: int) -> Build | None:
    """Build `number` of an unarchived public pipeline of the organization `org_slug`, or None: what a visitor sees.

    One query, loading what the build page shows of the build, its pipeline and
    organization (`scoped_build`'s columns), and nothing of who triggered it.
    """
    if not 0 <= number <= MAX_BUILD_NUMBER:
        return None
    return (Build.objects.select_related("pipeline__organization")
            .only(*sql.SCOPED_BUILD_FIELDS, "pipeline__id", "pipeline__slug", "pipeline__name",
                  "pipeline__organization__id", "pipeline__organization__slug", "pipeline__organization__name",
                  "pipeline__visibility")
            .filter(pipeline__organization__slug=org_slug, pipeline__slug=pipeline_slug, number=number,
                    pipeline__archived_at__isnull=True, pipeline__visibility=Visibility.PUBLIC)
            .first())


def jobs_with_prerequisites(build: Build) -> QuerySet[Job]:
    """The build's jobs, each with its prerequisite edges prefetched in dependency order (one more query).

    The edges alone miss what a job waits for through a wait (`after_segment`):
    `build_jobs` and `build_job` give every prerequisite.
    """
    edges = JobDependency.objects.order_by("prerequisite__position").only("job_id", "prerequisite_id", "kind")
    return Job.objects.filter(build=build).prefetch_related(Prefetch("prerequisite_edges", queryset=edges))


def build_jobs(build: Build, *, fields: tuple[str, ...] = (), include_retried: bool = False) -> list[Job]:
    """The build's jobs in dependency order, each with `prerequisite_ids`: every prerequisite, in position order.

    Two queries (the jobs, their edges) however the prerequisites are stored: a
    wait's are the jobs of a segment, which are among the jobs read. Jobs
    waiting for one segment share one list. The latest attempt of each step
    only, unless `include_retried`: then each older attempt comes just before
    the one that retried it (a step's attempts share its position).
    """
    jobs_qs = jobs_with_prerequisites(build).order_by("position", "attempt")
    if not include_retried:
        jobs_qs = jobs_qs.filter(retried=False)
    if fields:
        jobs_qs = jobs_qs.only(*fields, "position", "segment", "after_segment", "attempt", "retried")
    jobs = list(jobs_qs)
    position = {job.pk: job.position for job in jobs}
    members: dict[int, list[uuid.UUID]] = {}
    for job in jobs:
        # What a wait waits for is the segment's latest attempts.
        if job.segment is not None and not job.retried:
            members.setdefault(job.segment, []).append(job.pk)
    for job in jobs:
        explicit = [edge.prerequisite_id for edge in job.prerequisite_edges.all()]
        waited = members.get(job.after_segment, []) if job.after_segment is not None else []
        if not waited:
            job.prerequisite_ids = explicit
        elif set(explicit) <= set(waited):
            job.prerequisite_ids = waited
        else:
            job.prerequisite_ids = sorted(set(explicit) | set(waited), key=position.__getitem__)
    return jobs


def build_job(build: Build, job_id: str | uuid.UUID) -> Job | None:
    """One job of the build with `prerequisite_ids` (see `build_jobs`), in two queries; None for no such job."""
    pk = parse_uuid(job_id)
    job = Job.objects.filter(build=build, pk=pk).first() if pk is not None else None
    if job is None:
        return None
    through = Q(dependent_edges__job_id=job.pk)
    if job.after_segment is not None:
        through |= Q(segment=job.after_segment, retried=False)
    job.prerequisite_ids = list(Job.objects.filter(through, build=build).order_by("position").distinct()
                                .values_list("id", flat=True))
    return job


def builds_in_parent(job: Job) -> Job | None:
    """The job whose files `job` starts from, or None: its `builds_in` parent, or the job that one reuses."""
    edge = (JobDependency.objects.select_related("prerequisite__reused_job")
            .filter(job=job, kind=EdgeKind.BUILDS_IN).first())
    if edge is None:
        return None
    return edge.prerequisite.reused_job or edge.prerequisite


def parent_workspace(job: Job) -> tuple[Job, FieldFile]:
    """The `builds_in` parent of a live job and the workspace it left; 404 `workspace_not_found` otherwise."""
    parent = builds_in_parent(job)
    if job.state not in states.LIVE_JOB_STATES or parent is None or not parent.workspace_archive:
        raise ApiError("workspace_not_found", "No workspace from this job's builds_in parent.")
    return parent, parent.workspace_archive


def parent_snapshot(job: Job) -> tuple[Job, FieldFile]:
    """The `builds_in` parent of a live job and its filesystem snapshot; 404 `snapshot_not_found` otherwise."""
    parent = builds_in_parent(job)
    if job.state not in states.LIVE_JOB_STATES or parent is None or not parent.snapshot_image:
        raise ApiError("snapshot_not_found", "No filesystem snapshot from this job's builds_in parent.")
    return parent, parent.snapshot_image


def build_source(job: Job, build_id: str) -> FieldFile:
    """The uploaded source of build `build_id`, for a live job of that build; 404 `source_not_found` otherwise.

    One code for every refusal: what the agent learns is that there is no
    source for it, whether the build lacks one or is not its own.
    """
    if str(job.build_id) != build_id or job.state not in states.LIVE_JOB_STATES:
        raise ApiError("source_not_found", "This credential does not open that build's source.")
    if not job.build.source_archive:
        raise ApiError("source_not_found", "This build has no uploaded source.")
    return job.build.source_archive


@dataclass(frozen=True)
class BuildsInLinks:
    parent_id: uuid.UUID | None  # the job whose files this one starts from
    has_children: bool  # some job starts from this one's files


def builds_in_links(job: Job) -> BuildsInLinks:
    """Both directions of the job's `builds_in` edges, in one query (none for a claim's job, which has them)."""
    if hasattr(job, "builds_in"):  # read with the job by the claim
        return job.builds_in
    edges = JobDependency.objects.filter(Q(job=job) | Q(prerequisite=job), kind=EdgeKind.BUILDS_IN).values_list(
        "job_id", "prerequisite_id", "prerequisite__reused_job_id")
    parent = None
    children = False
    for job_id, prerequisite_id, reused_id in edges:
        if job_id == job.pk:
            parent = reused_id or prerequisite_id  # a cache hit's child starts from what the reused job left
        else:
            children = True
    return BuildsInLinks(parent, children)


def find_job(*, build: Build, job_id: str | uuid.UUID, fields: tuple[str, ...] = ()) -> Job | None:
    """The build's job with this id (None for another build's, or an id that is no UUID); `fields`: `.only()`."""
    pk = parse_uuid(job_id)
    if pk is None:
        return None
    jobs = Job.objects.filter(build=build, pk=pk)
    return (jobs.only(*fields) if fields else jobs).first()


def find_artifact(*, build: Build, artifact_id: str | uuid.UUID) -> Artifact | None:
    """The build's artifact with this id (None for another build's, or an id that is no UUID)."""
    pk = parse_uuid(artifact_id)
    return None if pk is None else Artifact.objects.filter(build=build, pk=pk).first()


def agent_silence_allowed() -> timedelta:
    """How long an idle agent may go unseen and still be connected: the heartbeat timeout, plus the
    longest a claim is held (an agent is seen when each attempt of its claim begins)."""
    return timedelta(seconds=settings.AGENT_HEARTBEAT_TIMEOUT_SECONDS + MAX_CLAIM_WAIT_SECONDS)


def connection_state(agent: Agent, now: datetime) -> str:
    """stopped (exited cleanly), lost (silent past agent_silence_allowed), or connected."""
    if agent.stopped_at is not None:
        return "stopped"
    return "lost" if now - agent.last_seen_at > agent_silence_allowed() else "connected"


def recent_agents_query(org: Organization, *, now: datetime) -> QuerySet[Agent]:
    """The organization's agents seen within AGENT_LIST_WINDOW, with their tokens and live jobs (two queries).

    Pass what it yields through `with_status` for `connection_state` and `current_job`.
    """
    live = Job.objects.filter(state__in=states.LIVE_JOB_STATES).select_related("build__pipeline").only(
        "id", "agent_id", "state", "step_key", "build__number", "build__pipeline__slug")
    return (Agent.objects.filter(organization=org, last_seen_at__gte=now - AGENT_LIST_WINDOW)
            .select_related("token").prefetch_related(Prefetch("jobs", queryset=live, to_attr="live_jobs")))


def with_status(agents: list[Agent], *, now: datetime) -> list[Agent]:
    """Each agent of `recent_agents_query` with `connection_state`, `tags_label` (its tags as the page
    shows them, implied queue included) and `current_job`: the job it holds (with the build number
    and pipeline slug shown beside it), or None."""
    for agent in agents:
        agent.connection_state = connection_state(agent, now)
        agent.tags_label = agent_tags.describe(agent_tags.effective_tags(agent.tags))
        agent.current_job = agent.live_jobs[0] if agent.live_jobs else None
    return agents


def recent_agents(org: Organization, *, now: datetime) -> list[Agent]:
    """All of the organization's agents seen within AGENT_LIST_WINDOW, most recently seen first (the agents page)."""
    return with_status(list(recent_agents_query(org, now=now).order_by("-last_seen_at")), now=now)


# Distinct tag sets of connected agents read for the waiting reasons: far more than any
# fleet has, and it keeps that read bounded however many agents connect.
WAITING_REASON_TAG_SETS = 1000


def with_waiting_reasons(jobs: list[Job], *, organization_id: int, now: datetime | None = None) -> list[Job]:
    """Each job with `waiting_reason`: for a scheduled job nobody can take yet, why; else None.

    "waiting for an agent with queue=arm64" when no connected agent's tags match
    its selector, "waiting for concurrency group X (2 of 2 running)" when its
    group is full. Two queries when some job is scheduled (the connected agents'
    distinct tag sets, the live jobs per group), none otherwise, however many
    jobs there are. Advice for people, read without locks: the claim decides.
    """
    for job in jobs:
        job.waiting_reason = None
    waiting = [job for job in jobs if job.state == JobState.SCHEDULED]
    if not waiting:
        return jobs
    now = now or timezone.now()
    connected = (Agent.objects.filter(organization_id=organization_id, stopped_at__isnull=True,
                                      last_seen_at__gte=now - agent_silence_allowed())
                 .order_by().values_list("tags", flat=True).distinct()[:WAITING_REASON_TAG_SETS])
    tag_sets = list(connected)
    groups = {job.concurrency_group for job in waiting if job.concurrency_group is not None}
    running: dict[str, int] = {}
    if groups:
        running = dict(Job.objects.filter(organization_id=organization_id, concurrency_group__in=groups,
                                          state__in=states.LIVE_JOB_STATES)
                       .order_by().values_list("concurrency_group").annotate(n=Count("id")))
    for job in waiting:
        selector = agent_tags.job_selector(job.agents)
        if not any(agent_tags.selector_matches(selector, tags) for tags in tag_sets):
            job.waiting_reason = f"waiting for an agent with {agent_tags.describe(selector)}"
        elif job.concurrency_group is not None and running.get(job.concurrency_group, 0) >= (job.concurrency or 1):
            job.waiting_reason = (f"waiting for concurrency group {job.concurrency_group} "
                                  f"({running[job.concurrency_group]} of {job.concurrency} running)")
    return jobs
