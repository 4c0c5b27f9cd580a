"""Builds without an IR or stored definition: one render job first, then the plan it sends back."""

from __future__ import annotations

from typing import Any

import pytest

from builds.models import Job, JobDependency
from builds.services.builds import RENDER_STEP_KEY
from pipelines import services as pipeline_services
from tests.dsl import hm
from tests.helpers import assert_error, claim, finish, job_states, job_url, make_build, start

pytestmark = pytest.mark.django_db


@pytest.fixture
def repo_pipeline(org):
    """A pipeline of a repository, with no stored definition: its builds are rendered on an agent."""
    return pipeline_services.create_pipeline(org=org, name="Site", repository="file:///srv/git/site.git",
                                             default_branch="main", source_slug="ci")


def rendered_ir() -> dict[str, Any]:
    first = hm.sh("make", key="build")
    return hm.pipeline([first.sh("make test", key="test"), hm.sh("make lint", key="lint")])


@pytest.fixture
def rendering(session, repo_pipeline):
    """A build of `repo_pipeline` whose render job is claimed and started: (build, spec, job client)."""
    build = make_build(repo_pipeline, env={"STAGE": "ci"})
    spec, job_client = claim(session)
    start(job_client, spec["id"])
    return build, spec, job_client


def send(job_client: Any, spec: dict[str, Any], **body: Any) -> Any:
    return job_client.post(job_url(spec["id"], "pipeline"), body, format="json")


def test_a_build_without_ir_or_definition_starts_with_one_render_job(repo_pipeline, settings):
    build = make_build(repo_pipeline, env={"STAGE": "ci"})

    assert build.state == "scheduled" and build.error_code is None
    job = Job.objects.get(build=build)
    assert (job.step_key, job.kind, job.state, job.position, job.name) == (
        RENDER_STEP_KEY, "render", "scheduled", 0, "Render pipeline ci")
    assert job.timeout_seconds == settings.RENDER_TIMEOUT_SECONDS
    assert job.env == {"DEBIAN_FRONTEND": "noninteractive", "TERM": "dumb", "STAGE": "ci"}


def test_the_render_jobs_spec_names_the_pipeline_and_the_checkout(session, repo_pipeline):
    build = make_build(repo_pipeline, commit="0123abcd")

    spec, _ = claim(session)

    assert spec["render"] == {"source_slug": "ci", "result_path": job_url(spec["id"], "pipeline"), "envelope": False}
    assert spec["source"] == {"kind": "git", "url": "file:///srv/git/site.git", "commit": "0123abcd",
                              "branch": "main", "path": None, "sha256": None}
    assert spec["build_id"] == str(build.id)


def test_the_rendered_ir_plans_the_rest_of_the_build_after_the_render_job(rendering):
    build, spec, job_client = rendering

    response = send(job_client, spec, pipeline_ir=rendered_ir())

    assert response.status_code == 200, response.content
    assert response.json() == {"jobs": 3}
    # Everything waits for the render job; its own order follows.
    assert job_states(build) == {RENDER_STEP_KEY: "running", "build": "pending", "test": "pending",
                                 "lint": "pending"}
    render = Job.objects.get(build=build, step_key=RENDER_STEP_KEY)
    edges = set(JobDependency.objects.filter(job__build=build).values_list("prerequisite__step_key", "job__step_key",
                                                                           "kind"))
    assert edges == {(RENDER_STEP_KEY, "build", "depends_on"), (RENDER_STEP_KEY, "lint", "depends_on"),
                     ("build", "test", "builds_in")}
    assert dict(Job.objects.filter(build=build).values_list("step_key", "position")) == {
        RENDER_STEP_KEY: 0, "build": 1, "test": 2, "lint": 3}
    assert Job.objects.get(build=build, step_key="build").env["STAGE"] == "ci"  # the build's env reaches them
    build.refresh_from_db()
    assert build.pipeline_ir == rendered_ir() and build.state == "running"

    assert finish(job_client, render.id, exit_code=0).status_code == 200

    assert job_states(build) == {RENDER_STEP_KEY: "passed", "build": "scheduled", "test": "pending",
                                 "lint": "scheduled"}


def test_sending_the_ir_again_adds_nothing(rendering):
    build, spec, job_client = rendering
    send(job_client, spec, pipeline_ir=rendered_ir())

    again = send(job_client, spec, pipeline_ir=rendered_ir())

    assert again.status_code == 200 and again.json() == {"jobs": 3}
    assert Job.objects.filter(build=build).count() == 4


def test_a_rejected_ir_fails_the_build_with_the_planners_code(rendering):
    build, spec, job_client = rendering
    broken = rendered_ir()
    broken["graph"]["edges"].append([1, 0, "depends_on"])

    assert_error(send(job_client, spec, pipeline_ir=broken), 422, "build_plan_rejected")

    build.refresh_from_db()
    assert (build.state, build.error_code) == ("failed", "cycle")
    assert build.finished_at is None  # the render job still has to report
    assert Job.objects.filter(build=build).count() == 1
    finish(job_client, spec["id"], exit_code=0, error_code="render_failed", error_message="rejected")
    build.refresh_from_db()
    assert build.finished_at is not None
    assert job_states(build) == {RENDER_STEP_KEY: "failed"}


def test_the_reserved_render_key_is_refused_in_a_rendered_ir(rendering):
    build, spec, job_client = rendering

    assert_error(send(job_client, spec, pipeline_ir=hm.pipeline([hm.sh("true", key=RENDER_STEP_KEY)])), 422,
                 "build_plan_rejected")

    build.refresh_from_db()
    assert build.error_code == "duplicate_key"


def test_an_ir_that_is_not_json_is_rejected(rendering):
    build, spec, job_client = rendering

    assert_error(send(job_client, spec, pipeline_ir="{nope"), 422, "build_plan_rejected")

    build.refresh_from_db()
    assert (build.error_code, build.pipeline_ir) == ("invalid_json", {"raw": "{nope"})


def test_a_reported_render_failure_fails_the_build(rendering):
    build, spec, job_client = rendering

    response = send(job_client, spec, error="Traceback ... NameError: name 'hm' is not defined")

    assert response.status_code == 200 and response.json() == {"jobs": 0}
    build.refresh_from_db()
    assert (build.state, build.error_code) == ("failed", "render_failed")
    assert "NameError" in build.error_message
    finish(job_client, spec["id"], exit_code=1, error_code="render_failed", error_message="renderer exited 1")
    render = Job.objects.get(build=build)
    assert (render.state, render.exit_code, render.error_code) == ("failed", 1, "render_failed")
    build.refresh_from_db()
    assert build.finished_at is not None


@pytest.mark.parametrize("body", [{}, {"pipeline_ir": {"version": "0"}, "error": "both"}])
def test_the_result_is_exactly_one_of_ir_and_error(rendering, body):
    build, spec, job_client = rendering
    assert_error(send(job_client, spec, **body), 422, "validation_failed")
    assert Job.objects.filter(build=build).count() == 1
    build.refresh_from_db()
    assert build.error_code is None


def test_only_a_render_job_may_send_a_pipeline(session, build):
    spec, job_client = claim(session)
    start(job_client, spec["id"])

    assert_error(send(job_client, spec, pipeline_ir=rendered_ir()), 409, "job_not_render")
    assert Job.objects.filter(build=build).count() == 2


def test_a_render_job_that_already_ended_can_not_plan(rendering):
    build, spec, job_client = rendering
    finish(job_client, spec["id"], exit_code=0)

    assert_error(send(job_client, spec, pipeline_ir=rendered_ir()), 409, "job_not_active")
    assert Job.objects.filter(build=build).count() == 1


def test_a_build_with_a_stored_definition_is_not_rendered(repo_pipeline):
    repo_pipeline.definition = rendered_ir()
    repo_pipeline.save()

    build = make_build(repo_pipeline)

    assert set(Job.objects.filter(build=build).values_list("kind", flat=True)) == {"command"}
    assert Job.objects.filter(build=build).count() == 3
