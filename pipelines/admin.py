from django.contrib import admin

from pipelines.models import Pipeline


@admin.register(Pipeline)
class PipelineAdmin(admin.ModelAdmin):
    list_display = ["slug", "organization", "name", "repo_name", "source_slug", "allow_manual", "build_counter",
                    "created_at", "archived_at"]
    list_filter = ["allow_manual", "visibility"]
    search_fields = ["slug", "name", "repo_name", "repository", "organization__slug"]
    list_select_related = ["organization"]
    raw_id_fields = ["organization"]
    # The counter hands out build numbers; editing it by hand would create gaps or duplicates.
    readonly_fields = ["build_counter", "created_at"]
