"""The build controls in Chromium: Retry a failed job, Rebuild, Approve a held build, and the pipeline page's
schedules; each only for those allowed, each a CSRF-protected form that goes through the services.

The fixtures and the job driver are tests/test_browser.py's (the same server and browser).
"""

from __future__ import annotations

from typing import Any

from tests.test_browser import (  # noqa: F401 (fixtures, found by name)
    Runner,
    _sync_django_beside_playwright,
    agent,
    browser,
    build_path,
    context,
    job_badge,
    page,
    server,
    sign_in,
)
from playwright.sync_api import BrowserContext, Page, expect

from builds import services as build_services
from builds.models import Agent, Build, Job
from organizations.models import User
from pipelines.models import Pipeline, PipelineSchedule
from tests.helpers import make_build


def test_retry_a_failed_job_then_rebuild(page: Page, context: BrowserContext, server: str, member: User,
                                         pipeline: Pipeline, agent: Agent) -> None:
    build = make_build(pipeline, message="flaky one")
    run = Runner(agent)
    assert run.finish(run.start("a", build), exit_code=1) == "failed"
    sign_in(context, server, member)
    page.goto(build_path(build))
    failed = build.jobs.get(step_key="a")
    expect(job_badge(page, failed)).to_have_text("failed")

    page.locator(f"#job-{failed.pk} [data-retry-form] button").click()

    expect(page.locator(".flash")).to_contain_text("Retrying a: attempt 2.")
    retry = Job.objects.get(build=build, step_key="a", attempt=2)
    expect(job_badge(page, retry)).to_have_text("scheduled")
    expect(page.locator(f"#job-{failed.pk}")).to_contain_text("retried")
    assert run.finish(run.start("a", build)) == "passed"
    assert run.finish(run.start("b", build)) == "passed"
    expect(page.locator("h1 .badge")).to_have_text("passed")

    page.get_by_role("button", name="Rebuild").click()

    rebuilt = Build.objects.get(pipeline=pipeline, rebuild_of=build.number)
    expect(page).to_have_url(f"{server}{build_path(rebuilt)}")
    expect(page.locator(".flash")).to_contain_text(f"Build #{rebuilt.number} rebuilds #{build.number}.")
    expect(page.locator("[data-rebuild-of]")).to_have_text(f"#{build.number}")


def test_an_admin_approves_a_held_build_a_member_sees_no_button(page: Page, context: BrowserContext, server: str,
                                                                 admin_user: User, member: User,
                                                                 pipeline: Pipeline, browser: Any) -> None:
    held = build_services.create_build(
        pipeline=pipeline, fork=True, held=True,
        request=build_services.validate_build_request(branch="fork/feature", commit="abc123", message="from a fork"))
    assert held.state == "held"
    other = browser.new_context(base_url=server)
    try:
        sign_in(other, server, member)
        as_member = other.new_page()
        as_member.goto(build_path(held))
        expect(as_member.locator("h1 .badge")).to_have_text("held")
        expect(as_member.locator("#approve-form")).to_have_count(0)
    finally:
        other.close()

    sign_in(context, server, admin_user)
    page.goto(build_path(held))
    page.get_by_role("button", name="Approve build").click()

    expect(page.locator(".flash")).to_contain_text(f"Build #{held.number} approved")
    expect(page.locator("h1 .badge")).to_have_text("scheduled")
    held.refresh_from_db()
    assert (held.state, held.approved_by_id) == ("scheduled", admin_user.pk)


def test_an_admin_creates_disables_and_deletes_a_schedule_on_the_pipeline_page(
        page: Page, context: BrowserContext, server: str, admin_user: User, pipeline: Pipeline) -> None:
    sign_in(context, server, admin_user)
    page.goto(f"/orgs/{pipeline.organization.slug}/pipelines/{pipeline.slug}/")
    page.locator(".new-schedule summary").click()
    form = page.locator("#new-schedule-form")
    form.locator("input[name=cron]").fill("not a cron")
    form.get_by_role("button", name="Create schedule").click()
    expect(page.locator("#new-schedule-form")).to_contain_text("Must have exactly 5 fields")  # kept, with the error
    assert not PipelineSchedule.objects.exists()

    page.locator("#new-schedule-form input[name=cron]").fill("15 3 * * 1")
    page.locator("#new-schedule-form input[name=timezone]").fill("Europe/Berlin")
    page.locator("#new-schedule-form").get_by_role("button", name="Create schedule").click()

    expect(page.locator(".flash")).to_contain_text("Schedule “15 3 * * 1” (Europe/Berlin) created.")
    schedule = PipelineSchedule.objects.get(pipeline=pipeline)
    row = page.locator(f'[data-schedule="{schedule.pk}"]')
    expect(row).to_contain_text("enabled")
    row.get_by_role("button", name="Disable").click()
    expect(page.locator(f'[data-schedule="{schedule.pk}"]')).to_contain_text("disabled")
    page.once("dialog", lambda dialog: dialog.accept())
    page.locator(f'[data-schedule="{schedule.pk}"]').get_by_role("button", name="Delete").click()
    expect(page.locator(f'[data-schedule="{schedule.pk}"]')).to_have_count(0)
    assert not PipelineSchedule.objects.exists()
