"""`rotatesecrets`: every secret and webhook secret ends up under the first key of
HARMONT_SECRETS_KEY, so the older keys can be removed; running it again changes nothing; a value
no key opens is reported and left as it is."""

from __future__ import annotations

from io import StringIO
from typing import Any

import pytest
from cryptography.fernet import Fernet
from django.core.management import CommandError, call_command

from harmont.crypto import decrypt_text, encrypt_text
from pipelines import secrets as secret_services
from pipelines.models import Repository, Secret

pytestmark = pytest.mark.django_db


def rotate() -> str:
    out = StringIO()
    call_command("rotatesecrets", stdout=out)
    return out.getvalue()


def opens_with(key: str, token: str) -> bool:
    try:
        Fernet(key.encode()).decrypt(token.encode())
        return True
    except Exception:
        return False


@pytest.fixture
def old_key(settings: Any) -> str:
    return settings.SECRETS_KEYS[0]


@pytest.fixture
def stored(org, pipeline, old_key) -> dict[str, Any]:
    """Two secrets and two webhook secrets written under the old key, and a repository without one."""
    secret_services.set_secret(organization=org, name="ORG_TOKEN", value="org-value")
    secret_services.set_secret(organization=org, pipeline=pipeline, name="PIPE_TOKEN", value="pipe-value")
    repos = [Repository.objects.create(organization=org, url=f"https://x/{i}.git", repo_name=f"x/{i}",
                                       webhook_secret_encrypted=encrypt_text(f"hook-{i}")) for i in range(2)]
    Repository.objects.create(organization=org, url="https://x/none.git", repo_name="x/none")
    return {"repos": repos}


def test_rotatesecrets_reencrypts_everything_with_the_first_key(settings, old_key, stored, org, pipeline):
    new_key = Fernet.generate_key().decode()
    settings.SECRETS_KEYS = [new_key, old_key]

    out = rotate()

    assert "secrets: 2 re-encrypted, 0 already current, 0 unreadable" in out
    assert "webhook secrets: 2 re-encrypted, 0 already current, 0 unreadable" in out
    tokens = list(Secret.objects.values_list("value_encrypted", flat=True))
    tokens += [repo.webhook_secret_encrypted for repo in Repository.objects.exclude(webhook_secret_encrypted="")]
    assert len(tokens) == 4
    assert all(opens_with(new_key, token) and not opens_with(old_key, token) for token in tokens)
    # The old key can go: everything still reads.
    settings.SECRETS_KEYS = [new_key]
    assert secret_services.secrets_for_job(organization_id=org.pk, pipeline_id=pipeline.pk) == {
        "ORG_TOKEN": "org-value", "PIPE_TOKEN": "pipe-value"}
    assert sorted(decrypt_text(repo.webhook_secret_encrypted)
                  for repo in Repository.objects.exclude(webhook_secret_encrypted="")) == ["hook-0", "hook-1"]
    assert Repository.objects.get(repo_name="x/none").webhook_secret_encrypted == ""


def test_rotatesecrets_run_again_changes_nothing(settings, old_key, stored):
    settings.SECRETS_KEYS = [Fernet.generate_key().decode(), old_key]
    rotate()
    before = sorted(Secret.objects.values_list("value_encrypted", flat=True))

    out = rotate()

    assert "secrets: 0 re-encrypted, 2 already current, 0 unreadable" in out
    assert "webhook secrets: 0 re-encrypted, 2 already current, 0 unreadable" in out
    assert sorted(Secret.objects.values_list("value_encrypted", flat=True)) == before


def test_rotatesecrets_works_in_batches(settings, old_key, stored, org, monkeypatch):
    monkeypatch.setattr(secret_services, "ROTATE_BATCH", 1)
    for i in range(3):
        secret_services.set_secret(organization=org, name=f"MORE_{i}", value=f"v{i}")
    new_key = Fernet.generate_key().decode()
    settings.SECRETS_KEYS = [new_key, old_key]

    assert "secrets: 5 re-encrypted" in rotate()
    assert all(opens_with(new_key, token) for token in Secret.objects.values_list("value_encrypted", flat=True))


def test_rotatesecrets_reports_an_unreadable_value_and_fails(settings, old_key, stored, org):
    stranger_key = Fernet.generate_key().decode()
    Secret.objects.create(organization=org, name="LOST", value_encrypted=Fernet(stranger_key.encode())
                          .encrypt(b"lost").decode())
    lost_before = Secret.objects.get(name="LOST").value_encrypted
    new_key = Fernet.generate_key().decode()
    settings.SECRETS_KEYS = [new_key, old_key]

    out = StringIO()
    with pytest.raises(CommandError, match="1 value"):
        call_command("rotatesecrets", stdout=out)

    assert "secrets: 2 re-encrypted, 0 already current, 1 unreadable" in out.getvalue()
    assert Secret.objects.get(name="LOST").value_encrypted == lost_before
    assert opens_with(new_key, Secret.objects.get(name="ORG_TOKEN").value_encrypted)


def test_rotatesecrets_leaves_a_value_written_meanwhile(settings, old_key, stored, org, monkeypatch):
    """A secret set between the read and the write keeps its new value (it is under the first key already)."""
    new_key = Fernet.generate_key().decode()
    settings.SECRETS_KEYS = [new_key, old_key]
    real = secret_services.reencrypt_text

    def racing(token: str) -> str | None:
        result = real(token)
        if Secret.objects.filter(value_encrypted=token, name="ORG_TOKEN").exists():
            secret_services.set_secret(organization=org, name="ORG_TOKEN", value="changed")
        return result

    monkeypatch.setattr(secret_services, "reencrypt_text", racing)
    out = rotate()

    assert "secrets: 1 re-encrypted, 1 already current" in out
    settings.SECRETS_KEYS = [new_key]
    assert decrypt_text(Secret.objects.get(name="ORG_TOKEN").value_encrypted) == "changed"
