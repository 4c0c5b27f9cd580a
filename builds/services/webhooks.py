"""Webhook deliveries: find the repositories a delivery is for, record it once, build what it triggers."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime

from django.core.exceptions import ImproperlyConfigured
from django.db import IntegrityError, transaction
from django.db.models.functions import Lower
from django.utils import timezone

from builds import webhooks
from builds.models import Build, BuildSource, WebhookDelivery
from builds.services.builds import BuildRequest, create_build, validate_build_request
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
    """What one delivery did for one repository.

    `builds` are the builds this call created, failed ones included (a rejected
    plan is recorded as a failed build). For a redelivery nothing is created:
    `builds` is empty and `builds_created` is what the first delivery created.
    """

    repository: Repository
    redelivery: bool
    builds_created: int
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


def handle_webhook_delivery(*, repository: Repository, delivery_id: str, event: webhooks.Event,
                            now: datetime | None = None) -> DeliveryResult:
    """Record a verified delivery for `repository` and create one `webhook` build per matching pipeline.

    One transaction: the delivery row goes in first, so a redelivery racing the
    original waits on the unique (repository, delivery_id) index and then finds
    the row, creating nothing; if the original rolls back, the redelivery builds.
    A pipeline whose build is refused or whose plan is rejected doesn't stop the
    others. A pull request from a fork builds as each pipeline's
    `fork_pull_requests` says: without secrets, held for approval, or not at all
    (`skipped`). Raises 422 `build_invalid` (nothing written) when the payload's
    branch, commit or message can't make a build at all.
    """
    now = now or timezone.now()
    facts = webhooks.build_facts(event)
    request = None
    if facts is not None:
        request = validate_build_request(branch=facts.branch, commit=facts.commit, message=facts.message,
                                         source=BuildSource.WEBHOOK, env=facts.env,
                                         allowed_sources=WEBHOOK_SOURCES)
    with transaction.atomic():
        try:
            with transaction.atomic():
                delivery = WebhookDelivery.objects.create(repository=repository, delivery_id=delivery_id,
                                                          event=event.name, received_at=now)
        except IntegrityError:
            previous = WebhookDelivery.objects.filter(repository=repository, delivery_id=delivery_id).first()
            if previous is None:  # not the unique index (the repository went away): a real failure
                raise
            return DeliveryResult(repository=repository, redelivery=True, builds_created=previous.builds_created)
        builds: list[Build] = []
        refused: list[RefusedBuild] = []
        skipped: list[SkippedBuild] = []
        fork = isinstance(event, webhooks.PullRequestEvent) and event.fork
        if request is not None:
            for pipeline in _matching_pipelines(repository, event):
                policy = pipeline.fork_pull_requests if fork else None
                if policy == ForkPullRequests.SKIP:
                    skipped.append(SkippedBuild(pipeline, "fork_pull_request",
                                                "The pull request comes from another repository (a fork) and the "
                                                "pipeline's fork_pull_requests is skip."))
                    continue
                _build_one(pipeline, request, now, builds, refused, fork=fork,
                           held=policy == ForkPullRequests.REQUIRE_APPROVAL)
        WebhookDelivery.objects.filter(pk=delivery.pk).update(builds_created=len(builds))
    return DeliveryResult(repository=repository, redelivery=False, builds_created=len(builds), builds=builds,
                          refused=refused, skipped=skipped)


def _matching_pipelines(repository: Repository, event: webhooks.Event) -> list[Pipeline]:
    pipelines = (
        Pipeline.objects.for_org(repository.organization)  # archived pipelines never build
        .alias(repo_lower=Lower("repo_name"))  # the expression pipeline_by_repo indexes
        .filter(repo_lower=repository.repo_name.lower())
        .order_by("id")
    )
    return [pipeline for pipeline in pipelines if webhooks.triggers_match(pipeline.triggers, event)]


def _build_one(pipeline: Pipeline, request: BuildRequest, now: datetime, builds: list[Build],
               refused: list[RefusedBuild], *, fork: bool, held: bool) -> None:
    try:
        # source "webhook": the request's env is the server's own (HARMONT_TAG, HARMONT_PULL_REQUEST*).
        builds.append(create_build(pipeline=pipeline, request=request, fork=fork, held=held, now=now))
    except ApiError as exc:
        # Caught without a savepoint of our own: ApiError is no database error, so the
        # transaction is still usable, and a savepoint here would roll back the failed
        # build that create_build records for a rejected plan before raising.
        if exc.code == "build_plan_rejected":
            # The failed build is recorded. create_build's counter update holds the
            # pipeline row lock until this transaction commits, so the newest build
            # of the pipeline is the one it just wrote.
            failed = Build.objects.filter(pipeline=pipeline).order_by("-number").first()
            if failed is not None:
                failed.pipeline = pipeline
                builds.append(failed)
        else:
            refused.append(RefusedBuild(pipeline=pipeline, code=exc.code, message=exc.message))
        logger.warning("webhook build for pipeline %s: %s (%s)", pipeline, exc.code, exc.message)
