"""`GET /metrics`: Prometheus text behind HARMONT_METRICS_TOKEN, with what the processes counted and what the
database knows at scrape time, in a constant number of queries; counters add up across processes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone

from builds.models import Agent, Job, JobState
from organizations.models import Organization
from pipelines import services as pipeline_services
from tests.helpers import AGENT, PROJECT_DIR, bearer, chunk, claim, job_url, make_build, register, start, two_step_ir

TOKEN = "metrics-token-for-tests"


@pytest.fixture
def scrape(settings) -> Client:
    settings.METRICS_TOKEN = TOKEN
    return Client(HTTP_AUTHORIZATION=f"Bearer {TOKEN}")


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one series in the exposition text (labels in any order), or None."""
    for line in text.splitlines():
        match = re.fullmatch(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)", line)
        if not match or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(2) or ""))
        if found == labels:
            return float(match.group(3))
    return None


@pytest.mark.django_db
def test_without_a_token_setting_metrics_do_not_exist(client, settings):
    settings.METRICS_TOKEN = ""
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer anything").status_code == 404


@pytest.mark.django_db
def test_a_missing_or_wrong_token_is_401(scrape, settings):
    assert Client().get("/metrics").status_code == 401
    assert Client(HTTP_AUTHORIZATION=f"Bearer {TOKEN}x").get("/metrics").status_code == 401
    assert Client(HTTP_AUTHORIZATION=TOKEN).get("/metrics").status_code == 401


@pytest.mark.django_db
def test_the_databases_gauges_count_jobs_queues_agents_and_tasks(scrape, org, pipeline, agent_token, session):
    build = make_build(pipeline, pipeline_ir=two_step_ir())
    other_org = Organization.objects.create(name="Beta", slug="beta")
    other = pipeline_services.create_pipeline(org=other_org, name="B", repository="", default_branch="main")
    make_build(other, pipeline_ir=two_step_ir())
    Job.objects.filter(build=build, step_key="a").update(scheduled_at=timezone.now() - timedelta(seconds=90))
    register(agent_token.raw, name="quiet")
    Agent.objects.filter(name="quiet").update(last_seen_at=timezone.now() - timedelta(minutes=5))

    response = scrape.get("/metrics")

    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain")
    text = response.content.decode()
    assert sample(text, "harmont_jobs", state="scheduled") == 2
    assert sample(text, "harmont_jobs", state="pending") == 2
    assert sample(text, "harmont_jobs", state="running") == 0
    assert sample(text, "harmont_jobs", state="passed") is None  # finished jobs are not counted
    assert sample(text, "harmont_queue_depth", organization=org.slug) == 1
    assert sample(text, "harmont_queue_depth", organization="beta") == 1
    assert 89 <= sample(text, "harmont_queue_oldest_seconds", organization=org.slug) < 200
    assert sample(text, "harmont_agents", state="connected") == 1
    assert sample(text, "harmont_agents", state="lost") == 1
    assert sample(text, "harmont_agents", state="stopped") == 0
    assert sample(text, "harmont_task_queue_depth") is not None


@pytest.mark.django_db
def test_a_scrape_is_a_constant_number_of_queries(scrape, pipeline, agent_token, django_assert_num_queries):
    make_build(pipeline, pipeline_ir=two_step_ir())
    with django_assert_num_queries(4):  # jobs by state, queues, agents, ready tasks
        scrape.get("/metrics")
    for number in range(5):
        org = Organization.objects.create(name=f"O{number}", slug=f"o{number}")
        make_build(pipeline_services.create_pipeline(org=org, name="p", repository="", default_branch="main"),
                   pipeline_ir=two_step_ir())
        register(agent_token.raw, name=f"agent-{number}")
    with django_assert_num_queries(4):
        scrape.get("/metrics")


@pytest.mark.django_db
def test_requests_claims_and_log_bytes_are_counted(scrape, session, build):
    before = scrape.get("/metrics").content.decode()
    route = "/api/v0/agent/claim"
    claimed_before = sample(before, "harmont_claim_latency_seconds_count") or 0
    bytes_before = sample(before, "harmont_log_bytes_ingested_total") or 0
    requests_before = sample(before, "harmont_http_request_duration_seconds_count", method="POST", route=route,
                             status="200") or 0

    spec, job_client = claim(session)
    start(job_client, spec["id"])
    assert job_client.post(job_url(spec["id"], "logs"), {"chunks": [chunk(1, "héllo\n"), chunk(2, "x")]},
                           format="json").status_code == 200

    text = scrape.get("/metrics").content.decode()
    assert sample(text, "harmont_claim_latency_seconds_count") == claimed_before + 1
    assert sample(text, "harmont_log_bytes_ingested_total") == bytes_before + len("héllo\nx".encode())
    assert sample(text, "harmont_http_request_duration_seconds_count", method="POST", route=route,
                  status="200") == requests_before + 1
    # Routes are patterns: a job's id never makes a series of its own.
    assert spec["id"] not in text
    assert sample(text, "harmont_http_request_duration_seconds_count", method="POST",
                  route="/api/v0/agent/jobs/<str:job_id>/logs", status="200") >= 1
    assert Job.objects.get(pk=spec["id"]).state == JobState.RUNNING


COUNT_IN_A_PROCESS = """
import django, sys
django.setup()
from harmont import metrics
metrics.LOG_BYTES.inc(int(sys.argv[1]))
metrics.CLAIMS_HELD.inc()
"""

SCRAPE_IN_A_PROCESS = """
import django
django.setup()
from harmont import metrics
print(metrics.process_metrics().decode())
"""


def test_counters_of_several_processes_add_up_in_the_metrics_directory(tmp_path):
    env = {**os.environ, "HARMONT_METRICS_DIR": str(tmp_path / "metrics"), "HARMONT_DEBUG": "1",
           "DJANGO_SETTINGS_MODULE": "harmont.settings"}
    env.pop("DATABASE_URL", None)  # nothing here touches the database
    for amount in ("10", "32"):
        subprocess.run([sys.executable, "-c", COUNT_IN_A_PROCESS, amount], cwd=PROJECT_DIR, env=env, check=True,
                       timeout=60)
    done = subprocess.run([sys.executable, "-c", SCRAPE_IN_A_PROCESS], cwd=PROJECT_DIR, env=env, check=True,
                          timeout=60, capture_output=True, text=True)

    assert sample(done.stdout, "harmont_log_bytes_ingested_total") == 42
    # A live gauge counts only processes still alive (gunicorn_conf's child_exit forgets the others).
    from harmont import gunicorn_conf

    class Worker:
        pid = 0

    for path in (tmp_path / "metrics").glob("gauge_livesum_*.db"):
        Worker.pid = int(path.stem.rsplit("_", 1)[1])
        os.environ["HARMONT_METRICS_DIR"] = str(tmp_path / "metrics")
        try:
            gunicorn_conf.child_exit(None, Worker)
        finally:
            del os.environ["HARMONT_METRICS_DIR"]
    after = subprocess.run([sys.executable, "-c", SCRAPE_IN_A_PROCESS], cwd=PROJECT_DIR, env=env, check=True,
                           timeout=60, capture_output=True, text=True)
    assert sample(after.stdout, "harmont_claims_held") in (None, 0)
    assert sample(after.stdout, "harmont_log_bytes_ingested_total") == 42


def test_the_server_start_clears_the_metrics_directory(tmp_path, monkeypatch):
    from harmont import gunicorn_conf

    directory = tmp_path / "metrics"
    directory.mkdir()
    (directory / "counter_123.db").write_bytes(b"old")
    (directory / "keep.txt").write_text("not ours")
    monkeypatch.setenv("HARMONT_METRICS_DIR", str(directory))

    gunicorn_conf.on_starting(None)

    assert sorted(p.name for p in directory.iterdir()) == ["keep.txt"]


@pytest.mark.django_db
def test_the_agent_api_still_answers_without_the_metrics_token(session, settings):
    settings.METRICS_TOKEN = ""
    assert session.post(f"{AGENT}/claim").status_code == 204
    assert bearer("nope").get("/metrics").status_code == 404
