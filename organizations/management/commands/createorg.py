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

    def handle(self, *args: Any, name: str, owner: str, **options: Any) -> None:
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
        self.stdout.write(services.create_organization(name=name, owner=user).slug)
