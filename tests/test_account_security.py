"""Accounts that strangers could take over: open sign-up, operators' commands, password guessing.

- Sign-up is off by default; an account that signed itself up gets an organization from
  `createorg`/`createtoken --org` only with `--existing-user` (its email is unconfirmed).
- Failed sign-ins on /login and /admin/login/ are throttled (django-axes) per account and per
  client address, with one message whether or not the account exists.
"""

from __future__ import annotations

from io import StringIO
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from django.test import Client

from organizations import services
from organizations.models import ApiToken, Membership, Organization, User

pytestmark = pytest.mark.django_db

PASSWORD = "pw-123456-long"  # what conftest's make_user sets
LIMIT = 10  # HARMONT_LOGIN_FAILURE_LIMIT's default


def run(command: str, *args: str) -> str:
    out = StringIO()
    call_command(command, *args, stdout=out, stderr=StringIO())
    return out.getvalue().strip()


@pytest.fixture
def squatter(settings: Any) -> User:
    """Someone who signed up as the address an operator is about to give an organization."""
    settings.SIGNUP_ENABLED = True
    response = Client().post("/signup", {"email": "ops@acme.test", "name": "", "password": "a-long-passphrase"})
    assert response.status_code == 302
    return User.objects.get(email="ops@acme.test")


# ---------------------------------------------------------------- operators' commands

def test_createorg_refuses_to_hand_an_organization_to_a_self_registered_account(squatter: User) -> None:
    with pytest.raises(CommandError, match="signed itself up.*--existing-user"):
        run("createorg", "--name", "Acme", "--owner", "ops@acme.test")
    assert not Organization.objects.filter(name="Acme").exists()
    assert list(Membership.objects.filter(user=squatter).values_list("organization__slug", flat=True)) == \
        [squatter.personal_org.slug]


def test_createorg_gives_it_with_existing_user(squatter: User) -> None:
    slug = run("createorg", "--name", "Acme", "--owner", "ops@acme.test", "--existing-user")
    assert Membership.objects.get(organization__slug=slug).user == squatter


def test_createorg_still_takes_accounts_the_operators_made(make_user: Any) -> None:
    made = make_user("ops@acme.test")  # created by an operator (admin, createtoken, invites)
    slug = run("createorg", "--name", "Acme", "--owner", "ops@acme.test")
    assert Membership.objects.get(organization__slug=slug).user == made


def test_createtoken_refuses_to_add_a_self_registered_account_to_an_organization(squatter: User,
                                                                                 org: Organization) -> None:
    with pytest.raises(CommandError, match="signed itself up"):
        run("createtoken", "--email", "ops@acme.test", "--org", org.slug)
    assert not Membership.objects.filter(organization=org, user=squatter).exists()
    assert not ApiToken.objects.filter(user=squatter).exists()
    assert run("createtoken", "--email", "ops@acme.test", "--org", org.slug, "--existing-user").startswith("hm_")
    assert Membership.objects.filter(organization=org, user=squatter).exists()


def test_createtoken_without_an_organization_gives_nothing_away(squatter: User) -> None:
    assert run("createtoken", "--email", "ops@acme.test").startswith("hm_")


def test_accounts_created_by_operators_are_not_self_registered(make_user: Any) -> None:
    assert not make_user("someone@example.com").self_registered
    user, _ = services.get_or_create_user(email="other@example.com")
    assert not user.self_registered


# ---------------------------------------------------------------- password guessing

def sign_in(client: Client, email: str, password: str, path: str = "/login") -> Any:
    return client.post(path, {"username": email, "password": password})


def test_an_account_is_paused_after_too_many_wrong_passwords_from_anywhere(owner: User) -> None:
    for i in range(LIMIT - 1):
        response = sign_in(Client(REMOTE_ADDR=f"198.51.100.{i}"), owner.email, "wrong-password")
        assert response.status_code == 200 and "correct" in response.content.decode()
    assert sign_in(Client(REMOTE_ADDR="198.51.100.99"), owner.email, "wrong-password").status_code == 429
    # Now even the right password, from a new address, in another spelling of the email, waits.
    locked = sign_in(Client(REMOTE_ADDR="203.0.113.7"), " Owner@Example.com", PASSWORD)
    assert locked.status_code == 429 and "Try again in 15 minutes" in locked.content.decode()
    assert locked["Retry-After"] == "900"
    assert "_auth_user_id" not in locked.client.session


def test_an_address_is_paused_after_too_many_failures_across_accounts(owner: User, make_user: Any) -> None:
    other = make_user("other@example.com")
    guesser = Client(REMOTE_ADDR="198.51.100.23")
    for i in range(LIMIT - 1):
        assert sign_in(guesser, f"guess{i}@example.com", "wrong-password").status_code == 200
    assert sign_in(guesser, "guess-last@example.com", "wrong-password").status_code == 429
    assert sign_in(guesser, other.email, PASSWORD).status_code == 429
    # The accounts themselves were not the ones guessed at: from elsewhere they sign in.
    assert sign_in(Client(REMOTE_ADDR="203.0.113.8"), other.email, PASSWORD).status_code == 302


def test_the_pause_reads_the_same_for_accounts_that_do_not_exist(owner: User) -> None:
    answers = []
    for email in (owner.email, "nobody@example.com"):
        for i in range(LIMIT):
            sign_in(Client(REMOTE_ADDR=f"198.51.{len(answers)}.{i}"), email, "wrong-password")
        answers.append(sign_in(Client(REMOTE_ADDR=f"192.0.2.{len(answers)}"), email, "wrong-password"))
    assert [a.status_code for a in answers] == [429, 429]
    assert answers[0].content == answers[1].content


def test_a_successful_sign_in_clears_the_accounts_failures(owner: User) -> None:
    browser = Client(REMOTE_ADDR="198.51.100.50")
    for _ in range(LIMIT - 1):
        sign_in(browser, owner.email, "wrong-password")
    assert sign_in(browser, owner.email, PASSWORD).status_code == 302
    browser = Client(REMOTE_ADDR="198.51.100.50")
    for _ in range(LIMIT - 1):
        assert sign_in(browser, owner.email, "wrong-password").status_code == 200


def test_a_forwarded_for_header_does_not_change_the_counted_address(owner: User) -> None:
    for i in range(LIMIT):  # the last of these already answers 429
        sign_in(Client(REMOTE_ADDR="198.51.100.60", HTTP_X_FORWARDED_FOR=f"10.0.0.{i}"), f"g{i}@example.com", "x")
    assert sign_in(Client(REMOTE_ADDR="198.51.100.60", HTTP_X_FORWARDED_FOR="10.9.9.9"),
                   owner.email, PASSWORD).status_code == 429


def test_the_admin_sign_in_is_throttled_too(make_user: Any) -> None:
    staff = services.create_user(email="ops@example.com", password="ops-password-long", is_staff=True)
    for i in range(LIMIT - 1):
        response = sign_in(Client(REMOTE_ADDR=f"198.51.100.{100 + i}"), staff.email, "wrong-password",
                           path="/admin/login/?next=/admin/")
        assert response.status_code == 200
    sign_in(Client(REMOTE_ADDR="198.51.100.200"), staff.email, "wrong-password", path="/admin/login/?next=/admin/")
    locked = sign_in(Client(REMOTE_ADDR="203.0.113.9"), staff.email, "ops-password-long",
                     path="/admin/login/?next=/admin/")
    assert locked.status_code == 429
