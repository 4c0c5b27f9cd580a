"""End to end: jobs write files under $HARMONT_ARTIFACTS, a real agent uploads them, the API serves them.

A live server and `manage.py runagent` processes (tests/e2e.py). Limits are set with
the `settings` fixture, which reaches the live server: it runs in this process.
"""

from __future__ import annotations

import hashlib
import shlex
import sys
from typing import Any

import pytest

from builds.models import Artifact, Job, StreamKind
from tests.dsl import hm
from tests.e2e import create_build, finished, job_in, job_log, wait_for
from tests.helpers import builds_url

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("e2e_server")]

# Every byte value, many times: a download that decodes or re-encodes anything differs.
BINARY = bytes(range(256)) * 40
WRITE_BINARY = f"{shlex.quote(sys.executable)} -c 'import sys; sys.stdout.buffer.write(bytes(range(256)) * 40)'"


def meta_log(job: Job) -> str:
    return job_log(job, kinds=(StreamKind.META,))


def download(api: Any, artifact: Artifact) -> bytes:
    url = f"{builds_url(artifact.build.pipeline)}/{artifact.build.number}/artifacts/{artifact.pk}/download"
    response = api.get(url)
    assert response.status_code == 200, response.content[:300]
    return b"".join(response.streaming_content)


def test_a_failing_job_uploads_its_artifacts_and_they_download_byte_for_byte(e2e_settings, api, pipeline, agents):
    command = "; ".join([
        'mkdir -p "$HARMONT_ARTIFACTS/bin"',
        f'{WRITE_BINARY} > "$HARMONT_ARTIFACTS/bin/data.bin"',
        'echo "3 tests failed" > "$HARMONT_ARTIFACTS/report.txt"',
        'ln -s /etc/hostname "$HARMONT_ARTIFACTS/leak"',  # a link to outside: not uploaded
        'ln -s report.txt "$HARMONT_ARTIFACTS/latest.txt"',  # a link to inside: uploaded
        "exit 1",
    ])
    agent = agents.start("a1")
    build = create_build(api, pipeline, hm.pipeline([hm.sh(command, key="test")]))

    wait_for(lambda: finished(build), 30, what="the build to finish")
    job = Job.objects.get(build=build)
    assert (build.state, job.state, job.exit_code, job.error_code) == ("failed", "failed", 1, None)
    artifacts = {artifact.path: artifact for artifact in Artifact.objects.filter(build=build)}
    assert sorted(artifacts) == ["bin/data.bin", "latest.txt", "report.txt"]
    data = artifacts["bin/data.bin"]
    assert (data.job_id, data.size, data.sha256) == (job.pk, len(BINARY), hashlib.sha256(BINARY).hexdigest())
    assert download(api, data) == BINARY
    assert download(api, artifacts["report.txt"]) == download(api, artifacts["latest.txt"]) == b"3 tests failed\n"
    log = meta_log(job)
    assert f"harmont-agent: uploaded artifact bin/data.bin ({len(BINARY)} bytes)\n" in log
    assert "harmont-agent: uploaded artifact report.txt (15 bytes)\n" in log
    assert "harmont-agent: skipped artifact leak: a symbolic link to outside $HARMONT_ARTIFACTS\n" in log
    # The uploads come after the exit status and before the job's end.
    assert log.index("harmont-agent: exit status 1") < log.index("uploaded artifact")
    assert not (agent.workdir / "artifacts" / str(job.pk)).exists()  # cleaned up

    listed = api.get(f"{builds_url(pipeline)}/{build.number}/artifacts", {"job_id": str(job.pk)}).json()
    assert sorted(item["path"] for item in listed["data"]) == ["bin/data.bin", "latest.txt", "report.txt"]


def test_an_oversized_artifact_is_refused_in_the_log_and_the_job_still_passes(e2e_settings, api, pipeline, agents):
    e2e_settings.ARTIFACT_MAX_BYTES = 4096
    command = "; ".join([
        'echo small > "$HARMONT_ARTIFACTS/small.txt"',
        'head -c 100000 /dev/zero > "$HARMONT_ARTIFACTS/big.bin"',
        "echo done",
    ])
    agents.start("a1")
    build = create_build(api, pipeline, hm.pipeline([hm.sh(command, key="build")]))

    wait_for(lambda: finished(build), 30, what="the build to finish")
    job = Job.objects.get(build=build)
    assert (build.state, job.state, job.exit_code, job.error_code) == ("passed", "passed", 0, None)
    assert list(Artifact.objects.filter(build=build).values_list("path", "size")) == [("small.txt", 6)]
    assert ("harmont-agent: artifact big.bin refused (artifact_too_large): The artifact is 100000 bytes; "
            "one artifact may be at most 4096 bytes.\n") in meta_log(job)
    assert "harmont-agent: uploaded artifact small.txt (6 bytes)\n" in meta_log(job)


def test_the_build_limit_is_shared_by_its_jobs(e2e_settings, api, pipeline, agents):
    e2e_settings.BUILD_ARTIFACTS_MAX_BYTES = 1500
    first = hm.sh('head -c 1000 /dev/zero > "$HARMONT_ARTIFACTS/first.bin"', key="first")
    ir = hm.pipeline([first, hm.wait(), hm.sh('head -c 1000 /dev/zero > "$HARMONT_ARTIFACTS/second.bin"',
                                              key="second")])
    agents.start("a1")
    build = create_build(api, pipeline, ir)

    wait_for(lambda: finished(build), 30, what="the build to finish")
    assert build.state == "passed"
    second = Job.objects.get(build=build, step_key="second")
    assert second.state == "passed"
    assert list(Artifact.objects.filter(build=build).values_list("path", flat=True)) == ["first.bin"]
    assert ("harmont-agent: artifact second.bin refused (build_artifacts_quota_exceeded): The build's artifacts "
            "already take 1000 bytes; 1000 more would exceed the build's limit of 1500 bytes.\n") in meta_log(second)


def test_a_timed_out_job_still_uploads_what_it_wrote(e2e_settings, api, pipeline, agents):
    e2e_settings.JOB_TIMEOUT_GRACE_SECONDS = 1
    command = 'echo partial > "$HARMONT_ARTIFACTS/partial.txt"; exec sleep 30'
    agents.start("a1")
    build = create_build(api, pipeline, hm.pipeline([hm.timeout("2s", hm.sh(command, key="slow"))]))
    job = Job.objects.get(build=build)

    wait_for(lambda: job_in(job, "timed_out"), 15, what="the job to time out")
    artifact = Artifact.objects.get(build=build)
    assert (artifact.path, download(api, artifact)) == ("partial.txt", b"partial\n")
    assert "harmont-agent: uploaded artifact partial.txt (8 bytes)\n" in meta_log(job)
