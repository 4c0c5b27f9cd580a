"""Plain helpers the test modules share: pipeline documents, API shapes and clients, builds,
the agent API over HTTP, racing threads, GitHub webhook deliveries.

Fixtures live in tests/conftest.py; those of live servers and agent processes in
tests/e2e.py and tests/live.py, which conftest.py loads through `pytest_plugins`.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tarfile
import threading
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone as dt_timezone
from pathlib import Path
from typing import Any

from django.db import connection
from django.test import Client, TestCase
from rest_framework.test import APIClient

from builds import services as build_services
from builds import webhooks
from builds.models import Agent, Build, BuildSource, Job, JobState
from harmont.timestamps import ns_from_datetime
from harmont.tokens import AGENT_SESSION_PREFIX, hash_secret, new_prefixed_secret
from organizations import services as org_services
from organizations.models import Organization, User
from pipelines.models import Pipeline
from tests.dsl import hm

# ------------------------------------------------------------------ pipeline documents


def two_step_ir() -> dict[str, Any]:
    """`a` then `b` (b builds in a's files), rendered by the real harmont package."""
    first = hm.sh("echo a", key="a")
    return hm.pipeline([first.sh("echo b", key="b")])


def cyclic_ir() -> dict[str, Any]:
    """`two_step_ir` with an edge back from `b` to `a`: a document the planner rejects."""
    doc = two_step_ir()
    doc["graph"]["edges"].append([1, 0, "depends_on"])
    return doc


def parallel_ir(count: int, prefix: str = "s") -> dict[str, Any]:
    """`count` independent steps, keys `{prefix}0` to `{prefix}{count - 1}`."""
    return hm.pipeline([hm.sh(f"echo {i}", key=f"{prefix}{i}") for i in range(count)])


def four_job_ir() -> dict[str, Any]:
    """deps -> build (builds_in), lint beside them, then a wait, then deploy after all three."""
    deps = hm.sh("make deps", key="deps", label="Dependencies")
    return hm.pipeline([deps.sh("make build", key="build"), hm.sh("make lint", key="lint"), hm.wait(),
                        hm.sh("make deploy", key="deploy")])


# ------------------------------------------------------------------ the API's shapes

ISO_Z = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$")


def iso(value: datetime | None) -> str | None:
    """A time as the API writes it: UTC, microseconds, `Z`. None stays None."""
    return None if value is None else value.astimezone(dt_timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def assert_error(response: Any, status: int, code: str) -> dict[str, Any]:
    """The response is the error envelope with this status and code; returns the error body."""
    assert response.status_code == status, (response.status_code, response.content[:500])
    assert response["Content-Type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert error["code"] == code, error
    assert error["type"] and error["message"]
    assert error["doc_url"].endswith(f"/docs/errors/{code}")
    assert error["request_id"] == response["X-Request-Id"]
    return error


def is_postgres() -> bool:
    """Whether the suite runs on PostgreSQL (races need it: SQLite serialises all writers)."""
    return connection.vendor == "postgresql"


# ------------------------------------------------------------------ clients


def bearer(raw: str) -> APIClient:
    """A client sending `raw` as its bearer token; `.raw_token` is `raw`."""
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    client.raw_token = raw  # type: ignore[attr-defined]
    return client


def make_api(user: User) -> APIClient:
    """A client with a new personal API token of `user`."""
    return bearer(org_services.create_personal_token(user=user, description="tests").raw)


# ------------------------------------------------------------------ builds


def builds_url(pipeline: Pipeline | str, suffix: str = "", *, org_slug: str | None = None) -> str:
    """The pipeline's builds collection (a Pipeline, or a pipeline slug with `org_slug`), then `suffix`."""
    if isinstance(pipeline, Pipeline):
        org_slug, pipeline = org_slug or pipeline.organization.slug, pipeline.slug
    return f"/api/v0/organizations/{org_slug}/pipelines/{pipeline}/builds{suffix}"


# The helpers stand in for every path that creates builds, the server's own (any source) included.
ANY_SOURCE = frozenset(BuildSource.values)


def make_build(pipeline: Pipeline, **fields: Any) -> Build:
    """A build through the services: branch `main`, commit `abc123`, unless `fields` say otherwise."""
    request = build_services.validate_build_request(**{"branch": "main", "commit": "abc123", **fields},
                                                    allowed_sources=ANY_SOURCE)
    return build_services.create_build(pipeline=pipeline, request=request)


def build_at(pipeline: Pipeline, now: datetime, **fields: Any) -> Build:
    """`make_build`, created (and scheduled) at `now`."""
    request = build_services.validate_build_request(**{"branch": "main", "commit": "abc123", **fields},
                                                    allowed_sources=ANY_SOURCE)
    return build_services.create_build(pipeline=pipeline, request=request, now=now)


def job_states(build: Build) -> dict[str, str]:
    """{step key: state} of the build's jobs (each step's latest attempt)."""
    return dict(Job.objects.filter(build=build, retried=False).order_by("position").values_list("step_key", "state"))


def run_job(job: Job, state: str = JobState.PASSED, exit_code: int | None = 0) -> None:
    """Drive one job the way an agent would: assigned, running, then finished."""
    assert build_services.move_job(job=job, state=JobState.ASSIGNED)
    assert build_services.move_job(job=job, state=JobState.RUNNING)
    assert build_services.finish_job(job=job, state=state, exit_code=exit_code)


def tarball(files: dict[str, bytes]) -> bytes:
    """A gzipped tar archive of `files` (name: content)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return raw.getvalue()


# ------------------------------------------------------------------ the agent API over HTTP

AGENT = "/api/v0/agent"
AGENT_T0 = datetime(2025, 1, 6, 12, 0, tzinfo=dt_timezone.utc)  # `chunk` stamps its lines from here


def job_url(job_id: Any, action: str) -> str:
    """The agent route of one job: start, heartbeat, logs, finish, artifacts..."""
    return f"{AGENT}/jobs/{job_id}/{action}"


def register(raw_agent_token: str, **body: Any) -> Any:
    """Register an agent with the organization's agent token (hma_); the response."""
    return bearer(raw_agent_token).post(f"{AGENT}/register", {"name": "runner-1", **body}, format="json")


def make_agent(org: Organization, *, name: str = "runner-1", token: Any = None) -> Agent:
    """An agent row made directly (for service-level tests that need no session)."""
    token = token or org_services.create_agent_token(organization=org).token
    return Agent.objects.create(organization=org, token=token, name=name,
                                session_hash=hash_secret(new_prefixed_secret(AGENT_SESSION_PREFIX)))


def claim(session: APIClient) -> tuple[dict[str, Any], APIClient]:
    """Claim over HTTP: (job spec, a client holding the job credential)."""
    response = session.post(f"{AGENT}/claim")
    assert response.status_code == 200, response.content
    return response.json()["job"], bearer(response.json()["job_token"])


def start(job_client: APIClient, job_id: Any) -> dict[str, Any]:
    """Report the claimed job started; the answer's body."""
    response = job_client.post(job_url(job_id, "start"))
    assert response.status_code == 200, response.content
    return response.json()


def finish(job_client: APIClient, job_id: Any, **body: Any) -> Any:
    """Report the job finished with `body` (exit_code, outcome, chunks...); the response."""
    return job_client.post(job_url(job_id, "finish"), body, format="json")


def chunk(seq: int, content: str, stream_kind: int = 0) -> dict[str, Any]:
    """A log chunk as the agent sends it, stamped `seq` seconds after AGENT_T0 (in Unix nanoseconds)."""
    return {"seq": seq, "stream_kind": stream_kind, "content": content,
            "ts": ns_from_datetime(AGENT_T0 + timedelta(seconds=seq))}


# ------------------------------------------------------------------ settings

PROJECT_DIR = Path(__file__).resolve().parent.parent


def settings_from_env(names: tuple[str, ...], **env: str) -> dict[str, Any]:
    """Settings `names` as a fresh process reads them from these environment variables,
    or {"error": <stderr>} when the settings module refuses them."""
    code = ("import json, sys, django; django.setup(); from django.conf import settings as s; "
            "print(json.dumps({name: getattr(s, name, None) for name in sys.argv[1:]}))")
    result = subprocess.run([sys.executable, "-c", code, *names], cwd=PROJECT_DIR, capture_output=True, text=True,
                            timeout=60, env={**os.environ, "DJANGO_SETTINGS_MODULE": "harmont.settings", **env})
    return json.loads(result.stdout) if result.returncode == 0 else {"error": result.stderr}


# ------------------------------------------------------------------ threads


def race(count: int, work: Callable[[int], Any]) -> list[Any]:
    """Run `work(i)` in `count` threads released together; return results in order, re-raise errors."""
    barrier = threading.Barrier(count)
    results: list[Any] = [None] * count
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait(timeout=30)
            results[i] = work(i)
        except BaseException as exc:  # noqa: BLE001 (reported below, in the test's thread)
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "a thread hung"
    assert not errors, errors
    return results


# ------------------------------------------------------------------ GitHub webhooks (GitHub's payload shapes, trimmed)

WEBHOOK_URL = "/webhooks/github"
WEBHOOK_SECRET = "It's a Secret to Everybody"
HEAD_SHA = "6113728f27ae82c7b1a177c8d03f9e96e0adf246"
BEFORE_SHA = "9049f1265b7d61be4a8904a9a27120d2064dab3b"
SENDER = {"login": "octocat", "id": 583231, "type": "User"}


def repository_json(full_name: str = "acme/web") -> dict[str, Any]:
    """The `repository` object of every payload."""
    owner, name = full_name.split("/")
    return {
        "id": 1296269, "node_id": "MDEwOlJlcG9zaXRvcnkxMjk2MjY5", "name": name, "full_name": full_name,
        "private": False, "owner": {"login": owner, "id": 1, "type": "Organization"},
        "html_url": f"https://github.com/{full_name}", "clone_url": f"https://github.com/{full_name}.git",
        "ssh_url": f"git@github.com:{full_name}.git", "default_branch": "main",
    }


def push_payload(ref: str = "refs/heads/main", *, after: str = HEAD_SHA, message: str = "Fix the flaky test",
                 full_name: str = "acme/web", deleted: bool = False) -> dict[str, Any]:
    """A `push` event's payload: one commit, or none when the ref was deleted."""
    commit = {
        "id": after, "tree_id": "f9d2a07e9488b91af2641b26b9407fe22a451433", "distinct": True,
        "message": message, "timestamp": "2026-05-10T12:00:00+02:00",
        "url": f"https://github.com/{full_name}/commit/{after}",
        "author": {"name": "Mona Lisa", "email": "mona@example.com", "username": "mona"},
        "committer": {"name": "Mona Lisa", "email": "mona@example.com", "username": "mona"},
        "added": [], "removed": [], "modified": ["README.md"],
    }
    return {
        "ref": ref, "before": BEFORE_SHA, "after": after, "created": False, "deleted": deleted, "forced": False,
        "base_ref": None, "compare": f"https://github.com/{full_name}/compare/{BEFORE_SHA[:12]}...{after[:12]}",
        "commits": [] if deleted else [commit], "head_commit": None if deleted else commit,
        "repository": repository_json(full_name), "pusher": {"name": "mona", "email": "mona@example.com"},
        "sender": SENDER,
    }


def pull_request_payload(action: str = "opened", *, base: str = "main", head: str = "feature/cache",
                         title: str = "Cache the wheels", full_name: str = "acme/web") -> dict[str, Any]:
    """A `pull_request` event's payload, PR #42 from `head` into `base`."""
    repo = repository_json(full_name)
    return {
        "action": action, "number": 42,
        "pull_request": {
            "url": f"https://api.github.com/repos/{full_name}/pulls/42", "id": 1, "number": 42,
            "state": "closed" if action == "closed" else "open", "locked": False, "title": title,
            "user": SENDER, "body": "Saves a minute per build.", "draft": False, "merged": False,
            "head": {"label": f"acme:{head}", "ref": head, "sha": HEAD_SHA, "user": SENDER, "repo": repo},
            "base": {"label": f"acme:{base}", "ref": base, "sha": BEFORE_SHA, "user": SENDER, "repo": repo},
        },
        "repository": repo, "sender": SENDER,
    }


def ping_payload(full_name: str = "acme/web") -> dict[str, Any]:
    """The `ping` GitHub sends when a webhook is set up."""
    return {"zen": "Keep it logically awesome.", "hook_id": 30,
            "hook": {"type": "Repository", "id": 30, "active": True, "events": ["push", "pull_request"],
                     "config": {"content_type": "json", "insecure_ssl": "0", "url": "https://ci.example.com/webhooks/github"}},
            "repository": repository_json(full_name), "sender": SENDER}


def run_tasks() -> int:
    """Run every task ready on the queue, as a `manage.py db_worker` would; returns how many ran.

    The worker's own claim and run, without its loop: the loop closes the database
    connection between tasks, which would end a test's transaction.
    """
    from django_tasks_db.management.commands.db_worker import Worker
    from django_tasks_db.models import DBTaskResult
    from django_tasks_db.utils import exclusive_transaction

    worker = Worker(queue_names=["*"], interval=0, batch=True, backend_name="default", startup_delay=False,
                    max_tasks=None, worker_id=f"tests-{threading.get_ident()}", excluded_queue_names=[])
    ran = 0
    while True:
        with exclusive_transaction():
            result = DBTaskResult.objects.ready().filter(backend_name="default").get_locked()
            if result is None:
                return ran
            result.claim(worker.worker_id)
        worker.run_task(result)
        ran += 1


def deliver(event: str, payload: Any, *, secret: str | None = WEBHOOK_SECRET, delivery: str | None = None,
            signature: str | None = None, body: bytes | None = None, content_type: str = "application/json",
            headers: dict[str, str] | None = None, repository: str | None = None, process: bool = True) -> Any:
    """POST a delivery like GitHub does; CSRF checks on, to show the endpoint needs no token.

    To the payload URL of `repository`, by default the one the payload names (else acme/web).
    With `process`, the task queue is then worked off, as a worker would (the enqueue happens
    after the delivery's row commits, which a test's transaction runs at once here).
    """
    repository = repository or webhooks.repository_full_name(payload) or "acme/web"
    raw = body if body is not None else json.dumps(payload).encode()
    extra = {"HTTP_X_GITHUB_EVENT": event, "HTTP_X_GITHUB_DELIVERY": delivery or str(uuid.uuid4()),
             "HTTP_USER_AGENT": "GitHub-Hookshot/044aadd"}
    if signature is not None:
        extra["HTTP_X_HUB_SIGNATURE_256"] = signature
    elif secret is not None:
        extra["HTTP_X_HUB_SIGNATURE_256"] = webhooks.sign(secret, raw)
    extra.update(headers or {})
    with TestCase.captureOnCommitCallbacks(execute=True):
        response = Client(enforce_csrf_checks=True).post(f"{WEBHOOK_URL}/{repository}", data=raw,
                                                         content_type=content_type, **extra)
    if process:
        run_tasks()
    response.delivery_id = extra["HTTP_X_GITHUB_DELIVERY"]  # type: ignore[attr-defined]
    return response


def outcomes(response: Any) -> list[dict[str, Any]]:
    """What a delivery did, per repository it verified for (oldest registered first): its record's builds,
    refusals and skips, as `GET .../webhook-deliveries/{id}` shows them, with the organization."""
    from builds.delivery_api import delivery_body
    from builds.models import WebhookDelivery

    found = []
    for delivery in (WebhookDelivery.objects.filter(delivery_id=response.delivery_id)
                     .select_related("repository__organization").order_by("repository_id")):
        org_slug = delivery.repository.organization.slug
        body = delivery_body(delivery, org_slug)
        found.append({"organization": org_slug, "repository": body["repository"],
                      "builds_created": body["builds_created"], "builds": body["builds"],
                      "refused": body["refused"], "skipped": body["skipped"]})
    return found
