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
from organizations.models import Organization


class Command(BaseCommand):
    help = "Create an organization owned by --owner (created if missing) and print only its slug."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--name", required=True, help="Display name; the slug is derived from it.")
        parser.add_argument("--owner", required=True, help="Email of the owner; the user is created if missing.")

    def handle(self, *args: Any, name: str, owner: str, **options: Any) -> None:
        name = name.strip()
        max_length = Organization._meta.get_field("name").max_length
        if not name or len(name) > max_length:
            raise CommandError(f"--name must be 1-{max_length} characters.")
        owner = owner.strip()
        try:
            validate_email(owner)
        except ValidationError:
            raise CommandError(f"--owner {owner!r} is not a valid email address.") from None
        user, _ = services.get_or_create_user(email=owner)
        self.stdout.write(services.create_organization(name=name, owner=user).slug)
