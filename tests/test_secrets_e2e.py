"""End to end: secrets set through the API reach a real agent's job and never its stored log.

A live server, a real `manage.py runagent` process, a real `bash` command that
checks the value it was given and prints it, whole and split across two writes
with a log flush in between.
"""

from __future__ import annotations

import json

import pytest

from builds import services as build_services

from builds.models import Job, LogChunk, StreamKind
from tests.dsl import hm
from tests.e2e import create_build, finished, job_log, stderr_of, stdout_of, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("e2e_server")]

TOKEN = "hm-e2e-S3cr3t-9f2b7c"
DEPLOY_ORG = "deploy-from-the-org"
DEPLOY_PIPELINE = "deploy-from-the-pipeline"


def test_a_secret_in_a_jobs_output_is_stored_redacted(e2e_settings, api, org, pipeline, agents):
    secrets = f"/api/v0/organizations/{org.slug}/secrets"
    for url, name, value in ((secrets, "TOKEN", TOKEN), (secrets, "DEPLOY_KEY", DEPLOY_ORG),
                             (f"/api/v0/organizations/{org.slug}/pipelines/{pipeline.slug}/secrets", "DEPLOY_KEY",
                              DEPLOY_PIPELINE)):
        assert api.post(url, {"name": name, "value": value}, format="json").status_code == 201
    command = (
        # The job fails unless its environment holds the values (the pipeline's DEPLOY_KEY wins).
        f'test "$TOKEN" = "{TOKEN}" && test "$DEPLOY_KEY" = "{DEPLOY_PIPELINE}" || exit 7\n'
        'echo "token=$TOKEN deploy=$DEPLOY_KEY"\n'
        'echo "to stderr: $TOKEN" >&2\n'
        # Split across two writes, more than a flush interval (0.5 s) apart.
        'printf "split=%s" "${TOKEN:0:7}"; sleep 0.8; printf "%s;\\n" "${TOKEN:7}"\n'
        # A start of the value that never completes comes out as it is, at the end.
        'printf "end=%s" "${TOKEN:0:4}"'
    )
    agents.start("a1")
    build = create_build(api, pipeline, hm.pipeline([hm.sh(command, key="show")]))

    wait_for(lambda: finished(build), 30, what="the build to finish")
    job = Job.objects.get(build=build)
    assert (build.state, job.state, job.exit_code) == ("passed", "passed", 0), job_log(job)
    assert stdout_of(job) == "token=[REDACTED] deploy=[REDACTED]\nsplit=[REDACTED];\nend=hm-e"
    assert stderr_of(job) == "to stderr: [REDACTED]\n"
    stored = job_log(job)
    for value in (TOKEN, TOKEN[:7], TOKEN[7:], DEPLOY_PIPELINE, DEPLOY_ORG):
        assert value not in stored
    assert "harmont-agent: exit status 0" in job_log(job, kinds=(StreamKind.META,))
    # The two halves of the split value were read apart: "split=" went out before the rest arrived.
    contents = list(LogChunk.objects.filter(job=job, stream_kind=StreamKind.STDOUT).order_by("seq")
                    .values_list("content", flat=True))
    assert any(c.endswith("split=") for c in contents), contents


def test_a_fork_builds_job_prints_its_whole_environment_and_no_secret(e2e_settings, api, org, pipeline, agents):
    secrets = f"/api/v0/organizations/{org.slug}/secrets"
    for url, name, value in ((secrets, "TOKEN", TOKEN),
                             (f"/api/v0/organizations/{org.slug}/pipelines/{pipeline.slug}/secrets", "DEPLOY_KEY",
                              DEPLOY_PIPELINE)):
        assert api.post(url, {"name": name, "value": value}, format="json").status_code == 201
    agents.start("a1")
    # What a pull request from a fork builds (tests/test_fork_pull_requests.py sends the deliveries).
    build = build_services.create_build(pipeline=pipeline, fork=True, request=build_services.validate_build_request(
        branch="feature/cache", commit="abc123", source="webhook", allowed_sources=frozenset({"webhook"}),
        pipeline_ir=json.dumps(hm.pipeline([hm.sh("env", key="env")]))))

    wait_for(lambda: finished(build), 30, what="the build to finish")
    job = Job.objects.get(build=build)
    assert (build.state, job.state) == ("passed", "passed"), job_log(job)
    printed = stdout_of(job)
    assert "HARMONT_PULL_REQUEST_FORK=true" in printed and "HARMONT_STEP_KEY=env" in printed
    for value in (TOKEN, DEPLOY_PIPELINE, "[REDACTED]"):
        assert value not in printed
    assert not [line for line in printed.splitlines() if line.startswith(("TOKEN=", "DEPLOY_KEY="))]
