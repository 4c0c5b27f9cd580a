"""`manage.py createtoken --email E [--org SLUG [--existing-user]] [--role R] [--description D]`: print a new personal API token.

For operators and scripts: stdout carries only the token, so
`TOKEN=$(python manage.py createtoken --email ci@example.com --org acme)` works;
every error goes to stderr with a non-zero exit status.
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.core.validators import validate_email

from harmont.errors import ApiError
from organizations import services
from organizations.models import Organization, Role


class Command(BaseCommand):
    help = ("Create a personal API token for a user (created, with their personal organization, if missing), "
            "optionally adding them to an organization, and print only the token.")

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--email", required=True, help="The user's email; the user is created if missing.")
        parser.add_argument("--org", help="Slug of an existing organization to add the user to (or update in).")
        parser.add_argument("--role", choices=Role.values,
                            help="Role in --org: a new member defaults to member; an existing one keeps theirs "
                                 "unless this is given.")
        parser.add_argument("--existing-user", action="store_true",
                            help="With --org: allow an account that signed itself up at /signup (its email is "
                                 "unconfirmed).")
        parser.add_argument("--description", default="created by manage.py createtoken",
                            help="Label shown in the token list.")

    def handle(self, *args: Any, email: str, org: str | None, role: str | None, description: str,
               existing_user: bool = False, **options: Any) -> None:
        email = email.strip()
        try:
            validate_email(email)
        except ValidationError:
            raise CommandError(f"--email {email!r} is not a valid email address.") from None
        if role is not None and org is None:
            raise CommandError("--role needs --org (the organization the role is in).")
        organization = None
        if org is not None:
            organization = Organization.objects.filter(slug=org).first()
            if organization is None:
                raise CommandError(f"No organization {org!r}; create it with `manage.py createorg`.")
        user, _ = services.get_or_create_user(email=email)
        refusal = None if existing_user or organization is None else services.existing_account_error(user)
        if refusal:
            raise CommandError(refusal)
        if organization is not None:
            try:
                services.set_membership(organization=organization, user=user, role=role)
            except ApiError as exc:  # e.g. demoting the last owner
                raise CommandError(exc.message) from None
        issued = services.create_personal_token(user=user, description=description[:255])
        self.stdout.write(issued.raw)
