"""End to end: a cached step runs once; later builds reuse its job, and its `builds_in` child starts from it.

In containers, a repository's `.hm/ci.py` names an `on_change` cache; the render job
renders it with the real `harmont` package in a checkout of the build's commit, so the
key covers the listed file's content. The second build's `setup` is passed without an
agent and its child, on an agent that never ran the parent, loads the parent's stored
snapshot: what `setup` installed under /opt is there, with the same random stamp. A
commit that changes the file makes a new key, and `setup` runs again. With the host
executor, a `forever` cache hands the child the reused job's stored workspace.
"""

from __future__ import annotations

import re
import signal
from pathlib import Path
from typing import Any

import pytest

from builds.models import Build, CacheEntry, Job
from pipelines import services as pipeline_services
from tests.containers import ContainerAgents, meta_of
from tests.dsl import hm
from tests.e2e import Agents, create_build, finished, job_log, jobs_by_key, stdout_of, wait_for
from tests.repos import make_repo

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

CI_PY = '''
import harmont as hm

@hm.pipeline("ci")
def ci():
    setup = hm.sh("mkdir -p /opt/tool && cp deps.txt /opt/tool/deps"
                  " && head -c 16 /dev/urandom | md5sum | cut -c1-32 > /opt/tool/stamp && echo installed",
                  key="setup", cache=hm.on_change("deps.txt"), image={image!r})
    return [setup.sh("cat /opt/tool/deps /opt/tool/stamp", key="use")]
'''


def passed(build: Build) -> dict[str, Job]:
    wait_for(lambda: finished(build), 90, what=f"build #{build.number} to finish")
    jobs = jobs_by_key(build)
    assert build.state == "passed", {key: (job.state, job_log(job)) for key, job in jobs.items()}
    return jobs


def by_repo(api: Any, org: Any, commit: str) -> Build:
    response = api.post(f"/api/v0/organizations/{org.slug}/builds",
                        {"repo_name": "acme/tools", "source_slug": "ci", "branch": "main", "commit": commit},
                        format="json")
    assert response.status_code == 201, response.content[:500]
    return Build.objects.get(pk=response.json()["id"])


def job_json(api: Any, build: Build, job: Job) -> dict[str, Any]:
    url = (f"/api/v0/organizations/{build.pipeline.organization.slug}/pipelines/{build.pipeline.slug}"
           f"/builds/{build.number}/jobs/{job.pk}")
    return api.get(url).json()


def test_an_on_change_step_in_a_container_is_reused_with_its_filesystem_until_the_file_changes(
        api, org, container_agents: ContainerAgents, tmp_path: Path):
    repo, first = make_repo(tmp_path / "acme" / "tools", {".hm/ci.py": CI_PY.format(image=container_agents.image),
                                                          "deps.txt": "tool 1.0\n"})
    pipeline_services.create_pipeline(org=org, name="Tools", repository=repo.url, default_branch="main",
                                      source_slug="ci")
    one = container_agents.start_podman("p1")

    jobs = passed(by_repo(api, org, first))
    deps, stamp = stdout_of(jobs["use"]).split("\n")[:2]
    assert deps == "tool 1.0" and re.fullmatch(r"[0-9a-f]{32}", stamp)
    assert stdout_of(jobs["setup"]) == "installed\n"
    entry = CacheEntry.objects.get()
    assert (entry.step_key, entry.job_id, entry.branch) == ("setup", jobs["setup"].pk, "main")
    assert entry.size_bytes > 0
    # The render job's key covers deps.txt (the package computed it, in the checkout).
    assert jobs["setup"].cache_key == entry.key
    first_setup = jobs["setup"]
    # A graceful stop takes its kept snapshots with it: the next agent must fetch the stored one.
    one.send(signal.SIGTERM)
    assert one.wait(timeout=30) == 0
    container_agents.start_podman("p2")

    again = by_repo(api, org, "HEAD")
    jobs = passed(again)

    assert (jobs["setup"].reused_job_id, jobs["setup"].agent_id, jobs["setup"].exit_code) == (first_setup.pk, None, 0)
    assert f"reuses job {first_setup.pk} of build #" in job_log(jobs["setup"])
    assert stdout_of(jobs["setup"]) == ""
    assert stdout_of(jobs["use"]) == f"tool 1.0\n{stamp}\n"
    assert "loaded the builds_in parent's filesystem snapshot" in meta_of(jobs["use"])
    assert jobs["use"].agent.name == "p2"
    body = job_json(api, again, jobs["setup"])
    assert (body["cached"], body["reused_job"], body["state"]) == (True, str(first_setup.pk), "passed")
    entry.refresh_from_db()
    assert entry.hits == 1

    changed = repo.commit({"deps.txt": "tool 2.0\n"}, "Bump the tool")
    jobs = passed(by_repo(api, org, changed))

    assert jobs["setup"].reused_job_id is None and stdout_of(jobs["setup"]) == "installed\n"
    new_deps, new_stamp = stdout_of(jobs["use"]).split("\n")[:2]
    assert new_deps == "tool 2.0" and new_stamp != stamp
    assert CacheEntry.objects.count() == 2


def test_a_forever_step_on_the_host_is_reused_and_its_child_gets_the_stored_workspace(api, pipeline, agents: Agents):
    setup = hm.sh("head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n' > stamp.txt; echo ran", key="setup",
                  cache=hm.forever())
    ir = hm.pipeline([setup.sh("cat stamp.txt", key="test"), hm.sh("echo lint", key="lint")])
    agents.start("h1")

    jobs = passed(create_build(api, pipeline, ir))
    stamp = stdout_of(jobs["test"])
    assert re.fullmatch(r"[0-9a-f]{32}", stamp)
    first_setup = jobs["setup"]

    jobs = passed(create_build(api, pipeline, ir))

    assert jobs["setup"].reused_job_id == first_setup.pk and stdout_of(jobs["setup"]) == ""
    assert stdout_of(jobs["test"]) == stamp
    assert "unpacked parent workspace" in job_log(jobs["test"])
    # A step without a cache runs every time.
    assert stdout_of(jobs["lint"]) == "lint\n"
