"""The pages in a real browser: headless Chromium (Debian's `chromium` package) driven by Playwright.

What they prove: signing in; the build history with a filter and a second page;
a build page on which a running job's log lines appear live and the states
change to passed without a reload; cancel from the page; the CLI login
confirmation; creating and revoking an API token. Jobs are driven from the test
through the same services the agent API calls. The build page screenshot in
the README (docs/build-page.png) is taken here, on every run.

The server is the production entry point, `harmont.asgi.application` (log
streams to Django's async handler, everything else to the WSGI app on
threads), under uvicorn in a thread of the test process. Not pytest-django's
`live_server`: that is a WSGI server, and under WSGI Django must read an async
streaming response to its end before sending any of it, so a log would only
arrive once its job had finished.

Without /usr/bin/chromium (or the playwright package) these tests skip locally;
under CI (`CI` set) that is a failure instead, so CI can't pass without them.
"""

from __future__ import annotations

import gc
import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = Path("/usr/bin/chromium")
PROJECT_ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT = PROJECT_ROOT / "docs" / "build-page.png"


def _missing() -> str | None:
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing: apt-get install -y chromium"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is missing: pip install -r requirements.txt"
    return None


if _missing():
    if os.environ.get("CI"):
        pytest.fail(f"browser tests can't run in CI: {_missing()}", pytrace=False)
    pytest.skip(f"browser tests skipped: {_missing()}", allow_module_level=True)

import uvicorn  # noqa: E402
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler  # noqa: E402
from django.db import connections  # noqa: E402
from django.test import Client  # noqa: E402
from playwright.sync_api import Browser, BrowserContext, Page, Route, expect, sync_playwright  # noqa: E402

from builds import services as build_services  # noqa: E402
from builds.models import Agent, Build, BuildSource, Job  # noqa: E402
from builds.services import ChunkIn  # noqa: E402
from harmont.tokens import hash_secret  # noqa: E402
from organizations import services as org_services  # noqa: E402
from organizations.models import ApiToken, TokenKind, User  # noqa: E402
from pipelines.models import Pipeline  # noqa: E402
from tests.dsl import hm  # noqa: E402
from tests.e2e import wait_for  # noqa: E402
from tests.helpers import make_build  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
PASSWORD = "pw-123456-long"  # conftest's make_user
# Generous for a busy CI box; the page polls every 2 s and the stream ticks every 0.2 s.
LIVE_TIMEOUT_MS = 15_000


# ---------------------------------------------------------------- the server and the browser


@pytest.fixture(scope="module")
def _sync_django_beside_playwright() -> Iterator[None]:
    """Playwright's sync API keeps an asyncio loop on the test's thread while it runs, and Django
    refuses ORM calls from a thread with a running loop. The calls here are ordinary blocking test
    code (the loop only serves Playwright between our calls), so allow them, for this module only."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
        yield


@pytest.fixture(scope="module")
def server(e2e_database: None, django_db_blocker: Any) -> Iterator[str]:
    """harmont.asgi under uvicorn in a thread (static files from the finders, as runserver does)."""
    from harmont.asgi import application

    conn = connections["default"]
    # The server's threads open their own connections; closing them after each request keeps
    # none alive for PostgreSQL's DROP DATABASE at the end of the session.
    saved_max_age = conn.settings_dict.get("CONN_MAX_AGE", 0)
    conn.settings_dict["CONN_MAX_AGE"] = 0
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(ASGIStaticFilesHandler(application), lifespan="off", log_level="warning",
                            timeout_graceful_shutdown=2, loop="asyncio", http="h11")
    uvi = uvicorn.Server(config)
    thread = threading.Thread(target=uvi.run, kwargs={"sockets": [sock]}, name="page-server", daemon=True)
    thread.start()
    wait_for(lambda: uvi.started, 15, what="uvicorn to start")
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        uvi.should_exit = True
        thread.join(timeout=15)
        sock.close()
        conn.settings_dict["CONN_MAX_AGE"] = saved_max_age
        with django_db_blocker.unblock():
            close_server_sessions()


def close_server_sessions() -> None:
    """End the database sessions the server's threads left open.

    The log stream polls from executor threads (`sync_to_async(thread_sensitive=False)`),
    which no request cycle ever closes; on PostgreSQL their sessions would block dropping
    the test database. Their threads are gone now, so nothing uses them any more.
    """
    gc.collect()  # an unreachable connection closes when collected
    conn = connections["default"]
    if conn.vendor != "postgresql":
        return
    with conn.cursor() as cursor:
        cursor.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                       "WHERE datname = current_database() AND pid <> pg_backend_pid()")


@pytest.fixture(scope="module")
def browser(_sync_django_beside_playwright: None) -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()
            # While Playwright's loop runs on this thread, Django keeps this thread's connections
            # per async context, apart from the ones pytest-django closes: close them here.
            connections.close_all()


@pytest.fixture
def context(browser: Browser, server: str, transactional_db: None) -> Iterator[BrowserContext]:
    """A fresh browser profile per test, closed (with its open log streams) before the database is flushed."""
    ctx = browser.new_context(base_url=server, viewport={"width": 1280, "height": 900}, locale="en-US")
    ctx.set_default_timeout(LIVE_TIMEOUT_MS)
    errors: list[str] = []
    ctx.on("weberror", lambda error: errors.append(str(error.error)))
    # Whatever the Content-Security-Policy blocked (an inline script or style, a foreign origin).
    blocked: list[str] = []
    ctx.on("console", lambda message: blocked.append(message.text)
           if message.type == "error" and "Content Security Policy" in message.text else None)
    try:
        yield ctx
    finally:
        ctx.close()
    assert not errors, f"JavaScript errors on the page: {errors}"
    assert not blocked, f"The page broke its own Content-Security-Policy: {blocked}"


@pytest.fixture
def page(context: BrowserContext) -> Page:
    return context.new_page()


def sign_in(context: BrowserContext, server: str, user: User) -> None:
    """Sign in by session cookie (the sign-in form itself has its own test)."""
    client = Client()
    client.force_login(user)
    cookie = client.cookies["sessionid"]
    context.add_cookies([{"name": "sessionid", "value": cookie.value, "url": server}])


def api(server: str, method: str, path: str, *, token: str | None = None, body: Any = None) -> tuple[int, Any]:
    """A plain HTTP call to the API, as a script or the CLI would make it."""
    request = urllib.request.Request(server + path, method=method, data=json.dumps(body).encode() if body else None,
                                     headers={"Content-Type": "application/json"})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


# ---------------------------------------------------------------- driving jobs as an agent would


@pytest.fixture
def agent(org: Any) -> Agent:
    """An agent row, as `POST /agent/register` makes it, for the services to hand jobs to."""
    token = org_services.create_agent_token(organization=org, description="browser tests").token
    return Agent.objects.create(organization=org, token=token, name="box-1", hostname="box1",
                                session_hash=hash_secret(f"hms_{uuid.uuid4()}"))


class Runner:
    """Claims, starts, logs and finishes jobs through builds.services, like the agent API."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.seq: dict[uuid.UUID, int] = {}

    def start(self, step_key: str, build: Build) -> Job:
        claim = build_services.claim_job(agent=self.agent)
        assert claim is not None and claim.job.step_key == step_key, claim
        build_services.start_job(job=claim.job)
        return claim.job

    def log(self, job: Job, *lines: str, stream_kind: int = 0) -> None:
        chunks = []
        for line in lines:
            self.seq[job.pk] = self.seq.get(job.pk, 0) + 1
            chunks.append(ChunkIn(seq=self.seq[job.pk], stream_kind=stream_kind, content=line, ts=time.time_ns()))
        build_services.append_log(job=job, chunks=chunks)

    def finish(self, job: Job, exit_code: int = 0) -> str:
        return build_services.report_finish(job=job, exit_code=exit_code)


def demo_ir() -> dict[str, Any]:
    """The demo's shape: hello → build → test (each in its parent's files), and lint after hello."""
    hello = hm.sh("echo hello", key="hello", label="hello", image="ubuntu:24.04")
    built = hello.sh("make build", key="build", label="build")
    tested = built.sh("make test", key="test", label="test")
    lint = hello.sh("make lint", key="lint", label="lint")
    return hm.pipeline([tested, lint])


def job_row(page: Page, job: Job) -> Any:
    return page.locator(f"#job-{job.pk}")


def job_badge(page: Page, job: Job) -> Any:
    return page.locator(f"#job-{job.pk} .job-head .badge")


def build_path(build: Build) -> str:
    return f"/orgs/{build.pipeline.organization.slug}/pipelines/{build.pipeline.slug}/builds/{build.number}"


def mark_page(page: Page) -> None:
    """A marker that only survives as long as the document does: proof that nothing reloaded."""
    page.evaluate("window.__noReload = 'still here'")


def assert_not_reloaded(page: Page) -> None:
    assert page.evaluate("window.__noReload") == "still here"


# ---------------------------------------------------------------- the tests


def test_sign_in_with_email_and_password_and_sign_out(page: Page, owner: User, org: Any, pipeline: Pipeline) -> None:
    page.goto("/")
    expect(page).to_have_url("/login?next=/")
    page.get_by_label("Email").fill("owner@example.com")
    page.get_by_label("Password").fill("wrong-password-here")
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator(".errorlist")).to_contain_text("correct")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(f"/orgs/{org.slug}/")
    expect(page.locator(".pipeline-card")).to_contain_text("Web CI")
    # The organization switcher lists the personal organization too.
    page.locator(".org-switcher summary").click()
    expect(page.locator(".org-switcher .menu-list")).to_contain_text(owner.personal_org.name)
    page.locator(".user-menu summary").click()
    page.get_by_role("button", name="Sign out").click()
    expect(page).to_have_url("/login")
    page.goto("/settings/tokens")
    expect(page).to_have_url("/login?next=/settings/tokens")


def test_the_api_reference_and_the_admin_run_within_the_content_security_policy(page: Page, context: BrowserContext,
                                                                                server: str) -> None:
    """Swagger UI and Django's admin are not our templates; the context's check fails on anything blocked."""
    page.goto("/api/v0/docs/")
    expect(page.locator("#swagger-ui .opblock").first).to_be_visible()
    staff = User.objects.create_superuser(email="root@example.com", password="root-password-long")
    sign_in(context, server, staff)
    page.goto("/admin/builds/build/")
    expect(page.locator("#changelist")).to_be_visible()


def test_history_with_a_filter_and_a_second_page(page: Page, context: BrowserContext, server: str, owner: User,
                                                 pipeline: Pipeline) -> None:
    for n in range(1, 31):
        make_build(pipeline, branch="feature/login" if n % 4 == 0 else "main", message=f"change number {n}")
    sign_in(context, server, owner)
    page.goto(f"/orgs/{pipeline.organization.slug}/")
    page.locator(".pipeline-card", has_text="Web CI").click()
    rows = page.locator("#builds tbody tr")
    expect(rows).to_have_count(25)
    expect(rows.first).to_contain_text("#30")
    expect(rows.last).to_contain_text("#6")
    page.get_by_role("link", name="Older →").click()
    expect(rows).to_have_count(5)
    expect(rows.first).to_contain_text("#5")
    expect(page.get_by_role("link", name="Older →")).to_have_count(0)
    # A filter is a link: the query string carries it.
    filters = page.locator("#filters")
    filters.get_by_label("Branch").fill("feature/login")
    filters.get_by_role("button", name="Filter").click()
    expect(page).to_have_url(f"/orgs/{pipeline.organization.slug}/pipelines/{pipeline.slug}/?branch=feature%2Flogin&state=")
    expect(rows).to_have_count(7)
    for i in range(7):
        expect(rows.nth(i).locator("td").nth(2)).to_have_text("feature/login")
    shared = page.url
    other = context.new_page()
    other.goto(shared)
    expect(other.locator("#builds tbody tr")).to_have_count(7)
    other.close()
    filters.get_by_label("State").select_option("canceled")
    filters.get_by_role("button", name="Filter").click()
    expect(page.locator(".empty").first).to_contain_text("No builds match")


def test_new_build_form_opens_the_new_build(page: Page, context: BrowserContext, server: str, owner: User,
                                            pipeline: Pipeline) -> None:
    sign_in(context, server, owner)
    page.goto(f"/orgs/{pipeline.organization.slug}/pipelines/{pipeline.slug}/")
    page.get_by_text("New build").click()
    form = page.locator("#new-build-form")
    expect(form.get_by_label("Branch")).to_have_value("main")  # the pipeline's default branch
    form.get_by_label("Branch").fill("release/1.2")
    form.get_by_label("Commit").fill("d34db33f")
    form.get_by_label("Message").fill("Ship it")
    form.get_by_role("button", name="Start build").click()
    expect(page.locator("h1")).to_contain_text("Build #1")
    build = Build.objects.get(pipeline=pipeline)
    assert (build.source, build.branch, build.created_by) == (BuildSource.UI, "release/1.2", owner)
    expect(page.locator(".build-meta")).to_contain_text("ui · owner@example.com")


def test_build_page_follows_a_running_job_live_until_the_build_passes(
        page: Page, context: BrowserContext, server: str, owner: User, pipeline: Pipeline, agent: Agent) -> None:
    build = build_services.create_build(
        pipeline=pipeline, created_by=owner,
        request=build_services.validate_build_request(branch="main", commit="9fceb02d0ae598e95dc970b74767f19372d61af8",
                                                      message="Render the build page", source=BuildSource.UI,
                                                      pipeline_ir=demo_ir()))
    jobs = {job.step_key: job for job in build.jobs.all()}
    run = Runner(agent)
    sign_in(context, server, owner)
    page.goto(build_path(build))
    mark_page(page)
    expect(page.locator("h1 .badge")).to_have_text("scheduled")
    expect(page.locator("#jobs .job")).to_have_count(4)
    # Dependency order: hello first; test after build.
    keys = page.locator("#jobs .job").evaluate_all("items => items.map(li => li.dataset.stepKey)")
    assert keys.index("hello") == 0 and keys.index("build") < keys.index("test")

    job_row(page, jobs["hello"]).get_by_role("button", name="Log").click()
    log = job_row(page, jobs["hello"]).locator("pre.log")
    hello = run.start("hello", build)
    expect(job_badge(page, jobs["hello"])).to_have_text("running")
    expect(page.locator("h1 .badge")).to_have_text("running")

    run.log(hello, "\x1b[1mHello from Harmont\x1b[0m\n", "<b>not markup</b> & friends\n")
    expect(log).to_contain_text("Hello from Harmont")
    expect(log.locator("span.b")).to_have_text("Hello from Harmont")
    expect(log).to_contain_text("<b>not markup</b> & friends")  # escaped, shown as text
    assert log.locator("b").count() == 0
    # A fast log: hundreds of lines in a few batches keep up, in order.
    for batch in range(4):
        run.log(hello, *[f"\x1b[32mok\x1b[0m line {batch * 100 + i}\n" for i in range(100)])
    expect(log).to_contain_text("line 399")
    text = log.inner_text()
    assert text.index("line 0\n") < text.index("line 250") < text.index("line 399")
    assert log.locator("span.f2").count() == 400
    assert job_row(page, jobs["hello"]).locator("[data-log-state]").inner_text() == "live"
    assert run.finish(hello) == "passed"
    expect(job_badge(page, jobs["hello"])).to_have_text("passed")
    expect(job_row(page, jobs["hello"]).locator("[data-job-exit]")).to_have_text("exit 0")
    expect(job_row(page, jobs["hello"]).locator("[data-log-state]")).to_have_text("end of log")

    # The rest, with the log of `test` open while it runs.
    job_row(page, jobs["test"]).get_by_role("button", name="Log").click()
    for key, lines in [
        ("build", ["\x1b[36m==>\x1b[0m \x1b[1mcompiling\x1b[0m 12 files\n", "built in 1.2 s\n"]),
        ("lint", ["\x1b[1mlint:\x1b[0m nothing to complain about\n"]),
        ("test", ["\x1b[1m============ test session starts ============\x1b[0m\n",
                  "collected 42 items\n\n",
                  "tests/test_api.py \x1b[32m....................\x1b[0m \x1b[32m[ 47%]\x1b[0m\n",
                  "tests/test_pages.py \x1b[32m..................\x1b[0m\x1b[33ms\x1b[0m\x1b[32m...\x1b[0m \x1b[32m[100%]\x1b[0m\n",
                  "\x1b[33mwarning:\x1b[0m 1 test skipped (needs PostgreSQL)\n",
                  "\x1b[32m\x1b[1m============ 41 passed, 1 skipped in 3.21s ============\x1b[0m\n"]),
    ]:
        job = run.start(key, build)
        run.log(job, *lines)
        if key == "test":
            expect(job_row(page, jobs["test"]).locator("pre.log")).to_contain_text("41 passed")
            expect(job_badge(page, jobs["test"])).to_have_text("running")
        run.finish(job)
    expect(page.locator("h1 .badge")).to_have_text("passed")
    for job in jobs.values():
        expect(job_badge(page, job)).to_have_text("passed")
    expect(page.locator("#cancel-form")).to_be_hidden()
    assert_not_reloaded(page)
    build.refresh_from_db()
    assert build.state == "passed"

    # The README's screenshot: the jobs, and the open log of `test`.
    job_row(page, jobs["hello"]).get_by_role("button", name="Hide log").click()
    expect(job_row(page, jobs["test"]).locator("[data-log-state]")).to_have_text("end of log")
    page.mouse.move(0, 0)
    page.set_viewport_size({"width": 1280, "height": 640})  # the page's own height, not a tall empty window
    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    assert SCREENSHOT.stat().st_size > 10_000


def test_a_huge_log_keeps_its_tail_on_the_page_and_links_the_raw_log(
        page: Page, context: BrowserContext, server: str, owner: User, pipeline: Pipeline, agent: Agent) -> None:
    build = make_build(pipeline)
    run = Runner(agent)
    a = run.start("a", build)
    for batch in range(7):
        run.log(a, *["".join(f"line {n}\n" for n in range(start, start + 100))
                     for start in range(batch * 1000, (batch + 1) * 1000, 100)])
    sign_in(context, server, owner)
    page.goto(build_path(build))
    job_row(page, a).get_by_role("button", name="Log").click()
    log = job_row(page, a).locator("pre.log")
    expect(log).to_contain_text("line 6999")
    note = job_row(page, a).locator("[data-log-note]")
    expect(note).to_be_visible()
    shown = log.evaluate("pre => pre.textContent.split('\\n').length - 1")
    assert 4000 <= shown <= 5000, shown
    assert "line 0\n" not in log.inner_text()
    raw = page.request.get(note.get_by_role("link").get_attribute("href"))
    assert raw.ok and raw.text().startswith("line 0\nline 1\n") and raw.text().endswith("line 6999\n")
    # More output still arrives live at the end, and the page stays capped.
    run.log(a, "".join(f"more {n}\n" for n in range(2000)))
    expect(log).to_contain_text("more 1999")
    assert log.evaluate("pre => pre.textContent.split('\\n').length - 1") <= 5000


def test_ansi_converter_escapes_html_and_renders_sgr(page: Page, server: str) -> None:
    page.goto("/login")
    page.add_script_tag(url="/static/harmont/build.js")
    convert = """pieces => { const c = new window.HarmontAnsi(); return pieces.map(p => c.push(p)).join(""); }"""
    cases = [
        (["\x1b[1;31mred bold\x1b[0m plain"], '<span class="b f1">red bold</span> plain'),
        (["\x1b[3", "2mgreen\x1b[0m"], '<span class="f2">green</span>'),  # a sequence split across chunks
        (["\x1b[33m", "still yellow\n", "\x1b[39mdefault"], '<span class="f3">still yellow\n</span>default'),
        (["\x1b[92mbright\x1b[0m"], '<span class="f10">bright</span>'),
        (["\x1b[44mon blue\x1b[49m off"], '<span class="g4">on blue</span> off'),
        (["\x1b[38;5;196mx\x1b[48;2;1;2;3my\x1b[m"], "xy"),  # 256/true colour: not misread as codes
        (["\x1b[1mb\x1b[22mn"], '<span class="b">b</span>n'),
        (["<script>alert('x')</script> & \""], "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;"),
        (["\x1b[31m<b>\x1b[0m"], '<span class="f1">&lt;b&gt;</span>'),
        (["a\x1b[2Kb\x1b[?25lc\x1b]0;title\x07d"], "abcd"),  # other sequences dropped
        (["one\r\ntwo\rthree"], "one\ntwo\nthree"),
    ]
    for pieces, expected in cases:
        assert page.evaluate(convert, pieces) == expected, pieces


def test_log_panel_opened_after_its_token_expired_gets_a_fresh_one(
        page: Page, context: BrowserContext, server: str, owner: User, pipeline: Pipeline, agent: Agent,
        settings: Any) -> None:
    settings.LOG_TOKEN_TTL_SECONDS = 1
    build = make_build(pipeline)
    first = Runner(agent)
    a = first.start("a", build)
    first.log(a, "from a\n")
    token_requests: list[str] = []
    page.on("request", lambda request: token_requests.append(request.url) if "log-token.json" in request.url else None)
    sign_in(context, server, owner)
    page.goto(build_path(build))
    job_row(page, a).get_by_role("button", name="Log").click()
    expect(job_row(page, a).locator("pre.log")).to_contain_text("from a")
    time.sleep(1.5)  # the token the page holds has expired now
    first.log(a, "still streaming\n")  # an open stream outlives its token
    expect(job_row(page, a).locator("pre.log")).to_contain_text("still streaming")
    b = build.jobs.get(step_key="b")
    job_row(page, b).get_by_role("button", name="Log").click()
    first.finish(a)
    b_job = first.start("b", build)
    first.log(b_job, "from b\n")
    expect(job_row(page, b).locator("pre.log")).to_contain_text("from b")
    assert len(token_requests) >= 2


def test_cancel_from_the_build_page(page: Page, context: BrowserContext, server: str, member: User,
                                    pipeline: Pipeline, agent: Agent) -> None:
    build = make_build(pipeline, message="a long one")
    run = Runner(agent)
    a = run.start("a", build)
    sign_in(context, server, member)
    page.goto(build_path(build))
    expect(job_badge(page, a)).to_have_text("running")
    page.get_by_role("button", name="Cancel build").click()
    expect(page.locator(".flash")).to_contain_text(f"Build #{build.number} canceled.")
    expect(page.locator("h1 .badge")).to_have_text("canceled")
    expect(job_badge(page, a)).to_have_text("canceling")
    expect(job_badge(page, build.jobs.get(step_key="b"))).to_have_text("canceled")
    expect(page.locator("#cancel-form")).to_have_count(0)
    build.refresh_from_db()
    assert build.state == "canceled" and build.cancel_requested_at is not None
    mark_page(page)
    # The agent stops the command and reports; the page follows without a reload.
    assert run.finish(a, exit_code=143) == "canceled"
    expect(job_badge(page, a)).to_have_text("canceled")
    assert_not_reloaded(page)


def test_signed_out_while_watching_stops_the_updates_with_a_note(
        page: Page, context: BrowserContext, server: str, owner: User, pipeline: Pipeline) -> None:
    build = make_build(pipeline)
    sign_in(context, server, owner)
    page.goto(build_path(build))
    expect(page.locator("[data-live-note]")).to_be_hidden()
    context.clear_cookies()
    expect(page.locator("[data-live-note]")).to_contain_text("You were signed out")


def test_cli_login_confirmation_hands_the_cli_a_token(page: Page, server: str, owner: User) -> None:
    nonce = f"nonce-{uuid.uuid4()}"
    callbacks: list[str] = []

    def cli_listener(route: Route) -> None:
        # Stands in for the CLI's loopback listener, so no real port is needed.
        callbacks.append(route.request.url)
        route.fulfill(status=200, content_type="text/html", body="<h1>Signed in. You can close this tab.</h1>")

    page.route("http://localhost:53682/**", cli_listener)
    # Signed out: sign in first, then back to the confirmation.
    page.goto(f"/cli-login?port=53682&nonce={nonce}")
    page.get_by_label("Email").fill(owner.email)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("h1")).to_have_text("Sign in the Harmont CLI?")
    # Nothing is handed over before the user confirms.
    assert api(server, "POST", "/api/v0/auth/cli/claim", body={"nonce": nonce})[0] == 400
    page.get_by_role("button", name="Authorize the CLI").click()
    expect(page.locator("h1")).to_have_text("Signed in. You can close this tab.")
    assert callbacks == ["http://localhost:53682/callback"]
    status, body = api(server, "POST", "/api/v0/auth/cli/claim", body={"nonce": nonce})
    assert status == 200, body
    assert api(server, "GET", "/api/v0/user", token=body["token"]) == (200, {
        "uuid": str(owner.uuid), "id": str(owner.uuid), "email": owner.email, "name": owner.name,
        "personal_org_slug": owner.personal_org.slug})
    assert api(server, "POST", "/api/v0/auth/cli/claim", body={"nonce": nonce})[0] == 400  # single use

    # The paste-code variant.
    page.goto("/cli-login?paste=true")
    page.get_by_role("button", name="Show a code").click()
    code = page.get_by_test_id("cli-code").inner_text()
    assert len(code) == 16
    status, body = api(server, "POST", "/api/v0/auth/cli/redeem", body={"code": code})
    assert status == 200 and api(server, "GET", "/api/v0/user", token=body["token"])[0] == 200


def test_api_token_create_then_revoke(page: Page, context: BrowserContext, server: str, owner: User, org: Any) -> None:
    sign_in(context, server, owner)
    page.goto(f"/orgs/{org.slug}/")
    page.locator(".user-menu summary").click()
    page.get_by_role("link", name="API tokens").click()
    expect(page.locator("h1")).to_have_text("Personal API tokens")
    page.get_by_label("Description").fill("deploy script")
    page.get_by_label("Expires").select_option("30")
    page.get_by_role("button", name="Create token").click()
    raw = page.get_by_test_id("raw-token").inner_text()
    assert raw.startswith("hm_")
    assert api(server, "GET", "/api/v0/user", token=raw)[0] == 200
    row = page.locator("tr", has_text="deploy script")
    expect(row).to_have_count(1)
    page.goto("/settings/tokens")
    expect(page.get_by_test_id("raw-token")).to_have_count(0)  # shown once
    page.locator("tr", has_text="deploy script").get_by_role("button", name="Revoke").click()
    expect(page.locator(".flash")).to_contain_text("Revoked the token")
    expect(page.locator("tr", has_text="deploy script")).to_have_count(0)
    assert api(server, "GET", "/api/v0/user", token=raw)[0] == 401
    assert ApiToken.objects.get(user=owner, kind=TokenKind.PERSONAL).revoked_at is not None


def test_pages_fit_a_phone_screen(browser: Browser, server: str, owner: User, pipeline: Pipeline,
                                  agent: Agent, transactional_db: None) -> None:
    build = make_build(pipeline, message="A commit message long enough to wrap on a narrow phone screen, " * 2)
    run = Runner(agent)
    job = run.start("a", build)
    run.log(job, "a log line that is much wider than a phone screen " * 6 + "\n")
    ctx = browser.new_context(base_url=server, viewport={"width": 375, "height": 740}, is_mobile=True,
                              has_touch=True)
    try:
        sign_in(ctx, server, owner)
        phone = ctx.new_page()
        for path in [f"/orgs/{pipeline.organization.slug}/",
                     f"/orgs/{pipeline.organization.slug}/pipelines/{pipeline.slug}/",
                     build_path(build), "/settings/tokens", f"/orgs/{pipeline.organization.slug}/agents",
                     "/cli-login?paste=true", "/docs/errors/"]:
            phone.goto(path)
            if path == build_path(build):
                job_row(phone, job).get_by_role("button", name="Log").click()
                expect(job_row(phone, job).locator("pre.log")).to_contain_text("a log line")
            overflow = phone.evaluate("document.documentElement.scrollWidth - window.innerWidth")
            assert overflow <= 0, f"{path} is {overflow}px wider than the phone"
    finally:
        ctx.close()
