"""`manage.py createorg --name N --owner E`: create an organization and print only its slug.

The owner is created (with their personal organization) if missing. The slug
follows the API's rules, so a second organization with the same name gets
`-2`. Errors go to stderr with a non-zero exit status.
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.core.validators import validate_email

from organizations import services


class Command(BaseCommand):
    help = "Create an organization owned by --owner (created if missing) and print only its slug."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--name", required=True, help="Display name; the slug is derived from it.")
        parser.add_argument("--owner", required=True, help="Email of the owner; the user is created if missing.")
        parser.add_argument("--existing-user", action="store_true",
                            help="Allow an owner account that signed itself up at /signup (its email is unconfirmed).")

    def handle(self, *args: Any, name: str, owner: str, existing_user: bool = False, **options: Any) -> None:
        name = name.strip()
        # Checked before the owner is created, so a refused name creates nothing.
        errors = services.organization_name_errors(name)
        if errors:
            raise CommandError(f"--name {name[:80]!r}: {errors[0]}")
        owner = owner.strip()
        try:
            validate_email(owner)
        except ValidationError:
            raise CommandError(f"--owner {owner!r} is not a valid email address.") from None
        user, _ = services.get_or_create_user(email=owner)
        refusal = None if existing_user else services.existing_account_error(user)
        if refusal:
            raise CommandError(refusal)
        self.stdout.write(services.create_organization(name=name, owner=user).slug)
