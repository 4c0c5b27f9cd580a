"""The build page's job graph and timeline, and the pipeline page's trends, in Chromium: drawn, kept live,
clickable, readable on a phone.

The fixtures and the job driver are tests/test_browser.py's (the same server and browser).
The screenshots in the README (docs/build-graph.png, docs/pipeline-trends.png) are taken here.
"""

from __future__ import annotations

import time
from typing import Any

from tests.test_browser import (  # noqa: F401 (fixtures, found by name)
    PROJECT_ROOT,
    Runner,
    _sync_django_beside_playwright,
    agent,
    assert_not_reloaded,
    browser,
    build_path,
    context,
    job_row,
    mark_page,
    page,
    server,
    sign_in,
)
from playwright.sync_api import Browser, BrowserContext, Page, expect

from builds import services as build_services
from builds.models import Agent, BuildSource
from organizations.models import User
from pipelines.models import Pipeline
from tests.dsl import hm
from tests.test_trends import ran, timed

SCREENSHOT = PROJECT_ROOT / "docs" / "build-graph.png"
TRENDS_SCREENSHOT = PROJECT_ROOT / "docs" / "pipeline-trends.png"


def graph_ir() -> dict[str, Any]:
    """hello → build → test, each in its parent's files; lint after hello (order only); deploy after a wait."""
    hello = hm.sh("echo hello", key="hello", label=":wave: hello", image="ubuntu:24.04")
    tested = hello.sh("make build", key="build", label=":hammer: build").sh("make test", key="test",
                                                                           label=":white_check_mark: test")
    doc = hm.pipeline([tested, hm.sh("make lint", key="lint", label=":mag: lint"), hm.wait(),
                       hm.sh("make deploy", key="deploy", label=":rocket: deploy")])
    keys = [node["step"]["key"] for node in doc["graph"]["nodes"]]
    doc["graph"]["edges"].append([keys.index("hello"), keys.index("lint"), "depends_on"])
    return doc


def node(page: Page, job: Any) -> Any:
    return page.locator(f'[data-graph-node="{job.pk}"]')


def bar(page: Page, job: Any) -> Any:
    return page.locator(f'[data-bar="{job.pk}"]')


def test_the_graph_and_the_timeline_follow_the_build_live_and_a_node_opens_its_log(
        page: Page, context: BrowserContext, server: str, owner: User, pipeline: Pipeline, agent: Agent) -> None:
    build = build_services.create_build(
        pipeline=pipeline, created_by=owner,
        request=build_services.validate_build_request(branch="main", commit="9fceb02d0ae598e95dc970b74767f19372d61af8",
                                                      message=":sparkles: Draw the build", source=BuildSource.UI,
                                                      pipeline_ir=graph_ir()))
    jobs = {job.step_key: job for job in build.jobs.all()}
    run = Runner(agent)
    sign_in(context, server, owner)
    page.goto(build_path(build))
    mark_page(page)

    expect(page.locator("[data-graph-node]")).to_have_count(5)
    expect(node(page, jobs["hello"])).to_contain_text("👋 hello")
    expect(node(page, jobs["hello"])).to_have_attribute("data-state", "scheduled")
    expect(node(page, jobs["test"])).to_have_attribute("data-state", "pending")
    edges = page.locator("#job-graph .svg-scroll .edge")
    kinds = edges.evaluate_all("paths => paths.map(p => p.dataset.kind).sort()")
    # hello→build, build→test (builds_in, solid); hello→lint, then test→deploy and lint→deploy: the
    # wait's other two edges into deploy (from hello and build) are implied by those, not drawn.
    assert kinds == ["builds_in", "builds_in", "depends_on", "depends_on", "depends_on"]
    dashes = edges.evaluate_all("paths => paths.map(p => [p.dataset.kind, getComputedStyle(p).strokeDasharray])")
    assert {kind for kind, dash in dashes if dash not in ("", "none")} == {"depends_on"}
    expect(page.locator("#job-graph .legend")).to_contain_text("builds in")
    expect(bar(page, jobs["hello"]).locator(".bar-label")).to_have_text("👋 hello")
    # The labels' shortcodes as emoji in the job list and the heading too (and as typed in the API).
    expect(job_row(page, jobs["hello"]).locator(".job-name strong")).to_have_text("👋 hello")
    expect(page.locator(".page-head")).to_contain_text("✨ Draw the build")

    time.sleep(0.3)  # waiting for an agent
    hello = run.start("hello", build)
    expect(node(page, jobs["hello"])).to_have_attribute("data-state", "running")
    expect(bar(page, jobs["hello"])).to_have_attribute("data-state", "running")
    assert run.finish(hello) == "passed"
    expect(node(page, jobs["hello"])).to_have_attribute("data-state", "passed")
    expect(node(page, jobs["build"])).to_have_attribute("data-state", "scheduled")
    width = float(bar(page, jobs["hello"]).locator("rect.running").get_attribute("width"))
    assert width > 0

    # A node opens its job's log in the list.
    node(page, jobs["lint"]).click()
    expect(job_row(page, jobs["lint"]).locator("[data-log-toggle]")).to_have_attribute("aria-expanded", "true")
    expect(job_row(page, jobs["lint"]).locator(".log-panel")).to_be_visible()
    assert page.evaluate("location.hash") == f"#job-{jobs['lint'].pk}"

    # build and lint side by side, then test, then deploy: time enough for the bars to show it.
    built, linted = run.start("build", build), run.start("lint", build)
    time.sleep(0.4)
    run.finish(linted)
    time.sleep(0.6)
    run.finish(built)
    tested = run.start("test", build)
    time.sleep(0.8)
    run.finish(tested)
    time.sleep(0.2)
    run.finish(run.start("deploy", build))
    expect(page.locator("h1 .badge")).to_have_text("passed")
    for job in jobs.values():
        expect(node(page, job)).to_have_attribute("data-state", "passed")
    # The chain that set the build's duration; lint ran beside it.
    expect(page.locator(".timeline .bar.critical")).to_have_count(4)
    assert "critical" not in (bar(page, jobs["lint"]).get_attribute("class") or "")
    expect(page.locator(".timeline [data-ticks] text").first).to_have_text("0s")
    assert_not_reloaded(page)

    job_row(page, jobs["lint"]).get_by_role("button", name="Hide log").click()
    page.mouse.move(0, 0)
    page.set_viewport_size({"width": 1280, "height": 640})
    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.locator(".pictures").screenshot(path=str(SCREENSHOT))
    assert SCREENSHOT.stat().st_size > 10_000


def test_the_pictures_scroll_in_their_box_on_a_phone(browser: Browser, server: str, owner: User,
                                                     pipeline: Pipeline, transactional_db: None) -> None:
    build = build_services.create_build(
        pipeline=pipeline, request=build_services.validate_build_request(
            branch="main", commit="abc123", source=BuildSource.UI, pipeline_ir=graph_ir()))
    ctx = browser.new_context(base_url=server, viewport={"width": 375, "height": 740}, is_mobile=True,
                              has_touch=True)
    try:
        sign_in(ctx, server, owner)
        phone = ctx.new_page()
        phone.goto(build_path(build))
        expect(phone.locator("#job-graph .svg-scroll svg")).to_be_visible()
        assert phone.evaluate("document.documentElement.scrollWidth - window.innerWidth") <= 0
        box = phone.locator("#job-graph .svg-scroll")
        # Drawn at full size (labels readable), scrolled sideways inside its box.
        assert box.evaluate("el => el.scrollWidth > el.clientWidth")
        assert phone.locator("#job-graph .svg-scroll svg").evaluate("svg => svg.getBoundingClientRect().width") >= 500
    finally:
        ctx.close()


def test_the_pipeline_page_charts_the_last_builds_and_a_bar_opens_its_build(
        page: Page, context: BrowserContext, server: str, owner: User, pipeline: Pipeline) -> None:
    builds = []
    for i in range(24):
        build = ran(pipeline, None, a_fails=i % 7 == 3)
        timed(build, {"a": 20 + (i * 37) % 50, "b": 40 + (i * 53) % 90})
        builds.append(build)
    sign_in(context, server, owner)
    page.goto(f"/orgs/{pipeline.organization.slug}/pipelines/{pipeline.slug}/")

    bars = page.locator(".trend-chart [data-trend-build]")
    expect(bars).to_have_count(24)
    assert bars.evaluate_all("links => links.map(a => +a.dataset.trendBuild)") == [b.number for b in builds]
    failed = [b for b in builds if b.state == "failed"]
    expect(page.locator('.trend-chart [data-state="failed"]')).to_have_count(len(failed))
    # Colour by state, height by duration: a failed build's bar is red, the longest is the tallest.
    assert page.locator(f'[data-trend-build="{failed[0].number}"] rect').evaluate(
        "r => getComputedStyle(r).fill") == "rgb(201, 42, 42)"
    expect(page.locator("[data-pass-rate]")).to_have_text(f"{round(100 * (24 - len(failed)) / 24)}%")
    expect(page.locator("#step-trends tbody tr")).to_have_count(2)
    expect(page.locator('#step-trends [data-step="a"] td').nth(2)).to_have_text(
        f"{round(100 * len(failed) / 24)}%")

    page.set_viewport_size({"width": 1280, "height": 640})
    TRENDS_SCREENSHOT.parent.mkdir(exist_ok=True)
    page.locator("#trends").screenshot(path=str(TRENDS_SCREENSHOT))
    assert TRENDS_SCREENSHOT.stat().st_size > 5_000

    page.locator(f'[data-trend-build="{builds[5].number}"]').click()
    expect(page).to_have_url(f"{server}/orgs/{pipeline.organization.slug}/pipelines/{pipeline.slug}/builds/"
                             f"{builds[5].number}")
