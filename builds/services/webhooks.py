"""Webhook deliveries: find the repositories a delivery is for, record it once, and (in a task) build what it triggers."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import IntegrityError, transaction
from django.db.models import F
from django.db.models.functions import Lower
from django.utils import timezone

from builds import webhooks
from builds.models import Build, BuildSource, DeliveryStatus, WebhookDelivery
from builds.services.builds import BuildPlanRejected, BuildRequest, create_build, validate_build_request
from harmont.crypto import decrypt_text
from harmont.errors import ApiError
from pipelines.models import ForkPullRequests, Pipeline, Repository

logger = logging.getLogger("harmont.webhooks")

WEBHOOK_SOURCES = frozenset({BuildSource.WEBHOOK})


@dataclass(frozen=True)
class RefusedBuild:
    """A matching pipeline whose build was refused before any row was written."""

    pipeline: Pipeline
    code: str
    message: str


@dataclass(frozen=True)
class SkippedBuild:
    """A matching pipeline that builds nothing for this delivery, by its own policy."""

    pipeline: Pipeline
    reason: str
    message: str


@dataclass(frozen=True)
class DeliveryResult:
    """What acting on one delivery did for its repository.

    `builds` are the builds it created, failed ones included (a rejected plan
    is recorded as a failed build).
    """

    repository: Repository
    builds: list[Build] = field(default_factory=list)
    refused: list[RefusedBuild] = field(default_factory=list)
    skipped: list[SkippedBuild] = field(default_factory=list)


def verified_repositories(*, repo_name: str, body: bytes, signature: str | None) -> list[Repository]:
    """Every repository registered under `repo_name` (any case, any organization) whose secret signed `body`.

    Several organizations may register the same repository; each one's secret is
    tried and a delivery acts only for those it verifies against, so one
    organization can never trigger another's pipelines.
    """
    candidates = (
        Repository.objects.alias(name_lower=Lower("repo_name"))  # the expression repository_name_unique indexes
        .filter(name_lower=repo_name.lower())
        .select_related("organization")
        .order_by("id")
    )
    verified = []
    for repository in candidates:
        if not repository.webhook_secret_encrypted:
            continue
        try:
            secret = decrypt_text(repository.webhook_secret_encrypted)
        except ImproperlyConfigured:
            # A rotated-away key: this repository can't verify anything until its secret is set again.
            logger.error("webhook secret of repository %s (id %s) can't be decrypted", repository, repository.pk)
            continue
        if webhooks.signature_valid(secret=secret, body=body, header=signature):
            verified.append(repository)
    return verified


def delivery_build_request(event: webhooks.Event) -> BuildRequest | None:
    """The build a delivery's event asks for (None: it builds nothing, such as a deleted branch).

    Raises 422 `build_invalid` when the payload's branch, commit or message can't
    make a build at all. Pure: the webhook route checks it before recording a
    delivery, and the task that acts on it again.
    """
    facts = webhooks.build_facts(event)
    if facts is None:
        return None
    return validate_build_request(branch=facts.branch, commit=facts.commit, message=facts.message,
                                  source=BuildSource.WEBHOOK, env=facts.env, allowed_sources=WEBHOOK_SOURCES)


def record_webhook_delivery(*, repository: Repository, delivery_id: str, event_name: str, payload: Any,
                            now: datetime | None = None) -> WebhookDelivery | None:
    """Record a verified delivery for `repository` and queue the task that acts on it; None for a redelivery.

    The unique (repository, delivery_id) index decides: a redelivery racing the
    original waits on it and then creates nothing. The task is enqueued once the
    row is committed; should that be lost (the process died in between), the
    reaper's sweep enqueues it when its lease is over.
    """
    now = now or timezone.now()
    try:
        with transaction.atomic():
            delivery = WebhookDelivery.objects.create(
                repository=repository, delivery_id=delivery_id, event=event_name, received_at=now, payload=payload,
                status=DeliveryStatus.QUEUED, enqueued_at=now, retry_at=now + _lease())
    except IntegrityError:
        if WebhookDelivery.objects.filter(repository=repository, delivery_id=delivery_id).exists():
            return None
        raise  # not the unique index (the repository went away): a real failure
    transaction.on_commit(lambda: _enqueue(delivery.pk))
    return delivery


def _lease() -> timedelta:
    return timedelta(seconds=settings.TASK_LEASE_SECONDS)


def _enqueue(delivery_pk: int) -> None:
    from builds.tasks import process_webhook_delivery  # the task module imports the services

    process_webhook_delivery.enqueue(delivery_pk)


def retry_delay(attempts: int) -> timedelta:
    """How long after its `attempts`-th failed attempt a delivery is tried again: 30 s, doubling, at most an hour."""
    return timedelta(seconds=min(30 * 2 ** (attempts - 1), 3600))


def process_webhook_delivery(*, delivery_pk: int, now: datetime | None = None) -> DeliveryResult | None:
    """Act on a queued delivery: one `webhook` build per matching pipeline. Safe to run twice, also at once.

    The first statement claims the delivery (queued → attempt counted), a
    compare-and-set that also takes its row lock (SQLite: the database's write
    lock) until this transaction ends: a second run waits and then finds it
    processed, creating nothing. None when there was nothing to do.

    A pipeline whose build is refused or whose plan is rejected doesn't stop
    the others. A pull request from a fork builds as each pipeline's
    `fork_pull_requests` says: without secrets, held for approval, or not at
    all (`skipped`). An unexpected failure rolls back the builds of this
    attempt and leaves the delivery queued for another, after `retry_delay`;
    after HARMONT_WEBHOOK_MAX_ATTEMPTS it is `failed`.
    """
    now = now or timezone.now()
    with transaction.atomic():
        claimed = WebhookDelivery.objects.filter(pk=delivery_pk, status=DeliveryStatus.QUEUED).update(
            attempts=F("attempts") + 1)
        if not claimed:
            return None
        delivery = WebhookDelivery.objects.select_related("repository__organization").get(pk=delivery_pk)
        try:
            with transaction.atomic():
                result = _act_on(delivery, now)
        except Exception as exc:  # noqa: BLE001 (recorded on the delivery, and in the log)
            logger.exception("webhook delivery %s (%s) failed, attempt %d", delivery.delivery_id, delivery.event,
                             delivery.attempts)
            failed = delivery.attempts >= settings.WEBHOOK_MAX_ATTEMPTS
            WebhookDelivery.objects.filter(pk=delivery_pk).update(
                status=DeliveryStatus.FAILED if failed else DeliveryStatus.QUEUED,
                retry_at=None if failed else now + retry_delay(delivery.attempts),
                last_error=f"{type(exc).__name__}: {exc}"[:1000])
            return None
        WebhookDelivery.objects.filter(pk=delivery_pk).update(
            status=DeliveryStatus.PROCESSED, processed_at=now, retry_at=None, builds_created=len(result.builds),
            result=result_record(result), last_error="")
    return result


def _act_on(delivery: WebhookDelivery, now: datetime) -> DeliveryResult:
    repository = delivery.repository
    event = webhooks.parse_event(delivery.event, delivery.payload)
    builds: list[Build] = []
    refused: list[RefusedBuild] = []
    skipped: list[SkippedBuild] = []
    try:
        request = delivery_build_request(event)
    except ApiError as exc:  # checked before the delivery was recorded; kept in case the rules changed since
        return DeliveryResult(repository=repository, refused=[
            RefusedBuild(pipeline, exc.code, exc.message) for pipeline in _matching_pipelines(repository, event)])
    fork = isinstance(event, webhooks.PullRequestEvent) and event.fork
    if request is not None:
        discovery_asked = False
        for pipeline in _matching_pipelines(repository, event):
            policy = pipeline.fork_pull_requests if fork else None
            if policy == ForkPullRequests.SKIP:
                skipped.append(SkippedBuild(pipeline, "fork_pull_request",
                                            "The pull request comes from another repository (a fork) and the "
                                            "pipeline's fork_pull_requests is skip."))
                continue
            # One render per delivery re-registers the repository's pipelines: several would
            # each build the pipelines that are new.
            discovers = not discovery_asked and _discovers(pipeline, repository, event)
            if _build_one(pipeline, request, now, builds, refused, fork=fork,
                          held=policy == ForkPullRequests.REQUIRE_APPROVAL, discovers=discovers):
                discovery_asked = True
    return DeliveryResult(repository=repository, builds=builds, refused=refused, skipped=skipped)


def result_record(result: DeliveryResult) -> dict[str, Any]:
    """What a delivery keeps of what it did (`WebhookDelivery.result`): builds by pipeline and number."""
    return {
        "builds": [{"pipeline_id": build.pipeline_id, "pipeline": build.pipeline.slug, "number": build.number}
                   for build in result.builds],
        "refused": [{"pipeline": refused.pipeline.slug, "code": refused.code, "message": refused.message}
                    for refused in result.refused],
        "skipped": [{"pipeline": skipped.pipeline.slug, "reason": skipped.reason, "message": skipped.message}
                    for skipped in result.skipped],
    }


def requeue_webhook_deliveries(*, now: datetime | None = None, limit: int = 100) -> int:
    """Hand to the queue again the queued deliveries whose lease or retry delay is over; returns how many.

    Their task was lost (a worker died mid-run, an enqueue died with its
    process) or failed. Each is taken with a compare-and-set on its `retry_at`,
    so of several reapers one enqueues it.
    """
    now = now or timezone.now()
    due = list(WebhookDelivery.objects.filter(status=DeliveryStatus.QUEUED, retry_at__lte=now)
               .order_by("retry_at").values_list("pk", "retry_at")[:limit])
    requeued = 0
    for pk, retry_at in due:
        if WebhookDelivery.objects.filter(pk=pk, status=DeliveryStatus.QUEUED, retry_at=retry_at).update(
                enqueued_at=now, retry_at=now + _lease()):
            _enqueue(pk)
            requeued += 1
    return requeued


def _matching_pipelines(repository: Repository, event: webhooks.Event) -> list[Pipeline]:
    pipelines = (
        Pipeline.objects.for_org(repository.organization)  # archived pipelines never build
        .alias(repo_lower=Lower("repo_name"))  # the expression pipeline_by_repo indexes
        .filter(repo_lower=repository.repo_name.lower())
        .order_by("id")
    )
    return [pipeline for pipeline in pipelines if webhooks.triggers_match(pipeline.triggers, event)]


def _discovers(pipeline: Pipeline, repository: Repository, event: webhooks.Event) -> bool:
    """Whether this pipeline's build of `event` re-registers the repository's pipelines: a push to its default branch."""
    return (pipeline.registered_from_id == repository.pk and isinstance(event, webhooks.PushEvent)
            and event.ref_type == "branch" and event.ref_name == pipeline.default_branch)


def _build_one(pipeline: Pipeline, request: BuildRequest, now: datetime, builds: list[Build],
               refused: list[RefusedBuild], *, fork: bool, held: bool, discovers: bool = False) -> bool:
    """Create the pipeline's build of the delivery (or record why not); whether a rendering build was created."""
    try:
        # source "webhook": the request's env is the server's own (HARMONT_TAG, HARMONT_PULL_REQUEST*).
        # A pipeline registered from the repository is rendered at the pushed commit, as the hosted
        # service does: its stored definition is what the repository said at registration.
        build = create_build(pipeline=pipeline, request=request, fork=fork, held=held, now=now,
                             render=pipeline.registered_from_id is not None, discovers_pipelines=discovers)
        builds.append(build)
        return build.discovers_pipelines
    except ApiError as exc:
        # Caught without a savepoint of our own: ApiError is no database error, so the
        # transaction is still usable, and a savepoint here would roll back the failed
        # build that create_build records for a rejected plan before raising.
        if isinstance(exc, BuildPlanRejected):
            builds.append(exc.build)  # recorded as a failed build, like any rejected plan
        else:
            refused.append(RefusedBuild(pipeline=pipeline, code=exc.code, message=exc.message))
        logger.warning("webhook build for pipeline %s: %s (%s)", pipeline, exc.code, exc.message)
        return False
