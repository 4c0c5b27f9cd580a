"""Pipelines: a repeatable CI workflow of one organization."""

from __future__ import annotations

from django.db import models
from django.db.models.functions import Lower
from django.utils import timezone

from organizations.models import Organization


class Visibility(models.TextChoices):
    PRIVATE = "private"
    PUBLIC = "public"


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
    # The last build number handed out. Incremented under the row lock inside the
    # transaction that inserts the build, so numbers have no gaps or duplicates.
    build_counter = models.PositiveIntegerField(default=0)
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
