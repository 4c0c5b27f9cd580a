"""Filters of the build and artifact lists (django-filter), combinable with the keyset cursor."""

from __future__ import annotations

import django_filters

from builds.models import Artifact, Build, BuildSource, BuildState


class BuildFilter(django_filters.FilterSet):
    branch = django_filters.CharFilter()
    commit = django_filters.CharFilter()
    state = django_filters.ChoiceFilter(choices=BuildState.choices)
    source = django_filters.ChoiceFilter(choices=BuildSource.choices)
    created_after = django_filters.IsoDateTimeFilter(field_name="created_at", lookup_expr="gte")
    created_before = django_filters.IsoDateTimeFilter(field_name="created_at", lookup_expr="lt")

    class Meta:
        model = Build
        fields = ["branch", "commit", "state", "source", "created_after", "created_before"]


# A list whose query names none of these needs no FilterSet (building one costs a list of builds a tenth).
BUILD_FILTERS = frozenset(BuildFilter.base_filters)


class ArtifactFilter(django_filters.FilterSet):
    job_id = django_filters.UUIDFilter(field_name="job_id")

    class Meta:
        model = Artifact
        fields = ["job_id"]
