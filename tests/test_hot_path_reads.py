"""The reads every API request makes, written out as SQL, load what the ORM would;
BuildSerializer renders exactly what its declared fields describe, and so does
the build list's one statement.

Token authentication (`organizations.sql.token_with_user`) and the build behind a
build-scoped URL (`builds.selectors.scoped_build`) skip the ORM's query compilation,
and BuildSerializer skips DRF's per-instance field copies. These tests hold each
fast path equal to the ORM / DRF path it stands in for, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone as dt_timezone

import pytest
from django.db.models import F, Model
from rest_framework import serializers
from rest_framework.renderers import JSONRenderer
from rest_framework.settings import api_settings

from builds import selectors, sql
from builds.selectors import scoped_build
from builds.sql import SCOPED_BUILD_FIELDS as BUILD_FIELDS
from builds.models import Build, BuildState
from builds.serializers import BUILD_COLUMNS, BuildSerializer, build_data, build_list_data
from harmont.pagination import encode_cursor
from harmont.tokens import hash_secret
from organizations.sql import token_with_user
from organizations import services as org_services
from organizations.models import ApiToken, Membership, Role
from pipelines import services as pipeline_services
from pipelines.models import Pipeline
from tests.helpers import assert_error, builds_url, make_build

T0 = datetime(2026, 6, 4, 12, 0, 0, 123456, tzinfo=dt_timezone.utc)


def loaded_state(instance: Model) -> dict:
    """Every loaded attribute (deferred ones are absent), and how the instance was loaded."""
    values = {name: value for name, value in vars(instance).items() if not name.startswith("_")}
    return {"values": values, "deferred": instance.get_deferred_fields(), "adding": instance._state.adding,
            "db": instance._state.db}


def declared_rendering(build: Build) -> dict:
    """What DRF renders through BuildSerializer's declared fields (its generic to_representation)."""
    return dict(serializers.Serializer.to_representation(BuildSerializer(), build))


# ===================================================================== token authentication


@pytest.mark.django_db
def test_token_lookup_loads_the_token_and_its_user_as_the_orm_does(owner):
    issued = org_services.create_personal_token(user=owner, description="ci", expires_at=T0 + timedelta(days=1))
    ApiToken.objects.filter(pk=issued.token.pk).update(last_used_at=T0)
    expected = ApiToken.objects.select_related("user").get(token_hash=hash_secret(issued.raw))

    token = token_with_user(hash_secret(issued.raw))

    assert loaded_state(token) == loaded_state(expected)
    assert loaded_state(token.user) == loaded_state(expected.user)
    assert token.last_used_at == T0 and token.expires_at == T0 + timedelta(days=1)
    assert token.user.email == "owner@example.com" and token.user.is_active is True


@pytest.mark.django_db
def test_token_lookup_of_an_unknown_hash_is_none(owner):
    org_services.create_personal_token(user=owner, description="ci")
    assert token_with_user(hash_secret("hm_not-a-token-anyone-holds")) is None


@pytest.mark.django_db
def test_token_of_a_deactivated_user_is_401(owner, pipeline, build, api):
    owner.is_active = False
    owner.save(update_fields=["is_active"])
    assert_error(api.get(builds_url(pipeline, "/1")), 401, "unauthorized")


@pytest.mark.django_db
def test_revoked_token_is_refused_on_the_very_next_request(owner, pipeline, build, api):
    assert api.get(builds_url(pipeline, "/1")).status_code == 200
    org_services.revoke_api_token(token=ApiToken.objects.get(user=owner))
    assert_error(api.get(builds_url(pipeline, "/1")), 401, "unauthorized")


# ===================================================================== the build behind a URL


def orm_scoped_build(*, org_slug: str, pipeline_slug: str, number: int, user) -> Build | None:
    """The same read through the ORM."""
    return (
        Build.objects.select_related("pipeline__organization")
        .only(*BUILD_FIELDS, "pipeline__slug", "pipeline__organization__slug")
        .filter(pipeline__organization__slug=org_slug, pipeline__organization__memberships__user=user,
                pipeline__slug=pipeline_slug, pipeline__archived_at__isnull=True, number=number)
        .annotate(caller_role=F("pipeline__organization__memberships__role"))
        .first()
    )


@pytest.mark.django_db
@pytest.mark.parametrize("who", ["owner", "admin_user", "member"])
def test_scoped_build_loads_what_the_orm_loads(request, org, pipeline, who):
    user = request.getfixturevalue(who)
    make_build(pipeline, message="first")
    Build.objects.filter(pipeline=pipeline, number=1).update(
        state=BuildState.FAILED, started_at=T0, finished_at=T0 + timedelta(seconds=3), error_code="boom",
        error_message="it broke", cancel_requested_at=T0)
    args = {"org_slug": org.slug, "pipeline_slug": pipeline.slug, "number": 1, "user": user}

    build, expected = scoped_build(**args), orm_scoped_build(**args)

    assert loaded_state(build) == loaded_state(expected)
    assert loaded_state(build.pipeline) == loaded_state(expected.pipeline)
    assert loaded_state(build.pipeline.organization) == loaded_state(expected.pipeline.organization)
    assert build.caller_role == Membership.objects.get(organization=org, user=user).role
    assert build.finished_at == T0 + timedelta(seconds=3)
    # A deferred column still loads on first use, as with `.only()`.
    assert build.pipeline_ir == Build.objects.get(pk=build.pk).pipeline_ir
    assert build.pipeline.name == pipeline.name


@pytest.mark.django_db
def test_scoped_build_is_none_outside_the_callers_memberships(org, owner, stranger, other_org, pipeline,
                                                               other_pipeline):
    make_build(pipeline)
    make_build(other_pipeline)
    mine = {"org_slug": org.slug, "pipeline_slug": pipeline.slug, "number": 1}

    assert scoped_build(**mine, user=stranger) is None  # not a member
    assert scoped_build(**{**mine, "org_slug": other_org.slug}, user=owner) is None  # their org
    assert scoped_build(**{**mine, "number": 2}, user=owner) is None
    assert scoped_build(**{**mine, "pipeline_slug": "nope"}, user=owner) is None
    Pipeline.objects.filter(pk=pipeline.pk).update(archived_at=T0)
    assert scoped_build(**mine, user=owner) is None


@pytest.mark.django_db
def test_scoped_build_takes_the_pipeline_of_the_named_organization(org, owner, other_org, pipeline):
    # Same pipeline slug and build number in two organizations the caller belongs to.
    Membership.objects.create(organization=other_org, user=owner, role=Role.MEMBER)
    twin = pipeline_services.create_pipeline(org=other_org, name=pipeline.name, repository=pipeline.repository,
                                             default_branch="main")
    assert twin.slug == pipeline.slug
    mine, theirs = make_build(pipeline), make_build(twin)

    found = scoped_build(org_slug=other_org.slug, pipeline_slug=pipeline.slug, number=1, user=owner)

    assert found.pk == theirs.pk != mine.pk
    assert found.pipeline.organization.slug == other_org.slug
    assert found.caller_role == Role.MEMBER


# ===================================================================== BuildSerializer


@pytest.mark.django_db
def test_build_rendering_equals_the_declared_fields(org, owner, pipeline):
    fresh = make_build(pipeline, message=None)  # as create_build returns it: scheduled, never started
    done = make_build(pipeline, message="Fix \u00e9 \"quotes\"")
    Build.objects.filter(pk=done.pk).update(state=BuildState.PASSED, started_at=T0,
                                            finished_at=datetime(999, 1, 2, 3, 4, 5, 6, tzinfo=dt_timezone.utc))
    loaded = [scoped_build(org_slug=org.slug, pipeline_slug=pipeline.slug, number=n, user=owner) for n in (1, 2)]
    listed = list(Build.objects.for_display().filter(pipeline=pipeline).select_related("pipeline"))

    for build in [fresh, *loaded, *listed]:
        assert build_data(build) == declared_rendering(build)
        assert list(build_data(build)) == list(BuildSerializer().fields)
        assert JSONRenderer().render(BuildSerializer(build).data) == JSONRenderer().render(declared_rendering(build))
    assert build_data(loaded[1])["finished_at"] == declared_rendering(loaded[1])["finished_at"]
    assert BuildSerializer(listed, many=True).data == [declared_rendering(build) for build in listed]


@pytest.mark.django_db
def test_the_build_list_renders_each_build_as_the_declared_fields(api, org, pipeline):
    """The list renders rows of columns, not model instances: the same JSON as GET build."""
    make_build(pipeline, message=None)
    done = make_build(pipeline, message="Fix \u00e9 \"quotes\"")
    Build.objects.filter(pk=done.pk).update(state=BuildState.PASSED, started_at=T0, finished_at=T0, rebuild_of=1,
                                            waiting_reason="a reason", error_code="x", fork=True)
    listed = api.get(builds_url(pipeline)).json()["data"]
    assert listed == [api.get(builds_url(pipeline, f"/{n}")).json() for n in (2, 1)]
    assert listed == [declared_rendering(Build.objects.select_related("pipeline").get(pipeline=pipeline, number=n))
                      for n in (2, 1)]


@pytest.mark.django_db
def test_get_build_body_is_the_declared_rendering(api, org, owner, pipeline, build):
    response = api.get(builds_url(pipeline, "/1"))
    assert response.status_code == 200
    build.refresh_from_db()
    assert response.json() == json.loads(JSONRenderer().render(declared_rendering(build)))


# ===================================================================== the build list's statement

UTC = dt_timezone.utc
# Every shape of microseconds a time can have: none, trailing zeros, leading zeros, all six digits;
# and a time given in another zone, shown in UTC.
LIST_TIMES = {
    "created_at": [datetime(2026, 6, 4, 12, 0, 0, tzinfo=UTC), datetime(2026, 1, 2, 3, 4, 5, 120000, tzinfo=UTC)],
    "scheduled_at": [None, datetime(2026, 6, 4, 12, 0, 0, 1, tzinfo=UTC)],
    "started_at": [None, datetime(2026, 6, 4, 14, 0, 0, 500, tzinfo=dt_timezone(timedelta(hours=2)))],
    "finished_at": [None, T0],
}


def list_builds_with_every_time(pipeline: Pipeline) -> None:
    """Builds 1..16: every combination of LIST_TIMES' values, and the other nullable columns set on some."""
    for n in range(16):
        build = make_build(pipeline, message=None if n % 2 else f"change {n}")
        times = {name: values[(n >> bit) & 1] for bit, (name, values) in enumerate(LIST_TIMES.items())}
        extra = {"error_code": "x", "error_message": "why", "rebuild_of": 1, "waiting_reason": "slots", "fork": True,
                 "state": BuildState.FAILED} if n % 3 == 0 else {}
        Build.objects.filter(pk=build.pk).update(**times, **extra)


@pytest.mark.django_db
@pytest.mark.parametrize("in_sql", [True, False], ids=["times-formatted-by-the-database", "times-formatted-in-python"])
def test_the_build_list_statement_renders_what_the_serializer_renders(org, pipeline, monkeypatch, in_sql):
    """On PostgreSQL the statement writes ids and times as text; elsewhere (or for another format) Python does."""
    if not in_sql:
        monkeypatch.setattr(sql, "TO_CHAR_FORMATS", {})
    list_builds_with_every_time(pipeline)
    builds = list(Build.objects.select_related("pipeline").filter(pipeline=pipeline).order_by("-number"))

    read = selectors.pipeline_builds(org=org, pipeline_slug=pipeline.slug, before=None, limit=100,
                                     columns=BUILD_COLUMNS, time_format=api_settings.DATETIME_FORMAT)
    listed = build_list_data(read, pipeline.slug)

    assert len(listed) == 16
    for data, build in zip(listed, builds):
        assert list(data) == list(BuildSerializer().fields)
        assert JSONRenderer().render(data) == JSONRenderer().render(BuildSerializer(build).data)
        assert data == declared_rendering(build)
    assert {listed[-1]["created_at"], listed[-2]["created_at"]} == {"2026-06-04T12:00:00.000000Z",
                                                                    "2026-01-02T03:04:05.120000Z"}
    assert "2026-06-04T12:00:00.000500Z" in {data["started_at"] for data in listed}


@pytest.mark.django_db
def test_the_build_list_body_is_the_serializers_byte_for_byte(api, org, pipeline):
    list_builds_with_every_time(pipeline)

    def expected(numbers: range, next_cursor: str | None) -> bytes:
        shown = Build.objects.select_related("pipeline").filter(pipeline=pipeline, number__in=numbers)
        return JSONRenderer().render({"data": [BuildSerializer(b).data for b in shown.order_by("-number")],
                                      "next_cursor": next_cursor})

    first = api.get(builds_url(pipeline), {"limit": 5})
    deeper = api.get(builds_url(pipeline), {"limit": 5, "cursor": first.json()["next_cursor"]})
    last = api.get(builds_url(pipeline), {"cursor": encode_cursor(6)})

    assert first.content == expected(range(12, 17), encode_cursor(12))
    assert deeper.content == expected(range(7, 12), encode_cursor(7))
    assert last.content == expected(range(1, 6), None)
