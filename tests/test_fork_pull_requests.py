"""Pull requests from forks: never any secret, built as the pipeline's `fork_pull_requests` says
(without secrets, held until an admin approves, or not at all); render jobs never get secrets."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client

from builds import services as build_services
from builds import webhooks
from builds.models import Build, Job, JobKind, JobState, WebhookDelivery
from organizations.models import User
from pipelines import secrets as secret_services
from pipelines import services as pipeline_services
from pipelines.models import ForkPullRequests, Pipeline
from tests.helpers import (
    AGENT,
    assert_error,
    builds_url,
    claim,
    deliver,
    is_postgres,
    make_api,
    make_build,
    outcomes,
    pull_request_payload,
    race,
)
from tests.test_webhooks import make_pipeline, make_repository

ORG_SECRET = "org-level-deploy-token-1f3a"
PIPELINE_SECRET = "pipeline-level-registry-pw-77c2"
SECRET_VALUES = (ORG_SECRET, PIPELINE_SECRET)


def fork_payload(fork_owner: str = "mallory", **kwargs: Any) -> dict[str, Any]:
    """A PR into acme/web whose head branch lives in `fork_owner`/web."""
    payload = pull_request_payload(**kwargs)
    head_repo = dict(payload["repository"], full_name=f"{fork_owner}/web", owner={"login": fork_owner})
    payload["pull_request"]["head"] = dict(payload["pull_request"]["head"], label=f"{fork_owner}:feature/cache",
                                           repo=head_repo)
    return payload


@pytest.fixture
def repo(org):
    return make_repository(org)


@pytest.fixture
def pr_pipeline(org, repo) -> Pipeline:
    pipeline = make_pipeline(org, "PR", [{"event": "pull_request"}])
    set_secrets(org, pipeline)
    return pipeline


def set_secrets(org, pipeline: Pipeline) -> None:
    # Unprotected, so any other build of a branch gets them: a fork build gets not even these.
    secret_services.set_secret(organization=org, name="DEPLOY_TOKEN", value=ORG_SECRET, protected=False)
    secret_services.set_secret(organization=org, pipeline=pipeline, name="REGISTRY_PASSWORD", value=PIPELINE_SECRET,
                               protected=False)


def set_policy(pipeline: Pipeline, policy: str) -> None:
    Pipeline.objects.filter(pk=pipeline.pk).update(fork_pull_requests=policy)


def assert_no_secret(spec: dict[str, Any]) -> None:
    assert spec["mask"] == []
    assert "DEPLOY_TOKEN" not in spec["env"] and "REGISTRY_PASSWORD" not in spec["env"]
    for value in SECRET_VALUES:
        assert value not in str(spec)


def only_build(pipeline: Pipeline) -> Build:
    return Build.objects.get(pipeline=pipeline)


def approve_url(build: Build) -> str:
    return builds_url(build.pipeline, f"/{build.number}/approve")


# ---------------------------------------------------------------- telling a fork from the repository itself

def test_a_pull_request_from_another_repository_is_a_fork():
    assert webhooks.parse_event("pull_request", fork_payload()).fork is True


def test_a_pull_request_between_branches_of_the_repository_is_no_fork():
    assert webhooks.parse_event("pull_request", pull_request_payload()).fork is False


def test_the_same_repository_in_another_case_is_no_fork():
    payload = pull_request_payload()
    payload["pull_request"]["head"]["repo"] = dict(payload["repository"], full_name="ACME/Web")
    assert webhooks.parse_event("pull_request", payload).fork is False


def test_a_head_whose_repository_was_deleted_counts_as_a_fork():
    # GitHub sends `"repo": null` for the head of a PR whose fork is gone.
    payload = pull_request_payload()
    payload["pull_request"]["head"]["repo"] = None
    assert webhooks.parse_event("pull_request", payload).fork is True


# ---------------------------------------------------------------- build_without_secrets (the default)

@pytest.mark.django_db
def test_a_fork_pull_requests_jobs_get_no_secret_and_are_told_they_are_a_fork(session, pr_pipeline):
    assert pr_pipeline.fork_pull_requests == ForkPullRequests.BUILD_WITHOUT_SECRETS
    response = deliver("pull_request", fork_payload())

    assert response.status_code == 202, response.content
    build = only_build(pr_pipeline)
    assert (build.fork, build.state) == (True, "scheduled")
    spec, _ = claim(session)
    assert_no_secret(spec)
    assert spec["env"]["HARMONT_PULL_REQUEST_FORK"] == "true"
    assert spec["env"]["HARMONT_PULL_REQUEST"] == "42"


@pytest.mark.django_db
def test_a_pull_request_from_the_repository_itself_gets_the_secrets(session, pr_pipeline):
    assert deliver("pull_request", pull_request_payload()).status_code == 202

    spec, _ = claim(session)
    assert (spec["env"]["DEPLOY_TOKEN"], spec["env"]["REGISTRY_PASSWORD"]) == SECRET_VALUES
    assert sorted(spec["mask"]) == sorted(SECRET_VALUES)
    assert spec["env"]["HARMONT_PULL_REQUEST_FORK"] == "false"
    assert only_build(pr_pipeline).fork is False


@pytest.mark.django_db
def test_a_fork_build_cannot_set_its_own_fork_flag_through_env(session, pr_pipeline):
    # The server's variables come after the build's env: nothing a job's definition says overrides them.
    build = build_services.create_build(
        pipeline=pr_pipeline, fork=True,
        request=build_services.validate_build_request(branch="b", commit="c0ffee",
                                                      env={"HARMONT_PULL_REQUEST_FORK": "false"}))
    spec, _ = claim(session)
    assert spec["build_id"] == str(build.pk)
    assert spec["env"]["HARMONT_PULL_REQUEST_FORK"] == "true"
    assert_no_secret(spec)


@pytest.mark.django_db
def test_fork_builds_show_it_in_the_build_json(api, pr_pipeline):
    deliver("pull_request", fork_payload())
    body = api.get(builds_url(pr_pipeline, "/1")).json()
    assert body["fork"] is True
    assert api.get(builds_url(pr_pipeline)).json()["data"][0]["fork"] is True


@pytest.mark.django_db
@pytest.mark.parametrize("policy", [ForkPullRequests.BUILD_WITHOUT_SECRETS, ForkPullRequests.REQUIRE_APPROVAL])
def test_a_fork_build_never_gets_secrets_whatever_the_policy(session, admin_user, pr_pipeline, policy):
    set_policy(pr_pipeline, policy)
    deliver("pull_request", fork_payload())
    build = only_build(pr_pipeline)
    if policy == ForkPullRequests.REQUIRE_APPROVAL:
        assert make_api(admin_user).post(approve_url(build)).status_code == 200

    spec, _ = claim(session)
    assert_no_secret(spec)


# ---------------------------------------------------------------- skip

@pytest.mark.django_db
def test_skip_builds_nothing_for_a_fork_and_says_why(org, pr_pipeline):
    set_policy(pr_pipeline, ForkPullRequests.SKIP)
    response = deliver("pull_request", fork_payload())

    assert response.status_code == 202
    assert outcomes(response) == [{
        "organization": org.slug, "repository": "acme/web", "builds_created": 0,
        "builds": [], "refused": [],
        "skipped": [{"pipeline": pr_pipeline.slug, "reason": "fork_pull_request",
                     "message": "The pull request comes from another repository (a fork) and the pipeline's "
                                "fork_pull_requests is skip."}],
    }]
    assert not Build.objects.exists() and not Job.objects.exists()
    assert WebhookDelivery.objects.get().builds_created == 0


@pytest.mark.django_db
def test_skip_still_builds_pull_requests_from_the_repository_itself(pr_pipeline):
    set_policy(pr_pipeline, ForkPullRequests.SKIP)
    response = deliver("pull_request", pull_request_payload())
    assert outcomes(response)[0]["builds_created"] == 1
    assert outcomes(response)[0]["skipped"] == []


# ---------------------------------------------------------------- require_approval

@pytest.fixture
def held(pr_pipeline) -> Build:
    set_policy(pr_pipeline, ForkPullRequests.REQUIRE_APPROVAL)
    response = deliver("pull_request", fork_payload())
    assert outcomes(response)[0]["builds"][0]["state"] == "held"
    return only_build(pr_pipeline)


def claim_status(session) -> int:
    return session.post(f"{AGENT}/claim").status_code


@pytest.mark.django_db
def test_no_agent_can_claim_a_held_build_until_an_admin_approves_it(session, admin_user, held):
    assert held.state == "held"
    assert {job.step_key: job.state for job in held.jobs.all()} == {"a": "held", "b": "pending"}
    assert claim_status(session) == 204

    response = make_api(admin_user).post(approve_url(held))

    assert response.status_code == 200, response.content
    body = response.json()
    assert (body["number"], body["state"], body["fork"]) == (1, "scheduled", True)
    held.refresh_from_db()
    assert (held.state, held.approved_by, held.approved_at is not None) == ("scheduled", admin_user, True)
    spec, _ = claim(session)
    assert spec["step_key"] == "a"
    assert_no_secret(spec)


@pytest.mark.django_db
def test_an_owner_may_approve(api, held):
    assert api.post(approve_url(held)).status_code == 200


@pytest.mark.django_db
def test_a_member_approving_is_403_and_changes_nothing(session, member, held):
    assert_error(make_api(member).post(approve_url(held)), 403, "insufficient_org_role")
    held.refresh_from_db()
    assert held.state == "held" and held.approved_by is None
    assert claim_status(session) == 204


@pytest.mark.django_db
def test_approving_another_organizations_build_is_404(stranger_api, held):
    assert_error(stranger_api.post(approve_url(held)), 404, "organization_not_found")


@pytest.mark.django_db
def test_approving_twice_is_409(admin_user, held):
    client = make_api(admin_user)
    assert client.post(approve_url(held)).status_code == 200
    assert_error(client.post(approve_url(held)), 409, "build_not_held")


@pytest.mark.django_db
def test_approving_a_build_that_was_never_held_is_409(api, build):
    assert_error(api.post(approve_url(build)), 409, "build_not_held")
    assert Job.objects.filter(build=build, state=JobState.SCHEDULED).count() == 1


@pytest.mark.django_db
def test_a_held_build_can_be_canceled_and_then_not_approved(session, api, held):
    response = api.put(builds_url(held.pipeline, "/1/cancel"))

    assert response.status_code == 200 and response.json()["state"] == "canceled"
    assert set(Job.objects.filter(build=held).values_list("state", flat=True)) == {"canceled"}
    assert_error(api.post(approve_url(held)), 409, "build_not_held")
    assert claim_status(session) == 204


@pytest.mark.django_db
def test_a_held_rendered_build_holds_its_render_job(session, org, admin_user, repo):
    pipeline = make_pipeline(org, "Rendered", [{"event": "pull_request"}],
                             fork_pull_requests=ForkPullRequests.REQUIRE_APPROVAL)
    Pipeline.objects.filter(pk=pipeline.pk).update(definition=None)
    deliver("pull_request", fork_payload())
    build = only_build(pipeline)
    assert [(job.kind, job.state) for job in build.jobs.all()] == [(JobKind.RENDER, JobState.HELD)]
    assert claim_status(session) == 204

    assert make_api(admin_user).post(approve_url(build)).status_code == 200
    spec, _ = claim(session)
    assert spec["render"] is not None and spec["env"]["HARMONT_PULL_REQUEST_FORK"] == "true"


# ---------------------------------------------------------------- the build page

def page_url(build: Build, suffix: str = "") -> str:
    return f"/orgs/{build.pipeline.organization.slug}/pipelines/{build.pipeline.slug}/builds/{build.number}{suffix}"


def signed_in(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


@pytest.mark.django_db
def test_the_build_page_shows_admins_an_approve_form_with_csrf(admin_user, held):
    page = signed_in(admin_user).get(page_url(held)).content.decode()
    form = page.split('id="approve-form"', 1)[1].split("</form>", 1)[0]
    assert "csrfmiddlewaretoken" in form and "Approve build" in form
    assert f'action="{page_url(held, "/approve")}"' in page


@pytest.mark.django_db
def test_the_build_page_shows_members_no_approve_form(member, held):
    assert 'id="approve-form"' not in signed_in(member).get(page_url(held)).content.decode()


@pytest.mark.django_db
def test_the_build_page_of_a_build_not_held_has_no_approve_form(admin_user, build):
    assert 'id="approve-form"' not in signed_in(admin_user).get(page_url(build)).content.decode()


@pytest.mark.django_db
def test_the_approve_button_schedules_the_held_jobs(admin_user, held):
    response = signed_in(admin_user).post(page_url(held, "/approve"))
    assert response.status_code == 302 and response["Location"] == page_url(held)
    held.refresh_from_db()
    assert held.state == "scheduled" and held.approved_by == admin_user


@pytest.mark.django_db
def test_a_member_posting_the_approve_form_is_403(member, held):
    assert signed_in(member).post(page_url(held, "/approve")).status_code == 403
    held.refresh_from_db()
    assert held.state == "held"


# ---------------------------------------------------------------- render jobs never get secrets

@pytest.mark.django_db
def test_a_render_job_of_a_normal_build_gets_no_secret(session, org):
    pipeline = pipeline_services.create_pipeline(org=org, name="Rendered", repository="https://github.com/acme/web.git",
                                                 default_branch="main")
    set_secrets(org, pipeline)
    build = make_build(pipeline)
    assert build.fork is False

    spec, _ = claim(session)

    assert spec["render"] is not None
    assert_no_secret(spec)
    assert spec["env"]["HARMONT_PULL_REQUEST_FORK"] == "false"


# ---------------------------------------------------------------- the policy on the pipeline

@pytest.mark.django_db
def test_fork_pull_requests_is_set_on_create_and_shown(admin_api, org):
    response = admin_api.post(f"/api/v0/organizations/{org.slug}/pipelines",
                              {"name": "Public", "repository": "https://github.com/acme/public.git",
                               "default_branch": "main", "fork_pull_requests": "require_approval"}, format="json")
    assert response.status_code == 201, response.content
    assert response.json()["fork_pull_requests"] == "require_approval"
    assert Pipeline.objects.get(slug="public").fork_pull_requests == ForkPullRequests.REQUIRE_APPROVAL


@pytest.mark.django_db
def test_an_unknown_fork_policy_is_422_and_creates_nothing(admin_api, org):
    response = admin_api.post(f"/api/v0/organizations/{org.slug}/pipelines",
                              {"name": "Public", "repository": "https://github.com/acme/public.git",
                               "default_branch": "main", "fork_pull_requests": "build_with_secrets"}, format="json")
    assert "fork_pull_requests" in assert_error(response, 422, "pipeline_invalid")["fields"]
    assert not Pipeline.objects.filter(slug="public").exists()


@pytest.mark.django_db
def test_the_admin_edits_the_fork_policy(pr_pipeline):
    client = signed_in(User.objects.create_superuser("ops@example.com", "a-long-passphrase"))
    page = client.get(f"/admin/pipelines/pipeline/{pr_pipeline.pk}/change/").content.decode()
    assert 'name="fork_pull_requests"' in page and 'value="require_approval"' in page


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_racing_approvals_and_a_cancel_leave_one_winner(admin_user, owner, held):
    if not is_postgres():
        pytest.skip("the approval race needs PostgreSQL (SQLite serialises all writers)")
    clients = [make_api(admin_user), make_api(owner)]

    def act(i: int) -> tuple[str, int]:
        if i == 0:
            return "cancel", clients[0].put(builds_url(held.pipeline, "/1/cancel")).status_code
        return "approve", clients[i % 2].post(approve_url(held)).status_code

    results = race(6, act)

    approvals = sorted(status for kind, status in results if kind == "approve")
    assert approvals in ([409] * 5, [200] + [409] * 4)  # the cancel came first, or one approval did
    held.refresh_from_db()
    states_now = set(Job.objects.filter(build=held).values_list("state", flat=True))
    assert held.state == "canceled" and states_now == {"canceled"}
    assert (held.approved_by is not None) == (approvals[0] == 200)
