"""Webhook builds of registered pipelines render `.hm/` at the pushed commit; a push to the default branch
registers the repository's pipelines again from that render's envelope.

The envelopes are rendered by the real `harmont` package from `.hm/*.py` files of local git repositories.
"""

from __future__ import annotations

import copy
import uuid
from pathlib import Path
from typing import Any

import pytest
from django.test import TestCase
from django_tasks_db.models import DBTaskResult

from builds.models import Build, Job, JobKind
from builds.services import discovery
from builds.services.builds import RENDER_STEP_KEY
from pipelines.models import Pipeline
from tests.e2e import finished, jobs_by_key, stdout_of, wait_for
from tests.helpers import (assert_error, claim, deliver, job_url, pull_request_payload, push_payload, run_tasks,
                           start)
from tests.repos import make_repo

SECRET = "hook-secret-for-acme-shop"

CI_PY = '''
import harmont as hm

@hm.pipeline("ci", name="Shop CI", triggers=[hm.push(branch=["main", "feature/*"]), hm.pull_request()])
def ci():
    return [hm.sh("echo building $(cat VERSION)", key="build")]

@hm.pipeline("release", triggers=[hm.push(tag="v*")])
def release():
    return [hm.sh("echo releasing", key="release")]
'''

# What the next commit says: `ci` gains a step, `docs` is new (built on pushes to main), `release` is gone.
CI_PY_NEXT = '''
import harmont as hm

@hm.pipeline("ci", name="Shop CI", triggers=[hm.push(branch=["main", "feature/*"]), hm.pull_request()])
def ci():
    build = hm.sh("echo building $(cat VERSION)", key="build")
    return [build, hm.sh("echo linting", key="lint")]

@hm.pipeline("docs", name="Shop docs", triggers=[hm.push(branch="main")])
def docs():
    return [hm.sh("echo docs for $(cat VERSION)", key="docs")]

@hm.pipeline("nightly", triggers=[hm.push(branch="nightly")])
def nightly():
    return [hm.sh("echo nightly", key="nightly")]
'''


@pytest.fixture(scope="module")
def envelopes(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, Any]]:
    repo, _ = make_repo(tmp_path_factory.mktemp("repo") / "shop", {".hm/ci.py": CI_PY, "VERSION": "1.0\n"})
    first = repo.envelope()
    repo.commit({".hm/ci.py": CI_PY_NEXT}, "docs pipeline")
    return first, repo.envelope()


def register(api: Any, org: Any, envelope: dict[str, Any], url: str = "https://github.com/acme/shop.git") -> Any:
    response = api.post(f"/api/v0/organizations/{org.slug}/pipelines/register", {
        "repository": url, "repo_name": "acme/shop", "default_branch": "main", "webhook_secret": SECRET,
        "envelope": envelope}, format="json")
    assert response.status_code == 200, response.content
    return response


def shop_push(ref: str = "refs/heads/main", **kwargs: Any) -> dict[str, Any]:
    return push_payload(ref, full_name="acme/shop", **kwargs)


def only_build(slug: str) -> Build:
    [build] = Build.objects.filter(pipeline__slug=slug)
    return build


# ---------------------------------------------------------------- render at the pushed commit


@pytest.mark.django_db
def test_a_push_builds_a_registered_pipeline_by_rendering_it_at_the_pushed_commit(api, org, envelopes):
    register(api, org, envelopes[0])

    assert deliver("push", shop_push(), secret=SECRET).status_code == 202

    build = only_build("acme-shop-ci")
    assert build.pipeline_ir is None  # not the definition stored at registration
    [job] = Job.objects.filter(build=build)
    assert (job.step_key, job.kind, job.state) == (RENDER_STEP_KEY, JobKind.RENDER, "scheduled")
    assert build.discovers_pipelines is True  # a push to the default branch
    assert build.secret_access == "all"  # still the organization's own commands, at a commit GitHub signed


@pytest.mark.django_db
@pytest.mark.parametrize("event, payload", [
    ("push", shop_push("refs/heads/feature/x")),
    ("pull_request", pull_request_payload(full_name="acme/shop")),
])
def test_builds_of_other_branches_render_too_but_register_nothing(api, org, envelopes, event, payload):
    register(api, org, envelopes[0])
    deliver(event, payload, secret=SECRET)
    build = only_build("acme-shop-ci")
    assert Job.objects.get(build=build).kind == JobKind.RENDER
    assert build.discovers_pipelines is False


@pytest.mark.django_db
def test_a_hand_made_pipeline_keeps_building_its_stored_definition(org, pipeline):
    from tests.helpers import make_build

    build = make_build(pipeline, source="webhook", commit="0123abcd")
    assert build.pipeline_ir is not None and not Job.objects.filter(build=build, kind=JobKind.RENDER).exists()


@pytest.mark.django_db
def test_only_one_build_of_a_delivery_registers_the_pipelines_again(api, org, envelopes):
    both = copy.deepcopy(envelopes[0])
    both["pipelines"][1]["triggers"] = [{"event": "push", "branches": ["main"]}]  # release builds on main too
    register(api, org, both)

    deliver("push", shop_push(), secret=SECRET)

    assert sorted(Build.objects.values_list("pipeline__slug", "discovers_pipelines")) == [
        ("acme-shop-ci", True), ("acme-shop-release", False)]


@pytest.mark.django_db
def test_the_render_jobs_spec_asks_for_the_envelope_only_when_it_registers(api, org, envelopes, session):
    register(api, org, envelopes[0])
    deliver("push", shop_push(), secret=SECRET)
    spec, _ = claim(session)
    assert spec["render"]["envelope"] is True

    deliver("push", shop_push("refs/heads/feature/x"), secret=SECRET)
    spec, _ = claim(session)
    assert spec["render"]["envelope"] is False


# ---------------------------------------------------------------- registering again from the envelope


@pytest.fixture
def rendering(api, org, envelopes, session):
    """A push to main of the registered shop, its render job claimed and started: (build, spec, job client)."""
    register(api, org, envelopes[0])
    deliver("push", shop_push(), secret=SECRET)
    spec, job_client = claim(session)
    start(job_client, spec["id"])
    return only_build("acme-shop-ci"), spec, job_client


def send_render(job_client: Any, spec: dict[str, Any], **body: Any) -> Any:
    with TestCase.captureOnCommitCallbacks(execute=True):
        return job_client.post(job_url(spec["id"], "pipeline"), body, format="json")


@pytest.mark.django_db
def test_the_envelope_registers_new_pipelines_builds_them_and_archives_vanished_ones(rendering, envelopes):
    build, spec, job_client = rendering
    ci_next = next(p for p in envelopes[1]["pipelines"] if p["slug"] == "ci")["definition"]

    response = send_render(job_client, spec, pipeline_ir=ci_next, envelope=envelopes[1])

    assert response.status_code == 200 and response.json() == {"jobs": 2}  # build, lint: the pushed commit's
    assert run_tasks() == 1
    live = dict(Pipeline.objects.filter(archived_at__isnull=True).values_list("slug", "definition"))
    assert set(live) == {"acme-shop-ci", "acme-shop-docs", "acme-shop-nightly"}
    assert live["acme-shop-ci"] == ci_next  # the stored definition follows the default branch
    assert Pipeline.objects.get(slug="acme-shop-release").archived_at is not None
    docs = only_build("acme-shop-docs")  # new, and its trigger matches a push to main
    assert (docs.source, docs.branch, docs.commit, docs.message) == ("webhook", build.branch, build.commit,
                                                                     build.message)
    assert list(Job.objects.filter(build=docs).values_list("step_key", flat=True)) == ["docs"]
    assert docs.secret_access == "all"
    assert not Build.objects.filter(pipeline__slug="acme-shop-nightly").exists()  # its trigger doesn't match

    # Run again (the queue delivers at least once): nothing new.
    discovery.enqueue_discovery(build_id=build.pk, envelope=envelopes[1])
    assert run_tasks() == 1
    assert Build.objects.count() == 2


@pytest.mark.django_db
def test_an_envelope_registration_refuses_changes_nothing_and_the_build_goes_on(rendering, envelopes):
    build, spec, job_client = rendering
    broken = copy.deepcopy(envelopes[1])
    broken["pipelines"][1]["definition"] = {"version": "0", "steps": [{"type": "nope"}]}
    ci_next = envelopes[1]["pipelines"][0]["definition"]

    assert send_render(job_client, spec, pipeline_ir=ci_next, envelope=broken).status_code == 200
    run_tasks()

    assert set(Pipeline.objects.filter(archived_at__isnull=True).values_list("slug", flat=True)) == {
        "acme-shop-ci", "acme-shop-release"}
    assert Build.objects.count() == 1 and Job.objects.filter(build=build).count() == 3


@pytest.mark.django_db
def test_an_envelope_for_a_build_that_does_not_register_is_ignored(api, org, envelopes, session):
    register(api, org, envelopes[0])
    deliver("push", shop_push("refs/heads/feature/x"), secret=SECRET)
    spec, job_client = claim(session)
    start(job_client, spec["id"])

    response = send_render(job_client, spec, pipeline_ir=envelopes[1]["pipelines"][0]["definition"],
                           envelope=envelopes[1])

    assert response.status_code == 200
    assert not DBTaskResult.objects.filter(task_path__endswith="discover_pipelines").exists()
    assert set(Pipeline.objects.filter(archived_at__isnull=True).values_list("slug", flat=True)) == {
        "acme-shop-ci", "acme-shop-release"}


@pytest.mark.django_db
def test_an_envelope_with_a_render_failure_is_422(rendering, envelopes):
    build, spec, job_client = rendering
    response = job_client.post(job_url(spec["id"], "pipeline"), {"error": "boom", "envelope": envelopes[1]},
                               format="json")
    assert_error(response, 422, "validation_failed")
    build.refresh_from_db()
    assert build.error_code is None


# ---------------------------------------------------------------- end to end: git, harmont, an agent, the queue


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_push_that_changes_hm_runs_the_new_definition_and_registers_the_new_pipeline(api, org, agents,
                                                                                       e2e_server, tmp_path: Path):
    repo, _ = make_repo(tmp_path / "acme" / "shop", {".hm/ci.py": CI_PY, "VERSION": "1.0\n"})
    register(api, org, repo.envelope(), url=repo.url)
    pushed = repo.commit({".hm/ci.py": CI_PY_NEXT, "VERSION": "2.0\n"}, "Add docs, lint")
    agents.start("a1")

    response = deliver("push", shop_push(after=pushed, message="Add docs, lint"), secret=SECRET,
                       delivery=str(uuid.uuid4()))
    assert response.status_code == 202

    ci = wait_for(lambda: finished(only_build("acme-shop-ci")), 60, what="the ci build to finish")
    assert ci.state == "passed"
    jobs = jobs_by_key(ci)
    assert set(jobs) == {RENDER_STEP_KEY, "build", "lint"}  # the pushed commit's definition, not the registered one
    assert "building 2.0" in stdout_of(jobs["build"])

    def docs_build() -> Build | None:
        run_tasks()  # the render's envelope waits on the task queue
        return Build.objects.filter(pipeline__slug="acme-shop-docs").first()

    docs = wait_for(lambda: finished(wait_for(docs_build, 30, what="the docs pipeline")), 60,
                    what="the docs build to finish")
    assert (docs.state, docs.commit) == ("passed", pushed)
    assert "docs for 2.0" in stdout_of(jobs_by_key(docs)["docs"])
    assert Pipeline.objects.get(slug="acme-shop-release").archived_at is not None
