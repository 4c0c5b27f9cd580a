"""A log line per request (with HARMONT_LOG_FORMAT=json, harmont.log_format), and the request id on every line.

`RequestLogMiddleware` logs every request on the `harmont.requests` logger
(enabled with the json format): its route pattern, method, status, duration,
request id, the user or agent it came from and the organization; while the
request is answered, every other line logged gets its request id too. Standard
library only: a formatter and a middleware are less code than configuring a
logging framework for them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from django.http import HttpRequest, HttpResponse

from harmont.errors import request_id_for
from harmont.log_format import REQUEST_ID
from harmont.metrics import route_of

request_log = logging.getLogger("harmont.requests")


def who(request: HttpRequest) -> dict[str, Any]:
    """The caller, as far as authentication got: a user id, or an agent (and job) id, and their organization."""
    fields: dict[str, Any] = {}
    credential = getattr(request, "auth", None)
    agent_id = getattr(credential, "agent_id", None) if credential is not None else None
    if credential is not None and type(credential).__name__ == "Agent":
        fields["agent_id"] = str(credential.pk)
    elif agent_id is not None:  # a job credential
        fields.update(agent_id=str(agent_id), job_id=str(credential.pk))
    organization = getattr(credential, "organization_id", None)
    user = request.__dict__.get("user")  # only if something already resolved it: no session read here
    user = getattr(user, "_wrapped", user)
    # A person (agents authenticate as a principal without a row of their own).
    if getattr(user, "is_authenticated", False) is True and getattr(user, "pk", None) is not None:
        fields["user_id"] = user.pk
    match = getattr(request, "resolver_match", None)
    if match is not None and "org" in match.kwargs:
        fields["organization"] = match.kwargs["org"]
    elif organization is not None:
        fields["organization_id"] = organization
    return fields


def log_request(*, method: str, route: str, path: str, status: int, duration: float, **caller: Any) -> None:
    """The line of one request (`duration` in seconds; `caller` as `who` gives it), if request lines are on."""
    if request_log.isEnabledFor(logging.INFO):
        request_log.info("request", extra={"method": method, "route": route, "path": path, "status": status,
                                           "duration_ms": round(duration * 1000, 2), **caller})


class RequestLogMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        token = REQUEST_ID.set(request_id_for(request))
        started = time.perf_counter()
        try:
            response = self.get_response(request)
            if request_log.isEnabledFor(logging.INFO):
                log_request(method=request.method or "", route=route_of(request), path=request.path,
                            status=response.status_code, duration=time.perf_counter() - started, **who(request))
            return response
        finally:
            REQUEST_ID.reset(token)
