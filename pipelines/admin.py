from typing import Any

from django import forms
from django.contrib import admin
from django.http import HttpRequest
from django.utils import timezone

from harmont.crypto import encrypt_text
from harmont.labels import with_emoji
from pipelines import agent_tags, ir
from pipelines import schedules as schedule_services
from pipelines.models import Pipeline, PipelineSchedule, Repository, ScheduledRun, Secret
from pipelines import secrets as secret_services
from pipelines.services import derive_repo_name


class PipelineForm(forms.ModelForm):
    class Meta:
        model = Pipeline
        fields = "__all__"

    def clean_protected_branches(self) -> Any:
        # An emptied box means no patterns, not a NULL the column can't hold.
        value = self.cleaned_data.get("protected_branches")
        return [] if value is None else value

    def clean_default_retry(self) -> Any:
        # Stored as the planner normalises it (the field's validator refused what it can't read).
        value = self.cleaned_data.get("default_retry")
        try:
            return ir.normalise_retry(value, "default_retry")
        except ir.PlanError:
            return value

    def clean_default_agents(self) -> Any:
        # The model's validator refused a malformed one; Buildkite's list form is stored as the map.
        value = self.cleaned_data.get("default_agents")
        try:
            return agent_tags.read_selector(value)
        except agent_tags.SelectorError:
            return value


@admin.register(Pipeline)
class PipelineAdmin(admin.ModelAdmin):
    form = PipelineForm
    list_display = ["slug", "organization", "label", "repo_name", "source_slug", "allow_manual", "build_counter",
                    "created_at", "archived_at"]
    label = admin.display(description="name", ordering="name")(lambda self, pipeline: with_emoji(pipeline.name))
    list_filter = ["allow_manual", "visibility", "fork_pull_requests", "cancel_intermediate_builds"]
    search_fields = ["slug", "name", "repo_name", "repository", "organization__slug"]
    list_select_related = ["organization"]
    raw_id_fields = ["organization"]
    # The counter hands out build numbers; editing it by hand would create gaps or duplicates.
    # has_test_results is set by the first parsed test report (builds.services.test_results).
    readonly_fields = ["build_counter", "has_test_results", "created_at"]


class RepositoryForm(forms.ModelForm):
    """The webhook secret is write-only: typed in, stored encrypted, never shown again."""

    webhook_secret = forms.CharField(
        required=False, strip=False, widget=forms.PasswordInput(render_value=False),
        help_text="The secret GitHub signs this repository's webhooks with. Leave empty to keep the current one.",
    )

    github_token = forms.CharField(
        required=False, strip=False, widget=forms.PasswordInput(render_value=False),
        help_text="A GitHub token that may post commit statuses to this repository. Leave empty to keep the "
                  "current one.",
    )
    remove_github_token = forms.BooleanField(required=False, help_text="Stop posting commit statuses.")

    class Meta:
        model = Repository
        fields = ["organization", "url", "repo_name"]

    def clean_repo_name(self) -> str:
        # Stored as `owner/repo`, the shape of a webhook's repository.full_name.
        return derive_repo_name(self.cleaned_data["repo_name"]) or ""

    def save(self, commit: bool = True) -> Repository:
        repository = super().save(commit=False)
        if self.cleaned_data.get("webhook_secret"):
            repository.webhook_secret_encrypted = encrypt_text(self.cleaned_data["webhook_secret"])
        if self.cleaned_data.get("remove_github_token"):
            repository.github_token_encrypted = ""
        elif self.cleaned_data.get("github_token"):
            repository.github_token_encrypted = encrypt_text(self.cleaned_data["github_token"])
        repository.updated_at = timezone.now()
        if commit:
            repository.save()
        return repository


@admin.register(Repository)
class RepositoryAdmin(admin.ModelAdmin):
    form = RepositoryForm
    list_display = ["repo_name", "organization", "url", "has_webhook_secret", "has_github_token", "updated_at"]
    search_fields = ["repo_name", "url", "organization__slug"]
    list_select_related = ["organization"]
    raw_id_fields = ["organization"]
    readonly_fields = ["has_webhook_secret", "has_github_token", "created_at", "updated_at"]

    @admin.display(description="webhook secret set", boolean=True)
    def has_webhook_secret(self, repository: Repository) -> bool:
        return bool(repository.webhook_secret_encrypted)

    @admin.display(description="GitHub token set", boolean=True)
    def has_github_token(self, repository: Repository) -> bool:
        return bool(repository.github_token_encrypted)


class SecretForm(forms.ModelForm):
    """The value is write-only: typed in, stored encrypted by the secrets service, never shown again."""

    value = forms.CharField(
        required=False, strip=False, widget=forms.PasswordInput(render_value=False),
        help_text="Injected into the environment of the jobs of the organization (or of the pipeline) and masked "
                  "in their logs. On an existing secret, leave empty to keep the current value.",
    )

    class Meta:
        model = Secret
        fields = ["organization", "pipeline", "name", "protected"]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["value"].required = self.instance.pk is None

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        value = data.get("value")
        name = data.get("name") if "name" in self.fields else self.instance.name
        for field, messages in secret_services.secret_errors(name=name, value=value).items():
            # An empty value on the change page keeps the stored one (the field is not required there).
            if field in self.fields and not (field == "value" and not value):
                self.add_error(field, messages)
        organization, pipeline = data.get("organization"), data.get("pipeline")
        if organization is not None and pipeline is not None and pipeline.organization_id != organization.pk:
            self.add_error("pipeline", "The pipeline belongs to another organization.")
        return data


@admin.register(Secret)
class SecretAdmin(admin.ModelAdmin):
    form = SecretForm
    list_display = ["name", "organization", "pipeline", "protected", "updated_at"]
    list_filter = ["protected"]
    search_fields = ["name", "organization__slug", "pipeline__slug"]
    list_select_related = ["organization", "pipeline"]
    raw_id_fields = ["organization", "pipeline"]

    def get_readonly_fields(self, request: HttpRequest, obj: Secret | None = None) -> list[str]:
        # Renaming or moving a secret is deleting it and setting another: only the value changes here.
        if obj is not None:
            return ["organization", "pipeline", "name", "created_at", "updated_at"]
        return []

    def save_model(self, request: HttpRequest, obj: Secret, form: Any, change: bool) -> None:
        value = form.cleaned_data.get("value")
        protected = form.cleaned_data["protected"]
        if change and not value:  # the value was left empty: keep it
            if "protected" in form.changed_data:
                secret_services.set_secret_protected(secret=obj, protected=protected)
            return
        # Through the service, so the value is encrypted the one way the API does it.
        secret, _ = secret_services.set_secret(organization=obj.organization, pipeline=obj.pipeline, name=obj.name,
                                               value=value, protected=protected)
        obj.pk, obj.updated_at = secret.pk, secret.updated_at
        obj._state.adding = False


class PipelineScheduleForm(forms.ModelForm):
    """Checked by the schedules service (cron, zone, branch, commit, env), which also computes the next run."""

    class Meta:
        model = PipelineSchedule
        fields = ["pipeline", "cron", "timezone", "branch", "commit", "message", "env", "enabled", "created_by"]

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        pipeline = data.get("pipeline")
        if pipeline is None:
            return data
        values = {name: data.get(name) for name in schedule_services.EDITABLE}
        values["env"] = {} if values["env"] is None else values["env"]
        values["message"] = values["message"] or None
        fields, clean = schedule_services.schedule_errors(pipeline=pipeline, values=values)
        for field, messages in fields.items():
            self.add_error(field if field in self.fields else None, messages)
        if not fields:
            data.update(clean)
        return data


@admin.register(PipelineSchedule)
class PipelineScheduleAdmin(admin.ModelAdmin):
    form = PipelineScheduleForm
    list_display = ["pipeline", "cron", "timezone", "branch", "enabled", "next_run_at", "last_run_at"]
    list_filter = ["enabled"]
    search_fields = ["pipeline__slug", "pipeline__organization__slug", "branch", "cron"]
    list_select_related = ["pipeline"]
    raw_id_fields = ["pipeline", "created_by"]
    readonly_fields = ["next_run_at", "last_run_at", "last_build", "created_at", "updated_at"]

    def save_model(self, request: HttpRequest, obj: PipelineSchedule, form: Any, change: bool) -> None:
        data = form.cleaned_data
        if change:
            schedule_services.update_schedule(schedule=obj, changes={name: data[name]
                                                                     for name in schedule_services.EDITABLE})
            return
        saved = schedule_services.create_schedule(
            pipeline=data["pipeline"], cron=data["cron"], timezone_name=data["timezone"], branch=data["branch"],
            commit=data["commit"], message=data["message"], env=data["env"], enabled=data["enabled"],
            created_by=data.get("created_by") or request.user)
        obj.pk, obj._state.adding = saved.pk, False


@admin.register(ScheduledRun)
class ScheduledRunAdmin(admin.ModelAdmin):
    """The record of each due time a schedule acted on; written by the tick only."""

    list_display = ["schedule", "due_at", "build", "created_at"]
    list_select_related = ["schedule", "build"]
    raw_id_fields = ["schedule", "build"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
