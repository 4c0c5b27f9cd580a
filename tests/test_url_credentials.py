"""A token written into a repository URL (`https://user:token@host/repo.git`) reaches the agents'
checkout and nothing people read: not job logs, not git's errors, not members' API answers or pages.
Admins and owners, who manage pipelines, still see the URL they stored."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from django.test import Client

from builds.agent import runner as agent_runner
from builds.agent.checkout import SourceError
from builds.agent.logs import LogShipper
from builds.agent.runner import Agent
from builds.agent.spec import JobSpec
from harmont.redaction import redact_url_credentials
from organizations.models import User
from pipelines import services as pipeline_services
from pipelines.models import Pipeline
from tests.helpers import make_api
from tests.test_secrets_masking import FakeTransport, shipped

TOKEN = "ghp_s3cr3tT0kenValue"
URL = f"https://x-access-token:{TOKEN}@git.example.com/acme/web.git"


@pytest.mark.parametrize(("text", "shown"), [
    (URL, "https://***@git.example.com/acme/web.git"),
    (f"fatal: could not read from {URL}: denied", "fatal: could not read from https://***@git.example.com/acme/web.git: denied"),
    ("https://user@host/r.git and http://a:b@h:8080/x", "https://***@host/r.git and http://***@h:8080/x"),
    ("https://git.example.com/acme/web.git", "https://git.example.com/acme/web.git"),
    ("git@github.com:acme/web.git", "git@github.com:acme/web.git"),  # scp-style: a user name, no secret
    ("see ssh://git@host/x and mail me@example.com", "see ssh://***@host/x and mail me@example.com"),
])
def test_credentials_in_urls_are_redacted(text: str, shown: str) -> None:
    assert redact_url_credentials(text) == shown


@pytest.fixture
def tokened(org: Any) -> Pipeline:
    return pipeline_services.create_pipeline(org=org, name="Tokened", repository=URL, default_branch="main")


@pytest.mark.django_db
def test_members_never_see_the_token_and_admins_do(tokened: Pipeline, member: User, owner: User) -> None:
    as_member = make_api(member)
    path = f"/api/v0/organizations/{tokened.organization.slug}/pipelines"
    for response in (as_member.get(path), as_member.get(f"{path}/{tokened.slug}")):
        assert response.status_code == 200 and TOKEN not in response.content.decode()
    assert as_member.get(f"{path}/{tokened.slug}").json()["repository"] == "https://***@git.example.com/acme/web.git"
    assert make_api(owner).get(f"{path}/{tokened.slug}").json()["repository"] == URL


@pytest.mark.django_db
def test_the_pages_never_show_the_token(tokened: Pipeline, member: User, owner: User) -> None:
    tokened.repo_name = ""
    tokened.save(update_fields=["repo_name"])
    for user in (member, owner):
        browser = Client()
        browser.force_login(user)
        org = tokened.organization.slug
        for url in (f"/orgs/{org}/", f"/orgs/{org}/pipelines/{tokened.slug}/"):
            page = browser.get(url).content.decode()
            assert TOKEN not in page and "https://***@git.example.com/acme/web.git" in page, url


def git_job() -> JobSpec:
    job = {"id": "job-1", "command": "true", "env": {}, "timeout_seconds": 60, "step_key": "a",
           "source": {"kind": "git", "url": URL, "commit": "HEAD", "branch": "main"}}
    return JobSpec.from_claim({"job": job, "job_token": "hmj_x"})


def test_the_checkout_line_of_the_job_log_hides_the_token(monkeypatch: Any, tmp_path: Path) -> None:
    monkeypatch.setattr(agent_runner, "git_checkout", lambda url, **kwargs: "a" * 40)
    agent = Agent(server="http://127.0.0.1:9", token="hma_x", workdir=str(tmp_path))
    transport = FakeTransport()
    shipper = LogShipper(transport, git_job())  # type: ignore[arg-type]
    agent._prepare_workspace(git_job(), tmp_path, shipper)
    shipper.flush()
    log = "".join(chunk["content"] for chunk in shipped(transport))
    assert "checked out https://***@git.example.com/acme/web.git at " in log and TOKEN not in log


def test_a_failed_checkout_reports_gits_error_without_the_token(monkeypatch: Any, tmp_path: Path) -> None:
    def failing(url: str, **kwargs: Any) -> str:
        raise SourceError(f"git fetch failed: fatal: unable to access '{url}/': Could not resolve host")

    monkeypatch.setattr(agent_runner, "git_checkout", failing)
    agent = Agent(server="http://127.0.0.1:9", token="hma_x", workdir=str(tmp_path))
    transport = FakeTransport()
    agent.transport = transport  # type: ignore[assignment]
    agent.run_job(git_job())
    sent = repr(transport.sent)
    assert "workspace_unavailable" in sent and "https://***@git.example.com" in sent and TOKEN not in sent
