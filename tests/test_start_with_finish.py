"""A quick job's start rides on its finish report (builds/agent/starts.py, `FinishRequest.started`).

The agent holds a job's start report back for a moment; a command that ends within it is
started and ended by one finish report. The server dates the start back by the agent's
`elapsed_seconds`, judges the assigned job as the running job it was, and starts the build.
"""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from builds.agent.starts import PendingStart
from builds.models import Build, Job, JobState
from tests.helpers import assert_error, claim, finish, job_url, make_build

J = JobState


def between(value, low, high) -> bool:
    return low <= value <= high


@pytest.mark.django_db
def test_a_finish_that_carries_the_start_starts_and_passes_an_assigned_job(session, build):
    spec, job_client = claim(session)
    before = timezone.now()

    response = finish(job_client, spec["id"], exit_code=0, started={"agent_name": "runner-1", "elapsed_seconds": 2.5})

    after = timezone.now()
    assert response.status_code == 200, response.content
    assert response.json() == {"state": "passed", "cancel": True, "timeout": False}
    job = Job.objects.get(pk=spec["id"])
    assert (job.state, job.exit_code) == (J.PASSED, 0)
    # Dated back from the server's clock by what the agent measured.
    assert between(job.started_at, before - timedelta(seconds=2.5), after - timedelta(seconds=2.5))
    assert job.finished_at - job.started_at >= timedelta(seconds=2.5)
    build.refresh_from_db()
    assert build.started_at == job.started_at


@pytest.mark.django_db
def test_the_builds_start_is_told_before_the_quick_jobs_end(session, build, org):
    from builds.models import Notification, WebhookEndpoint
    from harmont.crypto import encrypt_text

    WebhookEndpoint.objects.create(organization=org, url="http://hooks.example.test/in", secret_encrypted=encrypt_text(
        "whsec_x"), events=["build.created", "build.started", "job.finished", "build.finished"])
    spec, job_client = claim(session)

    finish(job_client, spec["id"], exit_code=0, started={"elapsed_seconds": 0.1})

    events = list(Notification.objects.filter(build=build).order_by("id").values_list("event", flat=True))
    assert events == ["build.started", "job.finished"]  # (the endpoint came after the build's creation)


@pytest.mark.django_db
def test_a_finish_that_overtakes_its_start_report_still_dates_the_start(session, build):
    # The start was on its way (or never sent) when the finish came: the job ran, so it started by now.
    spec, job_client = claim(session)

    assert finish(job_client, spec["id"], exit_code=0).json()["state"] == "passed"
    response = job_client.post(job_url(spec["id"], "start"), {"elapsed_seconds": 0.5}, format="json")

    job = Job.objects.get(pk=spec["id"])
    assert (job.state, job.exit_code) == (J.PASSED, 0)
    assert job.started_at is not None and job.started_at <= job.finished_at
    assert response.status_code == 200 and response.json()["cancel"] is True  # over: nothing changes
    assert Job.objects.get(pk=spec["id"]).started_at == job.started_at
    assert Build.objects.get(pk=build.pk).started_at == job.started_at


@pytest.mark.django_db
def test_a_job_that_could_not_start_fails_without_a_start(session, build):
    spec, job_client = claim(session)

    finish(job_client, spec["id"], exit_code=None, error_code="workspace_unavailable", error_message="no")

    job = Job.objects.get(pk=spec["id"])
    assert (job.state, job.error_code, job.started_at) == (J.FAILED, "workspace_unavailable", None)


@pytest.mark.django_db
def test_a_failing_quick_job_fails_and_skips_its_dependents(session, pipeline):
    from tests.dsl import hm

    first = hm.sh("exit 3", key="first")
    build = make_build(pipeline, pipeline_ir=hm.pipeline([first.sh("echo after", key="after")]))
    spec, job_client = claim(session)

    response = finish(job_client, spec["id"], exit_code=3, started={"elapsed_seconds": 0.01})

    assert response.json()["state"] == "failed"
    states = dict(Job.objects.filter(build=build).values_list("step_key", "state"))
    assert states == {"first": J.FAILED, "after": J.SKIPPED}
    assert Job.objects.get(pk=spec["id"]).started_at is not None


@pytest.mark.django_db
def test_the_start_is_never_dated_before_the_jobs_timeout(session, build):
    spec, job_client = claim(session)
    job = Job.objects.get(pk=spec["id"])
    before = timezone.now()

    finish(job_client, spec["id"], exit_code=0, started={"elapsed_seconds": job.timeout_seconds * 10})

    job.refresh_from_db()
    assert job.started_at >= before - timedelta(seconds=job.timeout_seconds)


@pytest.mark.django_db
def test_a_job_canceled_before_its_start_was_heard_of_ends_canceled(api, session, build):
    spec, job_client = claim(session)
    org, pipeline = build.pipeline.organization.slug, build.pipeline.slug
    response = api.put(f"/api/v0/organizations/{org}/pipelines/{pipeline}/builds/{build.number}/cancel")
    assert response.status_code == 200
    assert Job.objects.get(pk=spec["id"]).state == J.CANCELING

    response = finish(job_client, spec["id"], exit_code=0, started={"elapsed_seconds": 0.2})

    assert response.json()["state"] == "canceled"
    job = Job.objects.get(pk=spec["id"])
    # The server never had it running: the start stays unknown, as for any cancel before a start.
    assert (job.state, job.started_at) == (J.CANCELED, None)


@pytest.mark.django_db
def test_a_retried_finish_with_the_start_changes_nothing(session, build):
    spec, job_client = claim(session)
    body: dict[str, Any] = {"exit_code": 0, "started": {"elapsed_seconds": 1.0}}
    assert finish(job_client, spec["id"], **body).json()["state"] == "passed"
    first = Job.objects.values_list("state", "started_at", "finished_at").get(pk=spec["id"])

    assert finish(job_client, spec["id"], **{**body, "started": {"elapsed_seconds": 9.0}}).json()["state"] == "passed"

    assert Job.objects.values_list("state", "started_at", "finished_at").get(pk=spec["id"]) == first


@pytest.mark.django_db
@pytest.mark.parametrize("started,field", [
    ({"elapsed_seconds": -1}, "elapsed_seconds"),
    ({"elapsed_seconds": "soon"}, "elapsed_seconds"),
    ({}, "elapsed_seconds"),
    ({"elapsed_seconds": 1, "commit": "not-a-commit"}, "commit"),
    ("yes", "non_field_errors"),
])
def test_a_bad_start_in_a_finish_is_422_and_changes_nothing(session, build, started, field):
    spec, job_client = claim(session)

    response = finish(job_client, spec["id"], exit_code=0, started=started)

    assert_error(response, 422, "validation_failed")
    assert field in str(response.json()["error"]["fields"])
    job = Job.objects.get(pk=spec["id"])
    assert (job.state, job.started_at, job.finished_at) == (J.ASSIGNED, None, None)


@pytest.mark.django_db
def test_a_start_report_held_back_is_dated_back_by_its_elapsed_seconds(session, build):
    spec, job_client = claim(session)
    before = timezone.now()

    response = job_client.post(job_url(spec["id"], "start"), {"elapsed_seconds": 0.75}, format="json")

    assert response.json() == {"state": "running", "cancel": False, "timeout": False}
    job = Job.objects.get(pk=spec["id"])
    assert job.state == J.RUNNING
    assert between(job.started_at, before - timedelta(seconds=0.75), timezone.now() - timedelta(seconds=0.75))
    assert Build.objects.get(pk=build.pk).started_at == job.started_at


@pytest.mark.django_db
def test_the_job_spec_says_the_server_takes_the_start_with_the_finish(session, build):
    spec, _ = claim(session)
    assert spec["start_with_finish"] is True


# ------------------------------------------------------------------ the agent's side


def test_a_held_back_start_goes_out_once_whoever_takes_it():
    sent: list[dict[str, Any]] = []
    pending = PendingStart({"agent_name": "a"}, sent.append, delay=0.5)

    pending.send()
    pending.send()

    assert [set(body) for body in sent] == [{"agent_name", "elapsed_seconds"}]
    assert pending.take_for_finish() is None  # already reported: the finish carries none


def test_a_start_taken_by_the_finish_is_never_sent_after():
    sent: list[dict[str, Any]] = []
    pending = PendingStart({"agent_name": "a", "commit": None}, sent.append, delay=0.5)

    started = pending.take_for_finish()
    pending.send()

    assert started is not None and started["agent_name"] == "a" and started["elapsed_seconds"] >= 0
    assert sent == []


def test_a_start_that_failed_to_go_out_rides_on_the_finish():
    def refuse(body: dict[str, Any]) -> None:
        raise OSError("connection refused")

    pending = PendingStart({"agent_name": "a"}, refuse, delay=0.0)
    with pytest.raises(OSError):
        pending.send()

    assert pending.take_for_finish() is not None


def test_a_finish_waits_for_a_start_report_in_flight():
    # Else the finish could reach the server first, and the start find the job over.
    in_flight, release = threading.Event(), threading.Event()
    order: list[str] = []

    def slow_send(body: dict[str, Any]) -> None:
        in_flight.set()
        release.wait(5)
        order.append("start")

    pending = PendingStart({"agent_name": "a"}, slow_send, delay=0.0)
    sender = threading.Thread(target=pending.send)
    sender.start()
    assert in_flight.wait(5)
    taker = threading.Thread(target=lambda: order.append(f"finish {pending.take_for_finish()}"))
    taker.start()
    taker.join(0.2)
    assert taker.is_alive()  # held until the start's request is answered
    release.set()
    sender.join(5)
    taker.join(5)

    assert order == ["start", "finish None"]


def test_racing_takers_get_the_start_exactly_once():
    sent: list[dict[str, Any]] = []
    pending = PendingStart({"agent_name": "a"}, sent.append, delay=0.0)
    taken: list[Any] = []
    barrier = threading.Barrier(8)

    def race(i: int) -> None:
        barrier.wait()
        if i % 2:
            pending.send()
        else:
            taken.append(pending.take_for_finish())

    threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(sent) + len([t for t in taken if t is not None]) == 1


class RecordingTransport:
    """Answers the agent's job requests as a server would, and records their order (with the thread they came from)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []
        self.lock = threading.Lock()

    def json(self, method: str, path: str, *, token: str, body: Any = None, ok: tuple[int, ...] = (200,)) -> Any:
        with self.lock:
            self.sent.append((path.rsplit("/", 1)[-1], body or {}))
        return {"state": "running", "cancel": False, "timeout": False}

    def request(self, method: str, path: str, **kwargs: Any) -> tuple[int, bytes]:
        self.json(method, path, token=kwargs.get("token", ""), body=kwargs.get("body"))
        return 200, b'{"state": "running", "cancel": false, "timeout": false}'

    def last_header(self, name: str) -> None:
        return None

    def _drop_connection(self) -> None:
        pass

    def routes(self) -> list[str]:
        return [route for route, _ in self.sent]


def run_on_agent(tmp_path, command: str, *, start_with_finish: bool = True, delay: float = 0.5) -> RecordingTransport:
    from builds.agent.runner import Agent
    from builds.agent.spec import JobSpec

    agent = Agent(server="http://127.0.0.1:9", token="hma_x", workdir=str(tmp_path), start_report_delay=delay)
    transport = RecordingTransport()
    agent.transport = transport  # type: ignore[assignment]
    agent.host_executor.context.transport = transport  # type: ignore[assignment]
    agent.once = True  # no claim rides on the finish
    job = JobSpec.from_claim({"job": {"id": "5b0f0f35-6b1c-4a51-9d0e-0d1ad2a1e001", "command": command, "env": {},
                                      "timeout_seconds": 60, "step_key": "a", "start_with_finish": start_with_finish},
                              "job_token": "hmj_x"})
    agent.run_job(job)
    return transport


def test_a_quick_job_makes_one_request_its_finish_which_carries_the_start(tmp_path):
    transport = run_on_agent(tmp_path, "true")

    assert transport.routes() == ["finish"]
    started = transport.sent[0][1]["started"]
    assert set(started) == {"agent_name", "elapsed_seconds"} and 0 <= started["elapsed_seconds"] < 5
    assert transport.sent[0][1]["exit_code"] == 0


def test_a_job_that_outlives_the_delay_reports_its_start_on_its_own_first(tmp_path):
    transport = run_on_agent(tmp_path, "sleep 1.5", delay=0.2)

    routes = transport.routes()
    assert routes[0] == "start" and routes.count("start") == 1 and routes[-1] == "finish"
    assert transport.sent[0][1]["elapsed_seconds"] >= 0.2
    assert "started" not in transport.sent[-1][1]


def test_output_never_reaches_the_server_before_the_start(tmp_path):
    transport = run_on_agent(tmp_path, "echo early; sleep 1.2", delay=5.0)

    routes = transport.routes()
    assert routes[0] == "start" and "logs" in routes and routes[-1] == "finish"
    assert "started" not in transport.sent[-1][1]


def test_against_a_server_that_wants_its_start_first_the_agent_reports_it_before_the_command(tmp_path):
    transport = run_on_agent(tmp_path, "true", start_with_finish=False)

    assert transport.routes() == ["start", "finish"]
    assert "elapsed_seconds" not in transport.sent[0][1] and "started" not in transport.sent[1][1]
