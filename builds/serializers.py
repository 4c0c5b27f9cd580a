"""Build and job JSON <-> Python. No queries here: views prefetch what is shown."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, tzinfo
from typing import TYPE_CHECKING, Any

from django.utils import timezone
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers
from rest_framework.settings import api_settings

from builds.models import (Agent, Artifact, Build, BuildSource, BuildState, Job, SecretAccess, TestFailureKind,
                           TestReportStatus)
from builds.responses import SEARCH_LINE_MAX_CHARS
from harmont.serializers import page_serializer
from pipelines import agent_tags

if TYPE_CHECKING:
    from builds.sql import BuildListRows


class BuildSerializer(serializers.Serializer):
    # Declared, not a ModelSerializer: this is the hottest read of the API, and a
    # ModelSerializer introspects the model to build its fields on every use.
    id = serializers.UUIDField(read_only=True)
    number = serializers.IntegerField(read_only=True, help_text="Sequential and unique within the pipeline.")
    state = serializers.ChoiceField(choices=BuildState.choices, read_only=True)
    pipeline_slug = serializers.CharField(source="pipeline.slug", read_only=True)
    branch = serializers.CharField(read_only=True, allow_null=True)
    commit = serializers.CharField(read_only=True, allow_null=True)
    message = serializers.CharField(read_only=True, allow_null=True)
    source = serializers.CharField(read_only=True, allow_null=True)
    fork = serializers.BooleanField(read_only=True, help_text=(
        "Built from a pull request whose head is in another repository (a fork): its jobs get no secrets."))
    secret_access = serializers.ChoiceField(choices=SecretAccess.choices, read_only=True, help_text=(
        "Which secrets its jobs get, decided when it was created: `all`, `unprotected` (not the protected ones), "
        "or `none`."))
    error_code = serializers.CharField(read_only=True, allow_null=True)
    error_message = serializers.CharField(read_only=True, allow_null=True)
    rebuild_of = serializers.IntegerField(read_only=True, allow_null=True, help_text=(
        "The number of the build of this pipeline that this one rebuilt (`POST .../rebuild`), else null."))
    waiting_reason = serializers.CharField(read_only=True, allow_null=True, help_text=(
        "Set while the build waits for a slot under its pipeline's `max_concurrent_builds` (its jobs wait "
        "`pending`): why. Null once it may run."))
    created_at = serializers.DateTimeField(read_only=True)
    scheduled_at = serializers.DateTimeField(read_only=True, allow_null=True)
    started_at = serializers.DateTimeField(read_only=True, allow_null=True)
    finished_at = serializers.DateTimeField(read_only=True, allow_null=True)

    def to_representation(self, instance: Build) -> dict[str, Any]:
        # The declared fields above are the schema. Rendering through them costs, for
        # every build, a get_attribute and a to_representation call per field (and each
        # DateTimeField looks its format and time zone up again), plus, for GET build, a
        # deep copy of all fourteen fields for its one serializer instance: most of a
        # 50-build list's rendering. `build_data` produces the same dict directly; a
        # test holds the two equal.
        return build_data(instance)


# An unbound DateTimeField formats exactly as the declared ones do; it needs no parent or context.
_DATETIME = serializers.DateTimeField()


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _datetime(value: datetime | None, tz: tzinfo) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:  # never loaded so (USE_TZ); DRF's field decides what a naive value means
        return _DATETIME.to_representation(value)
    # DRF's DateTimeField, minus its per-value look-ups of the format and the time zone
    # (a quarter of a 50-build list's rendering): REST_FRAMEWORK's DATETIME_FORMAT is a
    # strftime pattern, applied in the current time zone.
    return value.astimezone(tz).strftime(api_settings.DATETIME_FORMAT)


# The columns a build's JSON is made of (all but `pipeline_slug`), in the declared fields' order.
BUILD_COLUMNS = ("id", "number", "state", "branch", "commit", "message", "source", "fork", "secret_access",
                 "error_code", "error_message", "rebuild_of", "waiting_reason", "created_at", "scheduled_at",
                 "started_at", "finished_at")


def build_data(build: Build) -> dict[str, Any]:
    """What BuildSerializer's declared fields render for `build`, key for key, in their order."""
    return build_row_data({name: getattr(build, name) for name in BUILD_COLUMNS}, build.pipeline.slug,
                          timezone.get_current_timezone())


def build_row_data(row: dict[str, Any], pipeline_slug: str, tz: tzinfo) -> dict[str, Any]:
    """`build_data` of a row of BUILD_COLUMNS (`.values(*BUILD_COLUMNS)`): a list of builds needs no
    model instances, which would cost more than the rendering."""
    return {
        "id": _text(row["id"]),
        "number": None if row["number"] is None else int(row["number"]),
        "state": _text(row["state"]),
        "pipeline_slug": pipeline_slug,
        "branch": _text(row["branch"]),
        "commit": _text(row["commit"]),
        "message": _text(row["message"]),
        "source": _text(row["source"]),
        "fork": bool(row["fork"]),
        "secret_access": _text(row["secret_access"]),
        "error_code": _text(row["error_code"]),
        "error_message": _text(row["error_message"]),
        "rebuild_of": None if row["rebuild_of"] is None else int(row["rebuild_of"]),
        "waiting_reason": _text(row["waiting_reason"]),
        "created_at": _datetime(row["created_at"], tz),
        "scheduled_at": _datetime(row["scheduled_at"], tz),
        "started_at": _datetime(row["started_at"], tz),
        "finished_at": _datetime(row["finished_at"], tz),
    }


# A build's JSON keys in the declared fields' order: BUILD_COLUMNS with the pipeline's slug fourth.
BUILD_KEYS = (*BUILD_COLUMNS[:3], "pipeline_slug", *BUILD_COLUMNS[3:])


def build_cells_data(cells: Sequence[Any], pipeline_slug: str) -> dict[str, Any]:
    """`build_data` of a row of BUILD_COLUMNS whose cells are already what the JSON shows
    (builds.selectors.pipeline_builds): the list's one statement formats its ids and times."""
    return dict(zip(BUILD_KEYS, (*cells[:3], pipeline_slug, *cells[3:])))


def build_list_data(read: BuildListRows, pipeline_slug: str) -> list[dict[str, Any]]:
    """`build_data` of each row of a build list read (builds.selectors.pipeline_builds), formatted or not."""
    if read.formatted:
        return [build_cells_data(cells, pipeline_slug) for cells in read.rows]
    tz = timezone.get_current_timezone()
    return [build_row_data(row, pipeline_slug, tz) for row in read.rows]


BuildListSerializer = page_serializer("BuildList", BuildSerializer)


class JobSerializer(serializers.ModelSerializer):
    depends_on = serializers.SerializerMethodField()
    retry_policy = serializers.JSONField(read_only=True, allow_null=True, help_text=(
        "The step's `retry` (or its pipeline's `default_retry`), normalised: `{\"automatic\": [{\"exit_status\": "
        "\"*\" | [int], \"limit\": 1..10}], \"manual\": {\"allowed\": bool, \"reason\": str | null}}`; null: none."))
    soft_fail_policy = serializers.JSONField(read_only=True, allow_null=True, help_text=(
        "The step's `soft_fail`, normalised: `{\"exit_status\": \"*\" | [int]}`; null: failures fail the build."))
    attempt = serializers.IntegerField(read_only=True, help_text="1 for a step's first job, n+1 for a retry of attempt n.")
    retry_of = serializers.UUIDField(source="retry_of_id", read_only=True, allow_null=True,
                                     help_text="The job this one retries (the step's previous attempt).")
    retried = serializers.BooleanField(read_only=True, help_text=(
        "A later attempt of the step replaced this job: it no longer counts for the build."))
    agents = serializers.SerializerMethodField(help_text=(
        "The tags an agent needs to take this job, `{tag: value or glob}`, its queue included."))
    cached = serializers.SerializerMethodField(help_text=(
        "A step cache hit: the job did not run; it reuses `reused_job`, an earlier passed job of the same "
        "step with the same cache key."))
    reused_job = serializers.UUIDField(source="reused_job_id", read_only=True, allow_null=True,
                                       help_text="The earlier job a cached job reuses; null when the job runs.")
    waiting_reason = serializers.SerializerMethodField(help_text=(
        "Why a scheduled job has not been taken yet (no connected agent matches its agents, or its "
        "concurrency group is full); null otherwise."))

    class Meta:
        model = Job
        fields = ["id", "step_key", "name", "command", "state", "exit_code", "error_code", "error_message",
                  "depends_on", "soft_failed", "retry_policy", "soft_fail_policy", "attempt", "retry_of", "retried",
                  "created_at", "started_at", "finished_at", "agents", "concurrency_group", "concurrency",
                  "waiting_reason", "cached", "reused_job"]
        read_only_fields = fields
        extra_kwargs = {
            "concurrency_group": {"help_text": "At most `concurrency` jobs of the organization in this group run at once."},
        }

    @extend_schema_field({"type": "object", "additionalProperties": {"type": "string"}})
    def get_agents(self, job: Job) -> dict[str, str]:
        return agent_tags.job_selector(job.agents)

    @extend_schema_field({"type": "boolean"})
    def get_cached(self, job: Job) -> bool:
        return job.reused_job_id is not None

    @extend_schema_field({"type": "string", "nullable": True})
    def get_waiting_reason(self, job: Job) -> str | None:
        # Set by the view (selectors.with_waiting_reasons), in constant queries.
        return getattr(job, "waiting_reason", None)

    def get_depends_on(self, job: Job) -> list[str]:
        # `prerequisite_ids` is set by the view (selectors.build_jobs / build_job), in constant queries.
        return [str(pk) for pk in job.prerequisite_ids]


class JobListSerializer(serializers.Serializer):
    data = JobSerializer(many=True)


class JobLogMatchSerializer(serializers.Serializer):
    line = serializers.IntegerField(help_text="The line's number in the log, from 1.")
    text = serializers.CharField(
        help_text=f"The line as stored, without its line end, cut to {SEARCH_LINE_MAX_CHARS:,} characters.")


class JobLogMatchListSerializer(serializers.Serializer):
    """Schema of a log search's answer (`GET .../log?q=`), which builds.responses writes as it reads the log."""

    data = JobLogMatchSerializer(many=True)
    truncated = serializers.BooleanField(help_text="More lines match after the last one given (`limit` was reached).")


class LogTokenResponseSerializer(serializers.Serializer):
    token = serializers.CharField(help_text="Build-scoped token for the log stream's `token` query parameter.")
    expires_at = serializers.DateTimeField()


class _BuildRequestFields(serializers.Serializer):
    """Schema of the create-build body; validation itself is `services.validate_build_request`."""

    branch = serializers.CharField()
    commit = serializers.CharField()
    message = serializers.CharField(required=False, allow_null=True)
    source = serializers.ChoiceField(choices=BuildSource.choices, required=False, allow_null=True)
    pipeline_ir = serializers.CharField(required=False, allow_null=True,
                                        help_text="The v0 IR as a JSON string (an object is accepted too).")
    env = serializers.DictField(child=serializers.CharField(), required=False, allow_null=True)
    source_b64 = serializers.CharField(required=False, allow_null=True,
                                       help_text="Base64 of a gzipped tarball of the code to build.")
    source_url = serializers.CharField(required=False, allow_null=True)
    source_sha256 = serializers.CharField(required=False, allow_null=True)


class CreateBuildRequestSerializer(_BuildRequestFields):
    pass


class CreateRepoBuildRequestSerializer(_BuildRequestFields):
    repo_name = serializers.CharField(help_text="`owner/repo`, matched case-insensitively.")
    source_slug = serializers.CharField(help_text="The pipeline's name inside the repository.")


class CurrentJobSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    state = serializers.CharField()
    step_key = serializers.CharField()
    build_number = serializers.IntegerField(source="build.number")
    pipeline_slug = serializers.CharField(source="build.pipeline.slug")


class AgentStatusSerializer(serializers.ModelSerializer):
    # Both set by builds.selectors.recent_agents.
    connection_state = serializers.CharField(
        read_only=True, help_text="connected (heard from recently), lost (silent), or stopped (exited cleanly)")
    current_job = CurrentJobSerializer(read_only=True, allow_null=True)

    class Meta:
        model = Agent
        fields = ["id", "name", "hostname", "version", "os", "tags", "created_at", "last_seen_at",
                  "connection_state", "current_job"]
        read_only_fields = fields


class AgentListSerializer(serializers.Serializer):
    data = AgentStatusSerializer(many=True)
    next_cursor = serializers.CharField(allow_null=True, help_text="Pass as `cursor` for the next page; null at the end.")


class ArtifactSerializer(serializers.Serializer):
    id = serializers.UUIDField(read_only=True)
    job_id = serializers.UUIDField(read_only=True)
    path = serializers.CharField(read_only=True, help_text="Relative to the job's $HARMONT_ARTIFACTS.")
    size = serializers.IntegerField(read_only=True, help_text="Bytes.")
    sha256 = serializers.CharField(read_only=True)
    mime_type = serializers.CharField(read_only=True)
    created_at = serializers.DateTimeField(read_only=True)
    download_url = serializers.SerializerMethodField(help_text="GET with the same bearer token.")

    def get_download_url(self, artifact: Artifact) -> str:
        # The build's URL comes from the view (context), which resolved it already: no query per row.
        return f"{self.context['build_url']}/artifacts/{artifact.pk}/download"


ArtifactListSerializer = page_serializer("ArtifactList", ArtifactSerializer)


# ------------------------------------------------------------------ test results (builds.test_results)


class TestResultsSummarySerializer(serializers.Serializer):
    tests = serializers.IntegerField(help_text="Test cases in the reports of the latest attempt of each step.")
    failed = serializers.IntegerField(help_text="Of those, failed or errored.")
    skipped = serializers.IntegerField()


class JobTestCountsSerializer(serializers.Serializer):
    job_id = serializers.UUIDField()
    step_key = serializers.CharField()
    attempt = serializers.IntegerField()
    retried = serializers.BooleanField(help_text="A later attempt replaced this job: it does not count in `summary`.")
    tests = serializers.IntegerField()
    failed = serializers.IntegerField(help_text="Failed or errored test cases (`errors` of them errored).")
    errors = serializers.IntegerField()
    skipped = serializers.IntegerField()
    reports = serializers.IntegerField(help_text="Report files of the job (`unparsed` of them could not be read).")
    unparsed = serializers.IntegerField()


class UnparsedReportSerializer(serializers.Serializer):
    artifact_id = serializers.UUIDField()
    job_id = serializers.UUIDField()
    path = serializers.CharField(source="artifact__path")
    status = serializers.ChoiceField(choices=[c for c in TestReportStatus.values if c != TestReportStatus.PARSED],
                                     help_text="too_large, malformed (not XML, or not JUnit), or unsafe (declares "
                                               "a DTD or entities).")
    error = serializers.CharField(help_text="Why it was not read.")


class TestFailureSerializer(serializers.Serializer):
    id = serializers.IntegerField(help_text="Stable; the list is ordered by it.")
    job_id = serializers.UUIDField()
    artifact_id = serializers.UUIDField(source="report__artifact_id", help_text="The report it was read from.")
    path = serializers.CharField(source="report__artifact__path")
    suite = serializers.CharField()
    classname = serializers.CharField()
    name = serializers.CharField()
    kind = serializers.ChoiceField(choices=TestFailureKind.choices,
                                   help_text="`failure`: an assertion failed; `error`: the test could not run.")
    message = serializers.CharField(help_text="At most 2,000 characters.")
    details = serializers.CharField(help_text="The report's text for it (a stack trace), at most 4,000 characters.")
    duration = serializers.FloatField(allow_null=True, help_text="Seconds.")
    flaky = serializers.BooleanField(help_text="A later job of the same step on the same commit passed it.")


class TestResultsSerializer(serializers.Serializer):
    summary = TestResultsSummarySerializer()
    jobs = JobTestCountsSerializer(many=True, help_text="Each job that stored a report, in dependency order.")
    unparsed = UnparsedReportSerializer(many=True, help_text="Report files that could not be read (the first 100).")
    data = TestFailureSerializer(many=True, help_text="Failed test cases, at most 1,000 stored per job.")
    next_cursor = serializers.CharField(allow_null=True, help_text="Pass as `cursor` for the next page; null at the end.")
