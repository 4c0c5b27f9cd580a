"""Pipeline schedules: the API (members read, admins write), validation, and the reaper's tick.

The tick creates exactly one build per due time, also with several ticks racing
(PostgreSQL threads), and after downtime catches up on at most one missed run.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from datetime import timezone as dt_timezone
from typing import Any

import pytest
from django.utils import timezone

from builds import services
from builds.models import Build, BuildSource, Job
from pipelines import cron
from pipelines import schedules as schedule_services
from pipelines.models import PipelineSchedule, ScheduledRun
from tests.helpers import assert_error, is_postgres, iso, race

pytestmark = pytest.mark.django_db

UTC = dt_timezone.utc


def schedules_url(pipeline: Any, schedule_id: Any = None, *, org_slug: str | None = None) -> str:
    base = f"/api/v0/organizations/{org_slug or pipeline.organization.slug}/pipelines/{pipeline.slug}/schedules"
    return base if schedule_id is None else f"{base}/{schedule_id}"


def make_schedule(pipeline: Any, *, cron: str = "0 * * * *", now: datetime | None = None, **fields: Any
                  ) -> PipelineSchedule:
    return schedule_services.create_schedule(pipeline=pipeline, cron=cron, now=now, **fields)


def due(schedule: PipelineSchedule, at: datetime) -> PipelineSchedule:
    """Pretend the schedule was saved long ago: its next run is `at`."""
    PipelineSchedule.objects.filter(pk=schedule.pk).update(next_run_at=at)
    schedule.refresh_from_db()
    return schedule


# ------------------------------------------------------------------ the API


def test_admin_creates_a_schedule_and_gets_its_full_json(admin_api, admin_user, pipeline):
    before = timezone.now()
    response = admin_api.post(schedules_url(pipeline), {
        "cron": "30 4 * * 1-5", "timezone": "Europe/Berlin", "branch": "release/1.2", "commit": "abc123",
        "message": "nightly", "env": {"NIGHTLY": "1"}}, format="json")
    assert response.status_code == 201, response.content
    schedule = PipelineSchedule.objects.get()
    assert schedule.next_run_at > before
    # 04:30 in Berlin is 02:30 or 03:30 UTC depending on the season.
    assert schedule.next_run_at.astimezone(UTC).minute == 30
    assert schedule.next_run_at.astimezone(UTC).hour in (2, 3)
    assert response.json() == {
        "id": str(schedule.pk), "cron": "30 4 * * 1-5", "timezone": "Europe/Berlin", "branch": "release/1.2",
        "commit": "abc123", "message": "nightly", "env": {"NIGHTLY": "1"}, "enabled": True,
        "created_by": admin_user.email, "next_run_at": iso(schedule.next_run_at), "last_run_at": None,
        "last_build_number": None, "created_at": iso(schedule.created_at), "updated_at": iso(schedule.updated_at),
    }


def test_create_defaults_to_the_default_branch_head_and_utc(admin_api, pipeline):
    response = admin_api.post(schedules_url(pipeline), {"cron": "0 3 * * *"}, format="json")
    assert response.status_code == 201, response.content
    body = response.json()
    assert (body["branch"], body["commit"], body["timezone"], body["env"], body["message"]) == (
        "main", "HEAD", "UTC", {}, None)
    assert body["next_run_at"].endswith("T03:00:00.000000Z")


@pytest.mark.parametrize("body, bad", [
    ({"cron": "61 * * * *"}, "cron"),
    ({"cron": "* * * *"}, "cron"),
    ({"cron": "0 0 * * * *"}, "cron"),  # six fields (seconds) are not cron's five
    ({"cron": "@hourly"}, "cron"),
    ({"cron": "0 0 30 2 *"}, "cron"),  # never due
    ({"cron": 5}, "cron"),
    ({"cron": "0 * * * *", "timezone": "Mars/Olympus"}, "timezone"),
    ({"cron": "0 * * * *", "timezone": "../etc/passwd"}, "timezone"),
    ({"cron": "0 * * * *", "branch": "--upload-pack=evil"}, "branch"),
    ({"cron": "0 * * * *", "branch": "a..b"}, "branch"),
    ({"cron": "0 * * * *", "commit": "not a sha"}, "commit"),
    ({"cron": "0 * * * *", "env": {"A": 1}}, "env"),
    ({"cron": "0 * * * *", "enabled": "yes"}, "enabled"),
    ({}, "cron"),
])
def test_bad_schedule_is_422_with_fields_and_creates_nothing(admin_api, pipeline, body, bad):
    error = assert_error(admin_api.post(schedules_url(pipeline), body, format="json"), 422, "validation_failed")
    assert bad in error["fields"], error
    assert not PipelineSchedule.objects.exists()


def test_members_list_schedules_but_may_not_create_edit_or_delete(member_api, pipeline):
    schedule = make_schedule(pipeline)
    listed = member_api.get(schedules_url(pipeline))
    assert listed.status_code == 200
    assert listed.json() == {"data": [{
        "id": str(schedule.pk), "cron": "0 * * * *", "timezone": "UTC", "branch": "main", "commit": "HEAD",
        "message": None, "env": {}, "enabled": True, "created_by": None, "next_run_at": iso(schedule.next_run_at),
        "last_run_at": None, "last_build_number": None, "created_at": iso(schedule.created_at),
        "updated_at": iso(schedule.updated_at)}], "next_cursor": None}
    assert_error(member_api.post(schedules_url(pipeline), {"cron": "0 * * * *"}, format="json"), 403,
                 "insufficient_org_role")
    assert_error(member_api.patch(schedules_url(pipeline, schedule.pk), {"enabled": False}, format="json"), 403,
                 "insufficient_org_role")
    assert_error(member_api.delete(schedules_url(pipeline, schedule.pk)), 403, "insufficient_org_role")
    schedule.refresh_from_db()
    assert schedule.enabled and PipelineSchedule.objects.count() == 1


def test_another_organizations_pipeline_and_schedule_are_404(api, stranger_api, pipeline, other_pipeline):
    schedule = make_schedule(pipeline)
    assert_error(stranger_api.get(schedules_url(pipeline)), 404, "organization_not_found")
    assert_error(stranger_api.patch(schedules_url(pipeline, schedule.pk), {"enabled": False}, format="json"), 404,
                 "organization_not_found")
    # The owner of `pipeline` asking for its schedule under a pipeline of another organization's slug, or
    # under their own pipeline with a foreign schedule id: 404 either way.
    foreign = make_schedule(other_pipeline)
    assert_error(api.patch(schedules_url(pipeline, foreign.pk), {"enabled": False}, format="json"), 404,
                 "schedule_not_found")
    assert_error(api.delete(schedules_url(pipeline, foreign.pk)), 404, "schedule_not_found")
    assert_error(api.delete(schedules_url(pipeline, "not-a-uuid")), 404, "schedule_not_found")
    assert_error(api.get(schedules_url(pipeline).replace(pipeline.slug, "nope")), 404, "pipeline_not_found")
    foreign.refresh_from_db()
    assert foreign.enabled


def test_patch_changes_fields_and_recomputes_the_next_run(api, pipeline):
    schedule = make_schedule(pipeline, cron="0 3 * * *")
    response = api.patch(schedules_url(pipeline, schedule.pk), {"cron": "15 * * * *", "enabled": False,
                                                                 "env": {"X": "y"}}, format="json")
    assert response.status_code == 200, response.content
    schedule.refresh_from_db()
    assert (schedule.cron, schedule.enabled, schedule.env) == ("15 * * * *", False, {"X": "y"})
    assert schedule.next_run_at.minute == 15 and schedule.next_run_at > timezone.now()
    assert response.json()["next_run_at"] == iso(schedule.next_run_at)
    assert response.json()["cron"] == "15 * * * *"


def test_bad_patch_is_422_and_changes_nothing(api, pipeline):
    schedule = make_schedule(pipeline, cron="0 3 * * *")
    error = assert_error(api.patch(schedules_url(pipeline, schedule.pk), {"cron": "nope", "timezone": "X/Y"},
                                   format="json"), 422, "validation_failed")
    assert set(error["fields"]) == {"cron", "timezone"}
    schedule.refresh_from_db()
    assert (schedule.cron, schedule.timezone) == ("0 3 * * *", "UTC")


def test_delete_removes_the_schedule_but_keeps_its_builds(api, pipeline):
    schedule = due(make_schedule(pipeline), datetime(2026, 1, 1, 10, tzinfo=UTC))
    [build] = services.run_due_schedules(now=datetime(2026, 1, 1, 10, 0, 5, tzinfo=UTC))
    assert api.delete(schedules_url(pipeline, schedule.pk)).status_code == 204
    assert not PipelineSchedule.objects.exists() and not ScheduledRun.objects.exists()
    assert Build.objects.filter(pk=build.pk).exists()
    assert_error(api.delete(schedules_url(pipeline, schedule.pk)), 404, "schedule_not_found")


def test_list_pages_with_a_cursor_in_constant_queries(api, pipeline, django_assert_num_queries):
    made = [make_schedule(pipeline, cron=f"{i} * * * *") for i in range(5)]
    seen: list[str] = []
    url = schedules_url(pipeline) + "?limit=2"
    api.get(url)  # the token's last_used_at is written once a minute, by this first request
    for _ in range(3):
        # Token, membership, pipeline, the page (creator and last build joined).
        with django_assert_num_queries(4):
            response = api.get(url)
        body = response.json()
        seen += [s["id"] for s in body["data"]]
        if not body["next_cursor"]:
            break
        url = schedules_url(pipeline) + f"?limit=2&cursor={body['next_cursor']}"
    assert seen == [str(s.pk) for s in made]
    assert_error(api.get(schedules_url(pipeline) + "?cursor=garbage"), 400, "invalid_cursor")


# ------------------------------------------------------------------ the tick


def test_a_due_schedule_creates_one_schedule_build_and_advances(pipeline, owner):
    pipeline.allow_manual = False  # the server's own path: a schedule still builds
    pipeline.save(update_fields=["allow_manual"])
    schedule = due(make_schedule(pipeline, created_by=owner, env={"NIGHTLY": "1"}, message="nightly"),
                   datetime(2026, 1, 1, 10, tzinfo=UTC))
    now = datetime(2026, 1, 1, 10, 0, 7, tzinfo=UTC)
    [build] = services.run_due_schedules(now=now)
    assert (build.source, build.branch, build.commit, build.message, build.env, build.created_by) == (
        BuildSource.SCHEDULE, "main", "HEAD", "nightly", {"NIGHTLY": "1"}, owner)
    assert build.state == "scheduled" and Job.objects.filter(build=build).count() == 2
    schedule.refresh_from_db()
    assert schedule.next_run_at == datetime(2026, 1, 1, 11, tzinfo=UTC)
    assert (schedule.last_run_at, schedule.last_build_id) == (datetime(2026, 1, 1, 10, tzinfo=UTC), build.pk)
    assert list(ScheduledRun.objects.values_list("due_at", "build_id")) == [
        (datetime(2026, 1, 1, 10, tzinfo=UTC), build.pk)]
    # The same pass again, or a later one before 11:00, creates nothing.
    assert services.run_due_schedules(now=now) == []
    assert services.run_due_schedules(now=datetime(2026, 1, 1, 10, 59, 59, tzinfo=UTC)) == []
    assert Build.objects.count() == 1


def test_disabled_not_yet_due_and_archived_pipelines_schedules_build_nothing(pipeline, other_pipeline):
    due(make_schedule(pipeline, enabled=False), datetime(2026, 1, 1, 10, tzinfo=UTC))
    due(make_schedule(pipeline), datetime(2026, 1, 1, 11, tzinfo=UTC))
    due(make_schedule(other_pipeline), datetime(2026, 1, 1, 10, tzinfo=UTC))
    other_pipeline.archived_at = datetime(2026, 1, 1, 9, tzinfo=UTC)
    other_pipeline.save(update_fields=["archived_at"])
    assert services.run_due_schedules(now=datetime(2026, 1, 1, 10, 30, tzinfo=UTC)) == []
    assert not Build.objects.exists()


def test_after_a_three_hour_gap_an_hourly_schedule_makes_exactly_one_build(pipeline):
    schedule = due(make_schedule(pipeline, cron="0 * * * *"), datetime(2026, 1, 1, 10, tzinfo=UTC))
    # The reaper was down from 09:59 until 13:20: 10:00, 11:00, 12:00 and 13:00 were missed.
    now = datetime(2026, 1, 1, 13, 20, tzinfo=UTC)
    builds = services.run_due_schedules(now=now)
    assert len(builds) == 1
    assert list(ScheduledRun.objects.values_list("due_at", flat=True)) == [datetime(2026, 1, 1, 13, tzinfo=UTC)]
    schedule.refresh_from_db()
    assert schedule.next_run_at == datetime(2026, 1, 1, 14, tzinfo=UTC)
    assert services.run_due_schedules(now=now + timedelta(minutes=5)) == []
    assert Build.objects.count() == 1


def test_a_due_time_already_claimed_creates_no_second_build(pipeline):
    """What a slower racing tick meets: the run row exists, so it creates nothing and only advances."""
    schedule = due(make_schedule(pipeline), datetime(2026, 1, 1, 10, tzinfo=UTC))
    ScheduledRun.objects.create(schedule=schedule, due_at=datetime(2026, 1, 1, 10, tzinfo=UTC))
    assert services.run_due_schedules(now=datetime(2026, 1, 1, 10, 0, 1, tzinfo=UTC)) == []
    assert not Build.objects.exists()
    schedule.refresh_from_db()
    assert schedule.next_run_at == datetime(2026, 1, 1, 11, tzinfo=UTC)


def test_daylight_saving_spring_forward_runs_the_skipped_time_once_at_the_gaps_end(pipeline):
    # Berlin skips 02:00-03:00 on 2026-03-29: a daily 02:30 runs at 03:00 CEST (01:00 UTC) that day.
    schedule = make_schedule(pipeline, cron="30 2 * * *", timezone_name="Europe/Berlin",
                             now=datetime(2026, 3, 27, 12, tzinfo=UTC))
    schedule = due(schedule, cron.next_due_after(cron="30 2 * * *", zone="Europe/Berlin",
                                                              after=datetime(2026, 3, 28, 12, tzinfo=UTC)))
    assert schedule.next_run_at == datetime(2026, 3, 29, 1, 0, tzinfo=UTC)
    [build] = services.run_due_schedules(now=datetime(2026, 3, 29, 1, 0, 30, tzinfo=UTC))
    schedule.refresh_from_db()
    # The next day is summer time: 02:30 CEST is 00:30 UTC.
    assert schedule.next_run_at == datetime(2026, 3, 30, 0, 30, tzinfo=UTC)
    assert services.run_due_schedules(now=datetime(2026, 3, 29, 23, 0, tzinfo=UTC)) == []
    assert len(services.run_due_schedules(now=datetime(2026, 3, 30, 0, 31, tzinfo=UTC))) == 1


def test_daylight_saving_fall_back_runs_an_hourly_schedule_at_both_instants_of_the_repeated_hour(pipeline):
    # Berlin's 02:00-03:00 happens twice on 2026-10-25: at 00:00 UTC (CEST) and at 01:00 UTC (CET).
    due(make_schedule(pipeline, cron="0 * * * *", timezone_name="Europe/Berlin"),
        datetime(2026, 10, 24, 23, 0, tzinfo=UTC))  # 01:00 CEST
    due_times = []
    for minute in range(0, 4 * 60, 10):  # a reaper pass every ten minutes from 23:00 UTC to 03:00 UTC
        now = datetime(2026, 10, 24, 23, 0, 5, tzinfo=UTC) + timedelta(minutes=minute)
        due_times += [b.created_at for b in services.run_due_schedules(now=now)]
    assert list(ScheduledRun.objects.order_by("due_at").values_list("due_at", flat=True)) == [
        datetime(2026, 10, 24, 23, tzinfo=UTC), datetime(2026, 10, 25, 0, tzinfo=UTC),
        datetime(2026, 10, 25, 1, tzinfo=UTC), datetime(2026, 10, 25, 2, tzinfo=UTC)]
    assert len(due_times) == 4


def test_a_rejected_definition_still_spends_the_due_time_on_a_failed_build(pipeline):
    pipeline.definition = None
    pipeline.repository = ""
    pipeline.save(update_fields=["definition", "repository"])
    schedule = due(make_schedule(pipeline), datetime(2026, 1, 1, 10, tzinfo=UTC))
    [build] = services.run_due_schedules(now=datetime(2026, 1, 1, 10, 0, 1, tzinfo=UTC))
    assert (build.state, build.error_code, build.source) == ("failed", "definition_missing", "schedule")
    schedule.refresh_from_db()
    assert schedule.last_build_id == build.pk
    assert services.run_due_schedules(now=datetime(2026, 1, 1, 10, 30, tzinfo=UTC)) == []


@pytest.mark.django_db(transaction=True)
def test_concurrent_ticks_create_exactly_one_build_per_due_time(pipeline):
    if not is_postgres():
        pytest.skip("races need PostgreSQL: SQLite serialises every writer")
    schedules = [due(make_schedule(pipeline, cron="*/5 * * * *"), datetime(2026, 1, 1, 10, tzinfo=UTC))
                 for _ in range(3)]
    now = datetime(2026, 1, 1, 10, 1, tzinfo=UTC)
    results = race(6, lambda i: services.run_due_schedules(now=now))
    assert sum(len(r) for r in results) == 3
    assert Build.objects.count() == 3
    assert sorted(Build.objects.values_list("number", flat=True)) == [1, 2, 3]
    assert ScheduledRun.objects.count() == 3
    for schedule in schedules:
        schedule.refresh_from_db()
        assert schedule.next_run_at == datetime(2026, 1, 1, 10, 5, tzinfo=UTC)
    # The next due time, raced again: one more build per schedule.
    later = datetime(2026, 1, 1, 10, 5, 0, tzinfo=UTC)
    results = race(6, lambda i: services.run_due_schedules(now=later))
    assert Build.objects.count() == 6 and ScheduledRun.objects.count() == 6


# ------------------------------------------------------------------ the admin


def test_the_admin_creates_schedules_through_the_service_and_refuses_bad_cron(pipeline, owner):
    from django.contrib.auth import get_user_model
    from django.test import Client

    staff = get_user_model().objects.create_superuser("ops@example.com", "a-long-passphrase")
    client = Client()
    client.force_login(staff)
    url = "/admin/pipelines/pipelineschedule/add/"
    form = {"pipeline": pipeline.pk, "cron": "61 * * * *", "timezone": "UTC", "branch": "main", "commit": "HEAD",
            "message": "", "env": "{}", "enabled": "on", "created_by": ""}
    response = client.post(url, form)
    assert response.status_code == 200 and b"Not a valid cron expression." in response.content
    assert not PipelineSchedule.objects.exists()
    response = client.post(url, {**form, "cron": "5 4 * * *", "timezone": "Europe/Berlin"})
    assert response.status_code == 302, response.content[:2000]
    schedule = PipelineSchedule.objects.get()
    assert (schedule.cron, schedule.timezone, schedule.created_by) == ("5 4 * * *", "Europe/Berlin", staff)
    assert schedule.next_run_at is not None and schedule.next_run_at > timezone.now()
