"""Operators' view of builds, jobs, their edges, logs and agents, and of what the server tells the outside world.

These rows are written only by the services (create_build, the agent API, the
reaper), so the admin shows them read-only: no add, no edit. Operators can
delete, and cancel builds with the action, which calls the same service as
the API and the Cancel button. Deleting a build, job or artifact here deletes its
stored files too (builds.services.retention), once the deletion commits.

Outbound webhook endpoints are the exception: operators add and edit them here,
through the same service as the API and the page (the secret is shown once,
after adding, and never again). Every commit status and webhook message, with
each attempt at posting it, is under Notifications.
"""

from datetime import datetime
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from builds import services
from builds.models import (
    Agent,
    Artifact,
    Build,
    CacheEntry,
    ConcurrencySlot,
    Job,
    JobDependency,
    LogChunk,
    Notification,
    NotificationAttempt,
    TestFailure,
    TestReport,
    WebhookDelivery,
    WebhookEndpoint,
    WebhookEvent,
)
from builds.services import caches, webhook_endpoints
from builds.states import TERMINAL_BUILD_STATES
from harmont.errors import ApiError
from harmont.labels import with_emoji
from harmont.timestamps import datetime_from_ns


class ReadOnlyAdmin(admin.ModelAdmin):
    """View and delete only: every write to these rows belongs to a service."""

    def has_add_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False


def job_label(job: Job) -> str:
    """A job's name as the pages show it (shortcodes as emoji)."""
    return with_emoji(job.name or job.step_key)


class JobInline(admin.TabularInline):
    model = Job
    fields = ["position", "step_key", "label", "state", "exit_code", "error_code", "agent", "started_at",
              "finished_at"]
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = True
    ordering = ["position"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Job]:
        return super().get_queryset(request).select_related("agent")

    def has_add_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False

    label = admin.display(description="name")(lambda self, job: job_label(job))


@admin.register(Build)
class BuildAdmin(ReadOnlyAdmin):
    list_display = ["title", "state", "branch", "short_commit", "short_message", "source", "created_by", "created_at",
                    "finished_at"]
    list_filter = ["state", "source", "fork", "created_at"]
    search_fields = ["=id", "branch", "commit", "message", "pipeline__slug", "pipeline__organization__slug",
                     "created_by__email"]
    list_select_related = ["pipeline", "pipeline__organization", "created_by"]
    raw_id_fields = ["pipeline", "created_by"]
    readonly_fields = ["id", "pipeline", "number", "state", "branch", "commit", "message", "source", "created_by",
                       "fork", "secret_access", "approved_by", "approved_at", "rebuild_of", "env", "error_code", "error_message", "cancel_requested_at", "created_at", "scheduled_at",
                       "started_at", "finished_at", "timeout_seconds", "source_url", "source_sha256",
                       "source_archive", "pipeline_ir"]
    inlines = [JobInline]
    actions = ["cancel_selected"]
    date_hierarchy = "created_at"
    # COUNT(*) over every build on each filtered page is the slowest query of a big history.
    show_full_result_count = False

    @admin.display(description="build", ordering="number")
    def title(self, build: Build) -> str:
        return f"{build.pipeline.organization.slug}/{build.pipeline.slug} #{build.number}"

    @admin.display(description="commit")
    def short_commit(self, build: Build) -> str:
        return build.commit[:12]

    @admin.display(description="message")
    def short_message(self, build: Build) -> str:
        message = with_emoji(build.message)
        return message if len(message) <= 80 else f"{message[:79]}…"

    @admin.action(description="Cancel selected builds", permissions=["view"])
    def cancel_selected(self, request: HttpRequest, queryset: QuerySet[Build]) -> None:
        canceled = skipped = 0
        for build in queryset.select_related("pipeline").exclude(state__in=TERMINAL_BUILD_STATES):
            try:
                services.cancel_build(build=build)
                canceled += 1
            except ApiError:  # finished between listing and canceling
                skipped += 1
        self.message_user(request, f"Canceled {canceled} build(s); {skipped} had already finished.",
                          messages.SUCCESS)


@admin.register(Job)
class JobAdmin(ReadOnlyAdmin):
    list_display = ["step_key", "label", "build_title", "state", "exit_code", "error_code", "agent", "started_at",
                    "finished_at"]
    list_filter = ["state", "error_code"]
    label = admin.display(description="name")(lambda self, job: job_label(job))
    search_fields = ["=id", "step_key", "name", "command", "build__pipeline__slug"]
    list_select_related = ["build", "build__pipeline", "build__pipeline__organization", "agent"]
    raw_id_fields = ["build", "organization", "agent", "retry_of", "reused_job"]
    exclude = ["credential_hash", "env", "workspace_archive", "snapshot_image"]
    readonly_fields = ["id", "build", "organization", "position", "step_key", "name", "command", "image",
                       "timeout_seconds", "cache", "runner", "runner_args", "state", "exit_code", "signal",
                       "error_code", "error_message", "soft_failed", "agent", "assigned_at", "last_heartbeat_at",
                       "log_bytes", "log_truncated", "created_at", "scheduled_at", "started_at", "finished_at",
                       "attempt", "retry_of", "retried", "retry_policy", "soft_fail_policy", "automatic_retries",
                       "agents", "concurrency_group", "concurrency", "cache_key", "reused_job"]
    show_full_result_count = False

    @admin.display(description="build", ordering="build__number")
    def build_title(self, job: Job) -> str:
        return f"{job.build.pipeline.organization.slug}/{job.build.pipeline.slug} #{job.build.number}"


@admin.register(CacheEntry)
class CacheEntryAdmin(ReadOnlyAdmin):
    """Step cache entries: view, and delete (later builds run the step again), through the service,
    which frees the reused job's stored files when nothing needs them any more."""

    list_display = ["step_key", "pipeline", "short_key", "branch", "secret_access", "size_bytes", "hits",
                    "created_at", "last_used_at"]
    list_filter = ["secret_access", "organization"]
    search_fields = ["step_key", "=key", "branch", "pipeline__slug"]
    list_select_related = ["pipeline"]
    raw_id_fields = ["organization", "pipeline", "job"]
    readonly_fields = ["id", "organization", "pipeline", "step_key", "key", "branch", "secret_access", "job",
                       "size_bytes", "hits", "created_at", "last_used_at"]
    ordering = ["-last_used_at"]

    @admin.display(description="key")
    def short_key(self, entry: CacheEntry) -> str:
        return entry.key[:12]

    def delete_model(self, request: HttpRequest, obj: CacheEntry) -> None:
        caches.delete_entry(entry=obj)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[CacheEntry]) -> None:
        rows = list(queryset.values_list("pk", "job_id"))
        caches.delete_entries(entry_ids=[pk for pk, _ in rows], job_ids=[job for _, job in rows])


@admin.register(JobDependency)
class JobDependencyAdmin(ReadOnlyAdmin):
    list_display = ["job", "prerequisite", "kind"]
    list_filter = ["kind"]
    list_select_related = ["job", "prerequisite"]
    raw_id_fields = ["job", "prerequisite"]


@admin.register(Agent)
class AgentAdmin(ReadOnlyAdmin):
    list_display = ["name", "organization", "token", "hostname", "version", "tags", "last_seen_at", "stopped_at"]
    list_filter = [("stopped_at", admin.EmptyFieldListFilter)]
    list_select_related = ["organization", "token"]
    search_fields = ["name", "hostname", "organization__slug"]
    exclude = ["session_hash"]
    readonly_fields = ["id", "organization", "token", "name", "hostname", "version", "os", "tags", "created_at",
                       "last_seen_at", "stopped_at"]


@admin.register(ConcurrencySlot)
class ConcurrencySlotAdmin(ReadOnlyAdmin):
    """Which job took each place of a concurrency group last (free once that job ended)."""

    list_display = ["group", "index", "organization", "holder"]
    list_select_related = ["organization", "holder"]
    search_fields = ["group", "organization__slug"]
    raw_id_fields = ["organization", "holder"]
    readonly_fields = ["organization", "group", "index", "holder"]


@admin.register(LogChunk)
class LogChunkAdmin(ReadOnlyAdmin):
    list_display = ["job", "seq", "stream_kind", "time"]
    list_filter = ["stream_kind"]
    list_select_related = ["job"]
    search_fields = ["=job__id"]
    raw_id_fields = ["job"]
    readonly_fields = ["job", "seq", "stream_kind", "content", "time", "ts", "created_at"]
    show_full_result_count = False

    @admin.display(description="time", ordering="ts")
    def time(self, chunk: LogChunk) -> datetime:
        """`ts` (Unix nanoseconds) as a time, to the microsecond."""
        return datetime_from_ns(chunk.ts)


@admin.register(WebhookDelivery)
class WebhookDeliveryAdmin(ReadOnlyAdmin):
    list_display = ["delivery_id", "event", "repository", "organization", "status", "attempts", "builds_created",
                    "received_at", "processed_at"]
    list_filter = ["status", "event", "received_at"]
    list_select_related = ["repository", "repository__organization"]
    search_fields = ["=delivery_id", "repository__repo_name", "repository__organization__slug"]
    readonly_fields = ["repository", "delivery_id", "event", "status", "attempts", "last_error", "received_at",
                       "enqueued_at", "retry_at", "processed_at", "builds_created", "result", "payload"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[WebhookDelivery]:
        queryset = super().get_queryset(request)
        match = getattr(request, "resolver_match", None)
        if match is not None and match.url_name == "builds_webhookdelivery_changelist":
            # A payload may be megabytes: only one delivery's own page loads it.
            queryset = queryset.defer("payload", "result")
        return queryset
    show_full_result_count = False

    @admin.display(description="organization", ordering="repository__organization__slug")
    def organization(self, delivery: WebhookDelivery) -> str:
        return delivery.repository.organization.slug


@admin.register(Artifact)
class ArtifactAdmin(ReadOnlyAdmin):
    list_display = ["path", "build_title", "job", "size", "mime_type", "created_at"]
    list_select_related = ["build", "build__pipeline", "build__pipeline__organization", "job"]
    search_fields = ["=id", "path", "=build__id", "=job__id", "sha256"]
    raw_id_fields = ["build", "job"]
    readonly_fields = ["id", "build", "job", "path", "size", "sha256", "mime_type", "file", "created_at"]
    show_full_result_count = False

    @admin.display(description="build", ordering="build__number")
    def build_title(self, artifact: Artifact) -> str:
        return f"{artifact.build.pipeline.organization.slug}/{artifact.build.pipeline.slug} #{artifact.build.number}"


class WebhookEndpointForm(forms.ModelForm):
    """The organization (on add), URL, events and description; checked by the rules the API and the page use."""

    # Only "required" here: the service's rules say what else is wrong, in the words the API uses.
    url = forms.CharField(label="URL", widget=forms.TextInput(attrs={"size": 80}))
    events = forms.MultipleChoiceField(choices=WebhookEvent.choices, widget=forms.CheckboxSelectMultiple,
                                       required=False, initial=WebhookEvent.values)

    class Meta:
        model = WebhookEndpoint
        fields = ["organization", "url", "events", "description"]

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        errors = webhook_endpoints.endpoint_errors(url=data.get("url", ""), events=data.get("events", []),
                                                   description=data.get("description", ""))
        for name, messages_ in errors.items():
            if name not in self.errors:  # a missing URL is said once, by its field
                self.add_error(name, messages_)
        organization = data.get("organization")
        if (self.instance._state.adding and organization is not None and not errors
                and organization.webhook_endpoints.count() >= webhook_endpoints.MAX_ENDPOINTS_PER_ORGANIZATION):
            self.add_error(None, webhook_endpoints.limit_error(organization).message)
        return data


@admin.register(WebhookEndpoint)
class WebhookEndpointAdmin(admin.ModelAdmin):
    form = WebhookEndpointForm
    list_display = ["url", "organization", "events", "created_at"]
    list_select_related = ["organization"]
    search_fields = ["url", "description", "organization__slug"]
    raw_id_fields = ["organization"]
    readonly_fields = ["created_by", "created_at"]
    ordering = ["-created_at"]

    def get_fields(self, request: HttpRequest, obj: WebhookEndpoint | None = None) -> list[str]:
        # Never the secret: it is shown once, in the message after adding.
        return ["organization", "url", "events", "description"] + (["created_by", "created_at"] if obj else [])

    def get_readonly_fields(self, request: HttpRequest, obj: WebhookEndpoint | None = None) -> list[str]:
        return self.readonly_fields + (["organization"] if obj else [])

    def save_model(self, request: HttpRequest, obj: WebhookEndpoint, form: Any, change: bool) -> None:
        data = form.cleaned_data
        if change:
            services.update_webhook_endpoint(endpoint=obj, url=data["url"], events=data["events"],
                                             description=data["description"])
            return
        issued = services.create_webhook_endpoint(organization=data["organization"], url=data["url"],
                                                  events=data["events"], description=data["description"],
                                                  created_by=request.user)  # type: ignore[arg-type]
        created = issued.endpoint
        obj.pk, obj.events, obj.created_at = created.pk, created.events, created.created_at
        obj.created_by = created.created_by
        obj.secret_encrypted = created.secret_encrypted
        obj._state.adding = False
        self.message_user(request, f"Signing secret of the webhook endpoint {created.url}: {issued.secret} "
                                   "(copy it now: it is not shown again).", messages.WARNING)


class NotificationAttemptInline(admin.TabularInline):
    model = NotificationAttempt
    fields = ["at", "status_code", "response_excerpt", "error", "duration_ms"]
    readonly_fields = fields
    extra = 0
    can_delete = False
    ordering = ["at", "id"]

    def has_add_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False


@admin.register(Notification)
class NotificationAdmin(ReadOnlyAdmin):
    """Commit statuses and webhook messages with every attempt at posting them; "Try again now" requeues."""

    list_display = ["message_id", "channel", "event", "status", "attempts", "build_title", "due_at", "delivered_at"]
    list_filter = ["channel", "status", "event"]
    list_select_related = ["build", "build__pipeline", "build__pipeline__organization"]
    search_fields = ["=message_id", "lane"]
    fields = ["channel", "event", "status", "attempts", "build", "job", "endpoint", "repository", "lane", "message_id",
              "created_at", "due_at", "delivered_at", "last_error", "payload"]
    readonly_fields = fields
    inlines = [NotificationAttemptInline]
    actions = ["try_again_now"]
    show_full_result_count = False

    def get_queryset(self, request: HttpRequest) -> QuerySet[Notification]:
        queryset = super().get_queryset(request)
        match = getattr(request, "resolver_match", None)
        if match is not None and match.url_name == "builds_notification_changelist":
            queryset = queryset.defer("payload")  # only one message's own page shows it
        return queryset

    @admin.display(description="build", ordering="build__number")
    def build_title(self, message: Notification) -> str:
        build = message.build
        return f"{build.pipeline.organization.slug}/{build.pipeline.slug} #{build.number}"

    @admin.action(description="Try again now", permissions=["view"])
    def try_again_now(self, request: HttpRequest, queryset: QuerySet[Notification]) -> None:
        count = services.retry_notifications(selected=queryset)
        self.message_user(request, f"{count} message(s) queued to be posted now; delivered and superseded ones, "
                                   "and any being posted at this moment, are left as they are.", messages.SUCCESS)


@admin.register(NotificationAttempt)
class NotificationAttemptAdmin(ReadOnlyAdmin):
    list_display = ["notification", "at", "status_code", "error", "duration_ms"]
    list_select_related = ["notification"]
    search_fields = ["=notification__message_id"]
    raw_id_fields = ["notification"]
    readonly_fields = ["notification", "at", "status_code", "response_excerpt", "error", "duration_ms"]
    show_full_result_count = False


@admin.register(TestReport)
class TestReportAdmin(ReadOnlyAdmin):
    """A JUnit report artifact as parsed (builds.services.test_results); written only by its task."""

    list_display = ["artifact_path", "build_title", "job", "status", "tests", "failures", "errors", "skipped",
                    "parsed_at"]
    list_filter = ["status"]
    list_select_related = ["artifact", "build", "build__pipeline", "build__pipeline__organization", "job"]
    search_fields = ["=artifact__id", "artifact__path", "=build__id", "=job__id"]
    raw_id_fields = ["artifact", "build", "job"]
    readonly_fields = ["artifact", "build", "job", "status", "error", "tests", "failures", "errors", "skipped",
                       "failures_stored", "parsed_at"]
    show_full_result_count = False

    @admin.display(description="file", ordering="artifact__path")
    def artifact_path(self, report: TestReport) -> str:
        return report.artifact.path

    @admin.display(description="build", ordering="build__number")
    def build_title(self, report: TestReport) -> str:
        return f"{report.build.pipeline.organization.slug}/{report.build.pipeline.slug} #{report.build.number}"


@admin.register(TestFailure)
class TestFailureAdmin(ReadOnlyAdmin):
    list_display = ["__str__", "build_title", "job", "kind", "flaky"]
    list_filter = ["kind", "flaky"]
    list_select_related = ["build", "build__pipeline", "build__pipeline__organization", "job"]
    search_fields = ["name", "classname", "=identity", "=build__id", "=job__id"]
    raw_id_fields = ["report", "build", "job"]
    readonly_fields = ["report", "build", "job", "suite", "classname", "name", "identity", "kind", "message",
                       "details", "duration", "flaky"]
    show_full_result_count = False

    @admin.display(description="build", ordering="build__number")
    def build_title(self, failure: TestFailure) -> str:
        return f"{failure.build.pipeline.organization.slug}/{failure.build.pipeline.slug} #{failure.build.number}"
