"""`POST /webhooks/github/<owner>/<name>`: GitHub's push and pull_request deliveries start builds.

A plain Django view outside /api/v0: GitHub authenticates with the HMAC of the
body (`X-Hub-Signature-256`), not a bearer token or a session, and it sends no
CSRF token. Its answers are JSON and its errors the API's envelope, written
out here because the envelope middleware covers /api/v0 only.

The URL names the repository so that its secrets are known before the body is
looked at: the HMAC is checked over the raw bytes first, and only a delivery
that verifies is ever parsed. Nothing anyone can send unsigned reaches a parser.

A verified delivery is recorded and answered 202; a task builds what it triggers
(builds.tasks), so GitHub's ten-second timeout never meets a slow build create.
"""

from __future__ import annotations

import json
import logging
from functools import wraps
from typing import Any, Callable
from urllib.parse import parse_qs

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from builds import services, webhooks
from builds.models import WebhookDelivery
from harmont.errors import DATABASE_UNAVAILABLE_ERRORS, ApiError, database_unavailable, envelope_response

logger = logging.getLogger("harmont.webhooks")

DELIVERY_ID_MAX_LENGTH = WebhookDelivery._meta.get_field("delivery_id").max_length


def _json_errors(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """Domain errors, oversized bodies and crashes leave as the envelope, like the API's."""

    @wraps(view)
    def wrapped(request: HttpRequest, **kwargs: Any) -> HttpResponse:
        try:
            return view(request, **kwargs)
        except ApiError as exc:
            return envelope_response(request, exc.code, exc.message, status=exc.status, fields=exc.fields)
        except RequestDataTooBig:
            return _too_large(request)
        except DATABASE_UNAVAILABLE_ERRORS as exc:
            return database_unavailable(request, exc)
        except Exception:
            logger.exception("webhook delivery failed")
            return envelope_response(request, "server_error", "Internal server error.", status=500)

    return wrapped


def _too_large(request: HttpRequest) -> JsonResponse:
    limit = min(settings.WEBHOOK_MAX_BYTES, settings.MAX_REQUEST_BYTES)
    return envelope_response(request, "payload_too_large", f"Webhook body exceeds {limit} bytes.", status=413)


def _unauthorized(request: HttpRequest) -> JsonResponse:
    # One answer for a missing signature, a wrong one and an unknown repository,
    # so a caller without the secret learns nothing about which repositories exist.
    return envelope_response(request, "webhook_signature_invalid",
                             "The X-Hub-Signature-256 signature does not verify for this repository.", status=401)


def _decode(request: HttpRequest, body: bytes) -> Any:
    """The payload, sent as application/json or (GitHub's other choice) as a `payload` form field."""
    if request.content_type == "application/x-www-form-urlencoded":
        fields = parse_qs(body.decode("utf-8"), strict_parsing=False)
        raw = fields.get("payload", [""])[0]
    else:
        raw = body.decode("utf-8")
    return json.loads(raw)


@csrf_exempt
@_json_errors
def github_webhook(request: HttpRequest, repo_name: str | None = None) -> HttpResponse:
    """Verify a delivery against every repository registered under the URL's name, record it, queue its task."""
    if request.method != "POST":
        return envelope_response(request, "method_not_allowed", f"Method {request.method} not allowed; POST a "
                                 "GitHub webhook delivery.", status=405, headers={"Allow": "POST"})
    # Everything up to the HMAC is decided from the headers and the URL: the body is not
    # read before its size is known to be acceptable, nor parsed before it verifies.
    length = request.META.get("CONTENT_LENGTH") or "0"
    if length.isdigit() and int(length) > settings.WEBHOOK_MAX_BYTES:
        return _too_large(request)
    if not repo_name:
        return envelope_response(request, "webhook_invalid", "Name the repository in the payload URL: "
                                 "/webhooks/github/<owner>/<name>, as registered.", status=400)
    signature = request.headers.get("X-Hub-Signature-256", "")
    if not signature:
        return _unauthorized(request)
    event_name = request.headers.get("X-GitHub-Event", "").strip()
    delivery_id = request.headers.get("X-GitHub-Delivery", "").strip()
    if not event_name or not delivery_id or len(delivery_id) > DELIVERY_ID_MAX_LENGTH:
        return envelope_response(request, "webhook_invalid",
                                 "The X-GitHub-Event and X-GitHub-Delivery headers are required "
                                 f"(a delivery id of at most {DELIVERY_ID_MAX_LENGTH} characters).", status=400)
    body = request.body
    repositories = services.verified_repositories(repo_name=repo_name, body=body, signature=signature)
    if not repositories:
        return _unauthorized(request)

    try:
        payload = _decode(request, body)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        return envelope_response(request, "invalid_json", f"The webhook body is not valid JSON: {exc}", status=400)
    named = webhooks.repository_full_name(payload)
    if named is not None and named.lower() != repo_name.lower():
        # Signed by this repository's secret, but about another one (a secret shared by
        # two repositories): it must not build this one at the other's commit.
        return envelope_response(request, "webhook_invalid", f"The payload is for repository {named!r}, but "
                                 f"the URL names {repo_name!r}.", status=400)
    if event_name == "ping":
        return JsonResponse({"ok": True})
    if event_name not in webhooks.SUPPORTED_EVENTS:
        return JsonResponse({"ok": True, "event": event_name, "ignored": True}, status=202)
    try:
        event = webhooks.parse_event(event_name, payload)
    except webhooks.PayloadError as exc:
        return envelope_response(request, "webhook_invalid", str(exc), status=400)
    # Checked now, so that a payload that can't make a build is refused to GitHub (and shown in
    # its delivery log) instead of failing later, where only the task's record would tell.
    services.delivery_build_request(event)
    recorded = [services.record_webhook_delivery(repository=repository, delivery_id=delivery_id,
                                                 event_name=event_name, payload=payload)
                for repository in repositories]
    # 202: verified and recorded; what it builds is decided by a task, and shown at
    # GET /api/v0/organizations/{org}/webhook-deliveries/{delivery_id}. A redelivery queues nothing.
    return JsonResponse({"ok": True, "event": event_name, "delivery_id": delivery_id,
                         "queued": any(delivery is not None for delivery in recorded)}, status=202)
