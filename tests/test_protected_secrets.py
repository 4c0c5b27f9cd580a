"""Protected secrets: only builds of the organization's own definition on a protected branch, and
builds admins and owners trigger, get them; the trust is decided when the build is created."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.test import Client

from builds import services as build_services
from builds.models import Build, SecretAccess
from organizations.models import Membership, Role, User
from pipelines import secrets as secret_services
from pipelines.models import Pipeline, Secret
from tests.dsl import hm
from tests.helpers import (
    assert_error,
    builds_url,
    claim,
    deliver,
    job_url,
    make_api,
    make_build,
    push_payload,
    start,
    tarball,
    two_step_ir,
)
from tests.test_webhooks import make_pipeline, make_repository

PROTECTED_ORG = "protected-org-deploy-key-51d0"
PROTECTED_PIPELINE = "protected-pipeline-prod-db-9e3a"
PLAIN = "unprotected-test-token-4c81"
PROTECTED_VALUES = (PROTECTED_ORG, PROTECTED_PIPELINE)


def set_secrets(pipeline: Pipeline) -> None:
    org = pipeline.organization
    secret_services.set_secret(organization=org, name="DEPLOY_KEY", value=PROTECTED_ORG)
    secret_services.set_secret(organization=org, pipeline=pipeline, name="PROD_DB", value=PROTECTED_PIPELINE)
    secret_services.set_secret(organization=org, name="TEST_TOKEN", value=PLAIN, protected=False)


@pytest.fixture
def secrets(pipeline) -> Pipeline:
    set_secrets(pipeline)
    return pipeline


def assert_unprotected_only(spec: dict[str, Any]) -> None:
    assert spec["env"]["TEST_TOKEN"] == PLAIN and spec["mask"] == [PLAIN]
    assert "DEPLOY_KEY" not in spec["env"] and "PROD_DB" not in spec["env"]
    for value in PROTECTED_VALUES:
        assert value not in json.dumps(spec)


def assert_all(spec: dict[str, Any]) -> None:
    assert (spec["env"]["DEPLOY_KEY"], spec["env"]["PROD_DB"], spec["env"]["TEST_TOKEN"]) == (*PROTECTED_VALUES, PLAIN)
    assert sorted(spec["mask"]) == sorted((*PROTECTED_VALUES, PLAIN))


def post_build(client, pipeline: Pipeline, **body: Any) -> dict[str, Any]:
    response = client.post(builds_url(pipeline), {"branch": "main", "commit": "abc123", **body}, format="json")
    assert response.status_code == 201, response.content
    return response.json()


def own_ir() -> str:
    return json.dumps(hm.pipeline([hm.sh("env", key="a")]))


# ---------------------------------------------------------------- a member's own commands

@pytest.mark.django_db
def test_a_members_build_with_their_own_pipeline_ir_gets_unprotected_secrets_only(session, member, secrets):
    body = post_build(make_api(member), secrets, pipeline_ir=own_ir())

    assert body["secret_access"] == "unprotected"
    assert_unprotected_only(claim(session)[0])


@pytest.mark.django_db
@pytest.mark.parametrize("env", [{"BASH_ENV": "/tmp/print-everything.sh"}, {"HARMLESS": "1"}])
def test_a_members_build_with_their_own_env_gets_unprotected_secrets_only(session, member, secrets, env):
    # On the default branch with the stored definition: the env alone can run other commands (BASH_ENV).
    body = post_build(make_api(member), secrets, env=env)

    assert body["secret_access"] == "unprotected"
    assert_unprotected_only(claim(session)[0])


@pytest.mark.django_db
def test_a_members_build_with_an_uploaded_source_gets_unprotected_secrets_only(session, member, secrets, settings,
                                                                                tmp_path):
    settings.MEDIA_ROOT = tmp_path
    archive = tarball({".bashrc": b"env\n", "Makefile": b"test:\n\tenv\n"})
    post_build(make_api(member), secrets, source_b64=base64.b64encode(archive).decode())

    assert_unprotected_only(claim(session)[0])


@pytest.mark.django_db
def test_a_members_build_from_a_source_url_gets_unprotected_secrets_only(session, member, secrets):
    post_build(make_api(member), secrets, source_url="https://attacker.example/code.tar.gz")

    assert_unprotected_only(claim(session)[0])


@pytest.mark.django_db
def test_a_member_may_not_label_a_build_webhook(session, member, secrets):
    response = make_api(member).post(builds_url(secrets), {"branch": "main", "commit": "HEAD", "source": "webhook",
                                                           "env": {"BASH_ENV": "/tmp/x"}}, format="json")
    error = assert_error(response, 422, "build_invalid")
    assert set(error["fields"]) == {"source"} and not Build.objects.exists()


@pytest.mark.django_db
def test_a_members_build_of_the_stored_definition_at_the_default_branchs_tip_gets_all(session, member, secrets):
    body = post_build(make_api(member), secrets, commit="HEAD")

    assert body["secret_access"] == "all"
    assert_all(claim(session)[0])


@pytest.mark.django_db
def test_a_members_build_naming_a_commit_under_the_default_branchs_name_gets_unprotected_only(session, member,
                                                                                             secrets):
    # The commit could be on any branch, or a pull request's ref: calling it `main` proves nothing.
    body = post_build(make_api(member), secrets, branch="main", commit="9fceb02d0ae598e95dc970b74767f19372d61af8")

    assert body["secret_access"] == "unprotected"
    assert_unprotected_only(claim(session)[0])


@pytest.mark.django_db
def test_a_members_build_of_the_stored_definition_on_another_branch_gets_unprotected_only(session, member, secrets):
    post_build(make_api(member), secrets, branch="feature/x")

    assert_unprotected_only(claim(session)[0])


@pytest.mark.django_db
def test_the_new_build_form_follows_the_same_rule(session, member, secrets):
    client = Client()
    client.force_login(member)
    url = f"/orgs/{secrets.organization.slug}/pipelines/{secrets.slug}/"
    assert client.post(url, {"branch": "feature/x", "commit": "abc123"}).status_code == 302

    assert Build.objects.get().secret_access == SecretAccess.UNPROTECTED
    assert_unprotected_only(claim(session)[0])


# ---------------------------------------------------------------- admins and owners

@pytest.mark.django_db
@pytest.mark.parametrize("who", ["admin", "owner"])
def test_an_admins_or_owners_build_gets_all_even_with_their_own_ir(session, admin_user, owner, secrets, who):
    client = make_api(admin_user if who == "admin" else owner)
    body = post_build(client, secrets, pipeline_ir=own_ir(), env={"X": "1"}, branch="feature/x")

    assert body["secret_access"] == "all"
    assert_all(claim(session)[0])


@pytest.mark.django_db
def test_the_by_repo_route_decides_the_same_way(session, member, admin_user, secrets):
    org = secrets.organization
    body = {"repo_name": "acme/web", "source_slug": "ci", "branch": "main", "commit": "abc123",
            "pipeline_ir": own_ir()}
    member_build = make_api(member).post(f"/api/v0/organizations/{org.slug}/builds", body, format="json")
    admin_build = make_api(admin_user).post(f"/api/v0/organizations/{org.slug}/builds", body, format="json")

    assert (member_build.json()["secret_access"], admin_build.json()["secret_access"]) == ("unprotected", "all")


# ---------------------------------------------------------------- decided once, at creation

@pytest.mark.django_db
def test_a_later_promotion_does_not_widen_an_existing_build(session, member, secrets):
    post_build(make_api(member), secrets, pipeline_ir=own_ir())
    Membership.objects.filter(user=member).update(role=Role.ADMIN)

    assert_unprotected_only(claim(session)[0])


@pytest.mark.django_db
def test_a_later_demotion_or_branch_change_does_not_narrow_an_existing_build(session, admin_user, secrets):
    post_build(make_api(admin_user), secrets, pipeline_ir=own_ir(), branch="feature/x")
    Membership.objects.filter(user=admin_user).update(role=Role.MEMBER)
    Pipeline.objects.filter(pk=secrets.pk).update(default_branch="trunk", definition=None)

    assert_all(claim(session)[0])


# ---------------------------------------------------------------- webhooks and protected branches

@pytest.fixture
def hooked(org) -> Pipeline:
    make_repository(org)
    pipeline = make_pipeline(org, "Deploy", [hm.push(branch=["*"]).to_dict()], protected_branches=["release/*"])
    set_secrets(pipeline)
    return pipeline


@pytest.mark.django_db
def test_a_push_to_the_default_branch_with_the_stored_definition_gets_all(session, hooked):
    assert deliver("push", push_payload("refs/heads/main")).status_code == 202

    assert Build.objects.get().secret_access == SecretAccess.ALL
    assert_all(claim(session)[0])


@pytest.mark.django_db
def test_a_push_to_a_branch_that_is_not_protected_gets_unprotected_only(session, hooked):
    assert deliver("push", push_payload("refs/heads/feature/print-env")).status_code == 202

    assert_unprotected_only(claim(session)[0])


@pytest.mark.django_db
@pytest.mark.parametrize(("ref", "access"), [
    ("refs/heads/release/1.2", "all"), ("refs/heads/release/1/hotfix", "all"),  # fnmatch's * crosses /
    ("refs/heads/Release/1.2", "unprotected"), ("refs/heads/release", "unprotected"),
    ("refs/heads/prerelease/1", "unprotected"),
])
def test_a_push_to_a_branch_matching_a_protected_pattern_gets_all(session, hooked, ref, access):
    deliver("push", push_payload(ref))

    assert Build.objects.get().secret_access == access
    (assert_all if access == "all" else assert_unprotected_only)(claim(session)[0])


@pytest.mark.django_db
def test_a_rendered_build_on_the_default_branch_gets_all_in_the_jobs_it_renders(session, member, org):
    make_repository(org)
    pipeline = make_pipeline(org, "Rendered", [hm.push(branch="main").to_dict()])
    Pipeline.objects.filter(pk=pipeline.pk).update(definition=None)
    set_secrets(pipeline)
    deliver("push", push_payload("refs/heads/main"))
    render_spec, job_client = claim(session)
    assert render_spec["render"] is not None and render_spec["mask"] == []  # the render job itself: none
    start(job_client, render_spec["id"])

    sent = job_client.post(job_url(render_spec["id"], "pipeline"), {"pipeline_ir": two_step_ir()}, format="json")
    assert sent.status_code == 200, sent.content
    assert job_client.post(job_url(render_spec["id"], "finish"), {"exit_code": 0}, format="json").status_code == 200

    assert_all(claim(session)[0])


# ---------------------------------------------------------------- which secrets are withheld

@pytest.mark.django_db
def test_a_withheld_pipeline_secret_does_not_fall_back_to_the_organizations(secrets):
    org = secrets.organization
    secret_services.set_secret(organization=org, name="PROD_DB", value="org-level-prod-db", protected=False)

    got = secret_services.secrets_for_job(organization_id=org.pk, pipeline_id=secrets.pk, protected=False)

    assert got == {"TEST_TOKEN": PLAIN}


@pytest.mark.django_db
def test_a_build_made_without_a_trigger_has_its_access_decided_by_the_same_rule(secrets):
    # Services and commands that create builds get the rule too, never a default.
    assert make_build(secrets, commit="HEAD").secret_access == SecretAccess.ALL
    assert make_build(secrets, commit="abc123").secret_access == SecretAccess.UNPROTECTED
    assert make_build(secrets, branch="dev", commit="HEAD").secret_access == SecretAccess.UNPROTECTED
    fork = build_services.create_build(pipeline=secrets, fork=True,
                                       request=build_services.validate_build_request(branch="main", commit="c0ffee"))
    assert fork.secret_access == SecretAccess.NONE


# ---------------------------------------------------------------- the flag in the API and the admin

@pytest.fixture
def secrets_url(org) -> str:
    return f"/api/v0/organizations/{org.slug}/secrets"


@pytest.mark.django_db
def test_a_new_secret_is_protected_unless_said_otherwise(api, org, secrets_url):
    assert api.post(secrets_url, {"name": "A", "value": "aaa"}, format="json").json()["protected"] is True
    assert api.post(secrets_url, {"name": "B", "value": "bbb", "protected": False},
                    format="json").json()["protected"] is False
    listed = api.get(secrets_url).json()["secrets"]
    assert [(s["name"], s["protected"]) for s in listed] == [("A", True), ("B", False)]


@pytest.mark.django_db
def test_replacing_a_value_keeps_the_flag_unless_it_is_given(api, org, secrets_url):
    api.post(secrets_url, {"name": "A", "value": "aaa", "protected": False}, format="json")

    assert api.post(secrets_url, {"name": "A", "value": "a2"}, format="json").json()["protected"] is False
    assert api.post(secrets_url, {"name": "A", "value": "a3", "protected": True},
                    format="json").json()["protected"] is True
    assert Secret.objects.get(name="A").protected is True


@pytest.mark.django_db
@pytest.mark.parametrize("protected", ["yes", 1, None, "false"])
def test_a_protected_flag_that_is_no_boolean_is_422_and_stores_nothing(api, org, secrets_url, protected):
    response = api.post(secrets_url, {"name": "A", "value": "aaa", "protected": protected}, format="json")

    assert list(assert_error(response, 422, "validation_failed")["fields"]) == ["protected"]
    assert not Secret.objects.exists()


@pytest.mark.django_db
def test_the_admin_protects_and_unprotects_a_secret_without_touching_its_value(org):
    secret, _ = secret_services.set_secret(organization=org, name="TOKEN", value="kept-value")
    client = Client()
    client.force_login(User.objects.create_superuser("ops@example.com", "a-long-passphrase"))
    url = f"/admin/pipelines/secret/{secret.pk}/change/"

    assert client.post(url, {"value": ""}).status_code == 302  # the checkbox left unticked
    secret.refresh_from_db()
    assert secret.protected is False
    assert secret_services.secrets_for_job(organization_id=org.pk, pipeline_id=None, protected=False) == {
        "TOKEN": "kept-value"}
    assert client.post(url, {"value": "", "protected": "on"}).status_code == 302
    secret.refresh_from_db()
    assert secret.protected is True


# ---------------------------------------------------------------- protected_branches on the pipeline

def create_pipeline(client, org, **body: Any) -> Any:
    return client.post(f"/api/v0/organizations/{org.slug}/pipelines",
                       {"name": "Deploy", "repository": "https://github.com/acme/deploy.git", "default_branch": "main",
                        **body}, format="json")


@pytest.mark.django_db
def test_protected_branches_are_set_on_create_and_shown(admin_api, org):
    response = create_pipeline(admin_api, org, protected_branches=["release/*", "v[0-9]*"])

    assert response.status_code == 201, response.content
    assert response.json()["protected_branches"] == ["release/*", "v[0-9]*"]
    assert admin_api.get(f"/api/v0/organizations/{org.slug}/pipelines/deploy").json()["protected_branches"] == [
        "release/*", "v[0-9]*"]


@pytest.mark.django_db
@pytest.mark.parametrize("patterns", ["release/*", [""], ["   "], [7], ["x" * 256], ["p"] * 51])
def test_malformed_protected_branches_are_422_and_create_nothing(admin_api, org, patterns):
    response = create_pipeline(admin_api, org, protected_branches=patterns)

    fields = assert_error(response, 422, "pipeline_invalid")["fields"]
    assert all(name.startswith("protected_branches") for name in fields), fields
    assert not Pipeline.objects.filter(slug="deploy").exists()


# ---------------------------------------------------------------- the migration

@pytest.mark.django_db(transaction=True)
def test_the_migration_leaves_existing_secrets_unprotected_and_protects_new_ones(org):
    before = [("pipelines", "0004_fork_pull_requests")]
    after = [("pipelines", "0005_protected_secrets")]
    executor = MigrationExecutor(connection)
    executor.migrate(before)
    try:
        old_state = executor.loader.project_state(before).apps
        OldSecret = old_state.get_model("pipelines", "Secret")
        OldSecret.objects.create(organization_id=org.pk, name="EXISTING", value_encrypted="x")

        executor = MigrationExecutor(connection)
        executor.migrate(after)
    finally:
        executor = MigrationExecutor(connection)
        executor.loader.build_graph()
        executor.migrate(executor.loader.graph.leaf_nodes())

    assert Secret.objects.get(name="EXISTING").protected is False
    assert Secret.objects.create(organization=org, name="NEW", value_encrypted="y").protected is True


@pytest.mark.django_db
def test_the_admin_edits_protected_branches_and_refuses_a_malformed_list(pipeline):
    client = Client()
    client.force_login(User.objects.create_superuser("ops@example.com", "a-long-passphrase"))
    url = f"/admin/pipelines/pipeline/{pipeline.pk}/change/"
    form = {"organization": pipeline.organization_id, "slug": pipeline.slug, "name": pipeline.name,
            "repository": pipeline.repository, "default_branch": "main", "visibility": "private", "allow_manual": "on",
            "source_slug": "ci", "definition": json.dumps(two_step_ir()), "triggers": "null",
            "fork_pull_requests": "build_without_secrets"}

    assert client.post(url, {**form, "protected_branches": '["release/*"]'}).status_code == 302
    pipeline.refresh_from_db()
    assert pipeline.protected_branches == ["release/*"]
    assert client.post(url, {**form, "protected_branches": '"release/*"'}).status_code == 200  # the form, with errors
    pipeline.refresh_from_db()
    assert pipeline.protected_branches == ["release/*"]
    assert client.post(url, {**form, "protected_branches": ""}).status_code == 302  # an emptied box: none
    pipeline.refresh_from_db()
    assert pipeline.protected_branches == []


@pytest.mark.django_db
def test_the_build_page_says_which_secrets_the_build_gets(member, secrets):
    build = make_build(secrets, branch="feature/x")
    client = Client()
    client.force_login(member)
    page = client.get(f"/orgs/{secrets.organization.slug}/pipelines/{secrets.slug}/builds/{build.number}")

    assert "<dt>Secrets</dt>" in page.content.decode() and ">unprotected</dd>" in page.content.decode()
