"""Handing jobs to agents: a claim, and the claim that rides on a finish report.

A claim is one statement (`sql.assign_next_job`); a retried claim with the same
`claim_key` gets the job its first attempt took, with a new credential, never
a second job.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from django.utils import timezone

from builds import sql, states
from builds.models import Agent, Job, JobState
from builds.selectors import BuildsInLinks
from builds.services.agents import agent_seen
from builds.services.jobs import StartedIn, report_finish
from builds.services.logs import ChunkIn
from harmont import metrics
from harmont.tokens import JOB_CREDENTIAL_PREFIX, hash_secret, new_prefixed_secret


@dataclass(frozen=True)
class Claim:
    job: Job
    credential: str  # raw job-scoped credential; only its hash is stored


def claim_job(*, agent: Agent, now: datetime | None = None, claim_key: str | None = None) -> Claim | None:
    """Give `agent` the oldest scheduled job of its organization it may take, or None; the request also counts as seen.

    It may take a job whose selector its tags match and whose concurrency group
    (if any) has room; see `sql.assign_next_job`.

    A claim retried with the same `claim_key` gets the job the first attempt took.
    """
    now = now or timezone.now()
    agent_seen(agent=agent, now=now)
    claim = claim_for_agent(agent_id=agent.pk, organization_id=agent.organization_id, now=now, claim_key=claim_key)
    if claim is not None:
        claim.job.agent = agent
    return claim


def claim_for_agent(*, agent_id: uuid.UUID, organization_id: int, now: datetime | None = None,
                    claim_key: str | None = None, fresh: bool = True) -> Claim | None:
    """`claim_job` by the agent's id (a finish report's job names its agent; it needn't be loaded).

    The claim itself is one statement, which also answers the job's
    `builds_in` links and, on PostgreSQL, the job with its build and pipeline
    for the job spec (on SQLite a second query reads those). `fresh=False`:
    only re-answer the job already claimed under `claim_key` (a retried
    finish report).
    """
    now = now or timezone.now()
    credential = new_prefixed_secret(JOB_CREDENTIAL_PREFIX)
    assigned = sql.assign_next_job(organization_id=organization_id, agent_id=agent_id,
                                   credential_hash=hash_secret(credential), now=now, claim_key=claim_key,
                                   fresh=fresh)
    if assigned is None:
        return None
    job = assigned.job if assigned.job is not None else sql.claimed_job(assigned.job_id)
    if fresh and job.scheduled_at is not None:
        metrics.CLAIM_LATENCY.observe(max(0.0, (now - job.scheduled_at).total_seconds()))
    job.builds_in = BuildsInLinks(assigned.builds_in_parent_id, assigned.builds_in_children)
    if job.build.state in states.WAITING_BUILD_STATES:
        # Only after the claim committed, and without the build's lock: waiting for it
        # while holding the job's deadlocks with cancel_build / time_out_build, which
        # lock the build first and then update its scheduled jobs. A build read as past
        # `scheduled` (or `held`) needs nothing: builds never go back to either.
        states.mark_build_running(job.build_id)
    return Claim(job, credential)


@dataclass(frozen=True)
class FinishOutcome:
    state: str  # the job's state after the report
    # Only when the report asked for its agent's next job: whether an answer is due, and the claim (or None).
    answers_next: bool
    next: Claim | None


def finish_and_claim_next(*, job: Job, exit_code: int | None, signal: int | None = None,
                          outcome: str | None = None, error_code: str | None = None,
                          error_message: str | None = None, chunks: Sequence[ChunkIn] = (),
                          claim_next: bool = False, claim_key: str | None = None,
                          started: StartedIn | None = None) -> FinishOutcome:
    """`report_finish`, and with `claim_next` the agent's next job, which spares a busy agent a request per job.

    Only the report that ends the job claims a new one. A retried report (the
    job was already over as its credential was checked: its first answer got
    lost) gets again what its first attempt claimed under the same
    `claim_key`; without a key it gets no answer about a next job. As a claim
    with the agent's session would: the credential's check already refused a
    revoked agent token, and a stopped agent gets nothing more.
    """
    live = job.state not in states.TERMINAL_JOB_STATES
    state = report_finish(job=job, exit_code=exit_code, signal=signal, outcome=outcome, error_code=error_code,
                          error_message=error_message, chunks=chunks, started=started)
    if not claim_next or not (live or claim_key):
        return FinishOutcome(state, answers_next=False, next=None)
    claim = None
    if job.agent_id and job.agent_serving:
        claim = claim_for_agent(agent_id=job.agent_id, organization_id=job.organization_id, claim_key=claim_key,
                                fresh=live)
    return FinishOutcome(state, answers_next=True, next=claim)


def hand_back_claim(*, job_id: uuid.UUID, now: datetime | None = None) -> bool:
    """A claimed job whose answer never reached its agent goes back to the queue (assigned → scheduled).

    Only while it is still `assigned` to nobody's knowledge: once its agent
    reported a start it is the agent's. It keeps its place in the queue (its
    `scheduled_at`) and its concurrency slot, as any handed-back job does.
    """
    now = now or timezone.now()
    scheduled_at = Job.objects.filter(pk=job_id, state=JobState.ASSIGNED).values_list("scheduled_at", flat=True).first()
    if scheduled_at is None:
        return False
    return bool(states.transition_jobs([job_id], to=JobState.SCHEDULED, now=now, only_from=[JobState.ASSIGNED],
                                       scheduled_at=scheduled_at, agent=None, credential_hash=None, claim_key=None,
                                       assigned_at=None))
