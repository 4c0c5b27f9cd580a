"""Pipeline JSON <-> Python."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from harmont.redaction import redact_url_credentials
from harmont.serializers import page_serializer
from pipelines import agent_tags
from pipelines.models import PROTECTED_BRANCHES_MAX, ForkPullRequests, Pipeline, Visibility
from pipelines.result_globs import DEFAULT_TEST_RESULTS_GLOB

SELECTOR_SCHEMA = {"type": "object", "additionalProperties": {"type": "string"}, "nullable": True}
TEST_RESULTS_GLOB_HELP = (
    "Which artifacts are JUnit XML reports, parsed into the build's test results: glob patterns separated by "
    "commas, matched against the artifact's path (`*` within a directory, `**/` across directories). Empty: "
    "none. Default `test-results/**/*.xml`.")


@extend_schema_field(SELECTOR_SCHEMA)
class AgentSelectorField(serializers.JSONField):
    """An agent selector, `{tag: value or glob}` or Buildkite's `["key=value", ...]`, read as the map."""

    def to_internal_value(self, data: object) -> dict[str, str] | None:
        try:
            return agent_tags.read_selector(data)
        except agent_tags.SelectorError as exc:
            raise serializers.ValidationError(f"The selector {exc}.") from None


class PipelineSerializer(serializers.ModelSerializer):
    """A pipeline; `repository` without the credentials in its URL unless context `show_credentials` is set."""

    class Meta:
        model = Pipeline
        fields = ["slug", "name", "description", "repository", "repo_name", "default_branch", "visibility",
                  "allow_manual", "source_slug", "definition", "triggers", "fork_pull_requests", "protected_branches",
                  "default_retry", "cancel_intermediate_builds", "cancel_intermediate_builds_branch_filter",
                  "max_concurrent_builds", "default_agents", "test_results_glob", "created_at"]
        read_only_fields = fields
        extra_kwargs = {"default_agents": {"help_text": (
            "The agent selector (`{tag: value or glob}`) of steps without their own `agents`; a step's own "
            "replaces it whole. Null: steps without `agents` want `queue=default`.")},
            "test_results_glob": {"help_text": TEST_RESULTS_GLOB_HELP}}

    def to_representation(self, instance: Pipeline) -> dict[str, Any]:
        data = super().to_representation(instance)
        if not self.context.get("show_credentials") and data.get("repository"):
            data["repository"] = redact_url_credentials(data["repository"])
        return data


PipelineListSerializer = page_serializer("PipelineList", PipelineSerializer)


class AnyJSONField(serializers.JSONField):
    """An IR document given either as a JSON object or as a JSON string."""


class StrictCharField(serializers.CharField):
    """A JSON string and nothing else (DRF's CharField would turn 123 into "123")."""

    def to_internal_value(self, data: object) -> str:
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


class CreatePipelineRequestSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=255)
    repository = serializers.CharField(max_length=500)
    default_branch = serializers.CharField(max_length=255)
    description = serializers.CharField(required=False, allow_null=True, allow_blank=True)
    repo_name = serializers.CharField(required=False, allow_null=True, allow_blank=True, max_length=255)
    allow_manual = serializers.BooleanField(required=False, default=True)
    visibility = serializers.ChoiceField(choices=Visibility.choices, required=False, default=Visibility.PRIVATE)
    source_slug = serializers.SlugField(required=False, allow_null=True, max_length=100)
    definition = AnyJSONField(required=False, allow_null=True,
                              help_text="Stored v0 IR (object or JSON string); builds without `pipeline_ir` use it.")
    protected_branches = serializers.ListField(
        child=StrictCharField(max_length=255, trim_whitespace=False), required=False, default=list,
        max_length=PROTECTED_BRANCHES_MAX, help_text=(
            "Branch patterns (fnmatch: `release/*`) whose builds of the stored definition get protected secrets, "
            "besides the default branch."))
    default_agents = AgentSelectorField(required=False, allow_null=True, help_text=(
        "Agent selector for steps without `agents`: `{tag: value or glob (* ?)}` or `[\"key=value\", ...]`. "
        "A step's own `agents` replaces it whole; a selector without `queue` wants `queue=default`."))
    fork_pull_requests = serializers.ChoiceField(
        choices=ForkPullRequests.choices, required=False, default=ForkPullRequests.BUILD_WITHOUT_SECRETS,
        help_text="What a pull request from another repository (a fork) builds: without secrets (the default), "
                  "nothing (`skip`), or a build held until an admin approves it (`require_approval`). Fork builds "
                  "never get secrets.")
    default_retry = serializers.JSONField(required=False, allow_null=True, help_text=(
        "The `retry` of every step that sets none, in Buildkite's shape: `{\"automatic\": true | rule | [rule], "
        "\"manual\": bool | {\"allowed\": bool, \"reason\": str}}`, a rule being `{\"exit_status\": int | \"*\" | "
        "[int], \"limit\": 1..10}` (-1: the agent was lost). Stored normalised."))
    cancel_intermediate_builds = serializers.BooleanField(required=False, default=False, help_text=(
        "A new build on a branch cancels that branch's older scheduled and running builds "
        "(`error_code: superseded`)."))
    cancel_intermediate_builds_branch_filter = serializers.ListField(
        child=StrictCharField(max_length=255, trim_whitespace=False), required=False, allow_null=True, default=None,
        max_length=PROTECTED_BRANCHES_MAX, help_text=(
            "Branches whose new builds cancel older ones: fnmatch patterns, `!pattern` excluding. Null (the "
            "default): every branch except the default branch."))
    max_concurrent_builds = serializers.IntegerField(
        required=False, allow_null=True, default=None, min_value=1, max_value=10_000, help_text=(
            "At most this many builds of the pipeline are scheduled or running at once; later ones wait, "
            "`scheduled`, with `waiting_reason` set. Null: no limit."))
    test_results_glob = StrictCharField(required=False, allow_blank=True, trim_whitespace=False,
                                        default=DEFAULT_TEST_RESULTS_GLOB, help_text=TEST_RESULTS_GLOB_HELP)


class UpdatePipelineRequestSerializer(CreatePipelineRequestSerializer):
    """A PATCH of a pipeline's settings: any of the create request's fields but `source_slug`; absent ones stay."""

    source_slug = None


class StrictBooleanField(serializers.BooleanField):
    """A JSON true or false and nothing else (DRF's BooleanField would take "yes" and 1)."""

    def to_internal_value(self, data: object) -> bool:
        if not isinstance(data, bool):
            self.fail("invalid")
        return data


class SecretSerializer(serializers.Serializer):
    """A secret as the API shows it: never its value."""

    name = serializers.CharField()
    protected = serializers.BooleanField(help_text=(
        "Only for builds of the organization's own definition on a protected branch, or an admin's."))
    updated_at = serializers.DateTimeField()


class SecretListSerializer(serializers.Serializer):
    secrets = SecretSerializer(many=True)
    next_cursor = serializers.CharField(allow_null=True, help_text="Pass as `cursor` for the next page; null at the end.")


class SetSecretRequestSerializer(serializers.Serializer):
    # Only the kinds are checked here; the rules (environment variable name, size) are
    # pipelines.secrets.secret_errors, shared with the admin.
    name = StrictCharField(trim_whitespace=False, help_text="An environment variable name: [A-Za-z_][A-Za-z0-9_]*.")
    value = StrictCharField(trim_whitespace=False, allow_blank=True, write_only=True,
                            help_text="The value (non-empty, at most 64 KiB). Never returned.")
    protected = StrictBooleanField(required=False, help_text=(
        "Inject it only into builds of the organization's own definition (the stored one, or what the "
        "repository renders) on a protected branch, and into builds admins and owners trigger. Absent: true "
        "for a new secret, unchanged when replacing a value."))


class RegisterPipelinesRequestSerializer(serializers.Serializer):
    repository = serializers.CharField(max_length=500, help_text="The clone URL agents check the code out from.")
    repo_name = serializers.CharField(required=False, allow_null=True, allow_blank=True, max_length=255,
                                      help_text="owner/name; derived from repository when absent.")
    default_branch = serializers.CharField(max_length=255)
    webhook_secret = serializers.CharField(required=False, allow_null=True, allow_blank=True, write_only=True,
                                           trim_whitespace=False, help_text=(
                                               "The secret GitHub signs webhooks with. Absent or null keeps the "
                                               "stored one; an empty string removes it. Never returned."))
    github_token = serializers.CharField(required=False, allow_null=True, allow_blank=True, write_only=True,
                                         trim_whitespace=False, help_text=(
                                             "A GitHub token that may post commit statuses to the repository "
                                             "(`repo:status`, or a fine-grained token with Commit statuses: "
                                             "write): every build of its pipelines gets one. Absent or null "
                                             "keeps the stored one; an empty string removes it. Never returned."))
    envelope = AnyJSONField(help_text="What `harmont.dump_registry_json()` prints (object or JSON string).")


class RegisteredRepositorySerializer(serializers.Serializer):
    repo_name = serializers.CharField()
    url = serializers.CharField()
    webhook_secret_set = serializers.BooleanField()
    github_token_set = serializers.BooleanField(help_text="Whether builds post commit statuses to GitHub.")
    webhook_url = serializers.CharField(help_text="Where to point the repository's GitHub webhook.")


class RegisterPipelinesResponseSerializer(serializers.Serializer):
    repository = RegisteredRepositorySerializer()
    pipelines = PipelineSerializer(many=True)
    archived = serializers.ListField(child=serializers.CharField(),
                                     help_text="Slugs of pipelines archived because their entry disappeared.")


class ScheduleSerializer(serializers.Serializer):
    """A pipeline schedule. Views load `created_by` and `last_build` with it (no queries here)."""

    id = serializers.UUIDField()
    cron = serializers.CharField(help_text="5 fields: minute hour day-of-month month day-of-week.")
    timezone = serializers.CharField(help_text="The IANA time zone the cron fields are read in.")
    branch = serializers.CharField()
    commit = serializers.CharField()
    message = serializers.CharField(allow_null=True)
    env = serializers.DictField(child=serializers.CharField(), help_text="Passed on to every job of its builds.")
    enabled = serializers.BooleanField()
    created_by = serializers.EmailField(source="created_by.email", allow_null=True, default=None,
                                        help_text="Who created it (its builds name them); null once they are gone.")
    next_run_at = serializers.DateTimeField(allow_null=True, help_text="The next due time (ignored while disabled).")
    last_run_at = serializers.DateTimeField(allow_null=True, help_text="The due time of its latest build.")
    last_build_number = serializers.IntegerField(source="last_build.number", allow_null=True, default=None)
    created_at = serializers.DateTimeField()
    updated_at = serializers.DateTimeField()


ScheduleListSerializer = page_serializer("PipelineScheduleList", ScheduleSerializer)


@extend_schema_field({"type": "object", "additionalProperties": {"type": "string"}})
class StringMapField(serializers.JSONField):
    """A JSON object of strings; checked (with the field's name, not each key's) by the service."""


class CreateScheduleRequestSerializer(serializers.Serializer):
    # Only the kinds here; the rules (cron, zone, branch, commit) are pipelines.schedules.schedule_errors.
    cron = StrictCharField(trim_whitespace=True, help_text="5 fields: minute hour day-of-month month day-of-week.")
    timezone = StrictCharField(required=False, default="UTC", help_text="An IANA time zone name; default UTC.")
    branch = StrictCharField(required=False, trim_whitespace=False,
                             help_text="Default: the pipeline's default branch.")
    commit = StrictCharField(required=False, default="HEAD", help_text="A commit id or HEAD (the default).")
    message = StrictCharField(required=False, allow_null=True, allow_blank=True, trim_whitespace=False)
    env = StringMapField(required=False, default=dict, help_text="Names to values, passed on to every job.")
    enabled = StrictBooleanField(required=False, default=True)


class UpdateScheduleRequestSerializer(serializers.Serializer):
    cron = StrictCharField(required=False, trim_whitespace=True)
    timezone = StrictCharField(required=False)
    branch = StrictCharField(required=False, trim_whitespace=False)
    commit = StrictCharField(required=False)
    message = StrictCharField(required=False, allow_null=True, allow_blank=True, trim_whitespace=False)
    env = StringMapField(required=False)
    enabled = StrictBooleanField(required=False)
