"""Pipelines: a repeatable CI workflow of one organization."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MinValueValidator
from django.db import models
from django.db.models.functions import Lower
from django.utils import timezone

from organizations.models import Organization
from pipelines import agent_tags
from pipelines.result_globs import DEFAULT_TEST_RESULTS_GLOB, GLOB_MAX_CHARS, validate_glob


class Visibility(models.TextChoices):
    PRIVATE = "private"
    PUBLIC = "public"


class ForkPullRequests(models.TextChoices):
    """What a pull request from another repository (a fork) builds: code nobody in the organization reviewed."""

    BUILD_WITHOUT_SECRETS = "build_without_secrets"
    SKIP = "skip"
    # Built with its jobs held until an admin or owner approves the build.
    REQUIRE_APPROVAL = "require_approval"


# Enough for any branch policy; each is a glob of a branch name (branch names are at most 255 characters).
PROTECTED_BRANCHES_MAX = 50


def protected_branches_errors(value: object) -> list[str]:
    """What is wrong with a `protected_branches` list (empty: nothing)."""
    if not isinstance(value, list):
        return ["Must be a list of branch name patterns."]
    if len(value) > PROTECTED_BRANCHES_MAX:
        return [f"At most {PROTECTED_BRANCHES_MAX} patterns."]
    if not all(isinstance(p, str) and p.strip() and len(p) <= 255 for p in value):
        return ["Each pattern must be a non-empty string of at most 255 characters."]
    return []


def validate_protected_branches(value: object) -> None:
    errors = protected_branches_errors(value)
    if errors:
        raise ValidationError(errors)


def validate_default_retry(value: object) -> None:
    """The admin's check of `default_retry`: what the planner accepts (pipelines.ir.normalise_retry)."""
    from pipelines import ir

    try:
        ir.normalise_retry(value, "default_retry")
    except ir.PlanError as exc:
        raise ValidationError(f"{exc.code}: {exc.message}") from None
def branch_filter_errors(value: object) -> list[str]:
    """What is wrong with a `cancel_intermediate_builds_branch_filter` (null is the default rule)."""
    if value is None:
        return []
    return protected_branches_errors(value)


def validate_branch_filter(value: object) -> None:
    errors = branch_filter_errors(value)
    if errors:
        raise ValidationError(errors)


def default_agents_errors(value: object) -> list[str]:
    """What is wrong with a `default_agents` selector (empty: nothing); the planner's rules for a step's `agents`."""
    try:
        agent_tags.read_selector(value)
    except agent_tags.SelectorError as exc:
        return [f"The selector {exc}."]
    return []


def validate_default_agents(value: object) -> None:
    errors = default_agents_errors(value)
    if errors:
        raise ValidationError(errors)


class PipelineQuerySet(models.QuerySet["Pipeline"]):
    def for_org(self, org: Organization) -> "PipelineQuerySet":
        return self.filter(organization=org, archived_at__isnull=True)


class Pipeline(models.Model):
    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="pipelines")
    slug = models.SlugField(max_length=100)
    name = models.CharField(max_length=255)
    description = models.TextField(blank=True, null=True)
    repository = models.CharField(max_length=500)
    repo_name = models.CharField(max_length=255, blank=True, null=True)
    default_branch = models.CharField(max_length=255)
    visibility = models.CharField(max_length=10, choices=Visibility.choices, default=Visibility.PRIVATE)
    allow_manual = models.BooleanField(default=True)
    # The pipeline's name inside its repository (`@hm.pipeline("ci")`).
    source_slug = models.CharField(max_length=100)
    definition = models.JSONField(null=True, blank=True)
    triggers = models.JSONField(null=True, blank=True)
    fork_pull_requests = models.CharField(max_length=24, choices=ForkPullRequests.choices,
                                          default=ForkPullRequests.BUILD_WITHOUT_SECRETS)
    # Branches besides the default one whose builds of the stored definition get protected
    # secrets: fnmatch patterns (`release/*`), matched case-sensitively like git refs.
    protected_branches = models.JSONField(default=list, blank=True, validators=[validate_protected_branches])
    # The `retry` of every step that sets none (Buildkite's shape, stored normalised; null: none).
    default_retry = models.JSONField(null=True, blank=True, validators=[validate_default_retry])
    # A new build on a branch cancels the branch's older scheduled and running builds (Buildkite's
    # "cancel intermediate builds"). The filter is a list of fnmatch patterns, `!pattern` excluding;
    # null: every branch except the default branch.
    cancel_intermediate_builds = models.BooleanField(default=False)
    cancel_intermediate_builds_branch_filter = models.JSONField(null=True, blank=True,
                                                                validators=[validate_branch_filter])
    # At most this many builds of the pipeline are scheduled or running at once; later ones wait
    # (`Build.waiting_reason`). Null: no limit.
    max_concurrent_builds = models.PositiveIntegerField(null=True, blank=True, validators=[MinValueValidator(1)])
    # The agent selector of steps without their own `agents` (pipelines.agent_tags), stored
    # as the `{key: pattern}` map; NULL: none (jobs want `queue=default`).
    default_agents = models.JSONField(null=True, blank=True, validators=[validate_default_agents])
    # Which artifacts are JUnit XML reports, parsed into test results (pipelines.result_globs); empty: none.
    test_results_glob = models.CharField(max_length=GLOB_MAX_CHARS, blank=True, default=DEFAULT_TEST_RESULTS_GLOB,
                                         validators=[validate_glob])
    # Set once a report of one of its builds was parsed: until then the pipeline page reads no test failures.
    has_test_results = models.BooleanField(default=False)
    # The last build number handed out. Incremented under the row lock inside the
    # transaction that inserts the build, so numbers have no gaps or duplicates.
    build_counter = models.PositiveIntegerField(default=0)
    # Set when the pipeline was registered from its repository's pipeline envelope;
    # re-registering archives the ones whose entry disappeared.
    registered_from = models.ForeignKey("Repository", null=True, blank=True, on_delete=models.SET_NULL,
                                        related_name="pipelines")
    created_at = models.DateTimeField(default=timezone.now)
    archived_at = models.DateTimeField(null=True, blank=True)

    objects = PipelineQuerySet.as_manager()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["organization", "slug"], name="pipeline_slug_unique")]
        indexes = [
            # The by-repo build endpoint: repo_name matched case-insensitively.
            models.Index(Lower("repo_name"), "organization", "source_slug", name="pipeline_by_repo"),
        ]

    def __str__(self) -> str:
        return f"{self.organization_id}/{self.slug}"


class Repository(models.Model):
    """A source repository an organization registered pipelines from.

    It says where agents clone the code from and holds the secret its webhooks
    are signed with (encrypted, see harmont.crypto). Pipelines belong to it by
    `(organization, repo_name)`, matched case-insensitively like the by-repo
    build endpoint matches them.
    """

    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="repositories")
    url = models.CharField(max_length=500)
    repo_name = models.CharField(max_length=255)
    webhook_secret_encrypted = models.TextField(blank=True, default="")
    # A GitHub token (encrypted) allowed to post commit statuses to the repository; empty: no statuses.
    github_token_encrypted = models.TextField(blank=True, default="")
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        verbose_name_plural = "repositories"
        constraints = [
            # Leads with lower(repo_name): webhooks look a repository up by name across organizations.
            models.UniqueConstraint(Lower("repo_name"), "organization", name="repository_name_unique"),
        ]

    def __str__(self) -> str:
        return self.repo_name


class Secret(models.Model):
    """A named secret injected into jobs' environments; a pipeline's secret wins over the organization's."""

    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="secrets")
    # Null: the secret is the organization's, for every pipeline.
    pipeline = models.ForeignKey(Pipeline, null=True, blank=True, on_delete=models.CASCADE, related_name="secrets")
    name = models.CharField(max_length=255)
    value_encrypted = models.TextField()
    # Only for builds of the organization's own definition on a protected branch, or an
    # admin's (Build.secret_access). The migration left older secrets unprotected.
    protected = models.BooleanField(default=True)
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["organization", "name"], condition=models.Q(pipeline__isnull=True),
                                    name="secret_org_name_unique"),
            models.UniqueConstraint(fields=["pipeline", "name"], condition=models.Q(pipeline__isnull=False),
                                    name="secret_pipeline_name_unique"),
        ]

    def __str__(self) -> str:
        return self.name


class PipelineSchedule(models.Model):
    """Builds a pipeline on a cron schedule (5 fields, in `timezone`), with `source: schedule`.

    `next_run_at` is the next due time (UTC) the reaper's tick looks for; each due
    time that produced a build has its `ScheduledRun` row, unique per due time, so
    several reapers running the tick at once create one build per due time.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    pipeline = models.ForeignKey(Pipeline, on_delete=models.CASCADE, related_name="schedules")
    cron = models.CharField(max_length=100)
    branch = models.CharField(max_length=255)
    commit = models.CharField(max_length=255, default="HEAD")
    message = models.TextField(blank=True, null=True)
    env = models.JSONField(default=dict, blank=True)
    enabled = models.BooleanField(default=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                   related_name="+")
    next_run_at = models.DateTimeField(null=True, blank=True)
    last_run_at = models.DateTimeField(null=True, blank=True)
    last_build = models.ForeignKey("builds.Build", null=True, blank=True, on_delete=models.SET_NULL,
                                   related_name="+")
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(default=timezone.now)
    # An IANA zone name (`Europe/Berlin`): the cron fields are read as that zone's wall-clock time.
    # Declared after the fields above, whose defaults need the `timezone` module this name shadows.
    timezone = models.CharField(max_length=64, default="UTC")

    class Meta:
        indexes = [
            # The pipeline's list, keyset-paginated by (created_at, id).
            models.Index(fields=["pipeline", "created_at", "id"], name="schedule_by_pipeline"),
            # The tick: enabled schedules that are due.
            models.Index(fields=["next_run_at"], condition=models.Q(enabled=True), name="schedule_due"),
        ]

    def __str__(self) -> str:
        return f"{self.pipeline_id}: {self.cron} ({self.timezone})"


class ScheduledRun(models.Model):
    """One due time of a schedule that was acted on: inserting it is the claim to create that build."""

    schedule = models.ForeignKey(PipelineSchedule, on_delete=models.CASCADE, related_name="runs")
    due_at = models.DateTimeField()
    build = models.ForeignKey("builds.Build", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["schedule", "due_at"], name="scheduled_run_unique")]

    def __str__(self) -> str:
        return f"{self.schedule_id} @ {self.due_at.isoformat()}"
