"""Writes for pipelines."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from django.db import IntegrityError, transaction
from django.utils import timezone

from harmont.errors import ApiError, validation_error
from organizations.models import Organization
from organizations.services import slugify_name
from pipelines import agent_tags, ir
from pipelines.models import ForkPullRequests, Pipeline, Visibility, protected_branches_errors

_SCP_LIKE = re.compile(r"^[^/@:]+@[^/:]+:")  # git@github.com:owner/repo
_SCHEME_HOST = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://[^/]*/?")
SLUG_MAX_LENGTH = Pipeline._meta.get_field("slug").max_length
REPO_NAME_MAX_LENGTH = Pipeline._meta.get_field("repo_name").max_length


def derive_repo_name(repository: str) -> str | None:
    """`https://github.com/acme/web.git` and `git@github.com:acme/web.git` → `acme/web`."""
    path = _SCHEME_HOST.sub("", repository.strip(), count=1)
    path = _SCP_LIKE.sub("", path, count=1)
    path = path.rstrip("/")
    if path.endswith(".git"):
        path = path[: -len(".git")]
    segments = [s for s in path.split("/") if s]
    if not segments:
        return None
    return "/".join(segments[-2:])


def validate_definition(definition: Any, *, field: str = "definition") -> dict:
    """A stored definition must plan like a build's IR would; returns the decoded document."""
    try:
        doc = ir.load_ir(definition)
        ir.plan_ir(doc)
    except ir.PlanError as exc:
        raise ApiError("pipeline_invalid", f"{field} rejected: {exc.message}",
                       fields={field: [f"{exc.code}: {exc.message}"]}) from None
    return doc


@transaction.atomic
def create_pipeline(*, org: Organization, name: str, repository: str, default_branch: str,
                    description: str | None = None, repo_name: str | None = None,
                    allow_manual: bool = True, visibility: str = Visibility.PRIVATE,
                    source_slug: str | None = None, definition: Any = None,
                    triggers: list | None = None,
                    fork_pull_requests: str = ForkPullRequests.BUILD_WITHOUT_SECRETS,
                    protected_branches: list[str] | None = None, default_agents: Any = None,
                    now: datetime | None = None) -> Pipeline:
    """A new pipeline of `org`, its slug made from `name` (a slug the organization already uses is an error).

    `default_agents`: the agent selector of steps without their own (pipelines.agent_tags), stored as its map.

    Bad fields are 422 `pipeline_invalid`, a taken slug 422 `pipeline_slug_taken`; both write nothing.
    """
    base = slugify_name(name, fallback="")
    if not base:
        # Without a letter or digit the slug would be a made-up fallback nobody asked for.
        raise validation_error({"name": ["Must contain a letter a-z or a digit 0-9: the pipeline's slug is made "
                                         "of them."]}, code="pipeline_invalid")
    # Names may be longer than the slug column; cut there rather than fail the INSERT.
    slug = base[:SLUG_MAX_LENGTH].rstrip("-")
    repo_name = repo_name or derive_repo_name(repository)
    if repo_name is not None and len(repo_name) > REPO_NAME_MAX_LENGTH:
        raise ApiError("pipeline_invalid", "repo_name derived from repository is too long.",
                       fields={"repo_name": [f"The name derived from repository is longer than "
                                             f"{REPO_NAME_MAX_LENGTH} characters; give repo_name explicitly."]})
    stored_definition = validate_definition(definition) if definition is not None else None
    branch_errors = protected_branches_errors(protected_branches or [])
    if branch_errors:
        raise ApiError("pipeline_invalid", "protected_branches is invalid.",
                       fields={"protected_branches": branch_errors})
    try:
        default_agents = agent_tags.read_selector(default_agents)
    except agent_tags.SelectorError as exc:
        raise ApiError("pipeline_invalid", "default_agents is invalid.",
                       fields={"default_agents": [f"The selector {exc}."]}) from None
    if Pipeline.objects.filter(organization=org, slug=slug).exists():
        raise _slug_taken(slug)
    try:
        with transaction.atomic():
            return Pipeline.objects.create(
                organization=org, slug=slug, name=name, description=description, repository=repository,
                repo_name=repo_name, default_branch=default_branch,
                allow_manual=allow_manual, visibility=visibility, source_slug=source_slug or slug,
                definition=stored_definition, triggers=triggers, fork_pull_requests=fork_pull_requests,
                protected_branches=list(protected_branches or []), default_agents=default_agents,
                created_at=now or timezone.now(),
            )
    except IntegrityError:  # lost a race for the same slug
        raise _slug_taken(slug) from None


def _slug_taken(slug: str) -> ApiError:
    return ApiError("pipeline_slug_taken", f"A pipeline with slug {slug!r} already exists in this organization.",
                    fields={"name": [f"slug {slug!r} is taken"]})
