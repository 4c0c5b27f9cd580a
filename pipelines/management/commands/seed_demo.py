"""Seed a demo user, organization `demo`, pipeline `hello` and a personal API token.

Idempotent: re-running finds the same user, organization and pipeline. The
password and the token are secrets we only keep hashed, so each run sets a
fresh password and replaces the previous demo token, and prints both.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand
from django.db import transaction
from django.utils import timezone

from organizations.models import ApiToken, Membership, Organization, Role, TokenKind
from organizations.services import create_organization, create_personal_token, get_or_create_user
from pipelines.models import Pipeline
from pipelines.services import create_pipeline

DEMO_EMAIL = "demo@example.com"
DEMO_TOKEN_DESCRIPTION = "demo token (make run)"


def _node(key: str, cmd: str, label: str, **step: Any) -> dict[str, Any]:
    return {"step": {"key": key, "cmd": cmd, "label": label, **step},
            "env": {"DEBIAN_FRONTEND": "noninteractive", "TERM": "dumb"}}


# What `hm.pipeline([...])` renders for: hello -> build -> test (each building in
# its parent's files), plus `lint` ordered after hello.
HELLO_DEFINITION: dict[str, Any] = {
    "version": "0",
    "timeout_seconds": 600,
    "graph": {
        "nodes": [
            _node("hello", "echo 'Hello from Harmont'; cat README.md; uname -a", ":wave: hello",
                  image="ubuntu:24.04"),
            _node("build", "mkdir -p out && date -u > out/built-at.txt && echo built", ":hammer: build"),
            # Its JUnit report (an artifact under test-results/) gives the build page its Tests section.
            _node("test", "test -s out/built-at.txt && echo \"tested build from $(cat out/built-at.txt)\""
                          " && mkdir -p \"$HARMONT_ARTIFACTS/test-results\" && printf '%s\\n'"
                          " '<testsuite name=\"demo\" tests=\"2\"><testcase classname=\"demo\" name=\"build_output_exists\"/>"
                          "<testcase classname=\"demo\" name=\"build_output_is_dated\"/></testsuite>'"
                          " > \"$HARMONT_ARTIFACTS/test-results/demo.xml\"",
                  ":test_tube: test"),
            _node("lint", "echo 'lint: nothing to complain about'", ":mag: lint", timeout_seconds=60),
        ],
        "edges": [[0, 1, "builds_in"], [1, 2, "builds_in"], [0, 3, "depends_on"]],
        "node_holes": [],
        "edge_property": "directed",
    },
}


DEMO_README = "Hello from the demo repository: the `hello` pipeline's agent checked this file out with git.\n"


def demo_repository() -> str:
    """A local git repository for the demo pipeline, so its builds check out real code.

    Returns its `file://` URL, or "" (builds start with an empty workspace) when git is missing.
    """
    path = settings.BASE_DIR / "var" / "demo-repo"
    if not (path / ".git").exists():
        path.mkdir(parents=True, exist_ok=True)
        (path / "README.md").write_text(DEMO_README)
        identity = {"GIT_AUTHOR_NAME": "Harmont demo", "GIT_AUTHOR_EMAIL": DEMO_EMAIL,
                    "GIT_COMMITTER_NAME": "Harmont demo", "GIT_COMMITTER_EMAIL": DEMO_EMAIL}
        try:
            for command in (["init", "--quiet", "--initial-branch=main"], ["add", "README.md"],
                            ["commit", "--quiet", "-m", "The demo repository"]):
                subprocess.run(["git", *command], cwd=path, env={**os.environ, **identity}, check=True,
                               capture_output=True)
        except (OSError, subprocess.CalledProcessError):
            return ""
    return path.as_uri()


class Command(BaseCommand):
    help = "Create (or refresh) the demo user, organization, pipeline and API token; print how to use them."

    @transaction.atomic
    def handle(self, *args: Any, **options: Any) -> None:
        user, _ = get_or_create_user(email=DEMO_EMAIL, name="Demo User")
        password = secrets.token_urlsafe(12)
        user.set_password(password)
        user.is_staff = user.is_superuser = True  # the demo user may open /admin/
        user.save(update_fields=["password", "is_staff", "is_superuser"])

        org = Organization.objects.filter(slug="demo").first()
        if org is None:
            org = create_organization(name="demo", owner=user)
        Membership.objects.update_or_create(organization=org, user=user, defaults={"role": Role.OWNER})

        repository = demo_repository()
        pipeline = Pipeline.objects.for_org(org).filter(slug="hello").first()
        if pipeline is None:
            pipeline = create_pipeline(org=org, name="hello", repository=repository, repo_name="demo/hello",
                                       default_branch="main", source_slug="hello", definition=HELLO_DEFINITION)
        elif pipeline.repository != repository:
            pipeline.repository = repository
            pipeline.save(update_fields=["repository"])

        ApiToken.objects.filter(user=user, kind=TokenKind.PERSONAL, description=DEMO_TOKEN_DESCRIPTION,
                                revoked_at__isnull=True).update(revoked_at=timezone.now())
        token = create_personal_token(user=user, description=DEMO_TOKEN_DESCRIPTION).raw

        base, app = settings.PUBLIC_URL, settings.APP_URL
        builds = f"{base}/api/v0/organizations/{org.slug}/pipelines/{pipeline.slug}/builds"
        self.stdout.write(
            "\n"
            f"Harmont demo is ready at {app}/\n"
            f"  sign in:      {app}/login  as {DEMO_EMAIL} / {password}  (also {app}/admin/)\n"
            f"  API token:    {token}\n"
            f"  try it:\n"
            f"    curl -s -X POST {builds} \\\n"
            f"      -H 'Authorization: Bearer {token}' -H 'Content-Type: application/json' \\\n"
            f"      -d '{{\"branch\": \"main\", \"commit\": \"HEAD\", \"message\": \"hello\"}}'\n"
            f"    curl -s {builds} -H 'Authorization: Bearer {token}'\n"
        )
