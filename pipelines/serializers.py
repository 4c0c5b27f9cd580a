"""Pipeline JSON <-> Python."""

from __future__ import annotations

from rest_framework import serializers

from harmont.serializers import page_serializer
from pipelines.models import Pipeline, Visibility


class PipelineSerializer(serializers.ModelSerializer):
    class Meta:
        model = Pipeline
        fields = ["slug", "name", "description", "repository", "repo_name", "default_branch", "visibility",
                  "allow_manual", "source_slug", "definition", "triggers", "created_at"]
        read_only_fields = fields


PipelineListSerializer = page_serializer("PipelineList", PipelineSerializer)


class AnyJSONField(serializers.JSONField):
    """An IR document given either as a JSON object or as a JSON string."""


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

    def validate_name(self, value: str) -> str:
        if not any(c.isalnum() for c in value):
            raise serializers.ValidationError("must contain at least one letter or digit")
        return value
