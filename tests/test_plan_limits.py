"""What one build may hold, and waits stored without an edge per pair of jobs.

A definition past a limit is refused before any job is written (a failed
build, `error_code: limit_exceeded`, naming the limit); no planner input is a
500; a flat `wait` between N and M steps stores no N×M edges, yet the jobs
after it run only once every job before it passed, and `depends_on` still lists
every prerequisite.
"""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from builds import services
from builds.models import Build, BuildState, Job, JobDependency, JobState
from pipelines import ir
from tests.dsl import hm
from tests.helpers import assert_error, builds_url, job_states, make_build, run_job

J = JobState
WAIT = {"type": "wait"}


def cmd(key: str, **fields: Any) -> dict[str, Any]:
    return {"type": "command", "key": key, "cmd": f"echo {key}", **fields}


def flat(*steps: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {"version": "0", "steps": list(steps), **top}


def segments(before: int, after: int) -> dict[str, Any]:
    """`before` steps, a wait, `after` steps."""
    return flat(*(cmd(f"a{i}") for i in range(before)), WAIT, *(cmd(f"b{i}") for i in range(after)))


def post_ir(api, pipeline, document: Any) -> Any:
    body = {"branch": "main", "commit": "abc123", "pipeline_ir": json.dumps(document)}
    return api.post(builds_url(pipeline), body, format="json")


def nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth):
        value = {"x": value}
    return value


def assert_limit_rejected(response, pipeline, *names: str) -> Build:
    """422 build_plan_rejected; the build failed with limit_exceeded, naming `names`, and has no jobs."""
    error = assert_error(response, 422, "build_plan_rejected")
    build = Build.objects.get(pipeline=pipeline)
    assert (build.state, build.error_code) == (BuildState.FAILED, "limit_exceeded")
    for name in names:
        assert name in build.error_message and name in error["message"]
    assert not Job.objects.filter(build=build).exists()
    return build


# ===================================================================== limits


@pytest.mark.django_db
def test_flat_700_steps_a_wait_and_700_more_is_422_limit_exceeded_jobs(api, pipeline):
    assert_limit_rejected(post_ir(api, pipeline, segments(700, 700)), pipeline, "HARMONT_MAX_BUILD_JOBS", "1000")


@pytest.mark.django_db
def test_a_graph_of_1001_nodes_is_422_limit_exceeded_jobs(api, pipeline):
    document = hm.pipeline([hm.sh("true", key=f"s{i}") for i in range(1001)])
    assert_limit_rejected(post_ir(api, pipeline, document), pipeline, "HARMONT_MAX_BUILD_JOBS")


@pytest.mark.django_db
def test_exactly_the_job_limit_is_accepted(api, pipeline, settings):
    settings.MAX_BUILD_JOBS = 3
    assert post_ir(api, pipeline, flat(cmd("a"), WAIT, cmd("b"), cmd("c"))).status_code == 201
    assert_error(post_ir(api, pipeline, flat(cmd("a"), cmd("b"), cmd("c"), cmd("d"))), 422, "build_plan_rejected")


@pytest.mark.django_db
def test_graph_edges_past_the_limit_are_422_limit_exceeded_edges(api, pipeline, settings):
    settings.MAX_BUILD_EDGES = 3
    document = hm.pipeline([hm.sh("true", key="a"), hm.sh("true", key="b"), hm.wait(),
                            hm.sh("true", key="c"), hm.sh("true", key="d")])  # 4 edges
    assert_limit_rejected(post_ir(api, pipeline, document), pipeline, "HARMONT_MAX_BUILD_EDGES")


@pytest.mark.django_db
def test_a_flat_wait_counts_one_edge_per_step_before_and_after_it(api, pipeline, settings):
    settings.MAX_BUILD_EDGES = 4
    assert post_ir(api, pipeline, segments(2, 2)).status_code == 201
    assert_error(post_ir(api, pipeline, segments(3, 2)), 422, "build_plan_rejected")
    assert Build.objects.get(pipeline=pipeline, number=2).error_code == "limit_exceeded"


@pytest.mark.django_db
def test_flat_depends_on_references_past_the_edge_limit_are_422(api, pipeline, settings):
    settings.MAX_BUILD_EDGES = 2
    document = flat(cmd("a"), cmd("b"), cmd("c", depends_on=["a", "b"]), cmd("d", depends_on=["a"]))
    assert_limit_rejected(post_ir(api, pipeline, document), pipeline, "HARMONT_MAX_BUILD_EDGES")


@pytest.mark.django_db
def test_a_command_over_64_kib_is_422_limit_exceeded(api, pipeline):
    document = flat({"type": "command", "key": "big", "cmd": "x" * (64 * 1024 + 1)})
    assert_limit_rejected(post_ir(api, pipeline, document), pipeline, "HARMONT_MAX_COMMAND_BYTES")


@pytest.mark.django_db
def test_a_command_of_exactly_64_kib_is_accepted(api, pipeline):
    document = flat({"type": "command", "key": "big", "cmd": "é" * (32 * 1024)})  # 2 bytes each
    assert post_ir(api, pipeline, document).status_code == 201


@pytest.mark.django_db
@pytest.mark.parametrize("layer", ["step", "pipeline", "build"])
def test_an_env_value_over_64_kib_is_422_limit_exceeded(api, pipeline, layer):
    big = {"BIG": "v" * (64 * 1024 + 1)}
    document = flat(cmd("a", **({"env": big} if layer == "step" else {})), **({"env": big} if layer == "pipeline" else {}))
    body = {"branch": "main", "commit": "abc123", "pipeline_ir": json.dumps(document),
            **({"env": big} if layer == "build" else {})}
    response = api.post(builds_url(pipeline), body, format="json")
    assert_limit_rejected(response, pipeline, "HARMONT_MAX_ENV_VALUE_BYTES")


@pytest.mark.django_db
def test_an_env_over_1_mib_in_all_is_422_limit_exceeded(api, pipeline):
    env = {f"V{i}": "v" * (60 * 1024) for i in range(18)}  # every value fits, all of them don't
    assert_limit_rejected(post_ir(api, pipeline, flat(cmd("a", env=env))), pipeline, "HARMONT_MAX_ENV_BYTES")


@pytest.mark.django_db
def test_a_pipeline_env_copied_into_every_job_is_bounded_for_the_whole_build(api, pipeline, settings):
    settings.MAX_BUILD_SPEC_BYTES = 10 * 1024
    document = flat(*(cmd(f"s{i}") for i in range(20)), env={"SHARED": "v" * 1024})
    assert_limit_rejected(post_ir(api, pipeline, document), pipeline, "HARMONT_MAX_BUILD_SPEC_BYTES")


@pytest.mark.django_db
@pytest.mark.parametrize(("step", "name"), [
    ({"key": "k" * 256}, "key"),
    ({"label": "l" * 501}, "'label'"),
    ({"image": "i" * 501}, "'image'"),
    ({"runner": "r" * 256}, "'runner'"),
    ({"timeout_seconds": 2**31}, "'timeout_seconds'"),
], ids=["key", "label", "image", "runner", "timeout"])
def test_values_too_large_for_the_jobs_columns_are_422_limit_exceeded(api, pipeline, step, name):
    document = flat({**cmd("a"), **step})
    assert_limit_rejected(post_ir(api, pipeline, document), pipeline, name)


@pytest.mark.django_db
def test_a_cache_nested_600_deep_is_422_not_500(api, pipeline):
    document = flat(cmd("a", cache=nested(600)))
    build = assert_limit_rejected(post_ir(api, pipeline, document), pipeline, "64 levels")
    assert build.pipeline_ir is None  # what no JSON column could hold is not kept


@pytest.mark.django_db
def test_a_cache_nested_600_deep_sent_as_an_object_is_422(api, pipeline):
    body = {"branch": "main", "commit": "abc123", "pipeline_ir": flat(cmd("a", cache=nested(600)))}
    assert_error(api.post(builds_url(pipeline), body, format="json"), 422, "build_plan_rejected")


@pytest.mark.django_db
@pytest.mark.parametrize("text", ["echo \x00", "echo \ud800"], ids=["nul", "lone-surrogate"])
def test_text_no_column_can_store_is_422_invalid_ir(api, pipeline, text):
    body = {"branch": "main", "commit": "abc123", "pipeline_ir": flat(cmd("a", cmd=text, cache={"k": text}))}
    # json.dumps escapes both as \u0000 / \ud800, as a client's JSON would.
    response = api.post(builds_url(pipeline), json.dumps(body), content_type="application/json")
    error = assert_error(response, 422, "build_plan_rejected")
    assert "invalid_ir" in error["message"]
    assert Build.objects.get(pipeline=pipeline).error_code == "invalid_ir"


@pytest.mark.django_db
@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity"])
def test_a_number_json_does_not_have_is_422_invalid_ir(api, pipeline, number):
    document = '{"version": "0", "steps": [{"type": "command", "key": "a", "cmd": "true", "cache": {"n": %s}}]}'
    body = {"branch": "main", "commit": "abc123", "pipeline_ir": document % number}  # the IR as a JSON string
    error = assert_error(api.post(builds_url(pipeline), body, format="json"), 422, "build_plan_rejected")
    assert "invalid_ir" in error["message"]
    build = Build.objects.get(pipeline=pipeline)
    assert (build.error_code, build.pipeline_ir) == ("invalid_ir", None)


@pytest.mark.django_db
@pytest.mark.parametrize("field", ["env", "message"])
def test_a_nul_in_the_build_requests_env_or_message_is_422_build_invalid(api, pipeline, field):
    value = {"A": "x\x00y", "B": "\ud800"} if field == "env" else "x\ud800\x00y"
    body = {"branch": "main", "commit": "abc123", "pipeline_ir": flat(cmd("a")), field: value}
    response = api.post(builds_url(pipeline), json.dumps(body), content_type="application/json")
    error = assert_error(response, 422, "build_invalid")
    assert field in error["fields"]
    assert not Build.objects.exists()


@pytest.mark.django_db
def test_a_stored_definition_past_a_limit_is_422_pipeline_invalid(api, org, settings):
    settings.MAX_BUILD_JOBS = 2
    body = {"name": "big", "repository": "https://github.com/acme/big", "default_branch": "main",
            "definition": flat(cmd("a"), cmd("b"), cmd("c"))}
    error = assert_error(api.post(f"/api/v0/organizations/{org.slug}/pipelines", body, format="json"), 422,
                         "pipeline_invalid")
    assert "limit_exceeded" in json.dumps(error["fields"])


# ===================================================================== the planner never crashes

def random_value(rng: random.Random, depth: int) -> Any:
    kind = rng.randrange(9 if depth < 200 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False, 0, -1, 2**63, 1.5, float("inf")])
    if kind in (2, 3):
        return rng.choice(["", "a", "wait", "command", "depends_on", "builds_in", "\x00", "\ud800", "é" * 70_000])
    if kind == 4:
        return rng.choice([[0, 1, "depends_on"], [1, 0, "builds_in"], [0, 0, "depends_on"], ["x", 1, None]])
    if kind == 5:
        return {"type": rng.choice(["command", "wait", None]), "key": rng.choice(["a", "b", ""]), "cmd": "true"}
    if kind == 6:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    keys = ["version", "steps", "graph", "nodes", "edges", "step", "key", "cmd", "env", "cache", "runner_args",
            "label", "image", "timeout_seconds", "depends_on", "builds_in", "type", "node_holes"]
    return {rng.choice(keys): random_value(rng, depth + 1) for _ in range(rng.randrange(5))}


def deep_list(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


def test_the_planner_answers_every_document_with_a_plan_or_a_plan_error():
    rng = random.Random(16)
    documents: list[Any] = []
    for _ in range(3000):
        doc = random_value(rng, 0)
        if isinstance(doc, dict) and rng.random() < 0.7:
            doc["version"] = "0"
        documents.append(doc)
    # Deep and huge, in every place a value can go.
    for field_name in ("cache", "runner_args", "env", "label", "depends_on", "image"):
        documents.append(flat(cmd("a", **{field_name: nested(5000)})))
        documents.append(flat(cmd("a", **{field_name: deep_list(5000)})))
    documents += [
        {"version": "0", "graph": nested(5000)}, {"version": nested(5000)}, {"version": "0", "steps": deep_list(5000)},
        {"version": "0", "graph": {"nodes": [{"step": {"key": "a", "cmd": "true"}}], "edges": deep_list(5000)}},
        {"version": "0", "steps": [WAIT] * 200_000},
        {"version": "0", "steps": [cmd("a")] * 5000},
        {"version": "0", "graph": {"nodes": [], "edges": [[0, 1, "depends_on"]] * 200_000}},
        '{"x": ' * 5000 + "{}" + "}" * 5000, "[" * 100_000, b"\xff\xfe",
    ]
    outcomes = set()
    for doc in documents:
        try:
            ir.plan_ir(doc, limits=ir.Limits())
            outcomes.add("plan")
        except ir.PlanError as exc:
            assert exc.code in {"invalid_json", "bad_version", "invalid_ir", "missing_field", "unknown_step_type",
                                "duplicate_key", "unknown_dependency", "cycle", "limit_exceeded"}, exc.code
            outcomes.add(exc.code)
    assert {"plan", "invalid_ir", "limit_exceeded"} <= outcomes


# ===================================================================== waits


@pytest.mark.django_db
def test_a_wait_between_500_and_500_steps_stores_no_edge_per_pair(pipeline):
    build = make_build(pipeline, pipeline_ir=segments(500, 500))
    jobs = Job.objects.filter(build=build)
    assert jobs.count() == 1000
    assert not JobDependency.objects.filter(job__build=build).exists()
    assert jobs.filter(state=J.SCHEDULED).count() == 500
    assert jobs.filter(state=J.PENDING, after_segment__isnull=False).count() == 500


@pytest.mark.django_db
def test_depends_on_lists_every_step_before_the_wait(api, pipeline):
    make_build(pipeline, pipeline_ir=flat(cmd("a"), cmd("b"), WAIT, cmd("c", depends_on=["x"]), cmd("x"),
                                          cmd("d", builds_in="a")))
    data = {job["step_key"]: job for job in api.get(builds_url(pipeline, "/1/jobs")).json()["data"]}
    ids = {key: job["id"] for key, job in data.items()}
    assert data["c"]["depends_on"] == [ids["a"], ids["b"], ids["x"]]
    assert data["x"]["depends_on"] == [ids["a"], ids["b"]]
    assert data["d"]["depends_on"] == [ids["a"], ids["b"]]
    for key in ("c", "d"):
        one = api.get(builds_url(pipeline, f"/1/jobs/{ids[key]}")).json()
        assert one["depends_on"] == data[key]["depends_on"]


@pytest.mark.django_db
def test_a_builds_in_parent_before_a_wait_keeps_its_edge(pipeline):
    build = make_build(pipeline, pipeline_ir=flat(cmd("a"), cmd("b"), WAIT, cmd("c", builds_in="a")))
    edges = list(JobDependency.objects.filter(job__build=build).values_list("job__step_key", "prerequisite__step_key",
                                                                           "kind"))
    assert edges == [("c", "a", "builds_in")]


@pytest.mark.django_db
def test_jobs_after_a_wait_are_scheduled_only_when_every_job_before_it_passed(pipeline):
    build = make_build(pipeline, pipeline_ir=flat(cmd("a"), cmd("b"), WAIT, cmd("c"), cmd("d"), WAIT, cmd("e")))
    run_job(Job.objects.get(build=build, step_key="a"))
    assert job_states(build) == {"a": J.PASSED, "b": J.SCHEDULED, "c": J.PENDING, "d": J.PENDING, "e": J.PENDING}
    run_job(Job.objects.get(build=build, step_key="b"))
    assert job_states(build) == {"a": J.PASSED, "b": J.PASSED, "c": J.SCHEDULED, "d": J.SCHEDULED, "e": J.PENDING}
    run_job(Job.objects.get(build=build, step_key="d"))
    assert job_states(build)["e"] == J.PENDING
    run_job(Job.objects.get(build=build, step_key="c"))
    assert job_states(build)["e"] == J.SCHEDULED
    run_job(Job.objects.get(build=build, step_key="e"))
    build.refresh_from_db()
    assert build.state == BuildState.PASSED


@pytest.mark.django_db
def test_a_claim_never_hands_out_a_job_after_a_wait_before_its_segment_passed(pipeline, org):
    from tests.helpers import make_agent

    build = make_build(pipeline, pipeline_ir=segments(3, 3))
    agent = make_agent(org)
    claimed = []
    while (claim := services.claim_job(agent=agent)) is not None:
        claimed.append(claim.job.step_key)
        if claim.job.step_key.startswith("b"):
            before = Job.objects.filter(build=build, step_key__startswith="a").values_list("state", flat=True)
            assert set(before) == {J.PASSED}
        job = Job.objects.get(pk=claim.job.pk)
        assert services.move_job(job=job, state=J.RUNNING)
        assert services.finish_job(job=job, state=J.PASSED, exit_code=0)
    assert sorted(claimed) == ["a0", "a1", "a2", "b0", "b1", "b2"]


@pytest.mark.django_db
@pytest.mark.parametrize("ending", [J.FAILED, J.TIMED_OUT])
def test_a_failure_before_a_wait_skips_every_job_after_it(pipeline, ending):
    build = make_build(pipeline, pipeline_ir=flat(cmd("a"), cmd("b"), WAIT, cmd("c"), WAIT, cmd("d"), cmd("e")))
    run_job(Job.objects.get(build=build, step_key="a"), ending, exit_code=1)
    assert job_states(build) == {"a": ending, "b": J.SCHEDULED, "c": J.SKIPPED, "d": J.SKIPPED, "e": J.SKIPPED}
    run_job(Job.objects.get(build=build, step_key="b"))
    build.refresh_from_db()
    assert build.state == BuildState.FAILED


@pytest.mark.django_db
def test_a_rendered_pipeline_with_a_wait_waits_for_the_render_job_and_the_wait(pipeline):
    from builds.services import render

    pipeline.repository, pipeline.definition = "https://github.com/acme/web", None
    pipeline.save()
    build = make_build(pipeline)
    render_job = Job.objects.get(build=build)
    assert services.move_job(job=render_job, state=J.ASSIGNED)
    assert services.move_job(job=render_job, state=J.RUNNING)
    render.record_render_result(job=render_job, pipeline_ir=segments(2, 1))
    assert job_states(build) == {":render": J.RUNNING, "a0": J.PENDING, "a1": J.PENDING, "b0": J.PENDING}
    assert services.finish_job(job=Job.objects.get(pk=render_job.pk), state=J.PASSED, exit_code=0)
    assert job_states(build) == {":render": J.PASSED, "a0": J.SCHEDULED, "a1": J.SCHEDULED, "b0": J.PENDING}
    run_job(Job.objects.get(build=build, step_key="a0"))
    run_job(Job.objects.get(build=build, step_key="a1"))
    assert job_states(build)["b0"] == J.SCHEDULED
