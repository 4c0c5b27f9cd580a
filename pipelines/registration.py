"""Registering a repository's pipelines from its pipeline envelope.

The envelope is what `harmont.dump_registry_json()` prints for a repository's
`.hm/*.py`: `{"schema_version": "1", "pipelines": [{slug, name, allow_manual,
triggers, definition}]}`. Registering it creates or updates one pipeline per
entry and archives the pipelines an earlier registration of the same
repository created whose entry is gone. All or nothing: an invalid envelope
changes nothing.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.db import IntegrityError, transaction
from django.db.models.functions import Lower
from django.utils import timezone

from harmont.crypto import encrypt_text
from harmont.errors import ApiError
from organizations.models import Organization
from organizations.services import slugify_name
from pipelines import ir
from pipelines.models import Pipeline, Repository
from pipelines.services import REPO_NAME_MAX_LENGTH, SLUG_MAX_LENGTH, derive_repo_name

# What the harmont package allows for `@hm.pipeline(slug)`.
SOURCE_SLUG = re.compile(r"^[a-z][a-z0-9-]{0,63}$")
PULL_REQUEST_TYPES = frozenset({"opened", "synchronize", "reopened", "closed", "ready_for_review"})
MAX_PIPELINES = 100
WEBHOOK_SECRET_MAX = 1000


@dataclass(frozen=True)
class EnvelopeEntry:
    source_slug: str
    name: str
    allow_manual: bool
    triggers: list[dict[str, Any]]
    definition: dict[str, Any]


@dataclass(frozen=True)
class Registration:
    repository: Repository
    pipelines: list[Pipeline]  # in envelope order
    archived: list[str]  # slugs


def _string_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) and v for v in value)


def trigger_errors(trigger: Any) -> list[str]:
    """What is wrong with one trigger as the harmont package writes them (empty: nothing)."""
    if not isinstance(trigger, dict):
        return ["must be an object"]
    event = trigger.get("event")
    errors = []
    if event == "push":
        if ("branches" in trigger) == ("tags" in trigger):
            errors.append("a push trigger names exactly one of branches or tags")
        for key in ("branches", "tags"):
            if key in trigger and not _string_list(trigger[key]):
                errors.append(f"{key} must be a non-empty list of glob strings")
    elif event == "pull_request":
        if "branches" in trigger and not _string_list(trigger["branches"]):
            errors.append("branches must be a non-empty list of glob strings")
        types = trigger.get("types")
        if not _string_list(types) or not set(types) <= PULL_REQUEST_TYPES:
            errors.append(f"types must be a non-empty list of: {', '.join(sorted(PULL_REQUEST_TYPES))}")
    else:
        errors.append("event must be 'push' or 'pull_request'")
    return errors


def parse_envelope(envelope: Any) -> list[EnvelopeEntry]:
    """Validate the whole envelope; 422 `pipeline_envelope_invalid` listing every problem.

    Definitions are planned like a build's IR would be; their messages start
    with the planner's error code (`cycle: ...`).
    """
    fields: dict[str, list[str]] = {}
    if isinstance(envelope, (str, bytes)):
        try:
            envelope = json.loads(envelope)
        except (ValueError, RecursionError):
            raise _invalid({"envelope": ["Not valid JSON."]}) from None
    if not isinstance(envelope, dict):
        raise _invalid({"envelope": ["Must be the pipeline envelope object (or that object as a JSON string)."]})
    if envelope.get("schema_version") != "1":
        fields["envelope.schema_version"] = ['Must be "1".']
    pipelines = envelope.get("pipelines")
    if not isinstance(pipelines, list):
        raise _invalid({**fields, "envelope.pipelines": ["Must be a list."]})
    if len(pipelines) > MAX_PIPELINES:
        raise _invalid({**fields, "envelope.pipelines": [f"At most {MAX_PIPELINES} pipelines per repository."]})
    entries: list[EnvelopeEntry] = []
    seen: set[str] = set()
    for index, raw in enumerate(pipelines):
        where = f"envelope.pipelines[{index}]"
        if not isinstance(raw, dict):
            fields[where] = ["Must be an object."]
            continue
        slug = raw.get("slug")
        if not isinstance(slug, str) or not SOURCE_SLUG.match(slug):
            fields[f"{where}.slug"] = ["Must match [a-z][a-z0-9-]{0,63}."]
        elif slug in seen:
            fields[f"{where}.slug"] = [f"Duplicate pipeline slug {slug!r}."]
        else:
            seen.add(slug)
        name = raw.get("name", slug)
        if not isinstance(name, str) or not name or len(name) > 255:
            fields[f"{where}.name"] = ["Must be a non-empty string of at most 255 characters."]
        allow_manual = raw.get("allow_manual", True)
        if not isinstance(allow_manual, bool):
            fields[f"{where}.allow_manual"] = ["Must be true or false."]
        triggers = raw.get("triggers", [])
        if not isinstance(triggers, list):
            fields[f"{where}.triggers"] = ["Must be a list."]
            triggers = []
        for t_index, trigger in enumerate(triggers):
            if problems := trigger_errors(trigger):
                fields[f"{where}.triggers[{t_index}]"] = problems
        definition = raw.get("definition")
        try:
            document = ir.load_ir(definition) if definition is not None else None
            if document is None:
                raise ir.PlanError("definition_missing", "The entry has no definition.")
            ir.plan_ir(document)
        except ir.PlanError as exc:
            fields[f"{where}.definition"] = [f"{exc.code}: {exc.message}"]
            continue
        if not any(key.startswith(where) for key in fields):
            entries.append(EnvelopeEntry(source_slug=slug, name=name, allow_manual=allow_manual,
                                         triggers=triggers, definition=document))
    if fields:
        raise _invalid(fields)
    return entries


def _invalid(fields: dict[str, list[str]]) -> ApiError:
    first = next(iter(fields))
    return ApiError("pipeline_envelope_invalid", f"The pipeline envelope is invalid ({first}: {fields[first][0]}).",
                    fields=fields)


def pipeline_slug(repo_name: str, source_slug: str) -> str:
    """`Acme/Web` + `ci` → `acme-web-ci` (cut to the column, keeping the source slug)."""
    head = slugify_name(repo_name, fallback="repo")[: SLUG_MAX_LENGTH - len(source_slug) - 1].rstrip("-")
    return f"{head}-{source_slug}"


def register_pipelines(*, org: Organization, repository: str, envelope: Any, default_branch: str,
                       repo_name: str | None = None, webhook_secret: str | None = None,
                       github_token: str | None = None, now: datetime | None = None) -> Registration:
    """Create or update a repository's pipelines from its envelope; archive the ones that disappeared.

    Idempotent: the same envelope again changes nothing but `updated_at`.
    `webhook_secret` and `github_token` (what commit statuses are posted with): None keeps
    the stored one, "" removes it.
    """
    entries = parse_envelope(envelope)
    repo_name = repo_name or derive_repo_name(repository)
    if not repo_name or len(repo_name) > REPO_NAME_MAX_LENGTH:
        raise ApiError("validation_failed", "repo_name is missing or too long.", fields={"repo_name": [
            f"Give repo_name (owner/name, at most {REPO_NAME_MAX_LENGTH} characters); "
            f"it could not be derived from repository."]})
    for name, value in (("webhook_secret", webhook_secret), ("github_token", github_token)):
        if value is not None and len(value) > WEBHOOK_SECRET_MAX:
            raise ApiError("validation_failed", f"{name} is too long.",
                           fields={name: [f"At most {WEBHOOK_SECRET_MAX} characters."]})
    now = now or timezone.now()
    try:
        with transaction.atomic():
            return _register(org=org, url=repository, repo_name=repo_name, default_branch=default_branch,
                             webhook_secret=webhook_secret, github_token=github_token, entries=entries,
                             now=now)
    except IntegrityError:
        # A concurrent registration of the same repository inserted its row first; ours now finds it.
        with transaction.atomic():
            return _register(org=org, url=repository, repo_name=repo_name, default_branch=default_branch,
                             webhook_secret=webhook_secret, github_token=github_token, entries=entries,
                             now=now)


def _register(*, org: Organization, url: str, repo_name: str, default_branch: str, webhook_secret: str | None,
              github_token: str | None, entries: list[EnvelopeEntry], now: datetime) -> Registration:
    repo = (Repository.objects.select_for_update().annotate(name_lower=Lower("repo_name"))
            .filter(organization=org, name_lower=repo_name.lower()).first())
    if repo is None:
        repo = Repository.objects.create(organization=org, url=url, repo_name=repo_name, created_at=now,
                                         updated_at=now)
    repo.url, repo.repo_name, repo.updated_at = url, repo_name, now
    if webhook_secret is not None:
        repo.webhook_secret_encrypted = encrypt_text(webhook_secret) if webhook_secret else ""
    if github_token is not None:
        repo.github_token_encrypted = encrypt_text(github_token) if github_token else ""
    repo.save()

    slugs = [pipeline_slug(repo_name, entry.source_slug) for entry in entries]
    existing = {p.slug: p for p in Pipeline.objects.select_for_update().filter(organization=org, slug__in=slugs)}
    taken = {
        f"envelope.pipelines[{i}].slug": [f"Pipeline slug {slug!r} is taken by a pipeline of another repository."]
        for i, slug in enumerate(slugs)
        if slug in existing and not _belongs(existing[slug], repo, entries[i].source_slug)
    }
    if taken:
        raise ApiError("pipeline_slug_taken", "A pipeline slug this envelope needs is taken.", fields=taken)

    pipelines = []
    for slug, entry in zip(slugs, entries):
        values = {
            "name": entry.name, "repository": url, "repo_name": repo_name, "default_branch": default_branch,
            "allow_manual": entry.allow_manual, "source_slug": entry.source_slug, "definition": entry.definition,
            "triggers": entry.triggers, "registered_from": repo, "archived_at": None,
        }
        pipeline = existing.get(slug)
        if pipeline is None:
            pipeline = Pipeline.objects.create(organization=org, slug=slug, created_at=now, **values)
        else:
            for field, value in values.items():
                setattr(pipeline, field, value)
            pipeline.save(update_fields=list(values))
        pipelines.append(pipeline)

    gone = Pipeline.objects.filter(registered_from=repo, archived_at__isnull=True).exclude(slug__in=slugs)
    archived = sorted(gone.values_list("slug", flat=True))
    gone.update(archived_at=now)
    return Registration(repository=repo, pipelines=pipelines, archived=archived)


def _belongs(pipeline: Pipeline, repo: Repository, source_slug: str) -> bool:
    """May registration take over this pipeline? Its own, or one made by hand for the same repository and slug."""
    if pipeline.registered_from_id is not None:
        return pipeline.registered_from_id == repo.pk
    return (pipeline.repo_name or "").lower() == repo.repo_name.lower() and pipeline.source_slug == source_slug
