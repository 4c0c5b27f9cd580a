"""Idempotent creates: a request sent again with the same `Idempotency-Key` gets the first answer again.

A view opts in with `@idempotent` on its handler. Without the header nothing here
runs (not one query). With it:

1. the key must be 1-255 printable ASCII characters (else 400 `idempotency_key_invalid`);
2. a row (caller, route, key) is inserted `in_progress`, in its own short transaction, before the
   view runs. The unique constraint is the lock: a request racing it with the same key finds the row
   and gets 409 `idempotency_key_in_progress`, or, once the first has answered, that answer again
   with `Idempotent-Replayed: true`;
3. the view's answer (status and body) is stored on the row whatever its status below 500, domain
   errors included: a rejected build plan still leaves a failed build behind, so its retry must not
   make another. An exception or a 5xx deletes the row, so the client may retry with the same key.

The caller is the authenticated user, so a session token and a personal API token of the same
person share their keys. The same key with another body is 422 `idempotency_key_reused`; the body
is compared as parsed JSON (keys sorted, whitespace dropped), so a client that re-serialises its
request on retry is still retrying. Rows live IDEMPOTENCY_KEY_TTL_SECONDS; the reaper's pass
(`prune_idempotency_keys`) deletes them, and a row past its time counts as gone even before that.

Answers refused before the view runs (401, the role check's 403, an unknown organization's 404)
are not stored: nothing ran, so a retry is safe anyway.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db import IntegrityError
from django.http import HttpResponse, HttpResponseBase
from django.utils import timezone
from django.utils.crypto import salted_hmac
from drf_spectacular.utils import OpenApiParameter
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from harmont.crypto import decrypt_text, encrypt_text
from harmont.errors import ApiError
from harmont.serializers import ErrorSerializer
from organizations.models import IdempotencyKey, IdempotencyState, User

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
_META_NAME = "HTTP_IDEMPOTENCY_KEY"
# Printable ASCII, space included; WSGI hands other bytes over as latin-1 characters, refused here.
_VALID_KEY = re.compile(r"[\x20-\x7e]{1,255}")

IDEMPOTENCY_KEY_HEADER = OpenApiParameter(
    HEADER, str, OpenApiParameter.HEADER, required=False,
    description=(
        "1-255 printable ASCII characters, new for each distinct request (a UUID, say). A retry with the same "
        "key and body within 24 h gets the first answer again, with the response header "
        "`Idempotent-Replayed: true`, and creates nothing; another body is 422 `idempotency_key_reused`, "
        "a retry while the first is running 409 `idempotency_key_in_progress`."
    ),
)
# The answers the header adds to an operation's own (400 for a malformed key).
IDEMPOTENCY_RESPONSES = {400: ErrorSerializer, 409: ErrorSerializer, 422: ErrorSerializer}

Handler = Callable[..., HttpResponseBase]


@dataclass(frozen=True)
class KeyClaim:
    """The caller's row for its key: its own, new one (`replay` False), or a finished one to answer from."""

    row: IdempotencyKey
    replay: bool


def parse_key(raw: str) -> str:
    """The header's value, or 400 `idempotency_key_invalid`."""
    if not _VALID_KEY.fullmatch(raw):
        raise ApiError("idempotency_key_invalid",
                       f"The {HEADER} header must be 1 to 255 printable ASCII characters.")
    return raw


def route_of(request: Request) -> str:
    """The digest of what the request addresses: method, route name and URL kwargs."""
    match = request.resolver_match
    text = json.dumps([request.method, match.view_name, match.kwargs], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def request_hash(request: Request) -> str:
    """The keyed hash of the request's parsed body (a malformed body raises its own 400 here)."""
    canonical = json.dumps(request.data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return salted_hmac("harmont.idempotency", canonical, algorithm="sha256").hexdigest()


def claim_idempotency_key(*, user: User, route: str, key: str, request_hash: str, path: str,
                          now: datetime | None = None) -> KeyClaim:
    """Insert the caller's in-progress row for `key`, or find the one already there.

    The insert commits on its own (the view has not opened a transaction yet), so a
    concurrent request with the same key blocks on the unique index until it commits and
    then finds it. Another body is 422 `idempotency_key_reused`, a row still in progress
    409 `idempotency_key_in_progress`; a finished row is returned to be replayed.
    """
    now = now or timezone.now()
    fields = {"request_hash": request_hash, "path": path, "created_at": now,
              "expires_at": now + timedelta(seconds=settings.IDEMPOTENCY_KEY_TTL_SECONDS)}
    # A second try after deleting an expired row, or after the row another request had just
    # inserted was deleted again (its view failed) before we could read it.
    for _ in range(3):
        try:
            row, created = IdempotencyKey.objects.get_or_create(user=user, route=route, key=key, defaults=fields)
        except IntegrityError:  # get_or_create lost the insert and then found no row
            continue
        if created:
            return KeyClaim(row=row, replay=False)
        if row.expires_at <= now:
            # Past its time but not yet pruned: the key is free again.
            IdempotencyKey.objects.filter(pk=row.pk, expires_at__lte=now).delete()
            continue
        if row.request_hash != request_hash:
            raise ApiError("idempotency_key_reused",
                           f"The {HEADER} {key!r} was already used for a request with a different body; "
                           "send a new key for a new request.")
        if row.state == IdempotencyState.IN_PROGRESS:
            raise _in_progress(key)
        return KeyClaim(row=row, replay=True)
    raise _in_progress(key)


def _in_progress(key: str) -> ApiError:
    return ApiError("idempotency_key_in_progress",
                    f"A request with the {HEADER} {key!r} is still in progress; retry when it has finished.")


def store_idempotent_answer(*, row: IdempotencyKey, status: int, body: str) -> None:
    """Keep the answer of the request that owns `row`, for its retries."""
    IdempotencyKey.objects.filter(pk=row.pk, state=IdempotencyState.IN_PROGRESS).update(
        state=IdempotencyState.COMPLETE, response_status=status, response_body=body)


def release_idempotency_key(*, row: IdempotencyKey) -> None:
    """Forget the key whose request failed (an exception or a 5xx), so that the client may retry with it."""
    IdempotencyKey.objects.filter(pk=row.pk).delete()


def prune_idempotency_keys(*, now: datetime | None = None) -> int:
    """Delete the keys past their time (a reaper pass); how many."""
    deleted, _ = IdempotencyKey.objects.filter(expires_at__lte=now or timezone.now()).delete()
    return deleted


def replayed(row: IdempotencyKey) -> HttpResponse:
    """The stored answer, as first sent, marked as a replay."""
    response = HttpResponse(row.response_body, status=row.response_status, content_type="application/json")
    response[REPLAYED_HEADER] = "true"
    return response


def body_of(response: HttpResponseBase) -> str:
    """The JSON text the client receives: a view's Response rendered as the API renders it, or an envelope's."""
    if isinstance(response, Response):
        return JSONRenderer().render(response.data).decode()
    assert isinstance(response, HttpResponse), type(response)  # no streaming answers on these routes
    return response.content.decode()


def idempotent(handler: Handler) -> Handler:
    """Make an API view's handler honour `Idempotency-Key` (see the module's docstring).

    It runs after authentication and the permission check, so `request.user` is the caller.
    """
    return _idempotent(handler, seal=_plain, unseal=_plain)


def idempotent_sealed(handler: Handler) -> Handler:
    """`idempotent` for an answer that holds a secret shown once: the kept answer is stored encrypted.

    A retry must get the secret again (the first answer may be the one that was
    lost), so the answer is kept, but a raw secret may be in no column.
    """
    return _idempotent(handler, seal=encrypt_text, unseal=decrypt_text)


def _plain(text: str) -> str:
    return text


def _idempotent(handler: Handler, *, seal: Callable[[str], str], unseal: Callable[[str], str]) -> Handler:
    @functools.wraps(handler)
    def wrapper(view: APIView, request: Request, *args: object, **kwargs: object) -> HttpResponseBase:
        raw = request.META.get(_META_NAME)
        if raw is None:
            return handler(view, request, *args, **kwargs)
        key = parse_key(raw)
        claim = claim_idempotency_key(user=request.user, route=route_of(request), key=key,
                                      request_hash=request_hash(request), path=request.path)
        if claim.replay:
            claim.row.response_body = unseal(claim.row.response_body)  # this copy only, never saved
            return replayed(claim.row)
        try:
            try:
                response = handler(view, request, *args, **kwargs)
            except Exception as exc:
                # Domain errors are answers to keep too; DRF renders them (and re-raises the rest).
                response = view.handle_exception(exc)
        except BaseException:
            release_idempotency_key(row=claim.row)
            raise
        if response.status_code >= 500:
            release_idempotency_key(row=claim.row)
        else:
            store_idempotent_answer(row=claim.row, status=response.status_code, body=seal(body_of(response)))
        return response

    return wrapper
