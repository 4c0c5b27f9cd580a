"""Emoji shortcodes in labels (`:wave: hello`): emoji on every page and in the admin, text everywhere else."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client

from builds.models import Job
from harmont.labels import with_emoji
from organizations.models import User
from pipelines import services as pipeline_services
from tests.dsl import hm
from tests.helpers import make_build

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize(("label", "shown"), [
    (":wave: hello", "👋 hello"),
    (":+1: :rocket: ship it", "👍 🚀 ship it"),
    (":white_check_mark: tests", "✅ tests"),
    (":shipit: unknown codes stay", ":shipit: unknown codes stay"),
    ("no codes: just a colon", "no codes: just a colon"),
    ("", ""),
    (None, ""),
])
def test_known_shortcodes_become_emoji_and_the_rest_stays(label: str | None, shown: str) -> None:
    assert with_emoji(label) == shown


@pytest.fixture
def labelled(org: Any) -> Any:
    pipe = pipeline_services.create_pipeline(
        org=org, name=":rocket: Deploy", repository="https://github.com/acme/deploy.git", default_branch="main",
        definition=hm.pipeline([hm.sh("echo hi", key="hello", label=":wave: hello <b>"),
                                hm.sh("echo x", key="odd", label=":shipit: as typed")]))
    return make_build(pipe, message=":tada: release")


def test_the_pages_show_emoji_and_still_escape_the_label(owner: User, labelled: Any) -> None:
    web = Client()
    web.force_login(owner)
    org, pipe = labelled.pipeline.organization.slug, labelled.pipeline.slug

    build_page = web.get(f"/orgs/{org}/pipelines/{pipe}/builds/{labelled.number}").content.decode()
    history = web.get(f"/orgs/{org}/pipelines/{pipe}/").content.decode()
    pipelines = web.get(f"/orgs/{org}/").content.decode()

    assert "<strong>👋 hello &lt;b&gt;</strong>" in build_page
    assert "<strong>:shipit: as typed</strong>" in build_page
    assert "🎉 release" in build_page and "🚀 Deploy" in build_page
    assert "🎉 release" in history and "<h1>🚀 Deploy</h1>" in history
    assert "<h2>🚀 Deploy</h2>" in pipelines
    # Stored as written: the API answers the label people typed.
    assert Job.objects.get(build=labelled, step_key="hello").name == ":wave: hello <b>"


def test_the_admin_shows_emoji(labelled: Any) -> None:
    ops = Client()
    ops.force_login(User.objects.create_superuser("ops@example.com", "a-long-passphrase"))

    jobs = ops.get("/admin/builds/job/").content.decode()
    builds = ops.get("/admin/builds/build/").content.decode()
    one_build = ops.get(f"/admin/builds/build/{labelled.pk}/change/").content.decode()
    pipelines = ops.get("/admin/pipelines/pipeline/").content.decode()

    assert "👋 hello &lt;b&gt;" in jobs and ":shipit: as typed" in jobs
    assert "🎉 release" in builds
    assert "👋 hello &lt;b&gt;" in one_build  # the build's job list
    assert "🚀 Deploy" in pipelines
