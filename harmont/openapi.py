"""The error answers of /api/v0/openapi.json, documented in one place.

Views annotate what is particular to them (their success shapes, a 409 for a
conflict, a 422 for a bad field). The statuses that follow from how the API is
built are added here, for every operation they can happen on, so that no view
has to repeat them and none can forget one:

- a request body can be larger than its route allows (413, refused before any
  view runs); one the view parses (`parser_classes`) can be of a type it does not parse
  (415), and a JSON one can be malformed or not an object (400);
- a keyset page (an operation with a `cursor` parameter) can have a `limit`, `cursor`
  or filter of the wrong kind (400);
- an operation with a security requirement refuses a missing or bad credential (401);
- a path parameter can name something that does not exist or is not visible (404);
- a view whose permission checks the caller's organization role (its `required_role`
  names the method) or whose service does (`role_checked_in_service`) can refuse (403);
- a view with throttles can refuse (429), whatever its `throttle_classes` are.

All of them are the error envelope, the `Error` component (harmont.serializers.ErrorSerializer),
and so is every error answer a view names itself: documented as it leaves (application/json,
whatever the view renders on success), each with a description.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from django.core.exceptions import ImproperlyConfigured

ERROR_COMPONENT = "Error"
ERROR_SCHEMA = {"$ref": f"#/components/schemas/{ERROR_COMPONENT}"}

UNAUTHORIZED = "Missing, malformed, unknown, revoked or expired credential (`unauthorized`)."
FORBIDDEN = "Your role in the organization does not allow this (`insufficient_org_role`)."
NOT_FOUND = ("Something the path names does not exist or is not visible to you (`organization_not_found`, "
             "`pipeline_not_found`, `build_not_found`, ...).")
TOO_LARGE = "The request body is larger than this server accepts (`payload_too_large`)."
UNSUPPORTED = "The request body's Content-Type is not one this operation accepts (`unsupported_media_type`)."
RATE_LIMITED = "Too many requests (`rate_limited`); retry after the seconds in Retry-After."
MALFORMED_BODY = "the body is not JSON, or not a JSON object (`invalid_json`, `invalid_request`)"
MALFORMED_PAGE = ("a page parameter or filter has a value of the wrong kind (`invalid_limit`, `invalid_cursor`, "
                  "`invalid_filter`)")
RETRY_AFTER = {"Retry-After": {"schema": {"type": "integer"}, "description": "Seconds to wait before retrying."}}


def document_error_responses(result: dict[str, Any], generator: Any, **kwargs: Any) -> dict[str, Any]:
    """drf-spectacular postprocessing hook: add the error answers every operation can give (see the module)."""
    if ERROR_COMPONENT not in result.get("components", {}).get("schemas", {}):
        raise ImproperlyConfigured(f"No {ERROR_COMPONENT!r} component: no view names harmont's ErrorSerializer")
    for path, method, view in _operations(generator):
        operation = result["paths"].get(path, {}).get(method)
        if operation is None:  # excluded from the document
            continue
        for status, description, headers in error_answers(operation, view, method):
            _add_response(operation["responses"], status, description, headers)
        for code, answer in operation["responses"].items():
            if code.isdigit() and int(code) >= 400:
                _as_envelope(answer, int(code))
    return result


def error_answers(operation: dict[str, Any], view: Any, method: str) -> list[tuple[int, str, dict[str, Any]]]:
    """The (status, description, headers) of the error answers `operation` can give besides its own."""
    parameters = operation.get("parameters", [])
    body_types = set(operation.get("requestBody", {}).get("content", {}))
    # A view that reads its body as a raw stream (an artifact upload) never meets its parsers.
    parsed_types = body_types & {parser.media_type for parser in view.parser_classes}
    paged = any(param.get("in") == "query" and param.get("name") == "cursor" for param in parameters)
    malformed = [reason for reason, applies in ((MALFORMED_BODY, "application/json" in parsed_types),
                                                (MALFORMED_PAGE, paged)) if applies]
    answers: list[tuple[int, str, dict[str, Any]]] = []
    if malformed:
        answers.append((400, "Malformed request: " + "; or ".join(malformed) + ".", {}))
    if any(requirement for requirement in operation.get("security", [])):
        answers.append((401, UNAUTHORIZED, {}))
    if _checks_role(view, method):
        answers.append((403, FORBIDDEN, {}))
    if any(param.get("in") == "path" for param in parameters):
        answers.append((404, NOT_FOUND, {}))
    if body_types:
        answers.append((413, TOO_LARGE, {}))
    if parsed_types:
        answers.append((415, UNSUPPORTED, {}))
    if view.throttle_classes:
        answers.append((429, RATE_LIMITED, RETRY_AFTER))
    return answers


def _operations(generator: Any) -> list[tuple[str, str, Any]]:
    """(path as in the document, lower-case method, view instance) of every endpoint, as drf-spectacular saw them."""
    found = []
    for path, _regex, method, callback in generator.endpoints:
        view = generator.create_view(callback, method)
        found.append((generator.coerce_path(path, method, view), method.lower(), view))
    return found


def _checks_role(view: Any, method: str) -> bool:
    upper = method.upper()
    # Read by duck typing: harmont imports no app, and only org-scoped views carry these.
    return upper in getattr(view, "required_role", {}) or upper in getattr(view, "role_checked_in_service", ())


def _add_response(responses: dict[str, Any], status: int, description: str, headers: dict[str, Any]) -> None:
    answer = responses.setdefault(str(status), {"content": {"application/json": {"schema": dict(ERROR_SCHEMA)}}})
    # A view that names this status keeps its own schema; what it left out comes from here.
    if not answer.get("description"):
        answer["description"] = description
    for name, header in headers.items():
        answer.setdefault("headers", {}).setdefault(name, header)


def _as_envelope(answer: dict[str, Any], status: int) -> None:
    """A view's own error answer, as it leaves: JSON whatever the view renders on success."""
    content = answer.get("content", {})
    if content and all(media.get("schema") == ERROR_SCHEMA for media in content.values()):
        # drf-spectacular lists the envelope under each of the view's renderers (a job log's
        # text/plain too), but envelope_response always answers application/json.
        answer["content"] = {"application/json": {"schema": dict(ERROR_SCHEMA)}}
    if not answer.get("description"):
        # A view's own 409 or 422: its code (and `fields`) say the rest.
        answer["description"] = f"{HTTPStatus(status).phrase}: see the error's `code`."
