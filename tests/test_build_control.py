"""Build control per pipeline: auto-cancel of superseded builds and `max_concurrent_builds`.

Auto-cancel and admission run after the creating (or ending) transaction commits,
so the tests that need them run inside `django_capture_on_commit_callbacks(execute=True)`.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from builds import services, states
from builds.models import Build, BuildSource, Job, JobState
from builds.services import builds as build_module
from pipelines import schedules as schedule_services
from pipelines import services as pipeline_services
from pipelines.models import Pipeline, PipelineSchedule
from tests.helpers import (
    assert_error,
    builds_url,
    cyclic_ir,
    deliver,
    is_postgres,
    job_states,
    make_agent,
    make_build,
    push_payload,
    race,
    run_job,
    two_step_ir,
)
from tests.test_webhooks import make_pipeline, make_repository, push_on

pytestmark = pytest.mark.django_db


@pytest.fixture
def on_commit(django_capture_on_commit_callbacks):
    """Run on-commit callbacks (auto-cancel, admission) as a committed transaction would."""
    def run():
        return django_capture_on_commit_callbacks(execute=True)
    return run


def configure(pipeline, **fields: Any):
    for name, value in fields.items():
        setattr(pipeline, name, value)
    pipeline.save(update_fields=list(fields))
    return pipeline


def root(build: Build) -> Job:
    return Job.objects.get(build=build, step_key="a")


def reread(build: Build) -> Build:
    build.refresh_from_db()
    return build


# ------------------------------------------------------------------ auto-cancel


def test_a_new_build_cancels_the_branchs_older_scheduled_and_running_builds(pipeline, on_commit):
    configure(pipeline, cancel_intermediate_builds=True)
    with on_commit():
        first = make_build(pipeline, branch="feature/x")
        second = make_build(pipeline, branch="feature/x")
    assert reread(first).state == "canceled"  # first was scheduled, superseded by second
    run_job(root(second), JobState.PASSED)  # second runs; a third supersedes it while `b` is running
    b = Job.objects.get(build=second, step_key="b")
    assert services.move_job(job=b, state=JobState.ASSIGNED) and services.move_job(job=b, state=JobState.RUNNING)
    with on_commit():
        third = make_build(pipeline, branch="feature/x")

    assert (first.state, first.error_code, first.error_message) == (
        "canceled", "superseded", "Superseded by build #2 on branch feature/x.")
    assert job_states(first) == {"a": "canceled", "b": "canceled"}
    reread(second)
    assert (second.state, second.error_code, second.error_message) == (
        "canceled", "superseded", "Superseded by build #3 on branch feature/x.")
    # The running job waits for its agent to stop it.
    assert job_states(second) == {"a": "passed", "b": "canceling"}
    assert reread(third).state == "scheduled" and third.error_code is None


def test_only_older_builds_of_the_same_branch_are_canceled(pipeline, on_commit):
    configure(pipeline, cancel_intermediate_builds=True)
    other = make_build(pipeline, branch="feature/other")
    finished = make_build(pipeline, branch="feature/x")
    for job in Job.objects.filter(build=finished).order_by("position"):
        run_job(job)
    with on_commit():
        newest = make_build(pipeline, branch="feature/x")
    assert reread(other).state == "scheduled"
    assert (reread(finished).state, finished.error_code) == ("passed", None)
    assert reread(newest).state == "scheduled"


def test_the_default_branch_is_left_alone_unless_the_filter_names_it(pipeline, on_commit):
    configure(pipeline, cancel_intermediate_builds=True)
    with on_commit():
        main1 = make_build(pipeline, branch="main")
        make_build(pipeline, branch="main")
    assert reread(main1).state == "scheduled"
    configure(pipeline, cancel_intermediate_builds_branch_filter=["main", "release/*"])
    with on_commit():
        make_build(pipeline, branch="main")
        feature = make_build(pipeline, branch="feature/x")
        make_build(pipeline, branch="feature/x")
    assert (reread(main1).state, main1.error_code) == ("canceled", "superseded")
    assert reread(feature).state == "scheduled"  # the filter does not name feature/*


@pytest.mark.parametrize("patterns, branch, cancels", [
    (None, "feature/x", True), (None, "main", False),
    (["release/*"], "release/1.0", True), (["release/*"], "feature/x", False),
    (["!main"], "main", False), (["!main"], "feature/x", True),
    (["*", "!release/*"], "release/2", False), (["*", "!release/*"], "main", True),
    ([], "main", True),
])
def test_branch_filter_patterns(pipeline, patterns, branch, cancels):
    configure(pipeline, cancel_intermediate_builds=True, cancel_intermediate_builds_branch_filter=patterns)
    assert build_module.supersedes_on_branch(pipeline, branch) is cancels


def test_without_the_setting_nothing_is_canceled(pipeline, on_commit):
    with on_commit():
        first = make_build(pipeline, branch="feature/x")
        make_build(pipeline, branch="feature/x")
    assert reread(first).state == "scheduled"


def test_held_builds_and_rejected_new_builds_cancel_nothing(pipeline, on_commit):
    configure(pipeline, cancel_intermediate_builds=True)
    request = services.validate_build_request(branch="feature/x", commit="abc123")
    held = services.create_build(pipeline=pipeline, request=request, held=True)
    with on_commit():
        older = make_build(pipeline, branch="feature/x")
        with pytest.raises(Exception):
            make_build(pipeline, branch="feature/x", pipeline_ir=json.dumps(cyclic_ir()))
    # The rejected build is failed and runs nothing: the older build keeps the branch going.
    assert reread(older).state == "scheduled"
    with on_commit():
        make_build(pipeline, branch="feature/x")
    assert reread(held).state == "held"  # waits for a person's approval, not superseded
    assert reread(older).state == "canceled"


def test_a_build_that_finished_meanwhile_is_left_alone(pipeline, monkeypatch):
    """The race with a finishing build: the candidate list was read before it passed; no 409 escapes."""
    configure(pipeline, cancel_intermediate_builds=True)
    done = make_build(pipeline, branch="feature/x")
    for job in Job.objects.filter(build=done).order_by("position"):
        run_job(job)
    newer = make_build(pipeline, branch="feature/x")
    monkeypatch.setattr(build_module, "SUPERSEDABLE_STATES", ("scheduled", "running", "passed"))
    assert services.cancel_superseded_builds(build=newer) == []
    assert (reread(done).state, done.error_code) == ("passed", None)


def test_api_and_schedule_builds_take_the_same_path(api, pipeline, on_commit):
    configure(pipeline, cancel_intermediate_builds=True, cancel_intermediate_builds_branch_filter=["*"])
    with on_commit():
        response = api.post(builds_url(pipeline), {"branch": "main", "commit": "abc123"}, format="json")
        first = Build.objects.get(pk=response.json()["id"])
        schedule = schedule_services.create_schedule(pipeline=pipeline, cron="0 * * * *")
        PipelineSchedule.objects.filter(pk=schedule.pk).update(next_run_at=first.created_at)
        [scheduled] = services.run_due_schedules()
    assert (reread(first).state, first.error_code) == ("canceled", "superseded")
    assert scheduled.source == BuildSource.SCHEDULE
    body = api.get(builds_url(pipeline, f"/{first.number}")).json()
    assert (body["state"], body["error_code"], body["error_message"]) == (
        "canceled", "superseded", f"Superseded by build #{scheduled.number} on branch main.")


def test_webhook_builds_supersede_too(org, on_commit):
    make_repository(org)
    pipeline = make_pipeline(org, "Feature CI", push_on("*"), cancel_intermediate_builds=True)
    with on_commit():
        assert deliver("push", push_payload("refs/heads/feature/x", after="a" * 40)).status_code == 202
        assert deliver("push", push_payload("refs/heads/feature/x", after="b" * 40)).status_code == 202
    first, second = Build.objects.filter(pipeline=pipeline).order_by("number")
    assert (first.source, first.state, first.error_code) == ("webhook", "canceled", "superseded")
    assert (second.commit, second.state) == ("b" * 40, "scheduled")


def test_pipeline_create_validates_the_settings(api, org):
    base = {"name": "X", "repository": "https://github.com/acme/x.git", "default_branch": "main"}
    url = f"/api/v0/organizations/{org.slug}/pipelines"
    for bad, field in (({"max_concurrent_builds": 0}, "max_concurrent_builds"),
                       ({"max_concurrent_builds": "two"}, "max_concurrent_builds"),
                       ({"cancel_intermediate_builds_branch_filter": "main"}, "cancel_intermediate_builds_branch_filter"),
                       ({"cancel_intermediate_builds_branch_filter": [""]}, "cancel_intermediate_builds_branch_filter"),
                       ({"cancel_intermediate_builds": "maybe"}, "cancel_intermediate_builds")):
        error = assert_error(api.post(url, {**base, **bad}, format="json"), 422, "pipeline_invalid")
        assert any(name.split(".")[0] == field for name in error["fields"]), error
    assert Pipeline.objects.filter(organization=org).count() == 0
    response = api.post(url, {**base, "cancel_intermediate_builds": True, "max_concurrent_builds": 2,
                              "cancel_intermediate_builds_branch_filter": ["feature/*", "!feature/keep"]},
                        format="json")
    assert response.status_code == 201, response.content
    body = response.json()
    assert (body["cancel_intermediate_builds"], body["cancel_intermediate_builds_branch_filter"],
            body["max_concurrent_builds"]) == (True, ["feature/*", "!feature/keep"], 2)


# ------------------------------------------------------------------ max_concurrent_builds


def test_a_build_over_the_limit_waits_with_pending_roots_and_says_why(api, pipeline):
    configure(pipeline, max_concurrent_builds=1)
    first = make_build(pipeline)
    second = make_build(pipeline)
    assert (first.waiting_reason, job_states(first)) == (None, {"a": "scheduled", "b": "pending"})
    assert second.state == "scheduled"
    assert job_states(second) == {"a": "pending", "b": "pending"}
    assert second.waiting_reason == "Waiting for a concurrency slot: 1 of 1 concurrent builds of this pipeline are running."
    assert Job.objects.get(build=second, step_key="a").scheduled_at is None
    body = api.get(builds_url(pipeline, "/2")).json()
    assert (body["state"], body["waiting_reason"]) == ("scheduled", second.waiting_reason)
    assert api.get(builds_url(pipeline, "/1")).json()["waiting_reason"] is None
    # settle_build (any follow-up pass) must not schedule a waiting build's roots.
    states.settle_build(build_id=second.pk)
    assert job_states(second) == {"a": "pending", "b": "pending"}


def test_agents_never_get_a_waiting_builds_jobs(pipeline, org):
    configure(pipeline, max_concurrent_builds=1)
    first = make_build(pipeline)
    make_build(pipeline)
    agent = make_agent(org)
    claimed = services.claim_job(agent=agent)
    assert claimed is not None and claimed.job.build_id == first.pk
    assert services.claim_job(agent=make_agent(org, name="runner-2")) is None


def test_when_the_active_build_ends_the_oldest_waiting_build_is_admitted(pipeline, on_commit):
    configure(pipeline, max_concurrent_builds=1)
    first, second, third = make_build(pipeline), make_build(pipeline), make_build(pipeline)
    assert "1 older build waiting first" in third.waiting_reason
    with on_commit():
        for job in Job.objects.filter(build=first).order_by("position"):
            run_job(job)
    assert reread(first).state == "passed"
    assert (reread(second).waiting_reason, job_states(second)) == (None, {"a": "scheduled", "b": "pending"})
    assert reread(third).waiting_reason is not None and job_states(third) == {"a": "pending", "b": "pending"}
    with on_commit():
        services.cancel_build(build=second)
    assert reread(third).waiting_reason is None and job_states(third)["a"] == "scheduled"


def test_a_failed_build_frees_its_slot_too(pipeline, on_commit):
    configure(pipeline, max_concurrent_builds=1)
    first, second = make_build(pipeline), make_build(pipeline)
    with on_commit():
        run_job(root(first), JobState.FAILED, exit_code=1)
    assert reread(first).state == "failed"
    assert job_states(second)["a"] == "scheduled"


def test_canceling_a_waiting_build_ends_it_and_keeps_the_queue(pipeline, on_commit):
    configure(pipeline, max_concurrent_builds=1)
    first, second, third = make_build(pipeline), make_build(pipeline), make_build(pipeline)
    with on_commit():
        services.cancel_build(build=second)
    assert (reread(second).state, second.waiting_reason, job_states(second)) == (
        "canceled", None, {"a": "canceled", "b": "canceled"})
    assert reread(third).waiting_reason is not None  # first still holds the one slot
    assert reread(first).state == "scheduled"


def test_the_reapers_sweep_admits_what_a_lost_admission_left_waiting(pipeline):
    configure(pipeline, max_concurrent_builds=1)
    first, second = make_build(pipeline), make_build(pipeline)
    for job in Job.objects.filter(build=first).order_by("position"):
        run_job(job)  # the on-commit admission never runs here: as if the process died after commit
    assert reread(second).waiting_reason is not None
    assert services.admit_everywhere() == 1
    assert reread(second).waiting_reason is None and job_states(second)["a"] == "scheduled"
    assert services.admit_everywhere() == 0


def test_removing_the_limit_admits_every_waiting_build(pipeline):
    configure(pipeline, max_concurrent_builds=1)
    make_build(pipeline)
    waiting = [make_build(pipeline) for _ in range(3)]
    configure(pipeline, max_concurrent_builds=None)
    assert services.admit_waiting_builds(pipeline_id=pipeline.pk) == [2, 3, 4]
    assert all(reread(b).waiting_reason is None for b in waiting)


def test_held_builds_take_no_slot_and_once_approved_wait_for_one(pipeline, owner, on_commit):
    configure(pipeline, max_concurrent_builds=1)
    request = services.validate_build_request(branch="main", commit="abc123")
    held = services.create_build(pipeline=pipeline, request=request, held=True)
    free = make_build(pipeline)
    assert (held.state, free.waiting_reason) == ("held", None)
    approved = services.approve_build(build=held, approved_by=owner)
    # The slot is free's: the approved build waits, its roots pending, for its turn.
    assert (approved.state, approved.waiting_reason, approved.approved_by) == (
        "scheduled", "Waiting for a concurrency slot: 1 of 1 concurrent builds of this pipeline are running.", owner)
    assert job_states(held) == {"a": "pending", "b": "pending"}
    with on_commit():
        services.cancel_build(build=free)
    assert reread(held).waiting_reason is None and job_states(held) == {"a": "scheduled", "b": "pending"}


def test_a_held_build_approved_with_a_free_slot_is_scheduled(pipeline, owner):
    configure(pipeline, max_concurrent_builds=2)
    make_build(pipeline)
    held = services.create_build(pipeline=pipeline, held=True,
                                 request=services.validate_build_request(branch="main", commit="abc123"))
    approved = services.approve_build(build=held, approved_by=owner)
    assert (approved.waiting_reason, job_states(held)) == (None, {"a": "scheduled", "b": "pending"})


def test_a_build_rendered_on_an_agent_waits_with_its_render_job_pending(pipeline):
    configure(pipeline, max_concurrent_builds=1, definition=None)
    make_build(pipeline)
    waiting = make_build(pipeline)
    assert waiting.waiting_reason is not None
    assert list(Job.objects.filter(build=waiting).values_list("kind", "state")) == [("render", "pending")]
    services.admit_waiting_builds(pipeline_id=pipeline.pk)  # the slot is still taken
    assert reread(waiting).waiting_reason is not None


@pytest.mark.django_db(transaction=True)
def test_concurrent_creates_take_no_more_slots_than_the_limit(org):
    if not is_postgres():
        pytest.skip("races need PostgreSQL: SQLite serialises every writer")
    pipeline = pipeline_services.create_pipeline(org=org, name="Limited", repository="https://github.com/a/b.git",
                                                 default_branch="main", definition=two_step_ir(),
                                                 max_concurrent_builds=2)
    race(8, lambda i: make_build(pipeline).number)
    assert Build.objects.filter(pipeline=pipeline, waiting_reason__isnull=True).count() == 2
    assert Build.objects.filter(pipeline=pipeline, waiting_reason__isnull=False).count() == 6
    # The two that run are the two oldest numbers: nobody overtook the queue.
    assert sorted(Build.objects.filter(pipeline=pipeline, waiting_reason__isnull=True)
                  .values_list("number", flat=True)) == [1, 2]


@pytest.mark.django_db(transaction=True)
def test_concurrent_admissions_admit_one_build_per_free_slot(org):
    if not is_postgres():
        pytest.skip("races need PostgreSQL: SQLite serialises every writer")
    pipeline = pipeline_services.create_pipeline(org=org, name="Limited", repository="https://github.com/a/b.git",
                                                 default_branch="main", definition=two_step_ir(),
                                                 max_concurrent_builds=1)
    first = make_build(pipeline)
    waiting = [make_build(pipeline) for _ in range(4)]
    services.cancel_build(build=first)  # autocommit: its admission already ran here
    assert sum(reread(b).waiting_reason is None for b in waiting) == 1
    results = race(6, lambda i: services.admit_waiting_builds(pipeline_id=pipeline.pk))
    assert sum(len(r) for r in results) == 0
    assert [reread(b).waiting_reason is None for b in waiting] == [True, False, False, False]
    # Free the slot and race the admissions themselves.
    Build.objects.filter(pk=waiting[0].pk).update(cancel_requested_at=waiting[0].created_at, state="canceled")
    results = race(6, lambda i: services.admit_waiting_builds(pipeline_id=pipeline.pk))
    assert sorted(n for r in results for n in r) == [3]
    assert [reread(b).waiting_reason is None for b in waiting[1:]] == [True, False, False]


@pytest.mark.django_db(transaction=True)
def test_an_admission_waiting_for_a_build_that_a_cancel_holds_does_not_deadlock(org, monkeypatch):
    """The cancel holds the waiting build's lock and, at its commit, the foreign key check takes a share
    lock on the pipeline row; the admission holds the pipeline row and waits for that build. The
    admission's lock must let the share lock through (FOR NO KEY UPDATE), or PostgreSQL aborts one."""
    if not is_postgres():
        pytest.skip("needs PostgreSQL's row locks")
    import threading
    import time

    pipeline = pipeline_services.create_pipeline(org=org, name="Limited", repository="https://github.com/a/b.git",
                                                 default_branch="main", definition=two_step_ir(),
                                                 max_concurrent_builds=1)
    first = make_build(pipeline)
    second, third = make_build(pipeline), make_build(pipeline)
    # The slot frees without its admission (as if that process died).
    Build.objects.filter(pk=first.pk).update(state="canceled", cancel_requested_at=first.created_at)
    slow = threading.Event()
    lock_build = states.lock_build

    def slow_lock_build(build_id):
        locked = lock_build(build_id)
        if threading.current_thread().name == "canceler" and not slow.is_set():
            slow.set()
            time.sleep(1)  # the admission takes the pipeline's row and queues on this build meanwhile
        return locked

    monkeypatch.setattr(states, "lock_build", slow_lock_build)
    errors: list[BaseException] = []

    def run(work) -> None:
        try:
            work()
        except BaseException as exc:  # noqa: BLE001 (asserted below)
            errors.append(exc)
        finally:
            from django.db import connection
            connection.close()

    canceler = threading.Thread(target=run, name="canceler", args=(lambda: services.cancel_build(build=second),))
    admitter = threading.Thread(target=run, args=(lambda: (slow.wait(5), time.sleep(0.2),
                                                           services.admit_waiting_builds(pipeline_id=pipeline.pk)),))
    canceler.start()
    admitter.start()
    canceler.join(30)
    admitter.join(30)
    assert not errors, errors
    assert reread(second).state == "canceled"
    assert reread(third).waiting_reason is None and job_states(third)["a"] == "scheduled"


@pytest.mark.django_db(transaction=True)
def test_admissions_racing_cancels_and_approvals_neither_deadlock_nor_overfill(org, owner):
    """A cancel holds its build's lock and, at commit, a foreign key check's share lock on the pipeline;
    admission and approval lock the pipeline first: the lock they take must let that share through."""
    if not is_postgres():
        pytest.skip("races need PostgreSQL: SQLite serialises every writer")
    pipeline = pipeline_services.create_pipeline(org=org, name="Limited", repository="https://github.com/a/b.git",
                                                 default_branch="main", definition=two_step_ir(),
                                                 max_concurrent_builds=1)
    first = make_build(pipeline)
    waiting = [make_build(pipeline) for _ in range(3)]
    held = services.create_build(pipeline=pipeline, held=True,
                                 request=services.validate_build_request(branch="main", commit="abc123"))

    def act(i: int) -> object:
        if i == 0:
            return services.cancel_build(build=first).state
        if i == 1:
            return services.cancel_build(build=waiting[2]).state
        if i == 2:
            return services.approve_build(build=held, approved_by=owner).state
        return services.admit_waiting_builds(pipeline_id=pipeline.pk)

    race(8, act)  # re-raises any error of a thread: a deadlock would be one
    builds = [reread(b) for b in (first, *waiting, held)]
    active = [b for b in builds if b.state in ("scheduled", "running") and b.waiting_reason is None]
    assert [b.number for b in active] == [2]  # the oldest waiting build took the one slot
    assert (reread(waiting[2]).state, reread(held).waiting_reason is not None) == ("canceled", True)
