"""Operators' view of builds and jobs. States are read-only: only services change them."""

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from builds import services
from builds.models import Agent, Build, Job, JobDependency, LogChunk
from builds.states import TERMINAL_BUILD_STATES
from harmont.errors import ApiError


class JobInline(admin.TabularInline):
    model = Job
    fields = ["position", "step_key", "name", "state", "exit_code", "started_at", "finished_at"]
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = True
    ordering = ["position"]

    def has_add_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False


@admin.register(Build)
class BuildAdmin(admin.ModelAdmin):
    list_display = ["__str__", "pipeline", "number", "state", "branch", "short_commit", "source", "created_at",
                    "finished_at"]
    list_filter = ["state", "source"]
    search_fields = ["branch", "commit", "message", "pipeline__slug", "pipeline__organization__slug"]
    list_select_related = ["pipeline", "pipeline__organization"]
    raw_id_fields = ["pipeline", "created_by"]
    readonly_fields = ["id", "pipeline", "number", "state", "error_code", "error_message", "cancel_requested_at",
                       "created_at", "scheduled_at", "started_at", "finished_at", "pipeline_ir", "source_archive"]
    inlines = [JobInline]
    actions = ["cancel_selected"]
    date_hierarchy = "created_at"

    @admin.display(description="commit")
    def short_commit(self, build: Build) -> str:
        return build.commit[:12]

    @admin.action(description="Cancel selected builds")
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
class JobAdmin(admin.ModelAdmin):
    list_display = ["step_key", "build", "state", "exit_code", "error_code", "started_at", "finished_at"]
    list_filter = ["state"]
    search_fields = ["step_key", "name", "command", "build__pipeline__slug"]
    list_select_related = ["build", "build__pipeline"]
    raw_id_fields = ["build", "organization", "agent"]
    exclude = ["credential_hash"]
    readonly_fields = ["id", "build", "organization", "position", "state", "exit_code", "error_code",
                       "error_message", "created_at", "scheduled_at", "started_at", "finished_at"]


@admin.register(JobDependency)
class JobDependencyAdmin(admin.ModelAdmin):
    list_display = ["job", "prerequisite", "kind"]
    list_select_related = ["job", "prerequisite"]
    raw_id_fields = ["job", "prerequisite"]


@admin.register(Agent)
class AgentAdmin(admin.ModelAdmin):
    list_display = ["name", "organization", "hostname", "version", "last_seen_at", "stopped_at"]
    list_select_related = ["organization"]
    search_fields = ["name", "hostname", "organization__slug"]
    exclude = ["session_hash"]
    readonly_fields = ["id", "organization", "token", "name", "hostname", "version", "os", "created_at",
                       "last_seen_at", "stopped_at"]


@admin.register(LogChunk)
class LogChunkAdmin(admin.ModelAdmin):
    list_display = ["job", "seq", "stream_kind", "ts"]
    list_select_related = ["job"]
    raw_id_fields = ["job"]
    readonly_fields = ["job", "seq", "stream_kind", "content", "ts", "created_at"]
