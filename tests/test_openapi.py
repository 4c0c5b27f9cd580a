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


# ---------------------------------------------------------------- the error answers (harmont/openapi.py)

ERROR_REF = {"$ref": "#/components/schemas/Error"}


def our_operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(path, method, op) for path, ops in doc["paths"].items() for method, op in ops.items() if method in METHODS]


def by_operation_id(doc: dict[str, Any], operation_id: str) -> dict[str, Any]:
    return next(op for _, _, op in our_operations(doc) if op["operationId"] == operation_id)


def test_every_error_answer_is_the_envelope(ours):
    errors = [(op["operationId"], code, answer) for _, _, op in our_operations(ours)
              for code, answer in op["responses"].items() if code.startswith("4")]
    assert len(errors) > 100
    for operation_id, code, answer in errors:
        assert answer["content"] == {"application/json": {"schema": ERROR_REF}}, (operation_id, code)
        assert answer["description"], (operation_id, code)


def test_every_operation_with_a_credential_documents_401(ours):
    secured = [op for _, _, op in our_operations(ours) if op.get("security")]
    assert len(secured) > 50
    assert [op["operationId"] for op in secured if "401" not in op["responses"]] == []
    assert "401" not in by_operation_id(ours, "cliClaim")["responses"]  # no credential, so never a 401


def test_every_operation_with_path_parameters_documents_404(ours):
    with_path = [op for _, _, op in our_operations(ours) if any(p["in"] == "path" for p in op.get("parameters", []))]
    assert [op["operationId"] for op in with_path if "404" not in op["responses"]] == []
    assert "404" not in by_operation_id(ours, "listOrganizations")["responses"]


def test_json_bodies_document_400_413_and_415(ours):
    for operation_id in ("createBuild", "updateCurrentUser", "agentFinishJob", "cliClaim"):
        assert {"400", "413", "415"} <= set(by_operation_id(ours, operation_id)["responses"]), operation_id
    # Bodyless, read as a raw stream, and parsed but never JSON: only what can happen to them.
    assert not {"413", "415"} & set(by_operation_id(ours, "cancelBuild")["responses"])
    assert {"413"} <= set(by_operation_id(ours, "agentUploadArtifact")["responses"])
    assert "415" not in by_operation_id(ours, "agentUploadArtifact")["responses"]
    workspace = set(by_operation_id(ours, "agentUploadWorkspace")["responses"])
    assert {"413", "415"} <= workspace and "400" not in workspace


def test_keyset_pages_document_400(ours):
    for operation_id in ("listOrganizations", "listPipelines", "listBuilds", "listArtifacts"):
        assert "400" in by_operation_id(ours, operation_id)["responses"], operation_id
    # The job list is not paged; its one 400 is a bad `include_retried` (invalid_filter).
    jobs = by_operation_id(ours, "listJobs")
    assert "400" in jobs["responses"] and {p["name"] for p in jobs.get("parameters", [])} >= {"include_retried"}
    assert not {"limit", "cursor"} & {p["name"] for p in jobs.get("parameters", [])}


def test_403_is_documented_where_a_role_is_checked_and_only_there(ours):
    for operation_id in ("createPipeline", "listAgentTokens", "listOrgSecrets", "updateOrgMember", "removeOrgMember"):
        assert "403" in by_operation_id(ours, operation_id)["responses"], operation_id
    for operation_id in ("listPipelines", "getPipeline", "listOrgMembers", "getBuild", "getCurrentUser"):
        assert "403" not in by_operation_id(ours, operation_id)["responses"], operation_id


def test_role_checks_in_services_and_permissions_both_make_a_403():
    from harmont.openapi import error_answers
    from organizations.api import MemberDetailView, MemberListView

    def statuses(view: Any, method: str) -> set[int]:
        return {status for status, _, _ in error_answers({"responses": {}}, view, method)}

    assert 403 in statuses(MemberDetailView(), "patch")  # required_role
    assert 403 in statuses(MemberDetailView(), "delete")  # role_checked_in_service
    assert 403 not in statuses(MemberListView(), "get")


def test_throttled_operations_document_429_with_retry_after(ours):
    for operation_id in ("cliClaim", "cliRedeem"):
        answer = by_operation_id(ours, operation_id)["responses"]["429"]
        assert "Retry-After" in answer["headers"], operation_id


def test_429_follows_the_views_throttle_classes():
    from rest_framework.throttling import UserRateThrottle
    from rest_framework.views import APIView

    from harmont.openapi import error_answers

    class Throttled(APIView):
        throttle_classes = [UserRateThrottle]

    assert 429 in {status for status, _, _ in error_answers({"responses": {}}, Throttled(), "get")}
    assert 429 not in {status for status, _, _ in error_answers({"responses": {}}, APIView(), "get")}
