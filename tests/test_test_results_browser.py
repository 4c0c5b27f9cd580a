"""The build page's test results in headless Chromium (the server and browser of tests/test_browser.py).

A build whose `test` job stored a real pytest report and a Surefire report and whose retry
passed one of the failed tests: the page lists the failed tests by name with their
messages, opens a failure's details, marks the flaky one, shows the job's counts, and
keeps within its Content-Security-Policy. The README's screenshot of the section
(docs/test-results.png) is taken here.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.test_browser import (  # noqa: F401 (fixtures, found by name)
    PROJECT_ROOT,
    Runner,
    _sync_django_beside_playwright,
    agent,
    browser,
    build_path,
    context,
    expect,
    job_row,
    page,
    server,
    sign_in,
)

from builds import services as build_services  # noqa: E402
from builds.models import Agent, BuildSource, Job  # noqa: E402
from builds.services import store_artifact  # noqa: E402
from organizations.models import User  # noqa: E402
from pipelines.models import Pipeline  # noqa: E402
from tests.dsl import hm  # noqa: E402
from tests.helpers import run_tasks  # noqa: E402
from tests.test_test_results import PYTEST_REPORT, SUREFIRE_REPORT, junit  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

SCREENSHOT = PROJECT_ROOT / "docs" / "test-results.png"


@pytest.fixture(autouse=True)
def media(settings: Any, tmp_path: Any) -> None:
    settings.MEDIA_ROOT = tmp_path / "media"


def test_the_build_page_lists_the_failed_tests_with_their_messages(
        page: Any, context: Any, server: str, owner: User, pipeline: Pipeline, agent: Agent) -> None:
    built = hm.sh("make build", key="build", label=":hammer: build")
    tested = built.sh("pytest --junitxml=$HARMONT_ARTIFACTS/test-results/pytest.xml", key="test",
                      label=":test_tube: test")
    build = build_services.create_build(
        pipeline=pipeline, created_by=owner,
        request=build_services.validate_build_request(branch="main", commit="9fceb02d0ae598e95dc970b74767f19372d61af8",
                                                      message="Apply coupons at checkout", source=BuildSource.UI,
                                                      pipeline_ir=hm.pipeline([tested])))
    run = Runner(agent)
    run.finish(run.start("build", build))
    first = run.start("test", build)
    store_artifact(job=first, path="test-results/pytest.xml", content=junit(
        {"test_cart_total": "passed", "test_timing_sensitive_cache": "failed", "test_shipping_rates": "passed"}))
    run.finish(first, exit_code=1)
    build_services.retry_job(job=Job.objects.get(pk=first.pk))
    retry = run.start("test", build)
    store_artifact(job=retry, path="test-results/unit.xml", content=junit({"test_timing_sensitive_cache": "passed"}))
    store_artifact(job=retry, path="test-results/pytest.xml", content=PYTEST_REPORT)
    store_artifact(job=retry, path="test-results/TEST-com.acme.shop.CartTest.xml", content=SUREFIRE_REPORT)
    store_artifact(job=retry, path="test-results/coverage.xml", content=b"<coverage line-rate='0.93'/>")
    run.finish(retry, exit_code=1)
    assert run_tasks() == 5

    sign_in(context, server, owner)
    page.goto(build_path(build))

    section = page.locator("#test-results")
    expect(section.locator("[data-test-summary]")).to_contain_text("11 tests, 5 failed, 2 skipped")
    names = section.locator(".test-failure .test-name strong")
    expect(names).to_have_text(["test_timing_sensitive_cache", "test_checkout_applies_discount",
                                "test_payment_gateway_times_out", "test_orders_are_saved", "appliesCoupon",
                                "savesToDatabase"])
    discount = section.locator(".test-failure", has_text="test_checkout_applies_discount")
    expect(discount.locator("[data-test-message]")).to_have_text(
        "AssertionError: discount not applied\nassert 90.0 == 80")
    expect(discount.locator(".test-details")).to_be_hidden()
    discount.locator("summary").click()
    expect(discount.locator(".test-details")).to_be_visible()
    expect(discount.locator(".test-details")).to_contain_text("E       assert 90.0 == 80")
    flaky = section.locator(".test-failure.flaky")
    expect(flaky).to_have_count(1)
    expect(flaky.locator(".test-name strong")).to_have_text("test_timing_sensitive_cache")
    expect(section.locator("#test-reports-unparsed")).to_contain_text("test-results/coverage.xml")
    expect(job_row(page, retry).locator("[data-job-tests]")).to_have_text(
        "11 tests, 5 failed, 2 skipped, 1 unreadable report")
    expect(job_row(page, first).locator("[data-job-tests]")).to_have_text("3 tests, 1 failed")

    page.mouse.move(0, 0)
    page.set_viewport_size({"width": 1280, "height": 640})
    SCREENSHOT.parent.mkdir(exist_ok=True)
    section.screenshot(path=str(SCREENSHOT))
    assert SCREENSHOT.stat().st_size > 10_000

    # The pipeline page: the most frequent failures of its last builds, and the flaky test.
    page.goto(f"/orgs/{pipeline.organization.slug}/pipelines/{pipeline.slug}/")
    expect(page.locator("#frequent-failures tbody tr")).to_have_count(6)
    expect(page.locator("#flaky-tests tbody tr .test-name strong")).to_have_text(["test_timing_sensitive_cache"])
