"""End to end: agents fetch the code themselves (git checkout, tarball URL) and render pipelines.

Local `file://` repositories and a local HTTP server stand in for the network.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from builds.models import Build, Job
from builds.services.builds import RENDER_STEP_KEY
from pipelines import services as pipeline_services
from tests.dsl import hm
from tests.e2e import create_build, finished, job_log, jobs_by_key, stdout_of, wait_for
from tests.repos import CI_PY, GitRepo, make_repo

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("e2e_server")]


@pytest.fixture
def repo(tmp_path: Path) -> tuple[GitRepo, str, str]:
    """acme/site (the `pipeline` fixture is acme/web): VERSION 1.0, then 2.0 on main. (repo, first, second)."""
    repo, first = make_repo(tmp_path / "acme" / "site", {".hm/ci.py": CI_PY, "VERSION": "1.0\n"})
    second = repo.commit({"VERSION": "2.0\n"}, "bump")
    return repo, first, second


def by_repo(api: Any, org: Any, **body: Any) -> Build:
    response = api.post(f"/api/v0/organizations/{org.slug}/builds",
                        {"repo_name": "acme/site", "source_slug": "ci", "branch": "main", **body}, format="json")
    assert response.status_code == 201, response.content[:500]
    return Build.objects.get(pk=response.json()["id"])


def test_a_registered_pipeline_builds_the_named_commit_from_a_git_checkout(api, org, repo, agents):
    git_repo, first, second = repo
    response = api.post(f"/api/v0/organizations/{org.slug}/pipelines/register", {
        "repository": git_repo.url, "repo_name": "acme/site", "default_branch": "main",
        "envelope": git_repo.envelope()}, format="json")
    assert response.status_code == 200, response.content
    agents.start("a1")

    old = by_repo(api, org, commit=first)
    tip = by_repo(api, org, commit="HEAD")
    short = by_repo(api, org, commit=first[:10])  # can't be fetched alone: fetch everything, then resolve

    for build in (old, tip, short):
        wait_for(lambda: finished(build), 60, what="the build to finish")
        assert build.state == "passed", {k: (j.state, job_log(j)) for k, j in jobs_by_key(build).items()}
    assert stdout_of(jobs_by_key(old)["build"]) == "built 1.0\n"
    assert stdout_of(jobs_by_key(old)["test"]) == "testing 1.0\n"  # builds_in: the checkout travels along
    assert stdout_of(jobs_by_key(tip)["build"]) == "built 2.0\n"
    assert f"checked out {git_repo.url} at {first}" in job_log(jobs_by_key(old)["build"])
    assert f"at {second}" in job_log(jobs_by_key(tip)["build"])
    assert f"at {first}" in job_log(jobs_by_key(short)["build"])


def test_a_commit_the_repository_does_not_have_fails_the_job(api, org, repo, agents):
    git_repo, _, _ = repo
    pipeline = pipeline_services.create_pipeline(org=org, name="Web", repository=git_repo.url, default_branch="main")
    agents.start("a1")

    build = create_build(api, pipeline, hm.pipeline([hm.sh("true", key="only")]), commit="f" * 40)

    wait_for(lambda: finished(build), 60, what="the build to finish")
    job = jobs_by_key(build)["only"]
    assert (build.state, job.state, job.error_code) == ("failed", "failed", "workspace_unavailable")
    assert "could not prepare the workspace" in job_log(job)


def test_a_pipeline_without_definition_is_rendered_on_an_agent(api, org, repo, agents):
    git_repo, first, _ = repo
    pipeline_services.create_pipeline(org=org, name="Web", repository=git_repo.url, default_branch="main",
                                      source_slug="ci")
    agents.start("a1")

    build = by_repo(api, org, commit=first)

    wait_for(lambda: finished(build), 60, what="the build to finish")
    jobs = jobs_by_key(build)
    assert build.state == "passed", {k: (j.state, job_log(j)) for k, j in jobs.items()}
    assert {key: job.state for key, job in jobs.items()} == {RENDER_STEP_KEY: "passed", "build": "passed",
                                                            "test": "passed"}
    render_log = job_log(jobs[RENDER_STEP_KEY])
    assert "harmont render: loading .hm/ci.py" in render_log
    assert "pipeline sent; 2 jobs planned" in render_log
    assert stdout_of(jobs["test"]) == "testing 1.0\n"
    assert build.pipeline_ir["graph"]["nodes"][0]["step"]["key"] == "build"


@pytest.mark.parametrize(("hm_file", "in_log"), [
    ("import harmont as hm\n\n1 / 0\n", "ZeroDivisionError"),
    ("import harmont as hm\n\n@hm.pipeline('other')\ndef other():\n    return [hm.sh('true', key='x')]\n",
     "no pipeline 'ci' in .hm/*.py (found: other)"),
])
def test_a_broken_hm_file_fails_the_build_with_render_failed(api, org, tmp_path, agents, hm_file, in_log):
    git_repo, commit = make_repo(tmp_path / "broken", {".hm/ci.py": hm_file})
    pipeline_services.create_pipeline(org=org, name="Web", repository=git_repo.url, repo_name="acme/site",
                                      default_branch="main", source_slug="ci")
    agents.start("a1")

    build = by_repo(api, org, commit=commit)

    wait_for(lambda: finished(build), 60, what="the build to finish")
    render = Job.objects.get(build=build)
    assert (build.state, build.error_code) == ("failed", "render_failed")
    assert (render.state, render.error_code) == ("failed", "render_failed")
    assert in_log in job_log(render)
    assert "render failed: the renderer exited with status" in job_log(render)


# ------------------------------------------------------------------ source_url tarballs


@pytest.fixture
def tarball_server(tmp_path: Path) -> Iterator[tuple[str, bytes]]:
    """A local HTTP server with one source tarball: (its URL, its bytes)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        data = b"from the tarball\n"
        info = tarfile.TarInfo("NOTE.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "src.tar.gz").write_bytes(buffer.getvalue())

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(tmp_path / "www"), **kwargs)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/src.tar.gz", buffer.getvalue()
    finally:
        server.shutdown()


def test_a_source_url_tarball_is_checked_and_unpacked(api, pipeline, agents, tarball_server):
    url, archive = tarball_server
    agents.start("a1")
    ir = hm.pipeline([hm.sh("cat NOTE.txt", key="read")])

    good = create_build(api, pipeline, ir, source_url=url, source_sha256=hashlib.sha256(archive).hexdigest())
    bad = create_build(api, pipeline, ir, source_url=url, source_sha256="0" * 64)

    for build in (good, bad):
        wait_for(lambda: finished(build), 60, what="the build to finish")
    assert good.state == "passed" and stdout_of(jobs_by_key(good)["read"]) == "from the tarball\n"
    job = jobs_by_key(bad)["read"]
    assert (bad.state, job.error_code) == ("failed", "workspace_unavailable")
    assert f"has SHA-256 {hashlib.sha256(archive).hexdigest()}, but the build expects {'0' * 64}" in job_log(job)


# ------------------------------------------------------------------ option injection through branch or commit


@pytest.mark.parametrize("field", ["branch", "commit"])
def test_an_injected_git_option_is_never_run_by_the_agent(api, pipeline, repo, agents, tmp_path, field):
    # The server refuses such a build (test_builds_api); here the row is written behind
    # its back, as a bypass would, to show the agent's git calls alone hold.
    git_repo, _, _ = repo
    pipeline.repository = git_repo.url
    pipeline.save(update_fields=["repository"])
    marker = tmp_path / "injected"
    injected = f"--upload-pack=touch {marker};git-upload-pack"
    build = create_build(api, pipeline, hm.pipeline([hm.sh("true", key="only")]), commit="HEAD")
    Build.objects.filter(pk=build.pk).update(**{"branch": "main", "commit": "HEAD", field: injected})
    agents.start("a1")

    wait_for(lambda: finished(build), 60, what="the build to finish")
    job = jobs_by_key(build)["only"]
    assert not marker.exists()
    assert (build.state, job.state, job.error_code) == ("failed", "failed", "workspace_unavailable")
