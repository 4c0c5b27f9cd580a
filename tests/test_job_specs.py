"""A claim's job spec is composed as JSON (builds.services.job_specs): what JobSpecSerializer, the schema, renders of it."""

from __future__ import annotations

import base64
import json

import pytest

from builds.agent_serializers import JobSpecSerializer
from builds.services import job_spec
from builds.sql import claimed_job
from pipelines import secrets as secret_services
from tests.dsl import hm
from tests.helpers import make_build, run_job, tarball


def specs_of(build) -> dict[str, dict]:
    return {job.step_key: job_spec(claimed_job(job.pk)) for job in build.jobs.order_by("position")}


def assert_rendered_as_composed(spec: dict) -> None:
    rendered = JobSpecSerializer(spec).data
    assert json.dumps(rendered) == json.dumps(spec)  # values, and the keys in the schema's order


@pytest.mark.django_db
def test_a_root_job_with_a_repository_and_a_child_with_its_parents_files(pipeline, org):
    pipeline.repository = "https://github.com/acme/web.git"
    pipeline.save(update_fields=["repository"])
    secret_services.set_secret(organization=org, name="TOKEN", value="s3cret", protected=False)
    root = hm.sh("make", key="root")
    build = make_build(pipeline, pipeline_ir=hm.pipeline([root.sh("make test", key="child")]), env={"A": "1"})
    run_job(build.jobs.get(step_key="root"))

    specs = specs_of(build)
    assert specs["root"]["source"]["kind"] == "git" and specs["child"]["parent_snapshot"] is not None
    assert specs["root"]["mask"] == ["s3cret"] and specs["root"]["env"]["TOKEN"] == "s3cret"
    for spec in specs.values():
        assert_rendered_as_composed(spec)


@pytest.mark.django_db
@pytest.mark.parametrize("source", ["archive", "url"])
def test_a_root_job_with_an_uploaded_or_downloaded_source(pipeline, settings, tmp_path, source):
    settings.MEDIA_ROOT = tmp_path
    given = ({"source_b64": base64.b64encode(tarball({"f": b"1"})).decode()} if source == "archive"
             else {"source_url": "https://x.test/s.tgz", "source_sha256": "a" * 64})
    build = make_build(pipeline, **given)

    specs = specs_of(build).values()
    assert [spec["source"]["kind"] for spec in specs if spec["parent_workspace_path"] is None] == [source]
    for spec in specs:
        assert_rendered_as_composed(spec)
