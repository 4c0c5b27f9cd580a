"""schemathesis against the live server: every answer of every operation is one /api/v0/openapi.json documents.

`st run` (schemathesis's CLI, in a subprocess) loads the document from `harmont.asgi:application`
served by uvicorn (tests/live.py), exactly as production serves it, and sends every operation
its examples, its coverage cases (missing credentials, wrong types, boundary values, malformed
bodies) and a bounded number of fuzzed requests. Four checks judge each answer: no 5xx, a
documented status, a documented content type, and a body that matches the documented schema.

The database is seeded with an organization the run's user owns, a pipeline, a build with a
running job (and its agent's credentials), an artifact, secrets, an invite and spare tokens;
parameters are mostly drawn from what was seeded, so operations reach real answers and not
only 404s. Generation is derandomized and single-threaded, and nothing is carried over
between runs (no example database, no request cache): the same cases every run.

The run's own credentials must survive it. Its bearer token is a session token, which
`DELETE /user/api-tokens/{id}` cannot revoke (that route knows only personal tokens, and the
ids offered to it are spare ones). The routes that end the credential they are called with
get credentials of their own (per-operation headers in the run's configuration):
`POST /auth/logout` a second session of the run's user, `DELETE /user` the session of a user
seeded to be deleted, `POST /agent/disconnect` a second agent's session, and the job routes
that end a job (`finish`) or its build's plan (`pipeline`) jobs of their own.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from django.core.cache import cache

from builds.models import Build, Job
from builds.services import agents as agent_services
from builds.services import artifacts as artifact_services
from builds.services import claims, jobs
from organizations import services as org_services
from organizations.models import Membership, Role
from pipelines import secrets as secret_services
from pipelines import services as pipeline_services
from tests.helpers import make_build, tarball, two_step_ir
from tests.live import LiveServer

pytestmark = pytest.mark.slow

CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"
# Fuzzed requests per operation, beside its examples and coverage cases: the bound that keeps
# the whole run within about half a minute here.
MAX_EXAMPLES = 15
# How often a path parameter is one of the seeded values rather than a generated one (mostly a 404).
SEEDED_PROBABILITY = 0.9
# A run that takes longer than this is stuck, not slow.
RUN_TIMEOUT_SECONDS = 300
HOOKS = Path(__file__).with_name("openapi_hooks.py")


@dataclass(frozen=True)
class World:
    """What the database was seeded with: credentials, and the values parameters are drawn from."""

    token: str
    logout_token: str
    leaver_token: str
    agent_token: str
    agent_session: str
    leaving_agent_session: str  # the session `disconnect` ends, so the other one keeps claiming
    job: tuple[str, str]  # (id, credential) of the running job every job route reports on
    finishing_job: tuple[str, str]  # the running job `finish` ends, so the other one stays live
    render_job: tuple[str, str]  # a running render job, which may send its build's pipeline
    values: dict[str, list[str]]


def seed() -> World:
    owner = org_services.create_user(email="olive@example.com", name="Olive Owner")
    org = org_services.create_organization(name="Acme Corp", owner=owner)
    member = org_services.create_user(email="mo@example.com", name="Mo Member")
    Membership.objects.create(organization=org, user=member, role=Role.MEMBER)
    leaver = org_services.create_user(email="leaver@example.com", name="Lee Leaver")
    pipeline = pipeline_services.create_pipeline(
        org=org, name="Web CI", repository="https://github.com/acme/web.git", default_branch="main",
        source_slug="ci", definition=two_step_ir(),
    )
    rendered = pipeline_services.create_pipeline(org=org, name="Rendered", repository="https://github.com/acme/web.git",
                                                 default_branch="main", source_slug="rendered")
    agent_token = org_services.create_agent_token(organization=org, description="conformance run")
    registration = agent_services.register_agent(token=agent_token.token, name="runner-1")
    leaving = agent_services.register_agent(token=agent_token.token, name="runner-2")

    def running_job(build: Build) -> tuple[str, str]:
        claim = claims.claim_job(agent=registration.agent)
        assert claim is not None and claim.job.build_id == build.id
        jobs.start_job(job=claim.job)
        return str(claim.job.id), claim.credential

    build = make_build(pipeline, source_b64=base64.b64encode(tarball({"README.md": b"hello\n"})).decode())
    job = running_job(build)
    finishing_job = running_job(make_build(pipeline))
    render_job = running_job(make_build(rendered))
    stored = artifact_services.store_artifact(job=Job.objects.get(pk=job[0]), path="out/report.txt",
                                              content=b"all good\n")
    secret_services.set_secret(organization=org, name="DEPLOY_KEY", value="s3cret")
    secret_services.set_secret(organization=org, pipeline=pipeline, name="DEPLOY_KEY", value="s3cret")
    invite = org_services.create_invite(organization=org, invited_by=owner, email="new@example.com", role=Role.MEMBER)
    # Ids the run may revoke: a spare personal token and a spare agent token, never the run's own credentials.
    spare_token = org_services.create_personal_token(user=owner, description="spare")
    spare_agent_token = org_services.create_agent_token(organization=org, description="spare")
    return World(
        token=org_services.issue_session_token(user=owner).raw,
        logout_token=org_services.issue_session_token(user=owner).raw,
        leaver_token=org_services.issue_session_token(user=leaver).raw,
        agent_token=agent_token.raw,
        agent_session=registration.session,
        leaving_agent_session=leaving.session,
        job=job,
        finishing_job=finishing_job,
        render_job=render_job,
        values={
            "path.org": [org.slug],
            "path.pipeline": [pipeline.slug],
            "path.number": [str(build.number)],
            "path.build_uuid": [str(build.id)],
            "path.job_id": [job[0]],
            "path.artifact_id": [str(stored.artifact.id)],
            "path.user_id": [str(member.uuid)],
            "path.id": [str(invite.invite.id), str(spare_token.token.id), str(spare_agent_token.token.id)],
            "path.name": ["DEPLOY_KEY"],
            "query.path": ["out/extra.txt"],
            # The by-repository build route finds the pipeline by these two.
            "body.repo_name": [pipeline.repo_name],
            "body.source_slug": [pipeline.source_slug],
        },
    )


def run_config(world: World) -> dict[str, Any]:
    """The run's schemathesis.toml, as a dict."""
    def job_route(operation_id: str, job: tuple[str, str]) -> dict[str, Any]:
        return {"include-operation-id": operation_id, "headers": {"Authorization": f"Bearer {job[1]}"},
                "parameters": {"path.job_id": job[0]}}

    return {
        "hooks": str(HOOKS),
        "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True, "database": "none"},
        # Cached requests would be replayed by the next run: each run must stand alone.
        "cache": {"enabled": False},
        "phases": {
            "stateful": {"enabled": False},
            # Values taken from answers (fresh ids every run) would make the cases differ between runs.
            "fuzzing": {"extra-data-sources": {"responses": False}},
        },
        "auth": {"openapi": {
            "bearer": {"bearer": world.token},
            "agentToken": {"bearer": world.agent_token},
            "agentSession": {"bearer": world.agent_session},
            "jobCredential": {"bearer": world.job[1]},
        }},
        "dictionaries": {key: {"values": values} for key, values in world.values.items()},
        "parameters": {key: {"dictionary": key, "probability": SEEDED_PROBABILITY} for key in world.values},
        "operations": [
            {"include-operation-id": "logout", "headers": {"Authorization": f"Bearer {world.logout_token}"}},
            {"include-operation-id": "deleteCurrentUser",
             "headers": {"Authorization": f"Bearer {world.leaver_token}"}},
            {"include-operation-id": "agentDisconnect",
             "headers": {"Authorization": f"Bearer {world.leaving_agent_session}"}},
            job_route("agentFinishJob", world.finishing_job),
            job_route("agentRenderResult", world.render_job),
        ],
    }


def toml(document: dict[str, Any]) -> str:
    """`document` as TOML: one quoted key per line, inline tables and arrays (JSON's strings are TOML's)."""
    def value(item: Any) -> str:
        if isinstance(item, dict):
            return "{" + ", ".join(f"{json.dumps(key)} = {value(sub)}" for key, sub in item.items()) + "}"
        if isinstance(item, list):
            return "[" + ", ".join(value(sub) for sub in item) + "]"
        return json.dumps(item)  # str, int, float and bool are spelled alike

    return "".join(f"{json.dumps(key)} = {value(item)}\n" for key, item in document.items())


@pytest.fixture
def world(live_asgi: LiveServer, settings: Any, tmp_path: Path) -> Iterator[World]:
    settings.MEDIA_ROOT = tmp_path / "media"
    # The CLI-login throttle counts in the cache; the run starts and leaves it empty.
    cache.clear()
    try:
        yield seed()
    finally:
        cache.clear()


def test_every_answer_of_every_operation_is_documented(live_asgi: LiveServer, world: World, tmp_path: Path) -> None:
    config = tmp_path / "schemathesis.toml"
    config.write_text(toml(run_config(world)))
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "--no-color", "run",
         f"{live_asgi.url}/api/v0/openapi.json", "--checks", CHECKS, "--workers", "1",
         "--phases", "examples,coverage,fuzzing"],
        cwd=tmp_path, capture_output=True, text=True, timeout=RUN_TIMEOUT_SECONDS,
    )
    print(f"schemathesis run: {time.monotonic() - started:.1f} s\n{done.stdout[-1500:]}")
    assert done.returncode == 0, done.stdout + done.stderr
    # Nothing in the run ended its own credentials.
    assert live_asgi.request("GET", "/api/v0/user", headers={"Authorization": f"Bearer {world.token}"}).status == 200
    claim = live_asgi.request("POST", "/api/v0/agent/claim", headers={"Authorization": f"Bearer {world.agent_session}"})
    assert claim.status in (200, 204)
    job_id, credential = world.job
    heartbeat = live_asgi.request("POST", f"/api/v0/agent/jobs/{job_id}/heartbeat", body={},
                                  headers={"Authorization": f"Bearer {credential}"})
    assert heartbeat.status == 200
