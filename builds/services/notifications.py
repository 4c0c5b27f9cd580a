"""Commit statuses on GitHub and outbound webhooks: recorded with the change they tell about, posted by tasks.

A build or job event writes its `Notification` rows in the transaction that
makes the change (`record_build_event`, `record_jobs_finished`), so a process
dying right after the commit loses none. After the commit a task per lane
(`deliver_lane`: one build's messages to one receiver) posts them one at a
time, oldest first: a message waits while an older one of its lane is being
retried, so a receiver sees each build's events in order. A failed attempt is
retried with exponential backoff (HARMONT_DELIVERY_RETRY_SECONDS, doubling)
until the channel's window is over: an hour for commit statuses, a day for
webhooks. Delivery is at least once: a task that dies between the post and its
record leaves the claim to expire, and the reaper's sweep posts it again, with
the same `webhook-id`.

A commit status is only worth its newest state: one that a newer status of its
lane replaces before it went out is `superseded`, not posted.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Iterable
from datetime import datetime, timedelta, timezone as dt_timezone
from typing import Any
from urllib.parse import quote

from django.conf import settings
from django.db import transaction
from django.db.models import F, OuterRef, Q, QuerySet, Subquery
from django.db.models.functions import Lower
from django.urls import reverse
from django.utils import timezone
from rest_framework.settings import api_settings
from standardwebhooks.webhooks import Webhook

from builds import outbound, sql
from builds.models import (
    Build,
    BuildState,
    Notification,
    NotificationAttempt,
    NotificationChannel,
    NotificationStatus,
    WebhookEndpoint,
    WebhookEvent,
)
from builds.serializers import JobSerializer, build_data
from harmont.crypto import decrypt_text
from pipelines.models import Repository

logger = logging.getLogger(__name__)

C, S = NotificationChannel, NotificationStatus

# A commit id as git prints it in full (SHA-1, or SHA-256 repositories).
FULL_COMMIT = re.compile(r"[0-9a-f]{40}(?:[0-9a-f]{24})?")

# How long a message is tried before it is `failed`: its last attempt starts at this age.
WINDOW = {C.COMMIT_STATUS: timedelta(hours=1), C.WEBHOOK: timedelta(hours=24)}
# The longest wait between two attempts (the doubling stops there).
LONGEST_DELAY = {C.COMMIT_STATUS: timedelta(minutes=5), C.WEBHOOK: timedelta(hours=1)}

# GitHub's limit on a status's description.
DESCRIPTION_MAX = 140
USER_AGENT = "harmont-server"


def is_full_commit(value: str | None) -> bool:
    return bool(value) and FULL_COMMIT.fullmatch(value or "") is not None


def _lease() -> timedelta:
    return timedelta(seconds=settings.TASK_LEASE_SECONDS)


def _timestamp(at: datetime) -> str:
    # As the API writes its times (REST_FRAMEWORK's DATETIME_FORMAT, in UTC).
    return at.astimezone(dt_timezone.utc).strftime(api_settings.DATETIME_FORMAT)


def lane_of(channel: str, receiver: object, build_id: uuid.UUID) -> str:
    return f"{channel}:{receiver}:{build_id}"


# ------------------------------------------------------------------ recording (inside the change's transaction)


def _events_build(build_id: uuid.UUID) -> Build | None:
    """The build as an event tells about it, with the repository its commit statuses go to (`status_repository_id`)."""
    with_token = (Repository.objects.alias(name_lower=Lower("repo_name"))
                  .filter(organization_id=OuterRef("pipeline__organization_id"),
                          name_lower=Lower(OuterRef("pipeline__repo_name")))
                  .exclude(github_token_encrypted="").values("pk")[:1])
    return (Build.objects.select_related("pipeline__organization").defer("pipeline_ir", "env")
            .annotate(status_repository_id=Subquery(with_token)).filter(pk=build_id).first())


def _subscribed(endpoints: Iterable[WebhookEndpoint], event: str) -> list[WebhookEndpoint]:
    # Few per organization: filtered here, since SQLite can't look inside a JSON list in a query.
    return [endpoint for endpoint in endpoints if event in (endpoint.events or [])]


def _message(*, build: Build, channel: str, event: str, payload: dict[str, Any], now: datetime,
             endpoint: WebhookEndpoint | None = None, repository_id: int | None = None,
             job_id: uuid.UUID | None = None) -> Notification:
    receiver = endpoint.pk if endpoint is not None else repository_id
    return Notification(
        message_id=f"msg_{uuid.uuid4().hex}", organization_id=build.pipeline.organization_id, build_id=build.pk,
        job_id=job_id, channel=channel, endpoint=endpoint, repository_id=repository_id,
        lane=lane_of(channel, receiver, build.pk), event=event, payload=payload, created_at=now, due_at=now,
        sweep_at=now + _lease())


def _record(rows: list[Notification]) -> None:
    if not rows:
        return
    Notification.objects.bulk_create(rows)
    lanes = sorted({row.lane for row in rows})
    # robust: the sweep hands the lanes over if this enqueue fails (their sweep_at comes due).
    transaction.on_commit(lambda: enqueue_lanes(lanes), robust=True)


def build_page_url(build: Build) -> str:
    return settings.PUBLIC_URL + reverse("builds_ui:build", args=[build.pipeline.organization.slug,
                                                                  build.pipeline.slug, build.number])


def commit_status(build: Build, event: str) -> tuple[str, str]:
    """The GitHub status state and description that a build event means."""
    number = f"Build #{build.number}"
    if event == WebhookEvent.BUILD_FINISHED:
        return {
            BuildState.PASSED: ("success", f"{number} passed"),
            BuildState.SKIPPED: ("success", f"{number} was skipped: nothing to run"),
            BuildState.CANCELED: ("error", f"{number} was canceled"),
        }.get(build.state, ("failure", f"{number} failed" + (f": {build.error_code}" if build.error_code else "")))
    if event == WebhookEvent.BUILD_STARTED:
        return "pending", f"{number} is running"
    if event == REOPENED:
        return "pending", f"{number} is running again (a job was retried)"
    if build.state == BuildState.HELD:
        return "pending", f"{number} waits for a member's approval"
    if build.waiting_reason:
        return "pending", f"{number} is waiting: {build.waiting_reason}"
    return "pending", f"{number} is scheduled"


# Not a webhook event: a finished build that a retry set running again gets its status back to pending.
REOPENED = "build.reopened"


def record_build_event(*, build_id: uuid.UUID, event: str, now: datetime | None = None) -> int:
    """Record what `event` of the build tells the outside world; returns the messages recorded.

    Call inside the transaction that makes the change. One query when nobody
    listens (builds.sql.build_event_receivers), three when somebody does.
    """
    receivers = sql.build_event_receivers(build_id, event)
    if receivers is None:
        return 0
    endpoints_listen, has_status_repository = receivers
    if event == REOPENED:
        endpoints_listen = False  # a reopened build tells only its commit status
    if not (endpoints_listen or has_status_repository):
        return 0
    now = now or timezone.now()
    build = _events_build(build_id)
    if build is None:
        return 0
    rows: list[Notification] = []
    if endpoints_listen:
        endpoints = _subscribed(WebhookEndpoint.objects.filter(organization_id=build.pipeline.organization_id),
                                event)
        if endpoints:
            payload = {"type": event, "timestamp": _timestamp(now),
                       "organization": build.pipeline.organization.slug, "data": build_data(build)}
            rows += [_message(build=build, channel=C.WEBHOOK, event=event, payload=payload, now=now, endpoint=endpoint)
                     for endpoint in endpoints]
    if build.status_repository_id is not None:
        state, description = commit_status(build, event)
        payload = {"state": state, "description": description[:DESCRIPTION_MAX],
                   "target_url": build_page_url(build), "context": f"harmont/{build.pipeline.slug}"}
        rows.append(_message(build=build, channel=C.COMMIT_STATUS, event=event, payload=payload, now=now,
                             repository_id=build.status_repository_id))
    _record(rows)
    return len(rows)


def record_jobs_finished(*, build_id: uuid.UUID, job_ids: Iterable[uuid.UUID], state: str | None = None,
                         now: datetime | None = None) -> int:
    """`job.finished` for the given jobs of one build that just ended; returns the messages recorded.

    With `state`, only the jobs now in that state that ended at `now` (the
    ones a compare-and-set over several jobs moved, not those another writer
    ended before). One query when no endpoint listens.
    """
    ids = set(job_ids)
    if not ids:
        return 0
    endpoints = _subscribed(WebhookEndpoint.objects.filter(organization__pipelines__builds__id=build_id),
                            WebhookEvent.JOB_FINISHED)
    if not endpoints:
        return 0
    from builds import selectors  # selectors read through the services' models; imported late like the tasks

    now = now or timezone.now()
    build = _events_build(build_id)
    if build is None:
        return 0
    if len(ids) == 1:  # an agent's report: the job alone, not the whole build per job end
        one = selectors.build_job(build, next(iter(ids)))
        candidates = [one] if one is not None else []
    else:
        candidates = [job for job in selectors.build_jobs(build, include_retried=True) if job.pk in ids]
    jobs = [job for job in candidates if state is None or (job.state == state and job.finished_at == now)]
    rows = []
    summary = {"id": str(build.pk), "number": build.number, "pipeline_slug": build.pipeline.slug,
               "state": build.state}
    for job in jobs:
        payload = {"type": WebhookEvent.JOB_FINISHED.value, "timestamp": _timestamp(now),
                   "organization": build.pipeline.organization.slug, "build": summary,
                   "data": JobSerializer(job).data}
        rows += [_message(build=build, channel=C.WEBHOOK, event=WebhookEvent.JOB_FINISHED, payload=payload, now=now,
                          endpoint=endpoint, job_id=job.pk) for endpoint in endpoints]
    _record(rows)
    return len(rows)


def record_checked_out_commit(*, build_id: uuid.UUID, commit: str, now: datetime | None = None) -> bool:
    """An agent checked out `commit` for a build whose commit was no full id (`HEAD`, a branch, a short id).

    From now on the build's `commit` is that id (later jobs check out the same
    one), and its commit statuses that waited for it go out. False when the
    build already had a full id (one compare-and-set, nothing else).
    """
    if not is_full_commit(commit):
        raise ValueError("not a full commit id")
    now = now or timezone.now()
    with transaction.atomic():
        changed = Build.objects.filter(pk=build_id).exclude(commit__regex=r"^[0-9a-f]{40}([0-9a-f]{24})?$").update(
            commit=commit)
        if not changed:
            return False
        waiting = Notification.objects.filter(build_id=build_id, channel=C.COMMIT_STATUS, status=S.QUEUED,
                                              due_at__isnull=True)
        lanes = sorted(set(waiting.values_list("lane", flat=True)))
        if lanes:
            waiting.update(due_at=now, sweep_at=now + _lease())
            transaction.on_commit(lambda: enqueue_lanes(lanes), robust=True)
    return True


# ------------------------------------------------------------------ delivering (tasks)


def enqueue_lanes(lanes: Iterable[str], *, run_after: datetime | None = None) -> None:
    from builds.tasks import deliver_notifications  # the task module imports the services

    task = deliver_notifications if run_after is None else deliver_notifications.using(run_after=run_after)
    for lane in lanes:
        task.enqueue(lane)


class _Outgoing:
    def __init__(self, url: str, headers: dict[str, str], body: bytes) -> None:
        self.url, self.headers, self.body = url, headers, body


class _Hold(Exception):
    """The message can't go out yet (a commit status waits for its commit)."""


class _Undeliverable(Exception):
    """The message can never go out: it ends `failed` with this reason."""


def deliver_lane(*, lane: str, now: datetime | None = None, limit: int = 100) -> int:
    """Post the lane's queued messages in order until one must wait; returns how many were delivered.

    Safe to run twice, also at once: the oldest queued message is claimed with
    a compare-and-set on `claimed_until` before its attempt, and while another
    task holds it this one leaves the lane alone, so two posts of one lane
    never overlap and arrive out of order.
    """
    delivered = 0
    for _ in range(limit):
        at = now or timezone.now()
        head = (Notification.objects.select_related("endpoint", "repository")
                .filter(lane=lane, status=S.QUEUED).order_by("id").first())
        if head is None or (head.claimed_until is not None and head.claimed_until > at):
            break
        if head.channel == C.COMMIT_STATUS and _supersede_older(lane, at):
            continue  # the head is the newest status now
        if head.due_at is None or head.due_at > at:
            break
        claimed = (Notification.objects.filter(pk=head.pk, status=S.QUEUED)
                   .filter(Q(claimed_until__isnull=True) | Q(claimed_until__lte=at))
                   .update(claimed_until=at + _lease(), sweep_at=at + _lease()))
        if not claimed:
            break  # another task took it just now
        try:
            outgoing = _request(head, at)
        except _Hold:
            if _hold(head):
                break
            continue  # its commit was reported meanwhile: try it again
        except _Undeliverable as exc:
            Notification.objects.filter(pk=head.pk).update(status=S.FAILED, last_error=str(exc), claimed_until=None,
                                                           sweep_at=None)
            continue  # nothing will ever come of it: the lane goes on
        answer = outbound.post(outgoing.url, headers=outgoing.headers, body=outgoing.body,
                               timeout=settings.DELIVERY_TIMEOUT_SECONDS,
                               public_only=head.channel == C.WEBHOOK and not settings.WEBHOOK_ALLOW_PRIVATE_ADDRESSES)
        outcome = _record_attempt(head, answer, at)
        if outcome == S.DELIVERED:
            delivered += 1
        elif outcome != S.FAILED:
            break  # it is retried later, and the rest of the lane waits for it
    return delivered


def _hold(message: Notification) -> bool:
    """Park a commit status until its build's commit is known; False when it is known by now.

    Decided under the build's row lock: `record_checked_out_commit` updates
    that row before it looks for parked statuses, so either it sees this one
    parked, or this sees its commit. (SQLite has one writer at a time anyway.)
    """
    with transaction.atomic():
        commit = (Build.objects.select_for_update().filter(pk=message.build_id)
                  .values_list("commit", flat=True).first())
        if commit is not None and is_full_commit(commit):
            Notification.objects.filter(pk=message.pk).update(claimed_until=None)
            return False
        Notification.objects.filter(pk=message.pk).update(due_at=None, sweep_at=None, claimed_until=None)
        return True


def _supersede_older(lane: str, at: datetime) -> int:
    """Mark the lane's statuses older than its newest queued one superseded (none another task holds)."""
    newest = (Notification.objects.filter(lane=lane, status=S.QUEUED).order_by("-id")
              .values_list("pk", flat=True).first())
    if newest is None:
        return 0
    return (Notification.objects.filter(lane=lane, status=S.QUEUED, id__lt=newest)
            .filter(Q(claimed_until__isnull=True) | Q(claimed_until__lte=at))
            .update(status=S.SUPERSEDED, claimed_until=None, sweep_at=None))


def _request(message: Notification, at: datetime) -> _Outgoing:
    if message.channel == C.COMMIT_STATUS:
        return _status_request(message)
    return _webhook_request(message, at)


def _status_request(message: Notification) -> _Outgoing:
    repository = message.repository
    # Read now, not with the message: the agent may have reported the commit since.
    commit, finished_at = Build.objects.values_list("commit", "finished_at").get(pk=message.build_id)
    if not is_full_commit(commit):
        if finished_at is None:
            raise _Hold()
        raise _Undeliverable(f"The build ended without checking out a commit (its commit is {commit!r}): "
                             "there is nothing to post a status to.")
    if repository is None or not repository.github_token_encrypted:
        raise _Undeliverable("The repository has no GitHub token any more.")
    owner, _, name = repository.repo_name.partition("/")
    url = (f"{settings.GITHUB_API_URL}/repos/{quote(owner, safe='')}/{quote(name, safe='')}"
           f"/statuses/{commit}")
    headers = {
        "Authorization": f"Bearer {decrypt_text(repository.github_token_encrypted)}",
        "Accept": "application/vnd.github+json",
        "X-GitHub-Api-Version": "2022-11-28",
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
    }
    return _Outgoing(url, headers, json.dumps(message.payload).encode())


def webhook_body(message: Notification) -> str:
    """The body of every attempt of `message`, byte for byte (the signature covers it)."""
    return json.dumps(message.payload, separators=(",", ":"), sort_keys=True)


def _webhook_request(message: Notification, at: datetime) -> _Outgoing:
    endpoint = message.endpoint
    if endpoint is None:
        raise _Undeliverable("The endpoint was deleted.")
    body = webhook_body(message)
    signature = Webhook(decrypt_text(endpoint.secret_encrypted)).sign(message.message_id, at, body)
    headers = {
        "webhook-id": message.message_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": signature,
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
    }
    return _Outgoing(endpoint.url, headers, body.encode())


def retry_delay(channel: str, attempts: int) -> timedelta:
    """The wait after the `attempts`-th failed attempt: HARMONT_DELIVERY_RETRY_SECONDS, doubling, capped per channel."""
    seconds = settings.DELIVERY_RETRY_SECONDS * 2 ** min(attempts - 1, 30)
    return min(timedelta(seconds=seconds), LONGEST_DELAY[channel])


def _record_attempt(message: Notification, answer: outbound.Answer, at: datetime) -> str:
    """Keep the attempt and what it means for the message: its status after (queued: tried again later)."""
    attempts = message.attempts + 1
    ended = at + timedelta(milliseconds=answer.duration_ms)
    columns: dict[str, Any]
    if answer.ok:
        columns = {"status": S.DELIVERED, "delivered_at": ended, "last_error": "", "due_at": None, "sweep_at": None}
    else:
        reason = answer.error or f"HTTP {answer.status_code}: {answer.excerpt[:200]}"
        deadline = message.created_at + WINDOW[message.channel]
        if ended >= deadline:
            columns = {"status": S.FAILED, "last_error": f"Gave up after {attempts} attempts; the last: {reason}",
                       "due_at": None, "sweep_at": None}
        else:
            due = min(ended + retry_delay(message.channel, attempts), deadline)
            columns = {"last_error": reason, "due_at": due, "sweep_at": due + _lease()}
    with transaction.atomic():
        updated = Notification.objects.filter(pk=message.pk, status=S.QUEUED).update(
            attempts=F("attempts") + 1, claimed_until=None, **columns)
        if updated:  # else the message (its endpoint) was deleted meanwhile
            NotificationAttempt.objects.create(notification_id=message.pk, at=at, status_code=answer.status_code,
                                               response_excerpt=answer.excerpt, error=answer.error,
                                               duration_ms=answer.duration_ms)
    if not answer.ok:
        level = logging.INFO if columns.get("status") != S.FAILED else logging.WARNING
        logger.log(level, "%s %s to %s: attempt %d failed (%s)", message.channel, message.message_id,
                   message.lane, attempts, columns["last_error"][:200])
        if columns["due_at"] is not None:
            enqueue_lanes([message.lane], run_after=columns["due_at"])
    return columns.get("status", S.QUEUED)


def _retryable(now: datetime) -> Q:
    # Failed ones, and queued ones no task is posting right now: clearing a live claim would let a
    # second task post its lane alongside the first, out of order.
    idle = Q(claimed_until__isnull=True) | Q(claimed_until__lte=now)
    return Q(status=S.FAILED) | (Q(status=S.QUEUED) & idle)


def retry_notifications(*, selected: QuerySet[Notification], now: datetime | None = None) -> int:
    """Try the failed and waiting messages of `selected` again now (the admin's action); returns how many.

    Each goes back to `queued`, due now, and its lane is handed to the queue
    once this commits. Delivered and superseded ones are left, and so is one a
    task is posting at this moment. A message past its channel's window gets
    one attempt more: if that fails too it is `failed` again.
    """
    now = now or timezone.now()
    with transaction.atomic():
        chosen = dict(selected.filter(_retryable(now)).values_list("pk", "lane"))
        count = Notification.objects.filter(_retryable(now), pk__in=list(chosen)).update(
            status=S.QUEUED, due_at=now, claimed_until=None, sweep_at=now + _lease())
        lanes = sorted(set(chosen.values()))
        if lanes:
            # robust: the reaper's sweep hands the lanes over if the enqueue fails (their sweep_at comes due).
            transaction.on_commit(lambda: enqueue_lanes(lanes), robust=True)
    return count


def sweep_notifications(*, now: datetime | None = None, limit: int = 200) -> int:
    """Hand to the queue again the lanes whose task got lost (their `sweep_at` came due); returns how many.

    Each message is taken with a compare-and-set on its `sweep_at`, so of
    several reapers one enqueues it.
    """
    now = now or timezone.now()
    due = list(Notification.objects.filter(status=S.QUEUED, sweep_at__lte=now).order_by("sweep_at")
               .values_list("pk", "lane", "sweep_at")[:limit])
    lanes = set()
    for pk, lane, sweep_at in due:
        if Notification.objects.filter(pk=pk, status=S.QUEUED, sweep_at=sweep_at).update(sweep_at=now + _lease()):
            lanes.add(lane)
    enqueue_lanes(sorted(lanes))
    return len(lanes)
