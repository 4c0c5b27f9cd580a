"""Our /api/v0/openapi.json against the hosted service's public reference document."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

REFERENCE = json.loads((Path(__file__).parent / "fixtures" / "harmont-openapi.public.json").read_text())
# Out of scope (SPEC): billing. Everything else in the reference is implemented here.
OUT_OF_SCOPE_PREFIXES = ("/api/v0/billing/",)
METHODS = ("get", "post", "put", "patch", "delete")


def reference_operations() -> list[tuple[str, str]]:
    return sorted(
        (path, method)
        for path, ops in REFERENCE["paths"].items()
        if not path.startswith(OUT_OF_SCOPE_PREFIXES)
        for method in ops
        if method in METHODS
    )


def resolve(doc: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        schema = doc["components"]["schemas"][name]
    return schema


def success_schema(doc: dict[str, Any], op: dict[str, Any]) -> tuple[str, dict[str, Any] | None]:
    code = next(c for c in op["responses"] if c.startswith("2"))
    content = op["responses"][code].get("content", {}).get("application/json")
    return code, resolve(doc, content["schema"]) if content else None


@pytest.fixture(scope="module")
def ours(django_db_blocker) -> dict[str, Any]:
    from django.test import Client

    with django_db_blocker.unblock():
        response = Client().get("/api/v0/openapi.json")
    assert response.status_code == 200
    return json.loads(response.content)


def test_reference_operations_are_many_enough_to_mean_something():
    assert len(reference_operations()) >= 30


@pytest.mark.parametrize(("path", "method"), reference_operations())
def test_operation_matches_reference(ours, path, method):
    ref_op = REFERENCE["paths"][path][method]
    assert path in ours["paths"], f"{path} missing from our schema"
    assert method in ours["paths"][path], f"{method.upper()} {path} missing from our schema"
    our_op = ours["paths"][path][method]
    assert our_op["operationId"] == ref_op["operationId"]

    ref_code, ref_schema = success_schema(REFERENCE, ref_op)
    our_code, our_schema = success_schema(ours, our_op)
    assert our_code == ref_code
    if ref_schema is None:
        assert our_schema is None
        return
    ref_required = set(ref_schema.get("required", []))
    assert ref_required <= set(our_schema.get("properties", {})), (path, method)
    assert ref_required <= set(our_schema.get("required", [])), (path, method)


def test_error_component_has_the_envelope_shape(ours):
    error = resolve(ours, ours["components"]["schemas"]["Error"])
    body = resolve(ours, error["properties"]["error"])
    assert {"type", "code", "message", "doc_url", "request_id"} <= set(body["required"])


def test_component_names_follow_the_reference(ours):
    names = set(ours["components"]["schemas"])
    assert {"Build", "BuildList", "Job", "JobList", "Error", "Pipeline", "PipelineList",
            "LogTokenResponse", "CreateBuildRequest", "CreateRepoBuildRequest"} <= names


def test_docs_page_renders(client):
    response = client.get("/api/v0/docs/")
    assert response.status_code == 200
    assert b"swagger" in response.content.lower()
