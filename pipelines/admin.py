from typing import Any

from django import forms
from django.contrib import admin
from django.http import HttpRequest
from django.utils import timezone

from harmont.crypto import encrypt_text
from pipelines import agent_tags
from pipelines.models import Pipeline, Repository
from pipelines.models import Secret
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
    list_display = ["slug", "organization", "name", "repo_name", "source_slug", "allow_manual", "build_counter",
                    "created_at", "archived_at"]
    list_filter = ["allow_manual", "visibility", "fork_pull_requests"]
    search_fields = ["slug", "name", "repo_name", "repository", "organization__slug"]
    list_select_related = ["organization"]
    raw_id_fields = ["organization"]
    # The counter hands out build numbers; editing it by hand would create gaps or duplicates.
    readonly_fields = ["build_counter", "created_at"]


class RepositoryForm(forms.ModelForm):
    """The webhook secret is write-only: typed in, stored encrypted, never shown again."""

    webhook_secret = forms.CharField(
        required=False, strip=False, widget=forms.PasswordInput(render_value=False),
        help_text="The secret GitHub signs this repository's webhooks with. Leave empty to keep the current one.",
    )

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
        repository.updated_at = timezone.now()
        if commit:
            repository.save()
        return repository


@admin.register(Repository)
class RepositoryAdmin(admin.ModelAdmin):
    form = RepositoryForm
    list_display = ["repo_name", "organization", "url", "has_webhook_secret", "updated_at"]
    search_fields = ["repo_name", "url", "organization__slug"]
    list_select_related = ["organization"]
    raw_id_fields = ["organization"]
    readonly_fields = ["has_webhook_secret", "created_at", "updated_at"]

    @admin.display(description="webhook secret set", boolean=True)
    def has_webhook_secret(self, repository: Repository) -> bool:
        return bool(repository.webhook_secret_encrypted)


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
