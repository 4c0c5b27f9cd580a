"""Pipeline schedules: cron expressions (pipelines.cron) that build a pipeline at their due times.

The builds are created by `builds.services.schedules.run_due_schedules` (the
reaper's tick); this module validates and stores schedules.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from croniter import CroniterError
from django.db import transaction
from django.db.models import QuerySet
from django.utils import timezone

from builds.models import BuildSource
from builds.services.builds import validate_build_request
from harmont.errors import ApiError, validation_error
from harmont.serializers import parse_uuid
from organizations.models import User
from pipelines.cron import cron_problem, next_due_after, zone_problem
from pipelines.models import Pipeline, PipelineSchedule

SCHEDULE_SOURCES = frozenset({BuildSource.SCHEDULE})
# The fields a PATCH may change; anything else in the body is ignored, like unknown fields elsewhere.
EDITABLE = ("cron", "timezone", "branch", "commit", "message", "env", "enabled")


def schedule_errors(*, pipeline: Pipeline, values: dict[str, Any]) -> tuple[dict[str, list[str]], dict[str, Any]]:
    """Every problem with a schedule's fields (empty: none), and the values to store.

    Branch, commit, message and env are checked exactly as a build request's are
    (`validate_build_request`), so what the tick sends later is a valid build.
    """
    fields: dict[str, list[str]] = {}
    clean = dict(values)
    if (problem := cron_problem(values.get("cron"))) is not None:
        fields["cron"] = [problem]
    if (problem := zone_problem(values.get("timezone"))) is not None:
        fields["timezone"] = [problem]
    if not isinstance(values.get("enabled"), bool):
        fields["enabled"] = ["Must be true or false."]
    try:
        request = validate_build_request(branch=values.get("branch"), commit=values.get("commit"),
                                         message=values.get("message"), env=values.get("env"),
                                         source=BuildSource.SCHEDULE, allowed_sources=SCHEDULE_SOURCES)
    except ApiError as exc:
        fields.update(exc.fields or {})
    else:
        clean.update(branch=request.branch, commit=request.commit, message=request.message, env=request.env)
    if not fields:
        try:
            clean["next_run_at"] = next_due_after(cron=clean["cron"], zone=clean["timezone"], after=timezone.now())
        except CroniterError:
            # Valid fields that never match a date (`0 0 30 2 *`).
            fields["cron"] = ["Never due: no date matches this expression."]
    return fields, clean


def list_schedules(*, pipeline: Pipeline) -> QuerySet[PipelineSchedule]:
    """The pipeline's schedules, oldest first, with what their JSON shows of creator and last build."""
    return (PipelineSchedule.objects.filter(pipeline=pipeline)
            .select_related("created_by", "last_build").order_by("created_at", "pk"))


def get_schedule(*, pipeline: Pipeline, schedule_id: Any) -> PipelineSchedule:
    """A schedule of this pipeline; 404 `schedule_not_found` for any other id (malformed ones included)."""
    pk = parse_uuid(str(schedule_id))
    schedule = list_schedules(pipeline=pipeline).filter(pk=pk).first() if pk is not None else None
    if schedule is None:
        raise ApiError("schedule_not_found", f"No schedule {schedule_id} in pipeline {pipeline.slug!r}.")
    return schedule


def create_schedule(*, pipeline: Pipeline, cron: Any, branch: Any = None, timezone_name: Any = "UTC",
                    commit: Any = "HEAD", message: Any = None, env: Any = None, enabled: Any = True,
                    created_by: User | None = None, now: datetime | None = None) -> PipelineSchedule:
    """A new schedule of `pipeline`; its first run is the first due time after now.

    Branch defaults to the pipeline's default branch. Bad fields are 422
    `validation_failed` with `fields`, and nothing is written.
    """
    values = {"cron": cron, "timezone": timezone_name, "branch": pipeline.default_branch if branch is None else branch,
              "commit": commit, "message": message, "env": {} if env is None else env, "enabled": enabled}
    fields, clean = schedule_errors(pipeline=pipeline, values=values)
    if fields:
        raise validation_error(fields)
    now = now or timezone.now()
    return PipelineSchedule.objects.create(pipeline=pipeline, created_by=created_by, created_at=now, updated_at=now,
                                           **clean)


def update_schedule(*, schedule: PipelineSchedule, changes: dict[str, Any],
                    now: datetime | None = None) -> PipelineSchedule:
    """Change some of a schedule's fields (`EDITABLE`); the next run is recomputed from now.

    Recomputing means a schedule enabled again does not catch up on the runs it
    missed while disabled. Bad fields are 422 `validation_failed`; nothing changes.
    """
    values = {name: getattr(schedule, name) for name in EDITABLE}
    values.update({name: value for name, value in changes.items() if name in EDITABLE})
    fields, clean = schedule_errors(pipeline=schedule.pipeline, values=values)
    if fields:
        raise validation_error(fields)
    now = now or timezone.now()
    with transaction.atomic():
        PipelineSchedule.objects.filter(pk=schedule.pk).update(updated_at=now, **clean)
    for name, value in clean.items():
        setattr(schedule, name, value)
    schedule.updated_at = now
    return schedule


def delete_schedule(*, schedule: PipelineSchedule) -> None:
    """Remove a schedule and its run records; the builds it created stay."""
    schedule.delete()
