"""Secrets: named values injected into the environment of an organization's (or one pipeline's) jobs.

Values are stored encrypted (harmont.crypto) and only ever leave the server in
the job spec an agent claims, which also lists them under `mask` so the agent
replaces them with `[REDACTED]` in the output it ships. Nothing here logs,
returns or formats a value.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.apps import apps
from django.core.exceptions import ImproperlyConfigured
from django.db import IntegrityError, transaction
from django.db.models import Q, QuerySet
from django.utils import timezone

from harmont.crypto import decrypt_text, encrypt_text, reencrypt_text
from harmont.errors import ApiError, validation_error
from organizations.models import Organization
from pipelines.models import Pipeline, Repository, Secret

NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
NAME_MAX_LENGTH = Secret._meta.get_field("name").max_length
# 64 KiB holds any token or key file, and stays below Linux's limit on one environment
# string (MAX_ARG_STRLEN, 128 KiB), past which the agent could not start the job.
VALUE_MAX_BYTES = 64 * 1024

logger = logging.getLogger("harmont.secrets")


def is_reserved_name(name: str) -> bool:
    """Names the server sets itself (`CI`, `HARMONT`, `HARMONT_*`).

    Those are written after the secrets, so a secret under such a name would be
    silently shadowed in every job: it is refused instead.
    """
    return name in ("CI", "HARMONT") or name.startswith("HARMONT_")


def secret_errors(*, name: Any, value: Any) -> dict[str, list[str]]:
    """Per-field problems with a secret's name and value (empty: both are fine).

    Messages never quote the value.
    """
    errors: dict[str, list[str]] = {}
    if not isinstance(name, str) or not name:
        errors["name"] = ["Must be a non-empty string."]
    elif len(name) > NAME_MAX_LENGTH:
        errors["name"] = [f"Must be at most {NAME_MAX_LENGTH} characters."]
    elif not NAME_PATTERN.match(name):
        errors["name"] = ["Must be an environment variable name: letters, digits and _, not starting with a digit."]
    elif is_reserved_name(name):
        errors["name"] = ["CI, HARMONT and HARMONT_* are set by the server for every job; choose another name."]
    if not isinstance(value, str) or not value:
        errors["value"] = ["Must be a non-empty string."]
    elif "\x00" in value:
        # An environment variable can't hold a NUL byte: the agent could not start the job.
        errors["value"] = ["Must not contain NUL characters."]
    elif len(value.encode()) > VALUE_MAX_BYTES:
        errors["value"] = [f"Must be at most {VALUE_MAX_BYTES} bytes (UTF-8)."]
    return errors


def _scope(organization: Organization, pipeline: Pipeline | None) -> Q:
    if pipeline is None:
        return Q(organization=organization, pipeline__isnull=True)
    if pipeline.organization_id != organization.pk:
        raise ValueError("the pipeline belongs to another organization")
    return Q(organization=organization, pipeline=pipeline)


def list_secrets(*, organization: Organization, pipeline: Pipeline | None = None) -> QuerySet[Secret]:
    """The secrets of the organization (pipeline None) or of one pipeline, by name; without their values."""
    return Secret.objects.filter(_scope(organization, pipeline)).only("name", "protected", "updated_at").order_by("name")


@transaction.atomic
def set_secret(*, organization: Organization, name: Any, value: Any, pipeline: Pipeline | None = None,
               protected: bool | None = None, now: datetime | None = None) -> tuple[Secret, bool]:
    """Create the secret, or replace the value of the one with this name in the same scope.

    `protected` None keeps a replaced secret's flag and protects a new one
    (see `secrets_for_job`). Returns `(secret, created)`. Invalid names or
    values raise 422 `validation_failed` before anything is written.
    """
    errors = secret_errors(name=name, value=value)
    if protected is not None and not isinstance(protected, bool):
        errors["protected"] = ["Must be true or false."]
    if errors:
        raise validation_error(errors)
    now = now or timezone.now()
    scope = _scope(organization, pipeline)
    encrypted = encrypt_text(value)
    changes: dict[str, Any] = {"value_encrypted": encrypted, "updated_at": now}
    if protected is not None:
        changes["protected"] = protected
    # Update first: replacing is the common case after the first set, and a racing
    # create of the same name is caught by the partial unique constraints below.
    for _ in range(2):
        if Secret.objects.filter(scope, name=name).update(**changes):
            return Secret.objects.only("name", "protected", "updated_at").get(scope, name=name), False
        try:
            with transaction.atomic():
                secret = Secret.objects.create(organization=organization, pipeline=pipeline, name=name,
                                               value_encrypted=encrypted, protected=protected is not False,
                                               created_at=now, updated_at=now)
            return secret, True
        except IntegrityError:
            continue  # another request created it between our update and insert: update that one
    raise RuntimeError(f"secret {name!r} could not be written")  # pragma: no cover (needs two lost races)


@transaction.atomic
def set_secret_protected(*, secret: Secret, protected: bool, now: datetime | None = None) -> None:
    """Protect or unprotect a secret, keeping its value (the admin's change page)."""
    now = now or timezone.now()
    Secret.objects.filter(pk=secret.pk).update(protected=protected, updated_at=now)
    secret.protected, secret.updated_at = protected, now


@transaction.atomic
def delete_secret(*, organization: Organization, name: str, pipeline: Pipeline | None = None) -> None:
    """Delete the secret with this name in the scope; 404 `secret_not_found` when there is none."""
    deleted, _ = Secret.objects.filter(_scope(organization, pipeline), name=name).delete()
    if not deleted:
        where = f"pipeline {pipeline.slug!r}" if pipeline is not None else f"organization {organization.slug!r}"
        raise ApiError("secret_not_found", f"No secret {name!r} in {where}.")


def secrets_for_job(*, organization_id: int, pipeline_id: int | None, protected: bool = True) -> dict[str, str]:
    """Name → plain value of every secret a job of this pipeline gets, in one query.

    The pipeline's secret wins over the organization's of the same name.
    `protected=False` (a build that may not have them, see
    `builds.services.builds.secret_access_for`) leaves protected secrets
    out. The organization's value is not used in place of a withheld
    pipeline value, nor in place of an unreadable one: it may be meant for
    elsewhere. A value no configured key opens (a key removed from
    HARMONT_SECRETS_KEY too early) is left out and logged: failing the claim
    instead would make the agent retry it, claiming and stranding one job
    after another.
    """
    rows = Secret.objects.filter(Q(pipeline__isnull=True) | Q(pipeline_id=pipeline_id),
                                 organization_id=organization_id).values_list(*SECRET_ROW)
    return compose_secrets(rows, organization_id=organization_id, pipeline_id=pipeline_id, protected=protected)


# What `compose_secrets` reads of each secret of the organization (its own and its pipelines').
SECRET_ROW = ("name", "pipeline_id", "protected", "value_encrypted")


def compose_secrets(rows: Iterable[Sequence[Any]], *, organization_id: int, pipeline_id: int | None,
                    protected: bool = True) -> dict[str, str]:
    """`secrets_for_job` of rows of SECRET_ROW already read: the organization's secrets and the pipeline's
    (builds.sql.claimed_job reads them with the claimed job, in its one query)."""
    org_level: dict[str, tuple[bool, str]] = {}
    pipeline_level: dict[str, tuple[bool, str]] = {}
    for name, row_pipeline_id, is_protected, encrypted in rows:
        (org_level if row_pipeline_id is None else pipeline_level)[name] = (bool(is_protected), encrypted)
    values: dict[str, str] = {}
    for name, (is_protected, encrypted) in {**org_level, **pipeline_level}.items():
        if is_protected and not protected:
            continue
        try:
            values[name] = decrypt_text(encrypted)
        except ImproperlyConfigured:
            level = f"pipeline {pipeline_id}" if name in pipeline_level else "organization level"
            logger.error("secret %s of organization %s (%s) can't be decrypted with HARMONT_SECRETS_KEY; "
                         "jobs run without it", name, organization_id, level)
    return values


# Rows read and rewritten per query when re-encrypting.
ROTATE_BATCH = 500


@dataclass
class RotationCount:
    rotated: int = 0
    current: int = 0  # already under the first key
    unreadable: int = 0  # no configured key opens it: left as it is


def _rotate_column(queryset: QuerySet[Any], column: str) -> RotationCount:
    count = RotationCount()
    last_pk = None
    while True:
        page = queryset.order_by("pk")
        if last_pk is not None:
            page = page.filter(pk__gt=last_pk)
        rows = list(page.values_list("pk", column)[:ROTATE_BATCH])
        if not rows:
            return count
        last_pk = rows[-1][0]
        for pk, token in rows:
            try:
                new = reencrypt_text(token)
            except ImproperlyConfigured:
                count.unreadable += 1
                logger.error("%s %s can't be decrypted with HARMONT_SECRETS_KEY; left as it is",
                             queryset.model._meta.model_name, pk)
                continue
            if new is None:
                count.current += 1
            # Compare-and-set on the value read: a value set meanwhile is already under the first key.
            elif queryset.model._default_manager.filter(pk=pk, **{column: token}).update(**{column: new}):
                count.rotated += 1
            else:
                count.current += 1


def rotate_encryption() -> dict[str, RotationCount]:
    """Re-encrypt every secret, webhook secret, GitHub token and webhook endpoint secret with the first key of HARMONT_SECRETS_KEY.

    Afterwards the other keys open nothing and can be removed. Safe to run
    again (values already under the first key are left) and beside live
    writes (each row is rewritten only if it still holds the value read).
    """
    return {
        "secrets": _rotate_column(Secret.objects.all(), "value_encrypted"),
        "webhook secrets": _rotate_column(Repository.objects.exclude(webhook_secret_encrypted=""),
                                          "webhook_secret_encrypted"),
        "GitHub tokens": _rotate_column(Repository.objects.exclude(github_token_encrypted=""),
                                        "github_token_encrypted"),
        # Through the app registry: the builds app depends on this one, not the other way round.
        "webhook endpoint secrets": _rotate_column(apps.get_model("builds", "WebhookEndpoint").objects.all(),
                                                   "secret_encrypted"),
    }
