"""End to end, a repository's whole path: register its envelope, a signed push webhook, an agent
clones the pushed commit and runs it to `passed`, and its artifact downloads byte for byte.

The envelope is rendered by the real `harmont` package from the repository's `.hm/ci.py`; the
repository is a local git repository (`file://`), so nothing leaves the machine.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from pathlib import Path

import pytest

from builds.models import Build, WebhookDelivery
from tests.e2e import finished, job_log, jobs_by_key, stdout_of, wait_for
from tests.helpers import deliver, push_payload
from tests.repos import make_repo

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("e2e_server")]

SECRET = "hook-secret-for-acme-shop"

SHOP_PY = '''
import harmont as hm

@hm.pipeline("ci", name="Shop CI", triggers=[hm.push(branch="main")])
def ci():
    build = hm.sh("mkdir -p out && printf 'shop %s' \\"$(cat VERSION)\\" > out/app.txt && echo built", key="build")
    return [build.sh(
        'mkdir -p "$HARMONT_ARTIFACTS/dist" && cp out/app.txt "$HARMONT_ARTIFACTS/dist/app.txt"'
        ' && head -c 5000 /dev/urandom > "$HARMONT_ARTIFACTS/blob.bin"'
        ' && sha256sum "$HARMONT_ARTIFACTS/blob.bin" | cut -d" " -f1',
        key="package")]

@hm.pipeline("release", triggers=[hm.push(tag="v*")])
def release():
    return [hm.sh("echo releasing", key="release")]
'''


def test_push_webhook_builds_the_registered_pipeline_and_its_artifacts_download(api, org, agents, tmp_path: Path):
    repo, _ = make_repo(tmp_path / "acme" / "shop", {".hm/ci.py": SHOP_PY, "VERSION": "1.0\n"})
    pushed = repo.commit({"VERSION": "1.1\n"}, "Bump to 1.1")
    registered = api.post(f"/api/v0/organizations/{org.slug}/pipelines/register", {
        "repository": repo.url, "repo_name": "acme/shop", "default_branch": "main", "webhook_secret": SECRET,
        "envelope": repo.envelope()}, format="json")
    assert registered.status_code == 200, registered.content
    assert [p["slug"] for p in registered.json()["pipelines"]] == ["acme-shop-ci", "acme-shop-release"]
    agents.start("a1")

    # A forged delivery first: nothing is built.
    payload = push_payload(after=pushed, message="Bump to 1.1", full_name="acme/shop")
    assert deliver("push", payload, secret="not-the-secret").status_code == 401
    assert not Build.objects.exists()

    delivery = str(uuid.uuid4())
    response = deliver("push", payload, secret=SECRET, delivery=delivery)

    assert response.status_code == 202, response.content
    [build] = Build.objects.all()  # `release` only builds tags
    assert (build.pipeline.slug, build.source, build.branch, build.commit, build.message) == (
        "acme-shop-ci", "webhook", "main", pushed, "Bump to 1.1")
    # GitHub redelivers: nothing new.
    assert deliver("push", payload, secret=SECRET, delivery=delivery).status_code == 202
    assert Build.objects.count() == 1 and WebhookDelivery.objects.count() == 1

    wait_for(lambda: finished(build), 60, what="the build to finish")
    jobs = jobs_by_key(build)
    assert build.state == "passed", {k: (j.state, job_log(j)) for k, j in jobs.items()}
    assert f"checked out {repo.url} at {pushed}" in job_log(jobs["build"])
    blob_sha = stdout_of(jobs["package"]).strip()
    assert re.fullmatch(r"[0-9a-f]{64}", blob_sha)

    artifacts_url = f"/api/v0/organizations/{org.slug}/pipelines/acme-shop-ci/builds/{build.number}/artifacts"
    listed = api.get(artifacts_url)
    assert listed.status_code == 200, listed.content
    by_path = {a["path"]: a for a in listed.json()["data"]}
    assert set(by_path) == {"dist/app.txt", "blob.bin"}
    assert by_path["dist/app.txt"]["job_id"] == str(jobs["package"].id)
    app = api.get(by_path["dist/app.txt"]["download_url"])
    assert app.status_code == 200 and b"".join(app.streaming_content) == b"shop 1.1"  # the pushed commit's
    blob = b"".join(api.get(by_path["blob.bin"]["download_url"]).streaming_content)
    assert len(blob) == 5000 and hashlib.sha256(blob).hexdigest() == blob_sha == by_path["blob.bin"]["sha256"]
