"""`python manage.py createagenttoken --org SLUG [--description D]`: print a new agent token."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError

from organizations.models import AgentToken, Organization
from organizations.services import create_agent_token, revoke_agent_token


class Command(BaseCommand):
    help = "Create an agent token for an organization and print only the token."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--org", required=True, help="The organization's slug")
        parser.add_argument("--description", default="", help="Where the agents using it run")
        parser.add_argument("--replace", action="store_true",
                            help="Revoke the organization's other tokens with the same description first")

    def handle(self, *args: Any, **options: Any) -> None:
        org = Organization.objects.filter(slug=options["org"]).first()
        if org is None:
            raise CommandError(f"No organization {options['org']!r}.")
        if options["replace"]:
            for old in AgentToken.objects.filter(organization=org, description=options["description"],
                                                 revoked_at__isnull=True):
                revoke_agent_token(token=old)
        self.stdout.write(create_agent_token(organization=org, description=options["description"]).raw)
