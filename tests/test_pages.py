"""The server-rendered pages, through Django's test client: sign-in, pipelines, build history,
the build page and its page-JSON, API and agent tokens, CLI login.

Every page resolves the organization through the caller's membership (another
organization's page is a 404), requires a signed-in user, and every form is
CSRF-protected. Query counts of the history and build pages are pinned and do
not depend on how many builds or jobs they show.
"""

from __future__ import annotations

import re
import time
import uuid
from datetime import timedelta
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone

from builds import services as build_services
from builds.models import Agent, Build, BuildSource, Job, JobState
from builds.services import ChunkIn
from harmont.tokens import hash_secret
from harmont.logtokens import verify_log_token
from organizations import services as org_services
from organizations.models import AgentToken, ApiToken, CliLoginGrant, Role, TokenKind, User
from pipelines import services as pipeline_services
from pipelines.models import Pipeline
from tests.dsl import hm
from tests.helpers import make_api, make_build, settings_from_env

pytestmark = pytest.mark.django_db

PASSWORD = "pw-123456-long"  # what conftest's make_user sets


def signed_in(user: User, *, csrf: bool = False) -> Client:
    client = Client(enforce_csrf_checks=csrf)
    client.force_login(user)
    return client


@pytest.fixture
def web(owner: User) -> Client:
    """The organization owner in a browser."""
    return signed_in(owner)


@pytest.fixture
def member_web(member: User) -> Client:
    return signed_in(member)


@pytest.fixture
def stranger_web(stranger: User, other_org: Any) -> Client:
    return signed_in(stranger)


def history_url(pipeline: Pipeline, query: str = "") -> str:
    return f"/orgs/{pipeline.organization.slug}/pipelines/{pipeline.slug}/" + (f"?{query}" if query else "")


def build_url(build: Build, suffix: str = "") -> str:
    return f"/orgs/{build.pipeline.organization.slug}/pipelines/{build.pipeline.slug}/builds/{build.number}{suffix}"


def text(response: Any) -> str:
    return response.content.decode()


def numbers_on(response: Any) -> list[int]:
    """Build numbers of the history table's rows, top to bottom."""
    return [int(n) for n in re.findall(r'<tr data-number="(\d+)"', text(response))]


def run_job(job: Job, agent: Agent, *, exit_code: int | None = 0, log: str = "") -> Job:
    """Drive one job through the agent services: claim, start, log, finish."""
    claim = build_services.claim_job(agent=agent)
    assert claim is not None and claim.job.pk == job.pk
    build_services.start_job(job=claim.job)
    if log:
        build_services.append_log(job=claim.job, chunks=[ChunkIn(seq=1, stream_kind=0, content=log,
                                                                 ts=time.time_ns())])
    if exit_code is not None:
        build_services.report_finish(job=claim.job, exit_code=exit_code)
    job.refresh_from_db()
    return job


@pytest.fixture
def agent(org: Any) -> Agent:
    token = org_services.create_agent_token(organization=org, description="box").token
    return Agent.objects.create(organization=org, token=token, name="box-1", hostname="box1.internal",
                                session_hash=hash_secret(f"hms_{uuid.uuid4()}"))


# ---------------------------------------------------------------- signing in, out and up


def test_login_page_has_an_email_form_with_csrf(client: Client) -> None:
    response = client.get("/login")
    assert response.status_code == 200
    assert 'name="username"' in text(response) and 'type="email"' in text(response)
    assert "csrfmiddlewaretoken" in text(response)


def test_sign_in_with_email_and_password_lands_on_the_first_organization(client: Client, owner: User, org: Any) -> None:
    response = client.post("/login", {"username": "Owner@Example.com ", "password": PASSWORD})
    assert response.status_code == 302 and response["Location"] == "/"
    response = client.get("/")
    # The shared organization comes before the personal one.
    assert response.status_code == 302 and response["Location"] == f"/orgs/{org.slug}/"


def test_sign_in_with_a_wrong_password_is_refused(client: Client, owner: User) -> None:
    response = client.post("/login", {"username": owner.email, "password": "nope-nope-nope"})
    assert response.status_code == 200
    assert "correct" in text(response)
    assert "_auth_user_id" not in client.session


def test_sign_in_goes_back_to_next(client: Client, owner: User) -> None:
    response = client.post("/login", {"username": owner.email, "password": PASSWORD, "next": "/settings/tokens"})
    assert response["Location"] == "/settings/tokens"


def test_sign_in_ignores_a_next_on_another_site(client: Client, owner: User) -> None:
    response = client.post("/login", {"username": owner.email, "password": PASSWORD, "next": "https://evil.example/"})
    assert response["Location"] == "/"


def test_sign_out_is_a_post(web: Client) -> None:
    assert web.get("/logout").status_code == 405
    response = web.post("/logout")
    assert response.status_code == 302 and response["Location"] == "/login"
    assert web.get("/settings/tokens").status_code == 302


@pytest.fixture
def signup_on(settings: Any) -> None:
    """Sign-up is off unless the operator turns it on (`make run`'s demo does)."""
    settings.SIGNUP_ENABLED = True


def test_sign_up_is_off_unless_turned_on() -> None:
    assert settings_from_env(("SIGNUP_ENABLED",), HARMONT_SIGNUP_ENABLED="") == {"SIGNUP_ENABLED": False}
    assert settings_from_env(("SIGNUP_ENABLED",), HARMONT_SIGNUP_ENABLED="1") == {"SIGNUP_ENABLED": True}


def test_sign_up_creates_the_user_and_a_personal_organization(client: Client, signup_on: None) -> None:
    response = client.post("/signup", {"email": "New@Example.com", "name": "Nia New", "password": "a-long-passphrase"})
    assert response.status_code == 302 and response["Location"] == "/"
    user = User.objects.get(email="new@example.com")
    assert user.check_password("a-long-passphrase") and user.name == "Nia New" and user.self_registered
    assert user.personal_org.memberships.get().role == Role.OWNER
    assert client.get("/").status_code == 302  # signed in: redirected to the personal organization
    assert client.get("/").headers["Location"] == f"/orgs/{user.personal_org.slug}/"


def test_sign_up_refuses_a_taken_email_and_a_weak_password(client: Client, owner: User, signup_on: None) -> None:
    response = client.post("/signup", {"email": "OWNER@example.com", "name": "", "password": "a-long-passphrase"})
    assert response.status_code == 422 and "already exists" in text(response)
    response = client.post("/signup", {"email": "fresh@example.com", "name": "", "password": "short"})
    assert response.status_code == 422 and "too short" in text(response)
    assert not User.objects.filter(email="fresh@example.com").exists()


def test_sign_up_refuses_a_name_with_a_control_character(client: Client, signup_on: None) -> None:
    response = client.post("/signup", {"email": "new@example.com", "name": "Nia\x1b[2JNew",
                                       "password": "a-long-passphrase"})
    assert response.status_code == 422 and "Must not contain control characters" in text(response)
    assert not User.objects.filter(email="new@example.com").exists()


def test_sign_up_switched_off_is_a_404_with_a_clear_message(client: Client, settings: Any) -> None:
    settings.SIGNUP_ENABLED = False
    response = client.get("/signup")
    assert response.status_code == 404 and "Sign-up is switched off" in text(response)
    response = client.post("/signup", {"email": "x@example.com", "name": "", "password": "a-long-passphrase"})
    assert response.status_code == 404
    assert not User.objects.filter(email="x@example.com").exists()
    assert 'href="/signup"' not in text(client.get("/login"))


def test_sign_up_is_linked_from_sign_in_when_on(client: Client, signup_on: None) -> None:
    assert 'href="/signup"' in text(client.get("/login"))


def test_home_without_organizations_explains(client: Client) -> None:
    # manage.py createsuperuser makes users without a personal organization.
    admin = User.objects.create_superuser("root@example.com", "a-long-passphrase")
    client.force_login(admin)
    response = client.get("/")
    assert response.status_code == 200 and "not in any organization" in text(response)


# ---------------------------------------------------------------- every page: login, tenancy, CSRF


def page_urls(build: Build, job: Job) -> list[str]:
    org = build.pipeline.organization.slug
    return [
        "/", f"/orgs/{org}/", history_url(build.pipeline), build_url(build), build_url(build, "/status.json"),
        build_url(build, "/log-token.json"), build_url(build, f"/jobs/{job.pk}/log"), f"/orgs/{org}/agents",
        "/settings/tokens", "/cli-login?port=5000&nonce=abc", "/cli-login?paste=true",
    ]


def test_every_page_needs_a_signed_in_user(client: Client, build: Build) -> None:
    for url in page_urls(build, build.jobs.first()):
        response = client.get(url)
        if url.endswith(".json"):  # read by the page's script: a 401 it can act on, not a redirect
            assert response.status_code == 401 and response.json()["error"] == "signed_out", url
            continue
        assert response.status_code == 302, url
        assert response["Location"].startswith("/login?next="), url
    for url in [build_url(build, "/cancel"), history_url(build.pipeline), "/settings/tokens",
                f"/orgs/{build.pipeline.organization.slug}/agents", "/cli-login"]:
        assert client.post(url).status_code == 302, url
    build.refresh_from_db()
    assert build.cancel_requested_at is None


def test_another_organizations_pages_are_404(stranger_web: Client, build: Build) -> None:
    job = build.jobs.first()
    for url in page_urls(build, job)[1:8]:
        assert stranger_web.get(url).status_code == 404, url
    assert stranger_web.post(build_url(build, "/cancel")).status_code == 404
    assert stranger_web.post(history_url(build.pipeline), {"branch": "main", "commit": "abc123"}).status_code == 404
    build.refresh_from_db()
    assert build.cancel_requested_at is None
    assert Build.objects.count() == 1


def test_unknown_pipeline_build_and_job_are_404(web: Client, build: Build, other_pipeline: Pipeline) -> None:
    org = build.pipeline.organization.slug
    assert web.get(f"/orgs/{org}/pipelines/nope/").status_code == 404
    theirs = make_build(other_pipeline)
    assert web.get(build_url(theirs)).status_code == 404  # same pipeline slug, another organization
    assert web.get(build_url(build).replace("/builds/1", "/builds/2")).status_code == 404
    assert web.get(build_url(build).replace("/builds/1", "/builds/99999999999")).status_code == 404
    assert web.get(build_url(build, f"/jobs/{uuid.uuid4()}/log")).status_code == 404
    assert web.get("/orgs/no-such-org/").status_code == 404


def test_a_job_of_another_build_is_404_on_this_builds_raw_log(web: Client, pipeline: Pipeline) -> None:
    first, second = make_build(pipeline), make_build(pipeline)
    assert web.get(build_url(first, f"/jobs/{second.jobs.first().pk}/log")).status_code == 404


def test_archived_pipelines_are_gone(web: Client, build: Build) -> None:
    Pipeline.objects.filter(pk=build.pipeline_id).update(archived_at=timezone.now())
    assert web.get(history_url(build.pipeline)).status_code == 404
    assert web.get(build_url(build)).status_code == 404
    assert build.pipeline.name not in text(web.get(f"/orgs/{build.pipeline.organization.slug}/"))


def csrf_refused(client: Client, url: str, data: dict[str, Any] | None = None) -> bool:
    response = client.post(url, data or {})
    return response.status_code == 403 and "CSRF" in text(response)


def test_every_form_needs_its_csrf_token(owner: User, build: Build) -> None:
    web = signed_in(owner, csrf=True)
    token = org_services.create_personal_token(user=owner, description="keep").token
    agent_token = org_services.create_agent_token(organization=build.pipeline.organization).token
    org = build.pipeline.organization.slug
    for url, data in [
        (build_url(build, "/cancel"), None),
        (build_url(build, "/approve"), None),
        (build_url(build, f"/jobs/{build.jobs.first().pk}/retry"), None),
        (history_url(build.pipeline), {"branch": "main", "commit": "abc123"}),
        ("/settings/tokens", {"description": "x"}),
        (f"/settings/tokens/{token.pk}/revoke", None),
        (f"/orgs/{org}/agents", {"description": "x"}),
        (f"/orgs/{org}/agents/tokens/{agent_token.pk}/revoke", None),
        ("/cli-login", {"port": "5000", "nonce": "n-1"}),
        ("/cli-login", {"paste": "true"}),
        ("/logout", None),
    ]:
        assert csrf_refused(web, url, data), url
    build.refresh_from_db()
    token.refresh_from_db()
    agent_token.refresh_from_db()
    assert build.cancel_requested_at is None and Build.objects.count() == 1
    assert token.revoked_at is None and agent_token.revoked_at is None
    assert ApiToken.objects.filter(kind=TokenKind.PERSONAL).count() == 1
    assert CliLoginGrant.objects.count() == 0
    assert csrf_refused(Client(enforce_csrf_checks=True), "/login", {"username": owner.email, "password": PASSWORD})


def test_the_forms_carry_their_csrf_token(web: Client, build: Build, signup_on: None) -> None:
    org = build.pipeline.organization.slug
    for url in [build_url(build), history_url(build.pipeline), "/settings/tokens", f"/orgs/{org}/agents",
                "/cli-login?port=5000&nonce=n", "/cli-login?paste=true", "/signup"]:
        page = text(web.get(url)) if url != "/signup" else text(Client().get(url))
        forms = page.count('method="post"')
        assert forms and page.count("csrfmiddlewaretoken") == forms, url


# ---------------------------------------------------------------- organization and pipelines


def test_pipelines_page_shows_each_pipeline_with_its_latest_build(web: Client, org: Any, pipeline: Pipeline) -> None:
    make_build(pipeline, branch="main")
    latest = make_build(pipeline, branch="feature/x")
    build_services.cancel_build(build=latest)
    empty = pipeline_services.create_pipeline(org=org, name="Docs", repository="https://github.com/acme/docs.git",
                                              default_branch="main")
    response = web.get(f"/orgs/{org.slug}/")
    assert response.status_code == 200
    page = text(response)
    card = page[page.index(f'data-pipeline="{pipeline.slug}"'):]
    card = card[:card.index("</a>")]
    assert "#2 on feature/x" in card and 'data-state="canceled"' in card
    docs = page[page.index(f'data-pipeline="{empty.slug}"'):]
    assert "No builds yet" in docs[:docs.index("</a>")]


def test_organization_switcher_lists_the_callers_organizations_only(web: Client, org: Any, other_org: Any,
                                                                  owner: User) -> None:
    page = text(web.get(f"/orgs/{org.slug}/"))
    assert f'href="/orgs/{org.slug}/"' in page and f'href="/orgs/{owner.personal_org.slug}/"' in page
    assert other_org.slug not in page


def test_pipelines_page_query_count_does_not_grow_with_pipelines(web: Client, org: Any, pipeline: Pipeline,
                                                                django_assert_num_queries: Any) -> None:
    make_build(pipeline)
    url = f"/orgs/{org.slug}/"
    # session, user, memberships (switcher + org), pipelines with their latest build id, those builds
    with django_assert_num_queries(5):
        assert web.get(url).status_code == 200
    for n in range(6):
        extra = pipeline_services.create_pipeline(org=org, name=f"P{n}", repository=f"https://x/{n}.git",
                                                  default_branch="main", definition=hm.pipeline([hm.sh("true")]))
        make_build(extra)
        make_build(extra)
    with django_assert_num_queries(5):
        assert web.get(url).status_code == 200


# ---------------------------------------------------------------- build history


def test_history_rows_show_number_state_branch_commit_message_trigger_time_duration(
        web: Client, owner: User, pipeline: Pipeline, agent: Agent) -> None:
    api_build = make_build(pipeline, branch="main", commit="0123456789abcdef", message="Fix the <flaky> test")
    jobs = list(api_build.jobs.order_by("position"))
    run_job(jobs[0], agent)
    run_job(jobs[1], agent)
    ui_build = build_services.create_build(
        pipeline=pipeline, created_by=owner,
        request=build_services.validate_build_request(branch="feature/login", commit="fedcba9876543210",
                                                      message="Try the new login", source=BuildSource.UI))
    response = web.get(history_url(pipeline))
    assert response.status_code == 200
    assert numbers_on(response) == [ui_build.number, api_build.number]
    page = text(response)
    row = page[page.index(f'<tr data-number="{api_build.number}"'):]
    row = row[:row.index("</tr>")]
    assert 'data-state="passed"' in row
    assert ">main</a>" in row and "0123456789<" in row
    assert "Fix the &lt;flaky&gt; test" in row  # escaped
    assert ">api<" in row.replace("</td>", "<")
    assert re.search(r'class="num nowrap">\d+\.\d s<', row)  # a duration
    row = page[page.index(f'<tr data-number="{ui_build.number}"'):]
    row = row[:row.index("</tr>")]
    assert "ui · <span" in row and "owner@example.com" in row and 'data-state="scheduled"' in row
    assert "—" in row  # not started: no duration


def test_history_filters_by_branch_and_state_as_links(web: Client, pipeline: Pipeline) -> None:
    for branch in ["main", "dev", "main", "dev", "main"]:
        make_build(pipeline, branch=branch)
    build_services.cancel_build(build=Build.objects.get(pipeline=pipeline, number=3))
    assert numbers_on(web.get(history_url(pipeline, "branch=dev"))) == [4, 2]
    assert numbers_on(web.get(history_url(pipeline, "state=canceled"))) == [3]
    assert numbers_on(web.get(history_url(pipeline, "branch=main&state=scheduled"))) == [5, 1]
    response = web.get(history_url(pipeline, "branch=nope"))
    assert numbers_on(response) == [] and "No builds match" in text(response)
    # Each row's branch links to its filter.
    assert 'href="?branch=dev"' in text(web.get(history_url(pipeline)))


def test_history_with_an_unknown_state_says_so(web: Client, pipeline: Pipeline) -> None:
    make_build(pipeline)
    response = web.get(history_url(pipeline, "state=bogus"))
    assert response.status_code == 400
    assert "state:" in text(response) and numbers_on(response) == []


def test_history_pages_newest_first_with_an_older_link_keeping_the_filters(web: Client, pipeline: Pipeline) -> None:
    for n in range(1, 31):
        make_build(pipeline, branch="main" if n % 3 else "dev")
    first = web.get(history_url(pipeline))
    assert numbers_on(first) == list(range(30, 5, -1))
    older = re.search(r'href="\?([^"]+)" rel="next"', text(first))
    assert older and "cursor=" in older[1]
    second = web.get(history_url(pipeline, older[1].replace("&amp;", "&")))
    assert numbers_on(second) == [5, 4, 3, 2, 1]
    assert 'rel="next"' not in text(second) and 'rel="first"' in text(second)
    # Filters ride along with the cursor.
    dev = web.get(history_url(pipeline, "branch=main&limit=5"))
    assert numbers_on(dev) == [29, 28, 26, 25, 23]
    older = re.search(r'href="\?([^"]+)" rel="next"', text(dev))[1].replace("&amp;", "&")
    assert "branch=main" in older and "limit=5" in older
    assert numbers_on(web.get(history_url(pipeline, older))) == [22, 20, 19, 17, 16]


def test_history_with_a_broken_cursor_shows_the_newest_builds(web: Client, pipeline: Pipeline) -> None:
    make_build(pipeline)
    response = web.get(history_url(pipeline, "cursor=%%%"))
    assert response.status_code == 200 and numbers_on(response) == [1]
    assert "no longer valid" in text(response)


@pytest.mark.parametrize("query", ["", "branch=main", "state=scheduled"])
def test_history_query_count_is_pinned_whatever_the_page(web: Client, owner: User, pipeline: Pipeline, query: str,
                                                         django_assert_num_queries: Any) -> None:
    def create(n: int) -> None:
        for _ in range(n):
            build_services.create_build(pipeline=pipeline, created_by=owner,
                                        request=build_services.validate_build_request(branch="main", commit="c0ffee"))
    create(2)
    # session, user, memberships, pipeline, one page of builds (creators joined), the schedules, and the
    # trends: the last builds, their jobs by step
    with django_assert_num_queries(8):
        assert len(numbers_on(web.get(history_url(pipeline, query)))) == 2
    create(60)
    with django_assert_num_queries(8):
        first = web.get(history_url(pipeline, query))
    assert len(numbers_on(first)) == 25
    older = re.search(r'href="\?([^"]+)" rel="next"', text(first))[1].replace("&amp;", "&")
    with django_assert_num_queries(8):
        assert len(numbers_on(web.get(history_url(pipeline, older)))) == 25


# ---------------------------------------------------------------- new build form


def test_new_build_form_creates_a_ui_build_and_opens_it(web: Client, owner: User, pipeline: Pipeline) -> None:
    page = text(web.get(history_url(pipeline)))
    assert 'id="new-build-form"' in page and 'value="main"' in page  # the default branch
    response = web.post(history_url(pipeline), {"branch": "feature/y", "commit": "abc123", "message": "by hand"})
    build = Build.objects.get(pipeline=pipeline)
    assert response.status_code == 302 and response["Location"] == build_url(build)
    assert (build.source, build.created_by, build.branch, build.commit, build.message) == (
        BuildSource.UI, owner, "feature/y", "abc123", "by hand")
    assert build.jobs.count() == 2


def test_new_build_form_shows_what_is_missing(web: Client, pipeline: Pipeline) -> None:
    response = web.post(history_url(pipeline), {"branch": "main", "commit": ""})
    assert response.status_code == 422
    assert "This field is required" in text(response) and not Build.objects.exists()


@pytest.mark.parametrize(("branch", "commit", "field"), [
    ("--upload-pack=touch /tmp/x;git-upload-pack", "HEAD", "branch"),
    ("main", "--upload-pack=touch /tmp/x;git-upload-pack", "commit"),
])
def test_new_build_form_refuses_a_ref_git_would_misread(web: Client, pipeline: Pipeline, branch: str, commit: str,
                                                       field: str) -> None:
    response = web.post(history_url(pipeline), {"branch": branch, "commit": commit})
    assert response.status_code == 422
    assert response.context["form"].errors[field] and not Build.objects.exists()


def test_new_build_form_shows_the_services_refusal(web: Client, pipeline: Pipeline) -> None:
    Pipeline.objects.filter(pk=pipeline.pk).update(allow_manual=False)
    response = web.post(history_url(pipeline), {"branch": "main", "commit": "abc123"})
    assert response.status_code == 403
    assert "does not allow manual builds" in text(response) and not Build.objects.exists()


def test_a_rejected_plan_still_opens_the_failed_build(web: Client, org: Any) -> None:
    bare = pipeline_services.create_pipeline(org=org, name="Bare", repository="", default_branch="main")
    assert 'id="new-build-form"' not in text(web.get(history_url(bare)))  # no stored definition: no form
    response = web.post(history_url(bare), {"branch": "main", "commit": "abc123"})
    build = Build.objects.get(pipeline=bare)
    assert response.status_code == 302 and response["Location"] == build_url(build)
    assert (build.state, build.error_code) == ("failed", "definition_missing")
    page = text(web.get(build_url(build)))
    assert "definition_missing" in page and "no jobs" in page


# ---------------------------------------------------------------- the build page


def test_build_page_lists_jobs_in_dependency_order_with_state_duration_and_exit_code(
        web: Client, build: Build, agent: Agent) -> None:
    first = build.jobs.get(step_key="a")
    run_job(first, agent, exit_code=0, log="hello\n")
    response = web.get(build_url(build))
    assert response.status_code == 200
    page = text(response)
    assert page.index('id="job-' + str(first.pk)) < page.index(f'id="job-{build.jobs.get(step_key="b").pk}"')
    head = page[page.index(f'id="job-{first.pk}"'):]
    head = head[:head.index("</li>")]
    assert 'data-state="passed"' in head and "exit 0" in head and re.search(r"\d+\.\d s", head)
    second = page[page.index(f'id="job-{build.jobs.get(step_key="b").pk}"'):]
    assert "after a" in second[:second.index("</li>")] and 'data-state="scheduled"' in second
    assert 'id="cancel-form"' in page
    assert 'id="build-page-config"' in page and build_url(build, "/status.json") in page
    assert f'href="{build_url(build, f"/jobs/{first.pk}/log")}"' in page


def test_finished_build_has_no_cancel_button(web: Client, build: Build) -> None:
    build_services.cancel_build(build=build)
    page = text(web.get(build_url(build)))
    assert 'id="cancel-form"' not in page and 'data-state="canceled"' in page


def ir_with(n: int) -> dict[str, Any]:
    """n jobs: a chain, so the page shows dependency edges too."""
    step = hm.sh("echo 0", key="s0")
    steps = [step]
    for i in range(1, n):
        step = step.sh(f"echo {i}", key=f"s{i}")
        steps.append(step)
    return hm.pipeline(steps[-1:])


def test_build_page_query_count_does_not_grow_with_jobs(web: Client, owner: User, pipeline: Pipeline,
                                                        django_assert_num_queries: Any) -> None:
    small = make_build(pipeline, pipeline_ir=ir_with(1))
    big = make_build(pipeline, pipeline_ir=ir_with(15))
    assert big.jobs.count() == 15
    # session, user, memberships, the build (pipeline, creator), its jobs, their edges, its artifacts,
    # and the connected agents' tags (some job is scheduled: its waiting reason)
    for build in (small, big):
        with django_assert_num_queries(8):
            assert web.get(build_url(build)).status_code == 200
        # session, user, memberships, the build, its jobs, their edges (the timeline's critical path),
        # the connected agents' tags
        with django_assert_num_queries(7):
            assert web.get(build_url(build, "/status.json")).status_code == 200


def test_status_json_has_the_build_and_each_job(web: Client, build: Build, agent: Agent) -> None:
    first = build.jobs.get(step_key="a")
    run_job(first, agent, exit_code=None)  # running
    body = web.get(build_url(build, "/status.json")).json()
    assert body["build"]["state"] == "running" and body["build"]["finished"] is False
    assert body["build"]["cancelable"] is True and body["build"]["error_code"] is None
    assert [(j["id"], j["state"], j["exit_code"]) for j in body["jobs"]] == [
        (str(first.pk), "running", None), (str(build.jobs.get(step_key="b").pk), "pending", None)]
    build_services.report_finish(job=Job.objects.get(pk=first.pk), exit_code=3)
    body = web.get(build_url(build, "/status.json")).json()
    assert body["build"]["state"] == "failed" and body["build"]["finished"] is True
    assert body["build"]["cancelable"] is False
    assert [(j["state"], j["exit_code"]) for j in body["jobs"]] == [("failed", 3), ("skipped", None)]


def test_log_token_json_opens_this_builds_streams(web: Client, build: Build) -> None:
    response = web.get(build_url(build, "/log-token.json"))
    assert response.status_code == 200 and "no-cache" in response["Cache-Control"]
    body = response.json()
    assert verify_log_token(body["token"]) == build.id
    assert body["expires_at"].endswith("Z")


def test_cancel_button_cancels_through_the_service(member_web: Client, build: Build, agent: Agent) -> None:
    first = run_job(build.jobs.get(step_key="a"), agent, exit_code=None)
    response = member_web.post(build_url(build, "/cancel"))
    assert response.status_code == 302 and response["Location"] == build_url(build)
    build.refresh_from_db()
    first.refresh_from_db()
    assert build.state == "canceled" and build.cancel_requested_at is not None
    assert first.state == JobState.CANCELING
    assert build.jobs.get(step_key="b").state == JobState.CANCELED
    page = text(member_web.get(build_url(build)))
    assert "Build #1 canceled." in page


def test_cancel_of_a_finished_build_says_so(web: Client, build: Build, agent: Agent) -> None:
    for job in build.jobs.order_by("position"):
        run_job(job, agent)
    response = web.post(build_url(build, "/cancel"), follow=True)
    assert "already passed" in text(response)
    build.refresh_from_db()
    assert build.state == "passed" and build.cancel_requested_at is None


def test_raw_log_is_the_whole_text_and_serves_a_tail(web: Client, build: Build, agent: Agent) -> None:
    job = run_job(build.jobs.get(step_key="a"), agent, exit_code=None, log="one\n")
    build_services.append_log(job=job, chunks=[ChunkIn(seq=2, stream_kind=1, content="\x1b[31mtwo\x1b[0m\n",
                                                       ts=time.time_ns())])
    response = web.get(build_url(build, f"/jobs/{job.pk}/log"))
    assert response.status_code == 200 and response["Content-Type"] == "text/plain; charset=utf-8"
    assert response.getvalue() == b"one\n\x1b[31mtwo\x1b[0m\n"
    tail = web.get(build_url(build, f"/jobs/{job.pk}/log"), HTTP_RANGE="bytes=-4")
    assert tail.status_code == 206 and tail.getvalue() == b"[0m\n"
    assert tail["Content-Range"] == "bytes 13-16/17"


# ---------------------------------------------------------------- personal API tokens


def test_tokens_page_lists_my_active_personal_tokens_only(web: Client, owner: User, member: User) -> None:
    mine = org_services.create_personal_token(user=owner, description="laptop").token
    revoked = org_services.create_personal_token(user=owner, description="old-one").token
    org_services.revoke_api_token(token=revoked)
    org_services.create_personal_token(user=member, description="someone-elses")
    org_services.issue_session_token(user=owner)
    page = text(web.get("/settings/tokens"))
    assert f'data-token-id="{mine.pk}"' in page and "laptop" in page
    assert "old-one" not in page and "someone-elses" not in page
    assert page.count("data-token-id=") == 1


def test_creating_a_token_shows_it_once_and_it_works(web: Client, owner: User) -> None:
    response = web.post("/settings/tokens", {"description": "ci script", "expires_in_days": "30"})
    assert response.status_code == 200
    raw = re.search(r'data-testid="raw-token">(hm_[A-Za-z0-9_-]{43})<', text(response))[1]
    token = ApiToken.objects.get(user=owner, kind=TokenKind.PERSONAL)
    assert token.description == "ci script"
    assert timedelta(days=29) < token.expires_at - timezone.now() <= timedelta(days=30)
    from rest_framework.test import APIClient
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    assert api.get("/api/v0/user").json()["email"] == owner.email
    assert raw not in text(web.get("/settings/tokens"))  # shown once


def test_creating_a_token_needs_a_description(web: Client) -> None:
    response = web.post("/settings/tokens", {"description": ""})
    assert response.status_code == 422 and not ApiToken.objects.exists()


def test_revoking_a_token_stops_it(web: Client, owner: User) -> None:
    api = make_api(owner)
    token = ApiToken.objects.get(user=owner, kind=TokenKind.PERSONAL)
    response = web.post(f"/settings/tokens/{token.pk}/revoke", follow=True)
    assert "Revoked the token" in text(response)
    token.refresh_from_db()
    assert token.revoked_at is not None
    assert api.get("/api/v0/user").status_code == 401


def test_revoking_someone_elses_token_is_404(web: Client, member: User) -> None:
    theirs = org_services.create_personal_token(user=member, description="theirs").token
    assert web.post(f"/settings/tokens/{theirs.pk}/revoke").status_code == 404
    theirs.refresh_from_db()
    assert theirs.revoked_at is None


# ---------------------------------------------------------------- agents and agent tokens


def test_agents_page_shows_agents_with_their_state_and_current_job(web: Client, org: Any, build: Build,
                                                                   agent: Agent) -> None:
    run_job(build.jobs.get(step_key="a"), agent, exit_code=None)
    Agent.objects.create(organization=org, token=agent.token, name="lost-one", session_hash="x" * 64,
                         last_seen_at=timezone.now() - timedelta(minutes=5))
    Agent.objects.create(organization=org, token=agent.token, name="gone-one", session_hash="y" * 64,
                         stopped_at=timezone.now())
    page = text(web.get(f"/orgs/{org.slug}/agents"))
    row = page[page.index("box-1"):]
    row = row[:row.index("</tr>")]
    assert "conn-connected" in row and f"{build.pipeline.slug} #1 · a" in row
    assert "conn-lost" in page[page.index("lost-one"):] and "conn-stopped" in page[page.index("gone-one"):]


def test_agents_page_query_count_does_not_grow_with_agents(web: Client, org: Any, pipeline: Pipeline, agent: Agent,
                                                          django_assert_num_queries: Any) -> None:
    url = f"/orgs/{org.slug}/agents"
    # session, user, memberships, agents (with their token), their active jobs (build, pipeline), tokens
    with django_assert_num_queries(6):
        assert web.get(url).status_code == 200
    for n in range(5):
        other = Agent.objects.create(organization=org, token=agent.token, name=f"box-{n + 2}",
                                     session_hash=hash_secret(f"hms_{uuid.uuid4()}"))
        make_build(pipeline)
        assert build_services.claim_job(agent=other) is not None  # each new agent runs something
        org_services.create_agent_token(organization=org, created_by=org.memberships.first().user)
    with django_assert_num_queries(6):
        page = text(web.get(url))
    assert page.count("conn-connected") == 6 and page.count('data-state="assigned"') == 5


def test_agents_page_is_for_admins(member_web: Client, org: Any, admin_user: User) -> None:
    response = member_web.get(f"/orgs/{org.slug}/agents")
    assert response.status_code == 403 and "Only admins and owners" in text(response)
    assert member_web.post(f"/orgs/{org.slug}/agents", {"description": "x"}).status_code == 403
    assert not AgentToken.objects.exists()
    assert signed_in(admin_user).get(f"/orgs/{org.slug}/agents").status_code == 200
    # The nav links the page for admins only.
    assert f'href="/orgs/{org.slug}/agents"' not in text(member_web.get(f"/orgs/{org.slug}/"))


def test_agent_tokens_are_created_once_and_revoked(web: Client, org: Any, owner: User) -> None:
    response = web.post(f"/orgs/{org.slug}/agents", {"description": "build box 2"})
    raw = re.search(r'data-testid="raw-agent-token">(hma_[A-Za-z0-9_-]+)<', text(response))[1]
    token = AgentToken.objects.get(organization=org)
    assert token.token_hash == hash_secret(raw) and token.created_by == owner
    page = text(web.get(f"/orgs/{org.slug}/agents"))
    assert "build box 2" in page and raw not in page
    response = web.post(f"/orgs/{org.slug}/agents/tokens/{token.pk}/revoke", follow=True)
    assert "Revoked the agent token" in text(response)
    token.refresh_from_db()
    assert token.revoked_at is not None
    assert f'data-token-id="{token.pk}"' not in text(web.get(f"/orgs/{org.slug}/agents"))


def test_revoking_another_organizations_agent_token_is_404(web: Client, org: Any, other_org: Any) -> None:
    theirs = org_services.create_agent_token(organization=other_org).token
    assert web.post(f"/orgs/{org.slug}/agents/tokens/{theirs.pk}/revoke").status_code == 404
    assert web.post(f"/orgs/{other_org.slug}/agents/tokens/{theirs.pk}/revoke").status_code == 404
    theirs.refresh_from_db()
    assert theirs.revoked_at is None


# ---------------------------------------------------------------- CLI login


def test_cli_login_asks_first_and_parks_nothing_on_get(web: Client) -> None:
    response = web.get("/cli-login?port=53682&nonce=n0nce-abc")
    assert response.status_code == 200
    page = text(response)
    assert "53682" in page and 'name="nonce" value="n0nce-abc"' in page and "Authorize" in page
    assert not CliLoginGrant.objects.exists()


def test_cli_login_confirmation_parks_the_token_and_goes_to_the_callback(web: Client, owner: User) -> None:
    response = web.post("/cli-login", {"port": "53682", "nonce": "n0nce-abc"})
    assert response.status_code == 302 and response["Location"] == "http://localhost:53682/callback"
    claim = Client().post("/api/v0/auth/cli/claim", {"nonce": "n0nce-abc"}, content_type="application/json")
    assert claim.status_code == 200
    api = Client(HTTP_AUTHORIZATION=f"Bearer {claim.json()['token']}")
    assert api.get("/api/v0/user").json()["email"] == owner.email


@pytest.mark.parametrize("query", ["port=abc&nonce=n", "port=80&nonce=n", "port=70000&nonce=n", "port=&nonce=n",
                                   "port=5000&nonce=", "port=5000", "", "port=%EF%BC%95%EF%BC%90%EF%BC%90%EF%BC%90&nonce=n",
                                   f"port=5000&nonce={'x' * 513}"])
def test_cli_login_with_a_bad_link_is_a_clear_error_and_parks_nothing(web: Client, query: str) -> None:
    response = web.get(f"/cli-login?{query}")
    assert response.status_code == 400 and "Nothing was authorized" in text(response)
    params = dict(pair.split("=", 1) for pair in query.split("&") if "=" in pair)
    response = web.post("/cli-login", params)
    assert response.status_code == 400
    assert not CliLoginGrant.objects.exists()


def test_cli_login_refuses_a_nonce_parked_before(web: Client) -> None:
    assert web.post("/cli-login", {"port": "5000", "nonce": "same"}).status_code == 302
    response = web.post("/cli-login", {"port": "5000", "nonce": "same"})
    assert response.status_code == 400 and "already been used" in text(response)
    assert CliLoginGrant.objects.count() == 1


def test_cli_login_sends_a_signed_out_browser_to_sign_in_and_back(client: Client, owner: User) -> None:
    response = client.get("/cli-login?port=53682&nonce=abc")
    assert response.status_code == 302
    assert response["Location"] == "/login?next=/cli-login%3Fport%3D53682%26nonce%3Dabc"
    response = client.post("/login", {"username": owner.email, "password": PASSWORD,
                                      "next": "/cli-login?port=53682&nonce=abc"})
    assert response["Location"] == "/cli-login?port=53682&nonce=abc"


def test_cli_paste_code_is_shown_after_confirming_and_redeems_once(web: Client, owner: User) -> None:
    page = text(web.get("/cli-login?paste=true"))
    assert "Show a code" in page and not CliLoginGrant.objects.exists()
    response = web.post("/cli-login", {"paste": "true"})
    code = re.search(r'data-testid="cli-code">([0-9A-Z]+)<', text(response))[1]
    assert len(code) == 16 and set(code) <= set(org_services.CLI_CODE_ALPHABET)
    redeem = Client().post("/api/v0/auth/cli/redeem", {"code": code}, content_type="application/json")
    assert redeem.status_code == 200
    again = Client().post("/api/v0/auth/cli/redeem", {"code": code}, content_type="application/json")
    assert again.status_code == 400


# ---------------------------------------------------------------- the rest of the site


def test_pages_link_the_error_code_docs_and_those_pages_render(web: Client, org: Any) -> None:
    page = text(web.get(f"/orgs/{org.slug}/"))
    assert 'href="/docs/errors/"' in page and 'href="/api/v0/docs/"' in page
    index = web.get("/docs/errors/")
    assert index.status_code == 200 and 'href="/docs/errors/build_not_found"' in text(index)
    assert "Build not found" in text(Client().get("/docs/errors/build_not_found"))


def test_unknown_page_is_the_html_404_and_api_paths_keep_the_envelope(web: Client) -> None:
    response = web.get("/no/such/page")
    assert response.status_code == 404 and "<h1>Not found</h1>" in text(response)
    assert web.get("/api/v0/nope")["Content-Type"].startswith("application/json")


def test_static_files_are_vendored(client: Client) -> None:
    from django.contrib.staticfiles import finders
    for name in ["harmont/harmont.css", "harmont/build.js", "harmont/favicon.svg"]:
        assert finders.find(name), name
    page = text(client.get("/login"))
    assert "/static/harmont/harmont.css" in page
    assert not re.search(r'(src|href)="(https?:)?//', page)  # nothing from a CDN


def test_the_demo_seed_prints_a_working_sign_in_line(client: Client) -> None:
    from io import StringIO

    from django.core.management import call_command

    out = StringIO()
    call_command("seed_demo", stdout=out)
    line = next(line for line in out.getvalue().splitlines() if "sign in:" in line)
    url, email, password = re.search(r"sign in:\s+(\S+)\s+as (\S+) / (\S+)", line).groups()
    assert url.endswith("/login")
    response = client.post("/login", {"username": email, "password": password})
    assert response.status_code == 302
    assert client.get("/").headers["Location"] == "/orgs/demo/"
