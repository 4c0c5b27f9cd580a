"""The error envelope, the request id, and the catalog of error codes.

Every failure under `/api/v0` leaves through `envelope_response`: domain errors
raised by services (`ApiError`), DRF's own exceptions, Django's 404/405/413,
and anything unhandled. One shape, one place.
"""

from __future__ import annotations

import io
import logging
import re
import sqlite3
import sys
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.db import InterfaceError, OperationalError
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views import defaults
from django.views.decorators.csrf import csrf_exempt
from rest_framework import exceptions as drf_exceptions
from rest_framework.views import exception_handler as drf_exception_handler

from harmont.parsers import body_limit_for, read_chunked_body, takes_chunked_body

logger = logging.getLogger("harmont.errors")

try:
    import psycopg
except ImportError:  # SQLite-only installs
    psycopg = None

# What the database raises while it is away (stopped, restarting, unreachable): Django's wrappers,
# and the drivers' own classes for the few places that reach a driver unwrapped.
DATABASE_UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    OperationalError, InterfaceError, sqlite3.OperationalError, sqlite3.InterfaceError,
    *((psycopg.OperationalError, psycopg.InterfaceError) if psycopg is not None else ()),
)
# Clients (the agent, `hm`) retry a 503; this tells them not to hammer a recovering database.
DATABASE_RETRY_AFTER_SECONDS = 2

API_PREFIX = "/api/v0/"

STATUS_BY_TYPE = {
    "invalid_request": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "conflict": 409,
    "payload_too_large": 413,
    "validation_failed": 422,
    "rate_limited": 429,
    "server_error": 500,
}


# Codes whose answers carry another status than their type's.
STATUS_BY_CODE = {
    # A server error the client can wait out: 503 with Retry-After, which clients retry.
    "database_unavailable": 503,
}


@dataclass(frozen=True)
class ErrorCode:
    code: str
    type: str
    title: str
    explanation: str

    @property
    def status(self) -> int:
        """The HTTP status of this code's answers (what its docs page says)."""
        return STATUS_BY_CODE.get(self.code, STATUS_BY_TYPE[self.type])


def _catalog(*entries: tuple[str, str, str, str]) -> dict[str, ErrorCode]:
    return {code: ErrorCode(code, type_, title, text) for code, type_, title, text in entries}


# Each code has a page at /docs/errors/<code>; the texts are what that page says.
CATALOG: dict[str, ErrorCode] = _catalog(
    ("invalid_request", "invalid_request", "Invalid request",
     "The request could not be understood: a malformed body, a missing field, or a value of the wrong kind."),
    ("invalid_json", "invalid_request", "Malformed JSON",
     "The request body is not valid JSON. Send a JSON object with Content-Type: application/json."),
    ("unsupported_media_type", "invalid_request", "Unsupported content type",
     "This endpoint accepts only application/json request bodies."),
    ("invalid_limit", "invalid_request", "Invalid page size",
     "The `limit` query parameter must be an integer from 1 to 100 (from 1 to 1,000 for a job log search, "
     "`GET .../jobs/{job_id}/log?q=`)."),
    ("invalid_cursor", "invalid_request", "Invalid cursor",
     "The `cursor` query parameter must be a `next_cursor` value returned by the same list endpoint."),
    ("invalid_filter", "invalid_request", "Invalid filter",
     "A list filter in the query string has a value of the wrong kind (for example a date that does not parse)."),
    ("webhook_invalid", "invalid_request", "Webhook delivery invalid",
     "The webhook lacks the X-GitHub-Event or X-GitHub-Delivery header, its payload URL names no repository "
     "(deliveries go to /webhooks/github/<owner>/<name>), its payload is about another repository than the URL "
     "names, or its payload lacks a field the event needs (such as `ref` and `after` of a push, or "
     "`pull_request.head.sha`)."),
    ("cli_code_invalid", "invalid_request", "CLI login code not valid",
     "The CLI login nonce or paste code is unknown, not yet authorized, already used, or expired. Start the login again."),
    ("idempotency_key_invalid", "invalid_request", "Idempotency key invalid",
     "The Idempotency-Key header must be 1 to 255 printable ASCII characters (letters, digits, punctuation, "
     "spaces). Send a new random value, such as a UUID, with each distinct request, and the same value when "
     "retrying it."),
    ("unauthorized", "unauthorized", "Authentication required",
     "Send `Authorization: Bearer <token>` with a session token or a personal API token that is neither revoked nor expired."),
    ("webhook_signature_invalid", "unauthorized", "Webhook signature invalid",
     "The webhook's X-Hub-Signature-256 is missing or is not the HMAC-SHA256 of the body under the webhook secret "
     "of a repository registered under the name in the payload URL. Set the same secret in GitHub and on the "
     "repository."),
    ("forbidden", "forbidden", "Forbidden",
     "The request was refused before it reached the API (for example a Host header this server does not serve)."),
    ("insufficient_org_role", "forbidden", "Role too low",
     "You are a member of this organization, but your role does not allow this action. Ask an owner or admin."),
    ("pipeline_manual_disabled", "forbidden", "Manual builds disabled",
     "This pipeline does not allow builds triggered from the API or the web pages (`allow_manual: false`); it builds from webhooks only."),
    ("route_not_found", "not_found", "No such route",
     "No API endpoint exists at this path. Check the path against /api/v0/openapi.json."),
    ("organization_not_found", "not_found", "Organization not found",
     "No organization with this slug exists that you are a member of."),
    ("pipeline_not_found", "not_found", "Pipeline not found",
     "No pipeline with this slug (or repository and source slug) exists in the organization."),
    ("build_not_found", "not_found", "Build not found",
     "No build with this number exists in the pipeline. Build numbers are decimal integers."),
    ("job_not_found", "not_found", "Job not found",
     "No job with this id exists in the build."),
    ("member_not_found", "not_found", "Member not found",
     "No member with this user id exists in the organization."),
    ("invite_not_found", "not_found", "Invite not found",
     "No pending invite with this id exists in the organization."),
    ("api_token_not_found", "not_found", "API token not found",
     "No personal API token with this id belongs to you, or it has already been revoked."),
    ("workspace_not_found", "not_found", "Workspace not found",
     "The job has no builds_in parent, or the parent left no workspace (it did not pass)."),
    ("snapshot_not_found", "not_found", "Snapshot not found",
     "The job has no builds_in parent, or the parent left no filesystem snapshot: it did not pass, it ran on "
     "an agent without a container executor, or its snapshot was not stored (too large)."),
    ("source_not_found", "not_found", "Source not found",
     "No uploaded source archive that this job credential opens: the build has none, the build is not the "
     "credential's own (or does not exist), or the credential's job has already finished."),
    ("agent_token_not_found", "not_found", "Agent token not found",
     "No agent token with this id exists in the organization."),
    ("schedule_not_found", "not_found", "Schedule not found",
     "No schedule with this id in the pipeline. Schedule ids come from the pipeline's schedule list."),
    ("secret_not_found", "not_found", "Secret not found",
     "No secret with this name exists in the organization (or, under `.../pipelines/{pipeline}/secrets`, in "
     "that pipeline). Names are case-sensitive, like environment variables."),
    ("method_not_allowed", "invalid_request", "Method not allowed",
     "This endpoint exists but does not accept this HTTP method."),
    ("last_owner", "conflict", "Last owner",
     "An organization must keep at least one owner: the last owner cannot be demoted or removed."),
    ("personal_org_owner", "conflict", "Personal organization",
     "The owner of a personal organization cannot leave or be demoted in it."),
    ("build_already_finished", "conflict", "Build already finished",
     "The build has already passed, failed or been skipped; there is nothing left to cancel."),
    ("job_not_retryable", "conflict", "Job not retryable",
     "A retry (`POST .../jobs/{job_id}/retry`) gives a job's step a new attempt. Only the latest attempt of a "
     "step that ended `failed`, `timed_out` or `canceled` can be retried, and not when its step says "
     "`retry: {manual: false}`, when it is the job that renders the pipeline, when the build failed as a whole "
     "(a rejected plan, a pipeline timeout), or while one of its prerequisites ended failed, timed out or "
     "canceled (retry that job first: its dependents come back with it). The message says which applies."),
    ("build_not_held", "conflict", "Build not waiting for approval",
     "Only a held build can be approved: one built from a pull request of another repository (a fork) on a "
     "pipeline whose `fork_pull_requests` is `require_approval`, before anyone approved or canceled it. This "
     "build holds no job waiting for approval (it was approved already, canceled, or never held)."),
    ("idempotency_key_in_progress", "conflict", "Request with this key in progress",
     "A request with this Idempotency-Key is still being processed. Retry once it has finished: the retry then "
     "gets its answer, and nothing is created twice."),
    ("job_not_active", "conflict", "Job not active",
     "The job has already finished, so an agent can no longer change it."),
    ("job_finished", "conflict", "Job finished",
     "The job has ended, so no more of its output is stored. The agent stops sending it; the job's log is what "
     "was stored before it ended."),
    ("job_not_render", "conflict", "Not a render job",
     "Only the render job of a build (the one that renders the pipeline from the repository's .hm/*.py on an agent) "
     "may send the build's pipeline."),
    ("render_failed", "validation_failed", "Pipeline render failed",
     "Rendering the pipeline from the repository's .hm/*.py failed on the agent (an exception, no such pipeline, no "
     ".hm/*.py files). The build failed before any step ran; the render job's log holds the renderer's output."),
    ("already_member", "conflict", "Already a member",
     "The invited person is already a member of this organization."),
    ("payload_too_large", "payload_too_large", "Request body too large",
     "The request body is larger than this route accepts: HARMONT_MAX_JSON_BYTES for JSON bodies, more for a "
     "build's create (its `source_b64`, HARMONT_SOURCE_MAX_BYTES) and for uploads (HARMONT_MAX_REQUEST_BYTES). "
     "The message names the limit. A body sent without Content-Length is refused once it passes the limit."),
    ("validation_failed", "validation_failed", "Validation failed",
     "One or more fields are invalid; `fields` maps each field name to its messages."),
    ("build_invalid", "validation_failed", "Build request invalid",
     "The build request is missing `branch` or `commit`, or a field such as `env` or `source_b64` is malformed; see `fields`."),
    ("build_plan_rejected", "validation_failed", "Pipeline definition rejected",
     "The v0 IR could not be planned. The build was recorded as failed; its `error_code` and `error_message` say why "
     "(invalid_json, bad_version, invalid_ir, missing_field, unknown_step_type, duplicate_key, unknown_dependency, cycle, definition_missing, "
     "limit_exceeded: the definition is past one of the limits on what a build may hold, named in the message, "
     "such as HARMONT_MAX_BUILD_JOBS; nothing of its jobs was written). "
     "A build whose pipeline is rendered on an agent fails the same way, or with `render_failed` when the render "
     "itself failed."),
    ("pipeline_envelope_invalid", "validation_failed", "Pipeline envelope invalid",
     "The pipeline envelope (what harmont.dump_registry_json() prints) is malformed or one of its pipelines is "
     "invalid; `fields` names each problem, and a definition's message starts with the planner's error code "
     "(invalid_json, bad_version, invalid_ir, missing_field, unknown_step_type, duplicate_key, unknown_dependency, "
     "cycle, definition_missing, limit_exceeded). Nothing was changed."),
    ("pipeline_slug_taken", "validation_failed", "Pipeline slug taken",
     "Another pipeline in this organization already has the slug derived from this name. Choose another name."),
    ("invite_unacceptable", "validation_failed", "Invite cannot be accepted",
     "The invite token is missing, unknown, revoked, expired or already used, the invite was sent to another "
     "email address, or you are already a member of its organization. Nothing was changed: no membership, and "
     "the invite stays as it was."),
    ("organization_invalid", "validation_failed", "Organization attributes invalid",
     "The organization's `name` is missing, blank, longer than 255 characters, or has no letter or digit (a-z, "
     "0-9) to make its slug from (`!!!` has none), or `url` is longer than 500 characters; `fields` says which. "
     "Nothing was created."),
    ("pipeline_invalid", "validation_failed", "Pipeline attributes invalid",
     "A field of the pipeline is missing or malformed: `name` (it needs a letter or digit, a-z or 0-9, to make "
     "the slug from), `repository`, `default_branch`, `visibility`, `allow_manual`, `source_slug`, a `repo_name` "
     "too long (also one derived from `repository`), or a `definition` the planner rejects (its message starts "
     "with the planner's error code, such as `cycle`). `fields` names each. Nothing was created."),
    ("invalid_role", "validation_failed", "Role not allowed",
     "A member's role is one of owner, admin and member; an invite's is admin or member, since owners are made by "
     "promoting a member. `fields` says what was wrong with `role`. Nothing was changed."),
    ("user_name_invalid", "validation_failed", "User name invalid",
     "A user's name is 1 to 255 characters once the surrounding whitespace is trimmed, without control "
     "characters (such as a newline or a tab); see `fields`. The name was not changed."),
    ("idempotency_key_reused", "validation_failed", "Idempotency key reused",
     "This Idempotency-Key was already sent to this route with a different request body (keys are kept for 24 "
     "hours, HARMONT_IDEMPOTENCY_KEY_TTL). A retry must repeat the first request exactly; a different request "
     "needs a new key. Nothing was changed."),
    ("webhook_delivery_not_found", "not_found", "Webhook delivery not found",
     "No delivery with this id (GitHub's X-GitHub-Delivery) reached a repository of this organization, or it "
     "did not verify (an unverified delivery is never recorded)."),
    ("webhook_not_found", "not_found", "Webhook endpoint not found",
     "No outbound webhook endpoint with this id exists in the organization: it was deleted, belongs to another "
     "organization, or the id is not one (ids are the UUIDs that `GET /organizations/{org}/webhooks` lists)."),
    ("cache_entry_not_found", "not_found", "Cache entry not found",
     "No step cache entry with this id exists in the organization: it was deleted (by an admin, or evicted as "
     "the least recently used past HARMONT_CACHE_MAX_BYTES), it belongs to another organization, or the id is not one (ids are the UUIDs that "
     "`GET /organizations/{org}/caches` lists)."),
    ("webhook_endpoint_invalid", "validation_failed", "Webhook endpoint invalid",
     "An outbound webhook endpoint needs a `url` that is http:// or https://, names a host, holds no user name or "
     "password, spaces or control characters and is at most 2000 characters long; `events`, a non-empty list of "
     "build.created, build.started, build.finished and job.finished; and a `description` of at most 255 "
     "characters. `fields` says what was wrong. Nothing was created or changed."),
    ("webhook_limit", "validation_failed", "Too many webhook endpoints",
     "An organization has at most 20 outbound webhook endpoints. Delete one it no longer needs "
     "(`DELETE /organizations/{org}/webhooks/{id}`) before adding another. Nothing was created."),
    ("artifact_not_found", "not_found", "Artifact not found",
     "No artifact with this id exists in the build."),
    ("artifact_path_invalid", "validation_failed", "Artifact path invalid",
     "An artifact's path must be relative to $HARMONT_ARTIFACTS: `/`-separated, at most 1000 characters, "
     "without a leading `/`, `..` segments or control characters."),
    ("artifact_checksum_mismatch", "validation_failed", "Artifact checksum mismatch",
     "The SHA-256 of the uploaded bytes differs from the `sha256` the upload named: the file changed or was "
     "damaged on the way. Nothing was stored."),
    ("artifact_exists", "conflict", "Artifact already stored",
     "The job already stored an artifact at this path with different content. Artifacts are immutable: a "
     "retried upload of the same bytes is accepted, different bytes are not."),
    ("snapshot_too_large", "payload_too_large", "Snapshot too large",
     "A job's filesystem snapshot (for its builds_in children) is larger than HARMONT_SNAPSHOT_MAX_BYTES; it is "
     "not stored, and children on other agents start from their step's image."),
    ("artifact_too_large", "payload_too_large", "Artifact too large",
     "The file is larger than one artifact may be (HARMONT_ARTIFACT_MAX_BYTES). It was not stored; the job's "
     "result is unchanged."),
    ("build_artifacts_quota_exceeded", "payload_too_large", "Build artifact quota exceeded",
     "Storing this file would take the build's artifacts together past HARMONT_BUILD_ARTIFACTS_MAX_BYTES. It was "
     "not stored; the job's result is unchanged."),
    ("rate_limited", "rate_limited", "Too many requests",
     "Slow down: this endpoint limits how often it may be called. Retry after the number of seconds in Retry-After."),
    ("server_error", "server_error", "Server error",
     "Something went wrong on the server. The request id identifies the failure in the server's logs."),
    ("database_unavailable", "server_error", "Database unavailable",
     "The server cannot reach its database right now (it is restarting, stopped or unreachable), so it answers "
     "503 with Retry-After. Nothing was changed: retry the same request once it is back (agents do this on "
     "their own, and a request with an Idempotency-Key is not applied twice)."),
)


class ApiError(Exception):
    """A domain error that the API renders as the envelope. Raised by services."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        fields: dict[str, list[str]] | None = None,
        status: int | None = None,
    ) -> None:
        entry = CATALOG[code]
        super().__init__(message)
        self.code = code
        self.type = entry.type
        self.message = message
        self.fields = fields
        self.status = status or entry.status


def validation_error(fields: dict[str, list[str]], *, code: str = "validation_failed", message: str | None = None) -> ApiError:
    names = ", ".join(sorted(fields))
    return ApiError(code, message or f"Invalid fields: {names}.", fields=fields)


# ---------------------------------------------------------------- request id

_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


def request_id_for(request: HttpRequest) -> str:
    rid = getattr(request, "request_id", None)
    if rid is None:
        incoming = request.headers.get("X-Request-Id", "")
        rid = incoming if _SANE_REQUEST_ID.match(incoming) else uuid.uuid4().hex
        request.request_id = rid  # type: ignore[attr-defined]
    return rid


def is_api_path(request: HttpRequest) -> bool:
    return request.path.startswith(API_PREFIX) or request.path == API_PREFIX.rstrip("/")


def doc_url(code: str) -> str:
    return f"{settings.PUBLIC_URL}/docs/errors/{code}"


def envelope(request: HttpRequest, code: str, message: str, *, type_: str | None = None,
             fields: dict[str, list[str]] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": type_ or CATALOG[code].type,
        "code": code,
        "message": message,
        "doc_url": doc_url(code),
        "request_id": request_id_for(request),
    }
    if fields:
        body["fields"] = fields
    return {"error": body}


def envelope_response(request: HttpRequest, code: str, message: str, *, status: int,
                      type_: str | None = None, fields: dict[str, list[str]] | None = None,
                      headers: dict[str, str] | None = None) -> JsonResponse:
    response = JsonResponse(envelope(request, code, message, type_=type_, fields=fields), status=status)
    for name, value in (headers or {}).items():
        response[name] = value
    return response


# ---------------------------------------------------------------- DRF handler

def flatten_detail(detail: Any) -> dict[str, list[str]]:
    """DRF ValidationError detail → {field: [messages]} (nested keys dotted)."""
    if isinstance(detail, dict):
        out: dict[str, list[str]] = {}
        for key, value in detail.items():
            if isinstance(value, dict):
                for sub, msgs in flatten_detail(value).items():
                    out[f"{key}.{sub}"] = msgs
            elif isinstance(value, list) and value and isinstance(value[0], dict):
                for i, item in enumerate(value):
                    for sub, msgs in flatten_detail(item).items():
                        out[f"{key}[{i}].{sub}"] = msgs
            else:
                items = value if isinstance(value, list) else [value]
                out[str(key)] = [str(m) for m in items]
        return out
    items = detail if isinstance(detail, list) else [detail]
    return {"non_field_errors": [str(m) for m in items]}


def api_exception_handler(exc: Exception, context: dict[str, Any]) -> HttpResponse | None:
    """DRF exception handler: every error becomes the envelope."""
    request = context["request"]
    if isinstance(exc, ApiError):
        return envelope_response(request, exc.code, exc.message, status=exc.status, fields=exc.fields)
    if isinstance(exc, RequestDataTooBig):
        return _too_large(request)
    if isinstance(exc, DATABASE_UNAVAILABLE_ERRORS):
        return database_unavailable(request, exc)
    if isinstance(exc, drf_exceptions.ValidationError):
        fields = flatten_detail(exc.detail)
        return envelope_response(request, "validation_failed", f"Invalid fields: {', '.join(sorted(fields))}.",
                                 status=422, fields=fields)
    if isinstance(exc, drf_exceptions.ParseError):
        return envelope_response(request, "invalid_json", f"Malformed request body: {exc.detail}", status=400)
    if isinstance(exc, drf_exceptions.UnsupportedMediaType):
        return envelope_response(request, "unsupported_media_type", str(exc.detail), status=415)
    if isinstance(exc, (drf_exceptions.NotAuthenticated, drf_exceptions.AuthenticationFailed)):
        return envelope_response(request, "unauthorized", str(exc.detail), status=401,
                                 headers={"WWW-Authenticate": 'Bearer realm="api"'})
    if isinstance(exc, drf_exceptions.MethodNotAllowed):
        return envelope_response(request, "method_not_allowed", str(exc.detail), status=405)
    if isinstance(exc, drf_exceptions.Throttled):
        wait = int(exc.wait or 1)
        return envelope_response(request, "rate_limited", f"Too many requests; retry in {wait} s.", status=429,
                                 headers={"Retry-After": str(wait)})
    if isinstance(exc, drf_exceptions.NotFound):
        return envelope_response(request, "route_not_found", str(exc.detail), status=404)
    if isinstance(exc, drf_exceptions.PermissionDenied):
        return envelope_response(request, "insufficient_org_role", str(exc.detail), status=403)
    if isinstance(exc, drf_exceptions.APIException):
        return envelope_response(request, "invalid_request", str(exc.detail), status=exc.status_code,
                                 type_="invalid_request" if exc.status_code < 500 else "server_error")
    response = drf_exception_handler(exc, context)
    if response is not None:  # Django's Http404 / PermissionDenied
        if response.status_code == 404:
            return envelope_response(request, "route_not_found", "Not found.", status=404)
        return envelope_response(request, "insufficient_org_role", "Permission denied.", status=403)
    return None  # unhandled: ApiErrorMiddleware renders the 500


def database_unavailable(request: HttpRequest, exc: BaseException) -> JsonResponse:
    """The 503 envelope for a request that failed because the database is away."""
    logger.warning("database unavailable on %s %s (request %s): %s", request.method, request.path,
                   request_id_for(request), exc)
    response = envelope_response(request, "database_unavailable", "The database is unavailable; retry shortly.",
                                 status=503, headers={"Retry-After": str(DATABASE_RETRY_AFTER_SECONDS)})
    # Logged above, once, as the warning it is: Django's request logger would log every 5xx
    # again as an error (django.utils.log.log_response skips a response marked so), and an
    # outage of a few seconds would fill the error log with one line per request.
    response._has_been_logged = True  # type: ignore[attr-defined]
    return response


def _too_large(request: HttpRequest, limit: int | None = None) -> JsonResponse:
    limit = getattr(request, "body_limit", None) if limit is None else limit
    return envelope_response(request, "payload_too_large",
                             f"Request body exceeds {limit or settings.MAX_REQUEST_BYTES} bytes.", status=413)


# ---------------------------------------------------------------- middleware

class RequestIdMiddleware:
    """Assigns the request id first and stamps it on every response."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        rid = request_id_for(request)
        if is_api_path(request):
            # Refuse bodies past the largest any route takes before anything reads them;
            # process_view applies the route's own limit.
            length = request.META.get("CONTENT_LENGTH") or "0"
            if length.isdigit() and int(length) > settings.MAX_REQUEST_BYTES:
                response: HttpResponse = _too_large(request)
                response["X-Request-Id"] = rid
                return response
        response = self.get_response(request)
        if is_api_path(request) and response.status_code >= 400 and not _is_json(response):
            # Errors raised before any view runs (a disallowed Host header, a
            # body Django refuses to read) come back as Django's HTML pages.
            response = _envelope_for_status(request, response.status_code)
        response["X-Request-Id"] = rid
        return response


    def process_view(self, request: HttpRequest, view_func: Callable[..., HttpResponse], view_args: Any,
                     view_kwargs: Any) -> HttpResponse | None:
        """The route's body limit (its view's `body_limit`, see harmont.parsers), before the body is read.

        First in the chain, so no other middleware has read the body yet.
        """
        if not is_api_path(request):
            return None
        limit = body_limit_for(view_func)
        request.body_limit = limit  # type: ignore[attr-defined]  (for the 413's message)
        length = request.META.get("CONTENT_LENGTH") or ""
        if length.isdigit():
            return _too_large(request, limit) if int(length) > limit else None
        if "chunked" in request.META.get("HTTP_TRANSFER_ENCODING", "").lower() and takes_chunked_body(view_func):
            body = read_chunked_body(request.META["wsgi.input"], limit=limit)
            if body is None:
                return _too_large(request, limit)
            # From here on it reads like any body with a length (Django and DRF read none without one).
            request.META["CONTENT_LENGTH"] = str(len(body))
            request._stream = io.BytesIO(body)  # type: ignore[attr-defined]
        return None


def _is_json(response: HttpResponse) -> bool:
    return response.get("Content-Type", "").startswith("application/json")


_CODE_FOR_STATUS = {400: "invalid_request", 401: "unauthorized", 403: "forbidden", 404: "route_not_found",
                    405: "method_not_allowed", 413: "payload_too_large", 429: "rate_limited"}


def _envelope_for_status(request: HttpRequest, status: int) -> JsonResponse:
    code = _CODE_FOR_STATUS.get(status, "server_error" if status >= 500 else "invalid_request")
    return envelope_response(request, code, CATALOG[code].title + ".", status=status)


class ApiErrorMiddleware:
    """Last line for `/api/v0`: exceptions that escaped the views become envelopes."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        return self.get_response(request)

    def process_exception(self, request: HttpRequest, exc: Exception) -> HttpResponse | None:
        if isinstance(exc, DATABASE_UNAVAILABLE_ERRORS):
            # Every route, pages too: an HTML 500 would tell a client the request itself was wrong.
            return database_unavailable(request, exc)
        if not is_api_path(request):
            return None
        if isinstance(exc, ApiError):
            return envelope_response(request, exc.code, exc.message, status=exc.status, fields=exc.fields)
        if isinstance(exc, RequestDataTooBig):
            return _too_large(request)
        logger.exception("unhandled error on %s %s (request %s)", request.method, request.path,
                         request_id_for(request))
        return envelope_response(request, "server_error", "Internal server error.", status=500)


@csrf_exempt  # API routes never depend on CSRF: an unknown one is a 404 whatever the method and cookies
def route_not_found(request: HttpRequest, *args: Any, **kwargs: Any) -> JsonResponse:
    """Catch-all for unknown paths under /api/v0."""
    return envelope_response(request, "route_not_found", f"No API route {request.method} {request.path}.",
                             status=404)


def server_error(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
    """handler500: what escaped a middleware (a session or sign-in lookup) rather than a view.

    Django calls it while handling the exception, so `sys.exc_info()` is that exception.
    """
    exc = sys.exc_info()[1]
    if isinstance(exc, DATABASE_UNAVAILABLE_ERRORS):
        return database_unavailable(request, exc)
    if is_api_path(request):
        return envelope_response(request, "server_error", "Internal server error.", status=500)
    return defaults.server_error(request, *args, **kwargs)
