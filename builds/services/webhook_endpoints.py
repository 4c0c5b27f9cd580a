"""An organization's outbound webhook endpoints: the URLs told about its builds (builds.services.notifications).

Each endpoint has a Standard Webhooks secret (`whsec_` + base64 of 32 random
bytes) that the server signs every message with. The server must read it back
to sign, so it is stored encrypted (harmont.crypto), not hashed, and the raw
value leaves the server once: in the answer that created the endpoint.
"""

from __future__ import annotations

import base64
import secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from django.db import transaction
from django.utils import timezone

from builds.models import WebhookEndpoint, WebhookEvent
from harmont.crypto import encrypt_text
from harmont.errors import ApiError, validation_error
from harmont.serializers import parse_uuid
from organizations.models import Organization, User

MAX_ENDPOINTS_PER_ORGANIZATION = 20
URL_MAX_LENGTH = WebhookEndpoint._meta.get_field("url").max_length
DESCRIPTION_MAX_LENGTH = WebhookEndpoint._meta.get_field("description").max_length
SECRET_PREFIX = "whsec_"  # what standardwebhooks.Webhook strips before decoding the key
INVALID_CODE = "webhook_endpoint_invalid"


@dataclass(frozen=True)
class IssuedEndpoint:
    """An endpoint and its raw secret; the raw value exists only here, once."""

    endpoint: WebhookEndpoint
    secret: str


def new_endpoint_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode("ascii")


def url_errors(url: Any) -> list[str]:
    """What is wrong with `url` as an endpoint's address ([] if nothing); the API, the page and the admin share it."""
    if not isinstance(url, str):
        return ["Must be a string."]
    if not url.strip():
        return ["This field may not be blank."]
    if len(url) > URL_MAX_LENGTH:
        return [f"Ensure this field has no more than {URL_MAX_LENGTH} characters."]
    # http.client refuses such a URL at every attempt; refused here, it never becomes a failed delivery.
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7f for c in url):
        return ["Must not contain spaces or control characters."]
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises for a port that is not a number from 0 to 65535)
    except ValueError:
        return ["Is not a valid URL."]
    if parts.scheme not in ("http", "https"):
        return ["Must be an http:// or https:// URL."]
    if not parts.hostname:
        return ["Must name a host."]
    # A user:password part would travel in every stored copy of the URL and in the admin; a
    # receiver that wants a credential finds it in the signature.
    if "@" in parts.netloc:
        return ["Must not contain a user name or password."]
    return []


def normalized_events(events: Any) -> tuple[list[str], list[str]]:
    """(the subscribed events without duplicates, in WebhookEvent's order; what is wrong with `events`)."""
    if not isinstance(events, (list, tuple)) or not events:
        return [], [f"Must be a non-empty list of events: {', '.join(WebhookEvent.values)}."]
    unknown = [event for event in events if event not in WebhookEvent.values]
    if unknown:
        return [], [f"{event!r} is not one of {', '.join(WebhookEvent.values)}." for event in unknown]
    return [event for event in WebhookEvent.values if event in events], []


def endpoint_errors(*, url: Any, events: Any, description: Any) -> dict[str, list[str]]:
    """What is wrong with an endpoint's fields, by field ({} if nothing)."""
    errors = {"url": url_errors(url), "events": normalized_events(events)[1]}
    if not isinstance(description, str):
        errors["description"] = ["Must be a string."]
    elif len(description.strip()) > DESCRIPTION_MAX_LENGTH:
        errors["description"] = [f"Ensure this field has no more than {DESCRIPTION_MAX_LENGTH} characters."]
    return {name: messages for name, messages in errors.items() if messages}


def _checked(*, url: Any, events: Any, description: Any) -> tuple[str, list[str], str]:
    fields = endpoint_errors(url=url, events=events, description=description)
    if fields:
        raise validation_error(fields, code=INVALID_CODE)
    return url, normalized_events(events)[0], description.strip()


def limit_error(organization: Organization) -> ApiError:
    return ApiError("webhook_limit", f"{organization.slug} has {MAX_ENDPOINTS_PER_ORGANIZATION} webhook endpoints, "
                                     "the most an organization may have; delete one before adding another.")


def create_webhook_endpoint(*, organization: Organization, url: str, events: Sequence[str], description: str = "",
                            created_by: User | None = None, now: datetime | None = None) -> IssuedEndpoint:
    """A new endpoint of `organization` for `events`; its raw secret is in the result only.

    422 `webhook_endpoint_invalid` with `fields` for a bad URL, event list or
    description, 422 `webhook_limit` when the organization has
    MAX_ENDPOINTS_PER_ORGANIZATION already; nothing is created then.
    """
    url, events, description = _checked(url=url, events=events, description=description)
    secret = new_endpoint_secret()
    with transaction.atomic():
        # The organization's row lock makes count-then-insert one step: two creates racing
        # for the last place can't both see 19. (SQLite serializes writers anyway.)
        if not list(Organization.objects.select_for_update().filter(pk=organization.pk).values_list("pk", flat=True)):
            raise ApiError("organization_not_found", f"No organization {organization.slug!r}.")
        if WebhookEndpoint.objects.filter(organization=organization).count() >= MAX_ENDPOINTS_PER_ORGANIZATION:
            raise limit_error(organization)
        endpoint = WebhookEndpoint.objects.create(
            organization=organization, url=url, events=events, description=description,
            secret_encrypted=encrypt_text(secret), created_by=created_by, created_at=now or timezone.now())
    return IssuedEndpoint(endpoint, secret)


def update_webhook_endpoint(*, endpoint: WebhookEndpoint, url: str, events: Sequence[str],
                            description: str) -> WebhookEndpoint:
    """Change where an endpoint is and what it hears about (the admin's edit); its secret stays.

    Messages already recorded go to the new URL; events it no longer hears
    about stop from the next build or job event on.
    """
    endpoint.url, endpoint.events, endpoint.description = _checked(url=url, events=events, description=description)
    endpoint.save(update_fields=["url", "events", "description"])
    return endpoint


def delete_webhook_endpoint(*, endpoint: WebhookEndpoint) -> None:
    """Delete the endpoint with every message recorded for it: nothing more is posted to it.

    A task posting one of them at that moment records nothing of its attempt
    (its compare-and-set finds no queued message).
    """
    with transaction.atomic():
        endpoint.delete()


def get_webhook_endpoint(*, organization: Organization, endpoint_id: str | uuid.UUID) -> WebhookEndpoint:
    """The organization's endpoint `endpoint_id`; 404 `webhook_not_found` for another's, a deleted or a malformed id."""
    pk = parse_uuid(endpoint_id)
    endpoint = WebhookEndpoint.objects.filter(organization=organization, pk=pk).first() if pk else None
    if endpoint is None:
        raise ApiError("webhook_not_found", f"No webhook endpoint {endpoint_id} in organization {organization.slug!r}.")
    return endpoint
