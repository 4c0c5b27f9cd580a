"""Retries (by hand and automatic) and soft fail: the planner's shapes, the services, the retry endpoint."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from builds import services, states
from builds.models import Build, BuildState, Job, JobDependency, JobKind, JobState
from builds.services import retries
from pipelines import ir
from tests.helpers import assert_error, builds_url, is_postgres, iso, make_api, make_build, race, run_job

J = JobState
B = BuildState


def step(key: str, **fields: Any) -> dict[str, Any]:
    return {"type": "command", "key": key, "cmd": f"run {key}", **fields}


def flat(*steps: dict[str, Any]) -> dict[str, Any]:
    return {"version": "0", "steps": list(steps)}


def jobs_of(build: Build, *, include_retried: bool = False) -> dict[str, Job]:
    jobs = Job.objects.filter(build=build).order_by("position", "attempt")
    if not include_retried:
        jobs = jobs.filter(retried=False)
    return {job.step_key: job for job in jobs}


def retry_url(build: Build, job: Job | str) -> str:
    job_id = job.pk if isinstance(job, Job) else job
    return builds_url(build.pipeline, f"/{build.number}/jobs/{job_id}/retry")


def jobs_url(build: Build, query: str = "") -> str:
    return builds_url(build.pipeline, f"/{build.number}/jobs{query}")


def fail(job: Job, exit_code: int = 1) -> None:
    run_job(Job.objects.get(pk=job.pk), J.FAILED, exit_code)


# ===================================================================== the planner's shapes

AUTO_ANY = {"exit_status": "*", "limit": 2}
MANUAL_OK = {"allowed": True, "reason": None}


@pytest.mark.parametrize(("given", "normalised"), [
    ({"automatic": True}, {"automatic": [AUTO_ANY], "manual": MANUAL_OK}),
    ({"automatic": False, "manual": False}, {"automatic": False, "manual": {"allowed": False, "reason": None}}),
    ({"automatic": []}, {"automatic": [], "manual": MANUAL_OK}),
    ({"automatic": {"exit_status": 3}}, {"automatic": [{"exit_status": [3], "limit": 2}], "manual": MANUAL_OK}),
    ({"automatic": [{"exit_status": -1, "limit": 5}, {"exit_status": [2, 1, 2], "limit": 10}]},
     {"automatic": [{"exit_status": [-1], "limit": 5}, {"exit_status": [1, 2], "limit": 10}], "manual": MANUAL_OK}),
    ({"automatic": {"limit": 1}}, {"automatic": [{"exit_status": "*", "limit": 1}], "manual": MANUAL_OK}),
    ({"manual": {"allowed": False, "reason": "deploys run once"}},
     {"automatic": [], "manual": {"allowed": False, "reason": "deploys run once"}}),
    ({"manual": {"reason": "fine"}}, {"automatic": [], "manual": {"allowed": True, "reason": "fine"}}),
    ({}, {"automatic": [], "manual": MANUAL_OK}),
])
def test_retry_shapes_are_normalised_and_normalising_again_changes_nothing(given, normalised):
    assert ir.normalise_retry(given, "x") == normalised
    assert ir.normalise_retry(normalised, "x") == normalised


@pytest.mark.parametrize(("given", "normalised"), [
    (True, {"exit_status": "*"}),
    (False, None),
    ([{"exit_status": 1}, {"exit_status": 42}], {"exit_status": [1, 42]}),
    ([{"exit_status": 1}, {"exit_status": "*"}], {"exit_status": "*"}),
    ({"exit_status": [3, 1]}, {"exit_status": [1, 3]}),
])
def test_soft_fail_shapes_are_normalised(given, normalised):
    assert ir.normalise_soft_fail(given, "x") == normalised
    if normalised is not None:
        assert ir.normalise_soft_fail(normalised, "x") == normalised


@pytest.mark.parametrize(("field", "value", "named"), [
    ("retry", "always", "'retry' must be an object"),
    ("retry", {"automatic": "yes"}, "'retry'.automatic must be"),
    ("retry", {"automatic": {"exit_status": 1, "limit": 0}}, "'retry'.automatic.limit must be"),
    ("retry", {"automatic": [{"exit_status": 1, "limit": 11}]}, "'retry'.automatic[0].limit must be"),
    ("retry", {"automatic": {"exit_status": 1, "limit": True}}, "'retry'.automatic.limit must be"),
    ("retry", {"automatic": {"exit_status": "1"}}, "'retry'.automatic.exit_status must be"),
    ("retry", {"automatic": {"exit_status": []}}, "'retry'.automatic.exit_status must be"),
    ("retry", {"automatic": {"exit_status": 256}}, "'retry'.automatic.exit_status must be"),
    ("retry", {"automatic": {"exit_status": 1, "signal": "SIGKILL"}}, "'retry'.automatic has unknown field"),
    ("retry", {"manual": "no"}, "'retry'.manual must be"),
    ("retry", {"manual": {"allowed": "no"}}, "'retry'.manual.allowed must be"),
    ("retry", {"manual": {"permit_on_passed": True}}, "'retry'.manual has unknown field"),
    ("retry", {"automatic": True, "limit": 3}, "'retry' has unknown field"),
    ("soft_fail", "yes", "'soft_fail' must be"),
    ("soft_fail", [], "'soft_fail' must be"),
    ("soft_fail", [{"status": 1}], "'soft_fail'[0] must be an object with 'exit_status'"),
    ("soft_fail", [{"exit_status": "one"}], "'soft_fail'[0].exit_status must be"),
])
def test_a_bad_retry_or_soft_fail_is_a_rejected_plan_naming_step_and_field(api, pipeline, field, value, named):
    response = api.post(builds_url(pipeline), {"branch": "main", "commit": "abc123",
                                               "pipeline_ir": flat(step("ok"), step("flaky", **{field: value}))},
                        format="json")
    error = assert_error(response, 422, "build_plan_rejected")
    build = Build.objects.get(pipeline=pipeline)
    assert (build.state, build.error_code) == (B.FAILED, "invalid_ir")
    assert "steps[1] ('flaky')" in build.error_message and named in build.error_message, build.error_message
    assert named in error["message"]
    assert not Job.objects.filter(build=build).exists()


@pytest.mark.django_db
def test_the_planned_jobs_carry_the_policies_and_the_pipeline_default_applies_where_a_step_sets_none(pipeline):
    pipeline.default_retry = {"automatic": {"exit_status": -1, "limit": 3}}
    pipeline.save()
    build = make_build(pipeline, pipeline_ir=flat(
        step("plain"), step("own", retry={"manual": False}), step("soft", soft_fail=[{"exit_status": 2}])))
    jobs = jobs_of(build)
    default = {"automatic": [{"exit_status": [-1], "limit": 3}], "manual": MANUAL_OK}
    assert jobs["plain"].retry_policy == default
    assert jobs["own"].retry_policy == {"automatic": [], "manual": {"allowed": False, "reason": None}}
    assert jobs["soft"].retry_policy == default
    assert (jobs["plain"].soft_fail_policy, jobs["soft"].soft_fail_policy) == (None, {"exit_status": [2]})


@pytest.mark.django_db
def test_a_pipeline_takes_default_retry_on_create_normalised_and_shows_it(admin_api, org):
    response = admin_api.post(f"/api/v0/organizations/{org.slug}/pipelines", {
        "name": "Flaky", "repository": "https://example.com/acme/flaky.git", "default_branch": "main",
        "default_retry": {"automatic": True, "manual": {"allowed": False, "reason": "no"}}}, format="json")
    assert response.status_code == 201, response.content
    stored = {"automatic": [AUTO_ANY], "manual": {"allowed": False, "reason": "no"}}
    assert response.json()["default_retry"] == stored
    assert admin_api.get(f"/api/v0/organizations/{org.slug}/pipelines/flaky").json()["default_retry"] == stored


@pytest.mark.django_db
def test_a_bad_default_retry_is_422_and_creates_nothing(admin_api, org):
    response = admin_api.post(f"/api/v0/organizations/{org.slug}/pipelines", {
        "name": "Flaky", "repository": "https://example.com/acme/flaky.git", "default_branch": "main",
        "default_retry": {"automatic": {"limit": 99}}}, format="json")
    error = assert_error(response, 422, "pipeline_invalid")
    assert list(error["fields"]) == ["default_retry"]
    assert error["fields"]["default_retry"][0].startswith("invalid_ir: 'default_retry'.automatic.limit must be")
    assert not org.pipelines.filter(slug="flaky").exists()


# ===================================================================== what a job's end means (pure)

LOST = "agent_heartbeat_lost"


@pytest.mark.parametrize(("policy", "used", "state", "exit_code", "error_code", "rule"), [
    (None, {}, J.FAILED, 1, None, None),
    (None, {}, J.FAILED, None, LOST, "agent_lost"),  # a lost agent: once by default
    (None, {"agent_lost": 1}, J.FAILED, None, LOST, None),
    ({"automatic": [], "manual": MANUAL_OK}, {}, J.FAILED, None, LOST, "agent_lost"),
    ({"automatic": False, "manual": MANUAL_OK}, {}, J.FAILED, None, LOST, None),  # opted out of every retry
    ({"automatic": [{"exit_status": [3], "limit": 2}]}, {}, J.FAILED, None, LOST, "agent_lost"),
    ({"automatic": [{"exit_status": [-1], "limit": 3}]}, {"agent_lost": 1, "0": 2}, J.FAILED, None, LOST, "0"),
    ({"automatic": [{"exit_status": [-1], "limit": 3}]}, {"0": 3}, J.FAILED, None, LOST, None),  # a rule for -1 decides
    ({"automatic": [{"exit_status": "*", "limit": 2}]}, {}, J.FAILED, None, LOST, "0"),
    ({"automatic": [{"exit_status": [3], "limit": 2}]}, {"0": 1}, J.FAILED, 3, None, "0"),
    ({"automatic": [{"exit_status": [3], "limit": 2}]}, {"0": 2}, J.FAILED, 3, None, None),
    ({"automatic": [{"exit_status": [3], "limit": 2}]}, {}, J.FAILED, 4, None, None),
    ({"automatic": [{"exit_status": [3], "limit": 1}, {"exit_status": "*", "limit": 1}]}, {}, J.FAILED, 4, None,
     "1"),
    # The first matching rule decides, also once used up.
    ({"automatic": [{"exit_status": [3], "limit": 1}, {"exit_status": "*", "limit": 5}]}, {"0": 1}, J.FAILED, 3,
     None, None),
    ({"automatic": [{"exit_status": "*", "limit": 2}]}, {}, J.TIMED_OUT, 143, "job_timeout", None),
    ({"automatic": [{"exit_status": "*", "limit": 2}]}, {}, J.CANCELED, 143, None, None),
    ({"automatic": [{"exit_status": "*", "limit": 2}]}, {}, J.PASSED, 0, None, None),
    ({"automatic": [{"exit_status": "*", "limit": 2}]}, {}, J.FAILED, None, "job_start_failed", "0"),
])
def test_automatic_retry_rule(policy, used, state, exit_code, error_code, rule):
    assert retries.automatic_retry_rule(policy, used, state=state, exit_code=exit_code, error_code=error_code) == rule


@pytest.mark.parametrize(("policy", "state", "exit_code", "error_code", "soft"), [
    (None, J.FAILED, 1, None, False),
    ({"exit_status": "*"}, J.FAILED, 1, None, True),
    ({"exit_status": "*"}, J.FAILED, None, LOST, False),  # not the command's failure
    ({"exit_status": "*"}, J.FAILED, None, "job_start_failed", False),
    ({"exit_status": "*"}, J.FAILED, 143, "agent_stopped", False),
    ({"exit_status": "*"}, J.TIMED_OUT, 143, "job_timeout", False),
    ({"exit_status": "*"}, J.PASSED, 0, None, False),
    ({"exit_status": [1, 42]}, J.FAILED, 42, None, True),
    ({"exit_status": [1, 42]}, J.FAILED, 2, None, False),
    ({"exit_status": [-1]}, J.FAILED, None, LOST, True),
])
def test_soft_fails(policy, state, exit_code, error_code, soft):
    assert retries.soft_fails(policy, state=state, exit_code=exit_code, error_code=error_code) is soft


@pytest.mark.django_db
def test_a_new_attempt_copies_every_step_column_and_no_execution_column(chain):
    job = jobs_of(chain)["d"]
    run_job(job, J.FAILED, 5)
    copied = retries.step_fields(Job.objects.get(pk=job.pk))
    concrete = {field.name: field.attname for field in Job._meta.concrete_fields}
    # Every concrete column is copied unless it records a run: columns added for steps come along unnamed.
    assert set(copied) == {attname for name, attname in concrete.items() if name not in retries.EXECUTION_FIELDS}
    assert {"build_id", "organization_id", "position", "step_key", "kind", "command", "image", "env",
            "timeout_seconds", "segment", "after_segment", "retry_policy", "soft_fail_policy"} <= set(copied)
    assert not {"state", "exit_code", "agent_id", "credential_hash", "log_bytes", "workspace_archive",
                "started_at", "attempt", "retried"} & set(copied)
    assert retries.EXECUTION_FIELDS <= set(concrete), "a name in EXECUTION_FIELDS is no Job column"


# ===================================================================== retry by hand


@pytest.fixture
def chain(pipeline) -> Build:
    """a -> b -> c, and d beside them."""
    return make_build(pipeline, pipeline_ir=flat(step("a", image="alpine:3", env={"X": "1"}, timeout_seconds=99),
                                                 step("b", depends_on=["a"]),
                                                 step("c", builds_in="b"), step("d")))


@pytest.mark.django_db
def test_retry_of_a_failed_job_is_201_with_the_new_attempt_and_its_skipped_dependents_wait_again(api, chain):
    jobs = jobs_of(chain)
    run_job(jobs["d"])
    fail(jobs["a"], 2)
    assert {k: j.state for k, j in jobs_of(chain).items()} == {"a": J.FAILED, "b": J.SKIPPED, "c": J.SKIPPED,
                                                                "d": J.PASSED}
    chain.refresh_from_db()
    assert chain.state == B.FAILED and chain.finished_at is not None

    response = api.post(retry_url(chain, jobs["a"]))

    assert response.status_code == 201, response.content
    new = Job.objects.get(pk=response.json()["id"])
    assert response.json() == {
        "id": str(new.pk), "step_key": "a", "name": "a", "command": "run a", "state": J.SCHEDULED,
        "exit_code": None, "error_code": None, "error_message": None, "depends_on": [], "soft_failed": False,
        "retry_policy": None, "soft_fail_policy": None, "attempt": 2, "retry_of": str(jobs["a"].pk),
        "retried": False, "created_at": iso(new.created_at), "started_at": None, "finished_at": None,
        "agents": {"queue": "default"}, "concurrency_group": None, "concurrency": None, "waiting_reason": None,
        "cached": False, "reused_job": None,
    }
    old = Job.objects.get(pk=jobs["a"].pk)
    assert (old.state, old.exit_code, old.retried, old.attempt) == (J.FAILED, 2, True, 1)
    assert (new.image, new.env, new.timeout_seconds, new.position) == (old.image, old.env, 99, old.position)
    now = jobs_of(chain)
    assert {k: j.state for k, j in now.items()} == {"a": J.SCHEDULED, "b": J.PENDING, "c": J.PENDING,
                                                     "d": J.PASSED}
    assert now["b"].finished_at is None
    # b waits for the new attempt (and c still builds in b's files).
    assert list(JobDependency.objects.filter(job=now["b"]).values_list("prerequisite_id", flat=True)) == [new.pk]
    chain.refresh_from_db()
    assert (chain.state, chain.finished_at) == (B.RUNNING, None)

    run_job(now["a"])
    run_job(Job.objects.get(pk=now["b"].pk))
    run_job(Job.objects.get(pk=now["c"].pk))
    chain.refresh_from_db()
    assert chain.state == B.PASSED and chain.finished_at is not None


@pytest.mark.django_db
def test_the_job_list_shows_latest_attempts_and_include_retried_the_older_ones_before_theirs(api, chain):
    jobs = jobs_of(chain)
    fail(jobs["a"])
    second = api.post(retry_url(chain, jobs["a"])).json()
    fail(Job.objects.get(pk=second["id"]))
    third = api.post(retry_url(chain, second["id"])).json()

    latest = api.get(jobs_url(chain)).json()["data"]
    assert [(j["step_key"], j["attempt"]) for j in latest] == [("a", 3), ("b", 1), ("c", 1), ("d", 1)]
    assert latest[1]["depends_on"] == [third["id"]]
    everything = api.get(jobs_url(chain, "?include_retried=true")).json()["data"]
    assert [(j["step_key"], j["attempt"], j["retried"], j["retry_of"]) for j in everything] == [
        ("a", 1, True, None), ("a", 2, True, str(jobs["a"].pk)), ("a", 3, False, second["id"]),
        ("b", 1, False, None), ("c", 1, False, None), ("d", 1, False, None)]
    assert api.get(jobs_url(chain, "?include_retried=false")).json()["data"] == latest
    # A retried attempt is still there by its id.
    assert api.get(jobs_url(chain, f"/{jobs['a'].pk}")).json()["retried"] is True


@pytest.mark.django_db
def test_include_retried_must_be_true_or_false(api, chain):
    error = assert_error(api.get(jobs_url(chain, "?include_retried=yes")), 400, "invalid_filter")
    assert error["fields"] == {"include_retried": ["Must be true or false."]}


@pytest.mark.django_db
@pytest.mark.parametrize("include", ["", "?include_retried=true"])
def test_the_job_list_costs_the_same_queries_however_many_attempts(api, pipeline, django_assert_num_queries,
                                                                    include):
    def build_with(retried: int) -> Build:
        build = make_build(pipeline, pipeline_ir=flat(step("a"), {"type": "wait"}, step("b"), step("c")))
        for _ in range(retried):
            fail(jobs_of(build)["a"])
            services.retry_job(job=jobs_of(build)["a"])
        return build

    small, large = build_with(1), build_with(5)
    assert api.get(jobs_url(small)).status_code == 200  # the token's last use is fresh: no write below
    for build, shown in ((small, 4 if include else 3), (large, 8 if include else 3)):
        # the token, the build, its jobs, their edges, the connected agents' tags (a job is scheduled)
        with django_assert_num_queries(5):
            response = api.get(jobs_url(build, include))
        assert len(response.json()["data"]) == shown


@pytest.mark.django_db
def test_a_member_may_retry(member_api, chain):
    fail(jobs_of(chain)["a"])
    assert member_api.post(retry_url(chain, jobs_of(chain)["a"])).status_code == 201


@pytest.mark.django_db
def test_retry_in_another_organization_or_of_no_such_job_is_404(stranger_api, api, chain, other_pipeline):
    job = jobs_of(chain)["a"]
    fail(job)
    assert_error(stranger_api.post(retry_url(chain, job)), 404, "organization_not_found")
    assert_error(api.post(retry_url(chain, "not-a-uuid")), 404, "job_not_found")
    other = make_build(other_pipeline, pipeline_ir=flat(step("x")))
    assert_error(api.post(retry_url(chain, jobs_of(other)["x"])), 404, "job_not_found")
    assert not Job.objects.filter(retried=True).exists()


@pytest.mark.django_db
@pytest.mark.parametrize("state", [J.PENDING, J.SCHEDULED, J.RUNNING, J.PASSED, J.SKIPPED])
def test_retry_of_a_job_that_did_not_fail_is_409(api, chain, state):
    job = jobs_of(chain)["a"]
    if state == J.RUNNING:
        services.move_job(job=job, state=J.ASSIGNED)
        services.move_job(job=job, state=J.RUNNING)
    elif state == J.PASSED:
        run_job(job)
    elif state == J.SKIPPED:
        fail(job)
        job = jobs_of(chain)["b"]
    elif state == J.PENDING:
        job = jobs_of(chain)["b"]
    assert Job.objects.get(pk=job.pk).state == state
    error = assert_error(api.post(retry_url(chain, job)), 409, "job_not_retryable")
    assert f"it is {state}" in error["message"]
    assert Job.objects.filter(build=chain).count() == 4


@pytest.mark.django_db
def test_retry_of_a_job_retried_already_is_409(api, chain):
    job = jobs_of(chain)["a"]
    fail(job)
    assert api.post(retry_url(chain, job)).status_code == 201
    error = assert_error(api.post(retry_url(chain, job)), 409, "job_not_retryable")
    assert "retried already" in error["message"]
    assert Job.objects.filter(build=chain, step_key="a").count() == 2


@pytest.mark.django_db
def test_manual_false_makes_the_step_not_retryable_by_hand_with_its_reason(api, pipeline):
    build = make_build(pipeline, pipeline_ir=flat(step("deploy", retry={"manual": {"allowed": False,
                                                                                     "reason": "deploys run once"}})))
    fail(jobs_of(build)["deploy"])
    error = assert_error(api.post(retry_url(build, jobs_of(build)["deploy"])), 409, "job_not_retryable")
    assert "does not allow manual retries: deploys run once" in error["message"]


@pytest.mark.django_db
def test_a_job_of_a_build_that_failed_as_a_whole_is_not_retryable(api, pipeline):
    from builds.services.reaping import time_out_build

    build = make_build(pipeline, pipeline_ir={**flat(step("slow")), "timeout_seconds": 5})
    job = jobs_of(build)["slow"]
    services.move_job(job=job, state=J.ASSIGNED)
    services.move_job(job=job, state=J.RUNNING)
    assert time_out_build(build_id=build.pk, now=timezone.now())
    services.report_finish(job=Job.objects.get(pk=job.pk), exit_code=143, outcome="timed_out")
    assert Job.objects.get(pk=job.pk).state == J.TIMED_OUT
    error = assert_error(api.post(retry_url(build, job)), 409, "job_not_retryable")
    assert "pipeline_timeout" in error["message"]


@pytest.mark.django_db
def test_the_render_job_is_not_retryable(api, pipeline):
    pipeline.repository, pipeline.definition = "https://example.com/acme/web.git", None
    pipeline.save()
    build = make_build(pipeline)
    render = Job.objects.get(build=build)
    assert render.kind == JobKind.RENDER
    fail(render)
    error = assert_error(api.post(retry_url(build, render)), 409, "job_not_retryable")
    assert "renders the pipeline" in error["message"]


@pytest.mark.django_db
def test_a_timed_out_job_can_be_retried(api, chain):
    job = jobs_of(chain)["a"]
    run_job(job, J.TIMED_OUT, 143)
    assert api.post(retry_url(chain, job)).status_code == 201
    assert jobs_of(chain)["b"].state == J.PENDING


# ------------------------------------------------------------------ canceled builds


@pytest.mark.django_db
def test_retry_in_a_canceled_build_lifts_the_cancel_for_what_follows_and_the_rest_stays_canceled(api, chain):
    jobs = jobs_of(chain)
    for key in ("a", "d"):
        services.move_job(job=jobs[key], state=J.ASSIGNED)
        services.move_job(job=jobs[key], state=J.RUNNING)
    services.cancel_build(build=chain)
    for key in ("a", "d"):
        services.report_finish(job=Job.objects.get(pk=jobs[key].pk), exit_code=143)
    assert {k: j.state for k, j in jobs_of(chain).items()} == {k: J.CANCELED for k in "abcd"}
    chain.refresh_from_db()
    assert chain.state == B.CANCELED and chain.finished_at is not None

    assert api.post(retry_url(chain, jobs["a"])).status_code == 201

    chain.refresh_from_db()
    assert (chain.state, chain.cancel_requested_at, chain.finished_at) == (B.RUNNING, None, None)
    # b and c waited for a when the build was canceled: they wait again. d ran and was stopped: it stays.
    assert {k: j.state for k, j in jobs_of(chain).items()} == {"a": J.SCHEDULED, "b": J.PENDING, "c": J.PENDING,
                                                                "d": J.CANCELED}
    for key in ("a", "b", "c"):
        run_job(jobs_of(chain)[key])
    chain.refresh_from_db()
    # Every job ended and d is canceled: the build did not run whole, it does not pass.
    assert chain.state == B.CANCELED and chain.finished_at is not None
    assert chain.cancel_requested_at is None
    # Retrying d too makes the build whole again.
    assert api.post(retry_url(chain, jobs["d"])).status_code == 201
    run_job(jobs_of(chain)["d"])
    chain.refresh_from_db()
    assert chain.state == B.PASSED


@pytest.mark.django_db
def test_a_job_whose_prerequisite_is_canceled_is_not_retryable_until_that_one_is(api, chain):
    jobs = jobs_of(chain)
    services.move_job(job=jobs["a"], state=J.ASSIGNED)
    services.move_job(job=jobs["a"], state=J.RUNNING)
    services.cancel_build(build=chain)
    services.report_finish(job=Job.objects.get(pk=jobs["a"].pk), exit_code=143)
    error = assert_error(api.post(retry_url(chain, jobs["b"])), 409, "job_not_retryable")
    assert f"prerequisite a ({jobs['a'].pk}) ended canceled; retry that job first" in error["message"]
    chain.refresh_from_db()
    assert chain.cancel_requested_at is not None


# ------------------------------------------------------------------ races


@pytest.mark.django_db(transaction=True)
def test_two_racing_retries_of_one_job_make_one_attempt(owner, pipeline):
    if not is_postgres():
        pytest.skip("a race needs PostgreSQL (SQLite serialises every writer)")
    build = make_build(pipeline, pipeline_ir=flat(step("a"), step("b", depends_on=["a"])))
    job = jobs_of(build)["a"]
    fail(job)
    clients = [make_api(owner) for _ in range(4)]

    statuses = race(4, lambda i: clients[i].post(retry_url(build, job)).status_code)

    assert sorted(statuses) == [201, 409, 409, 409]
    assert Job.objects.filter(build=build, step_key="a").count() == 2
    assert Job.objects.filter(build=build, step_key="a", retried=False).get().attempt == 2


# ===================================================================== automatic retries


@pytest.mark.django_db
def test_an_automatic_retry_happens_at_the_jobs_end_and_dependents_are_never_skipped(pipeline):
    build = make_build(pipeline, pipeline_ir=flat(
        step("flaky", retry={"automatic": {"exit_status": 3, "limit": 2}}), step("after", depends_on=["flaky"])))
    for attempt in (1, 2):
        fail(jobs_of(build)["flaky"], 3)
        jobs = jobs_of(build)
        assert (jobs["flaky"].attempt, jobs["flaky"].state, jobs["after"].state) == (attempt + 1, J.SCHEDULED,
                                                                                   J.PENDING)
        assert jobs["flaky"].automatic_retries == {"0": attempt}
        build.refresh_from_db()
        assert (build.state, build.finished_at) == (B.RUNNING, None)
    fail(jobs_of(build)["flaky"], 3)  # the limit is used up
    jobs = jobs_of(build)
    assert (jobs["flaky"].attempt, jobs["flaky"].state, jobs["after"].state) == (3, J.FAILED, J.SKIPPED)
    build.refresh_from_db()
    assert build.state == B.FAILED
    assert list(Job.objects.filter(build=build, step_key="flaky").order_by("attempt").values_list(
        "retried", "exit_code")) == [(True, 3), (True, 3), (False, 3)]


@pytest.mark.django_db
def test_an_exit_status_no_rule_matches_is_not_retried(pipeline):
    build = make_build(pipeline, pipeline_ir=flat(step("flaky", retry={"automatic": {"exit_status": 3}})))
    fail(jobs_of(build)["flaky"], 1)
    assert Job.objects.filter(build=build).count() == 1
    build.refresh_from_db()
    assert build.state == B.FAILED


@pytest.mark.django_db
def test_a_lost_agent_is_retried_once_by_default(pipeline):
    build = make_build(pipeline, pipeline_ir=flat(step("a"), step("b", depends_on=["a"])))
    for attempt in (1, 2):
        job = jobs_of(build)["a"]
        services.move_job(job=job, state=J.ASSIGNED)
        services.move_job(job=job, state=J.RUNNING)
        Job.objects.filter(pk=job.pk).update(last_heartbeat_at=timezone.now() - timedelta(minutes=10))
        assert services.reap().heartbeat_lost == 1
    jobs = jobs_of(build, include_retried=True)
    assert [(j.attempt, j.state, j.error_code, j.retried) for j in
            Job.objects.filter(build=build, step_key="a").order_by("attempt")] == [
        (1, J.FAILED, LOST, True), (2, J.FAILED, LOST, False)]
    assert jobs["b"].state == J.SKIPPED
    build.refresh_from_db()
    assert build.state == B.FAILED


@pytest.mark.django_db
def test_a_canceled_build_gets_no_automatic_retry(pipeline):
    build = make_build(pipeline, pipeline_ir=flat(step("a", retry={"automatic": True})))
    job = jobs_of(build)["a"]
    services.move_job(job=job, state=J.ASSIGNED)
    services.move_job(job=job, state=J.RUNNING)
    services.cancel_build(build=build)
    Job.objects.filter(pk=job.pk).update(last_heartbeat_at=timezone.now() - timedelta(minutes=10))
    assert services.reap().heartbeat_lost == 1
    assert Job.objects.filter(build=build).count() == 1


@pytest.mark.django_db
def test_an_agents_finish_report_retries_through_the_credential_read(pipeline, session):
    from tests.helpers import claim, finish, start

    build = make_build(pipeline, pipeline_ir=flat(step("a", retry={"automatic": {"exit_status": 7, "limit": 1}})))
    spec, job_client = claim(session)
    job_id = spec["id"]
    start(job_client, job_id)
    assert finish(job_client, job_id, exit_code=7).status_code == 200
    jobs = list(Job.objects.filter(build=build).order_by("attempt"))
    assert [(j.attempt, j.state, j.retried) for j in jobs] == [(1, J.FAILED, True), (2, J.SCHEDULED, False)]


# ===================================================================== soft fail


@pytest.mark.django_db
def test_a_soft_failure_lets_its_dependents_run_and_the_build_pass(api, pipeline):
    build = make_build(pipeline, pipeline_ir=flat(step("lint", soft_fail=[{"exit_status": 1}]),
                                                  step("deploy", depends_on=["lint"])))
    fail(jobs_of(build)["lint"], 1)
    jobs = jobs_of(build)
    assert (jobs["lint"].state, jobs["lint"].soft_failed, jobs["deploy"].state) == (J.FAILED, True, J.SCHEDULED)
    body = api.get(jobs_url(build, f"/{jobs['lint'].pk}")).json()
    assert (body["soft_failed"], body["soft_fail_policy"]) == (True, {"exit_status": [1]})
    run_job(jobs["deploy"])
    build.refresh_from_db()
    assert build.state == B.PASSED


@pytest.mark.django_db
def test_a_failure_the_soft_fail_policy_does_not_match_fails_the_build(pipeline):
    build = make_build(pipeline, pipeline_ir=flat(step("lint", soft_fail=[{"exit_status": 1}]),
                                                  step("deploy", depends_on=["lint"])))
    fail(jobs_of(build)["lint"], 2)
    jobs = jobs_of(build)
    assert (jobs["lint"].soft_failed, jobs["deploy"].state) == (False, J.SKIPPED)
    build.refresh_from_db()
    assert build.state == B.FAILED


@pytest.mark.django_db
def test_soft_fail_true_in_a_wait_segment_lets_the_steps_after_the_wait_run(pipeline):
    build = make_build(pipeline, pipeline_ir=flat(step("a", soft_fail=True), step("b"), {"type": "wait"},
                                                  step("c")))
    run_job(jobs_of(build)["b"])
    fail(jobs_of(build)["a"], 9)
    assert jobs_of(build)["c"].state == J.SCHEDULED
    run_job(jobs_of(build)["c"])
    build.refresh_from_db()
    assert build.state == B.PASSED


@pytest.mark.django_db
def test_only_the_last_attempt_soft_fails(pipeline):
    build = make_build(pipeline, pipeline_ir=flat(step("a", soft_fail=True,
                                                       retry={"automatic": {"exit_status": 1, "limit": 1}})))
    fail(jobs_of(build)["a"], 1)
    fail(jobs_of(build)["a"], 1)
    assert list(Job.objects.filter(build=build).order_by("attempt").values_list("retried", "soft_failed")) == [
        (True, False), (False, True)]
    build.refresh_from_db()
    assert build.state == B.PASSED


@pytest.mark.django_db
def test_a_soft_failed_job_may_still_be_retried_by_hand(api, pipeline):
    build = make_build(pipeline, pipeline_ir=flat(step("a", soft_fail=True)))
    fail(jobs_of(build)["a"], 1)
    build.refresh_from_db()
    assert build.state == B.PASSED
    assert api.post(retry_url(build, jobs_of(build)["a"])).status_code == 201
    build.refresh_from_db()
    assert (build.state, build.finished_at) == (B.RUNNING, None)
    assert states.roll_up([states.RETRIED, J.SCHEDULED]) == B.RUNNING


# ===================================================================== the build page


def page_url(build: Build, suffix: str = "") -> str:
    return f"/orgs/{build.pipeline.organization.slug}/pipelines/{build.pipeline.slug}/builds/{build.number}{suffix}"


def signed_in(user: Any) -> Any:
    from django.test import Client

    client = Client()
    client.force_login(user)
    return client


def retry_forms(html: str) -> dict[str, bool]:
    """{job id: whether its Retry form is shown} for every job offering one."""
    import re

    return {job_id: "hidden" not in attrs for job_id, attrs in re.findall(
        r'/jobs/([0-9a-f-]{36})/retry" class="inline-form" data-retry-form([^>]*)>', html)}


@pytest.mark.django_db
def test_the_build_page_offers_retry_on_retryable_jobs_and_shows_the_attempts(member, chain):
    web = signed_in(member)
    jobs = jobs_of(chain)
    run_job(jobs["d"])
    fail(jobs["a"])
    html = web.get(page_url(chain)).content.decode()
    forms = retry_forms(html)
    assert forms[str(jobs["a"].pk)] is True
    assert forms[str(jobs["d"].pk)] is False and forms[str(jobs["b"].pk)] is False

    response = web.post(page_url(chain, f"/jobs/{jobs['a'].pk}/retry"))

    assert response.status_code == 302 and response["Location"] == page_url(chain)
    new = jobs_of(chain)["a"]
    assert new.attempt == 2
    html = web.get(page_url(chain)).content.decode()
    assert "Retrying a: attempt 2." in html
    # The older attempt stays on the page, before the new one, without a Retry of its own.
    assert html.index(f'id="job-{jobs["a"].pk}"') < html.index(f'id="job-{new.pk}"')
    assert 'data-attempt="1" data-retried' in html and "attempt 1 · retried" in html and "attempt 2" in html
    assert str(jobs["a"].pk) not in retry_forms(html)
    status = web.get(page_url(chain, "/status.json")).json()
    assert [(j["id"], j["attempt"], j["retried"], j["retryable"]) for j in status["jobs"]][:2] == [
        (str(jobs["a"].pk), 1, True, False), (str(new.pk), 2, False, False)]


@pytest.mark.django_db
def test_a_retry_from_the_page_that_is_refused_says_why_and_changes_nothing(member, chain):
    web = signed_in(member)
    job = jobs_of(chain)["a"]
    response = web.post(page_url(chain, f"/jobs/{job.pk}/retry"), follow=True)
    assert "can&#x27;t be retried: it is scheduled" in response.content.decode()
    assert Job.objects.filter(build=chain).count() == 4


@pytest.mark.django_db
def test_the_page_retry_of_another_organizations_build_is_404(stranger, other_org, chain):
    job = jobs_of(chain)["a"]
    fail(job)
    assert signed_in(stranger).post(page_url(chain, f"/jobs/{job.pk}/retry")).status_code == 404
    assert not Job.objects.filter(retried=True).exists()


@pytest.mark.django_db
def test_the_admin_edits_default_retry_normalised_and_refuses_a_bad_one(pipeline):
    import json

    from django.test import Client

    from organizations.models import User

    client = Client()
    client.force_login(User.objects.create_superuser("ops@example.com", "a-long-passphrase"))
    url = f"/admin/pipelines/pipeline/{pipeline.pk}/change/"
    form = {"organization": pipeline.organization_id, "slug": pipeline.slug, "name": pipeline.name,
            "repository": pipeline.repository, "default_branch": "main", "visibility": "private", "allow_manual": "on",
            "source_slug": "ci", "definition": json.dumps(pipeline.definition), "triggers": "null",
            "fork_pull_requests": "build_without_secrets", "protected_branches": "[]"}

    assert client.post(url, {**form, "default_retry": '{"automatic": true}'}).status_code == 302
    pipeline.refresh_from_db()
    assert pipeline.default_retry == {"automatic": [AUTO_ANY], "manual": MANUAL_OK}
    page = client.post(url, {**form, "default_retry": '{"automatic": {"limit": 0}}'})
    assert page.status_code == 200 and "invalid_ir: default_retry.automatic.limit must be" in page.content.decode()
    pipeline.refresh_from_db()
    assert pipeline.default_retry == {"automatic": [AUTO_ANY], "manual": MANUAL_OK}
    assert client.post(url, {**form, "default_retry": "null"}).status_code == 302
    pipeline.refresh_from_db()
    assert pipeline.default_retry is None


@pytest.mark.django_db
def test_a_retry_reopens_the_steps_after_a_wait_and_they_wait_for_the_new_attempt(api, pipeline):
    build = make_build(pipeline, pipeline_ir=flat(step("a"), step("b"), {"type": "wait"}, step("c")))
    run_job(jobs_of(build)["b"])
    fail(jobs_of(build)["a"])
    assert jobs_of(build)["c"].state == J.SKIPPED

    new = api.post(retry_url(build, jobs_of(build)["a"])).json()

    assert jobs_of(build)["c"].state == J.PENDING
    # The wait's prerequisites are the segment's latest attempts.
    assert api.get(jobs_url(build, f"/{jobs_of(build)['c'].pk}")).json()["depends_on"] == [
        new["id"], str(jobs_of(build)["b"].pk)]
    run_job(Job.objects.get(pk=new["id"]))
    assert jobs_of(build)["c"].state == J.SCHEDULED
    run_job(jobs_of(build)["c"])
    build.refresh_from_db()
    assert build.state == B.PASSED
