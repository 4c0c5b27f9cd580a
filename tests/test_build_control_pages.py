"""The pages of build control: the pipeline page's Schedules section (admins manage, CSRF-protected
forms), and the build page saying a build was superseded or waits for a concurrency slot."""

from __future__ import annotations

import re
from typing import Any

import pytest
from django.test import Client

from pipelines import schedules as schedule_services
from pipelines.models import PipelineSchedule
from tests.helpers import make_build

pytestmark = pytest.mark.django_db


def signed_in(user: Any, *, csrf: bool = False) -> Client:
    client = Client(enforce_csrf_checks=csrf)
    client.force_login(user)
    return client


def page(pipeline: Any, suffix: str = "") -> str:
    return f"/orgs/{pipeline.organization.slug}/pipelines/{pipeline.slug}/{suffix}"


def test_members_see_schedules_without_forms_and_admins_get_them(pipeline, member, admin_user):
    schedule = schedule_services.create_schedule(pipeline=pipeline, cron="15 3 * * *", message="nightly")
    as_member = signed_in(member).get(page(pipeline)).content.decode()
    assert f'data-schedule="{schedule.pk}"' in as_member and "15 3 * * *" in as_member
    assert "new-schedule-form" not in as_member and "/toggle" not in as_member
    as_admin = signed_in(admin_user).get(page(pipeline)).content.decode()
    assert "new-schedule-form" in as_admin and f"schedules/{schedule.pk}/toggle" in as_admin
    assert f"schedules/{schedule.pk}/delete" in as_admin


def test_admin_creates_toggles_and_deletes_a_schedule_from_the_page(pipeline, admin_user):
    web = signed_in(admin_user)
    response = web.post(page(pipeline, "schedules"), {"cron": "0 6 * * 1", "timezone": "Europe/Berlin",
                                                      "branch": "main", "commit": "HEAD", "message": ""})
    assert response.status_code == 302 and response["Location"] == page(pipeline)
    schedule = PipelineSchedule.objects.get()
    assert (schedule.cron, schedule.timezone, schedule.created_by, schedule.enabled) == (
        "0 6 * * 1", "Europe/Berlin", admin_user, True)
    assert web.post(page(pipeline, f"schedules/{schedule.pk}/toggle")).status_code == 302
    schedule.refresh_from_db()
    assert not schedule.enabled
    assert "Enable</button>" in web.get(page(pipeline)).content.decode()
    assert web.post(page(pipeline, f"schedules/{schedule.pk}/delete")).status_code == 302
    assert not PipelineSchedule.objects.exists()


def test_a_bad_schedule_form_is_422_with_the_fields_errors(pipeline, admin_user):
    response = signed_in(admin_user).post(page(pipeline, "schedules"), {
        "cron": "99 * * * *", "timezone": "Nowhere/Land", "branch": "main", "commit": "HEAD"})
    assert response.status_code == 422
    body = response.content.decode()
    assert "Not a valid cron expression." in body and "IANA time zone" in body
    assert not PipelineSchedule.objects.exists()


def test_members_may_not_post_schedule_forms_and_strangers_get_404(pipeline, member, stranger, other_org):
    schedule = schedule_services.create_schedule(pipeline=pipeline, cron="0 * * * *")
    web = signed_in(member)
    assert web.post(page(pipeline, "schedules"), {"cron": "0 * * * *", "timezone": "UTC", "branch": "main",
                                                  "commit": "HEAD"}).status_code == 403
    assert web.post(page(pipeline, f"schedules/{schedule.pk}/delete")).status_code == 403
    assert signed_in(stranger).post(page(pipeline, f"schedules/{schedule.pk}/toggle")).status_code == 404
    schedule.refresh_from_db()
    assert schedule.enabled and PipelineSchedule.objects.count() == 1


def test_schedule_forms_need_the_csrf_token(pipeline, admin_user):
    web = signed_in(admin_user, csrf=True)
    assert web.post(page(pipeline, "schedules"), {"cron": "0 * * * *", "timezone": "UTC", "branch": "main",
                                                  "commit": "HEAD"}).status_code == 403
    html = web.get(page(pipeline)).content.decode()
    token = re.search(r'id="new-schedule-form">\s*<input type="hidden" name="csrfmiddlewaretoken" value="([^"]+)"',
                      html)[1]
    assert web.post(page(pipeline, "schedules"), {"cron": "0 * * * *", "timezone": "UTC", "branch": "main",
                                                  "commit": "HEAD", "csrfmiddlewaretoken": token}).status_code == 302


def test_the_build_page_says_superseded_by_and_waiting_for_a_slot(pipeline, owner, django_capture_on_commit_callbacks):
    pipeline.cancel_intermediate_builds = True
    pipeline.max_concurrent_builds = 1
    pipeline.save(update_fields=["cancel_intermediate_builds", "max_concurrent_builds"])
    first = make_build(pipeline, branch="feature/x")
    other = make_build(pipeline, branch="feature/y")  # waits: first holds the one slot
    web = signed_in(owner)
    html = web.get(page(pipeline, f"builds/{other.number}")).content.decode()
    assert "Waiting for a concurrency slot: 1 of 1 concurrent builds of this pipeline are running." in html
    assert web.get(page(pipeline, f"builds/{other.number}/status.json")).json()["build"]["waiting_reason"] == (
        other.waiting_reason)
    with django_capture_on_commit_callbacks(execute=True):
        make_build(pipeline, branch="feature/x")
    html = web.get(page(pipeline, f"builds/{first.number}")).content.decode()
    assert "superseded" in html and "Superseded by build #3 on branch feature/x." in html
    # first's cancel freed the slot: the build that waited is admitted, and its page no longer waits.
    other.refresh_from_db()
    assert other.waiting_reason is None
    assert re.search(r'<p class="notice" data-build-waiting hidden', web.get(
        page(pipeline, f"builds/{other.number}")).content.decode())
