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
from pipelines.models import ForkPullRequests, Pipeline, Visibility, branch_filter_errors, protected_branches_errors
from pipelines.result_globs import DEFAULT_TEST_RESULTS_GLOB, glob_errors

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


def validate_default_retry(value: Any, *, field: str = "default_retry") -> dict | None:
    """A pipeline's `default_retry`, normalised as the planner does a step's `retry` (None: none)."""
    try:
        return ir.normalise_retry(value, f"'{field}'")
    except ir.PlanError as exc:
        raise ApiError("pipeline_invalid", f"{field} rejected: {exc.message}",
                       fields={field: [f"{exc.code}: {exc.message}"]}) from None


@transaction.atomic
def create_pipeline(*, org: Organization, name: str, repository: str, default_branch: str,
                    description: str | None = None, repo_name: str | None = None,
                    allow_manual: bool = True, visibility: str = Visibility.PRIVATE,
                    source_slug: str | None = None, definition: Any = None,
                    triggers: list | None = None,
                    fork_pull_requests: str = ForkPullRequests.BUILD_WITHOUT_SECRETS,
                    protected_branches: list[str] | None = None, default_retry: Any = None,
                    cancel_intermediate_builds: bool = False,
                    cancel_intermediate_builds_branch_filter: list[str] | None = None,
                    max_concurrent_builds: int | None = None, default_agents: Any = None,
                    test_results_glob: str = DEFAULT_TEST_RESULTS_GLOB,
                    now: datetime | None = None) -> Pipeline:
    """A new pipeline of `org`, its slug made from `name` (a slug the organization already uses is an error).

    `default_agents`: the agent selector of steps without their own (pipelines.agent_tags), stored as its map.

    Bad fields are 422 `pipeline_invalid`, a taken slug 422 `pipeline_slug_taken`; both write nothing.
    `default_retry` is checked and normalised as a step's `retry` is (`validate_default_retry`).
    """
    base = slugify_name(name, fallback="")
    if not base:
        # Without a letter or digit the slug would be a made-up fallback nobody asked for.
        raise validation_error({"name": ["Must contain a letter a-z or a digit 0-9: the pipeline's slug is made "
                                         "of them."]}, code="pipeline_invalid")
    # Names may be longer than the slug column; cut there rather than fail the INSERT.
    slug = base[:SLUG_MAX_LENGTH].rstrip("-")
    repo_name = _checked_repo_name(repo_name or derive_repo_name(repository))
    stored_definition = validate_definition(definition) if definition is not None else None
    stored_retry = validate_default_retry(default_retry)
    _check_protected_branches(protected_branches or [])
    _check_build_control(cancel_intermediate_builds_branch_filter, max_concurrent_builds)
    default_agents = checked_default_agents(default_agents)
    _check_test_results_glob(test_results_glob)
    if Pipeline.objects.filter(organization=org, slug=slug).exists():
        raise _slug_taken(slug)
    try:
        with transaction.atomic():
            return Pipeline.objects.create(
                organization=org, slug=slug, name=name, description=description, repository=repository,
                repo_name=repo_name, default_branch=default_branch,
                allow_manual=allow_manual, visibility=visibility, source_slug=source_slug or slug,
                definition=stored_definition, triggers=triggers, fork_pull_requests=fork_pull_requests,
                protected_branches=list(protected_branches or []), default_retry=stored_retry,
                cancel_intermediate_builds=cancel_intermediate_builds,
                cancel_intermediate_builds_branch_filter=(None if cancel_intermediate_builds_branch_filter is None
                                                          else list(cancel_intermediate_builds_branch_filter)),
                max_concurrent_builds=max_concurrent_builds, default_agents=default_agents,
                test_results_glob=test_results_glob.strip(), created_at=now or timezone.now(),
            )
    except IntegrityError:  # lost a race for the same slug
        raise _slug_taken(slug) from None


# What PATCH may change: the slug stays (URLs and webhooks name it) and so does `source_slug`
# (registration matches a repository's pipelines by it).
UPDATABLE_FIELDS = frozenset({"name", "description", "repository", "repo_name", "default_branch", "visibility",
                              "allow_manual", "definition", "fork_pull_requests", "protected_branches",
                              "default_retry", "cancel_intermediate_builds",
                              "cancel_intermediate_builds_branch_filter", "max_concurrent_builds",
                              "default_agents", "test_results_glob"})


def update_pipeline(*, pipeline: Pipeline, changes: dict[str, Any]) -> Pipeline:
    """Change some of a pipeline's settings (the fields in `changes`), checked as `create_pipeline` checks them.

    Every field is checked before anything is written; a bad one is 422
    `pipeline_invalid` and changes nothing. A new `repository` without a
    `repo_name` derives it again, as creating does. Builds that exist keep what
    they were created with (their IR, their secret access).
    """
    unknown = set(changes) - UPDATABLE_FIELDS
    if unknown:
        raise ValueError(f"not updatable: {sorted(unknown)}")
    values = dict(changes)
    if "name" in values and not slugify_name(values["name"], fallback=""):
        raise validation_error({"name": ["Must contain a letter a-z or a digit 0-9."]}, code="pipeline_invalid")
    if "repository" in values and not values.get("repo_name"):
        values["repo_name"] = derive_repo_name(values["repository"])
    if "repo_name" in values:
        values["repo_name"] = _checked_repo_name(values["repo_name"] or None)
    if values.get("definition") is not None:
        values["definition"] = validate_definition(values["definition"])
    if "protected_branches" in values:
        values["protected_branches"] = list(values["protected_branches"] or [])
        _check_protected_branches(values["protected_branches"])
    if "default_retry" in values:
        values["default_retry"] = validate_default_retry(values["default_retry"])
    if "default_agents" in values:
        values["default_agents"] = checked_default_agents(values["default_agents"])
    if "test_results_glob" in values:
        # Reports already parsed stay; the new patterns apply to artifacts stored from now on.
        _check_test_results_glob(values["test_results_glob"])
        values["test_results_glob"] = values["test_results_glob"].strip()
    # A raised (or removed) max_concurrent_builds admits waiting builds at the reaper's next pass.
    _check_build_control(values.get("cancel_intermediate_builds_branch_filter"), values.get("max_concurrent_builds"))
    if values:
        Pipeline.objects.filter(pk=pipeline.pk).update(**values)
        for name, value in values.items():
            setattr(pipeline, name, value)
    return pipeline


def checked_default_agents(value: Any) -> dict[str, str] | None:
    """A pipeline's `default_agents` as stored (the `{tag: pattern}` map); 422 `pipeline_invalid` when malformed."""
    try:
        return agent_tags.read_selector(value)
    except agent_tags.SelectorError as exc:
        raise ApiError("pipeline_invalid", "default_agents is invalid.",
                       fields={"default_agents": [f"The selector {exc}."]}) from None


def _check_build_control(branch_filter: list[str] | None, max_concurrent_builds: int | None) -> None:
    filter_errors = branch_filter_errors(branch_filter)
    if filter_errors:
        raise ApiError("pipeline_invalid", "cancel_intermediate_builds_branch_filter is invalid.",
                       fields={"cancel_intermediate_builds_branch_filter": filter_errors})
    if max_concurrent_builds is not None and (isinstance(max_concurrent_builds, bool) or max_concurrent_builds < 1):
        raise ApiError("pipeline_invalid", "max_concurrent_builds is invalid.",
                       fields={"max_concurrent_builds": ["Must be null or a whole number of at least 1."]})


def _check_test_results_glob(value: Any) -> None:
    errors = glob_errors(value)
    if errors:
        raise ApiError("pipeline_invalid", "test_results_glob is invalid.", fields={"test_results_glob": errors})


def _checked_repo_name(repo_name: str | None) -> str | None:
    if repo_name is not None and len(repo_name) > REPO_NAME_MAX_LENGTH:
        raise ApiError("pipeline_invalid", "repo_name is too long.",
                       fields={"repo_name": [f"Longer than {REPO_NAME_MAX_LENGTH} characters; a repository URL "
                                             "whose derived name is that long needs an explicit repo_name."]})
    return repo_name


def _check_protected_branches(patterns: list[str]) -> None:
    branch_errors = protected_branches_errors(patterns)
    if branch_errors:
        raise ApiError("pipeline_invalid", "protected_branches is invalid.",
                       fields={"protected_branches": branch_errors})


def _slug_taken(slug: str) -> ApiError:
    return ApiError("pipeline_slug_taken", f"A pipeline with slug {slug!r} already exists in this organization.",
                    fields={"name": [f"slug {slug!r} is taken"]})
