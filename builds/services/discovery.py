"""A push to the default branch registers the repository's pipelines again, from the envelope rendered at that commit.

The render job of a build that `discovers_pipelines` sends the whole envelope
with its own pipeline's IR; a task then registers it exactly as `POST
.../pipelines/register` does (new entries created, changed ones updated,
vanished ones archived) and builds the entries that are new, when their
triggers match the push, at the same commit.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.db import transaction
from django.utils import timezone

from builds import webhooks
from builds.models import Build, BuildSource
from builds.services.builds import BuildRequest, create_build
from harmont.errors import ApiError
from pipelines.models import Pipeline, Repository
from pipelines.registration import Registration, register_pipelines

logger = logging.getLogger("harmont.webhooks")


@dataclass(frozen=True)
class Discovery:
    """What re-registering did: the registration (None: the envelope was refused, `error` says why) and the new builds."""

    registration: Registration | None
    builds: list[Build] = field(default_factory=list)
    error: str | None = None


def enqueue_discovery(*, build_id: uuid.UUID, envelope: Any) -> None:
    """Hand the envelope to the task queue (after the render's report committed)."""
    from builds.tasks import discover_pipelines  # the task module imports the services

    discover_pipelines.enqueue(str(build_id), envelope)


def discover_pipelines(*, build_id: uuid.UUID, envelope: Any, now: datetime | None = None) -> Discovery | None:
    """Register `envelope` for the repository of the build's pipeline; build the new entries its push triggers.

    One transaction, which starts by locking the repository's row (as
    registration does), so of two runs the second waits and then finds every
    pipeline registered and builds nothing. None when the build is gone, or is
    no discovering build of a registered pipeline. An envelope registration
    refuses (invalid, a slug taken) changes nothing and is logged.
    """
    now = now or timezone.now()
    build = (Build.objects.select_related("pipeline__registered_from__organization")
             .filter(pk=build_id, discovers_pipelines=True).first())
    if build is None or build.pipeline.registered_from is None:
        return None
    pipeline = build.pipeline
    with transaction.atomic():
        repository = Repository.objects.select_for_update().select_related("organization").get(
            pk=pipeline.registered_from_id)
        before = set(Pipeline.objects.filter(registered_from=repository, archived_at__isnull=True)
                     .values_list("pk", flat=True))
        try:
            with transaction.atomic():
                registration = register_pipelines(org=repository.organization, repository=repository.url,
                                                  envelope=envelope, default_branch=pipeline.default_branch,
                                                  repo_name=repository.repo_name, now=now)
        except ApiError as exc:
            logger.warning("pipelines of %s not registered again from build %s: %s (%s)", repository, build.pk,
                           exc.code, exc.message)
            return Discovery(registration=None, error=f"{exc.code}: {exc.message}")
        event = webhooks.PushEvent(ref_type="branch", ref_name=build.branch, commit=build.commit,
                                   message=build.message, deleted=False)
        request = BuildRequest(branch=build.branch, commit=build.commit, message=build.message,
                               source=BuildSource.WEBHOOK, env=dict(build.env or {}), pipeline_ir=None,
                               source_archive=None, source_url=None, source_sha256=None)
        built = []
        for new in registration.pipelines:
            if new.pk in before or not webhooks.triggers_match(new.triggers, event):
                continue
            # The definition just stored is the one rendered at this commit: no second render.
            try:
                built.append(create_build(pipeline=new, request=request, now=now))
            except ApiError as exc:  # its plan rejected (the failed build is recorded), or refused
                logger.warning("new pipeline %s not built: %s (%s)", new, exc.code, exc.message)
        if built or registration.archived:
            logger.info("pipelines of %s registered again: %d new built, archived %s", repository, len(built),
                        registration.archived)
    return Discovery(registration=registration, builds=built)
