"""`python manage.py rotatesecrets`: re-encrypt stored secrets with the first key of HARMONT_SECRETS_KEY."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError

from pipelines.secrets import rotate_encryption


class Command(BaseCommand):
    help = ("Re-encrypt every secret and webhook secret with the first key of HARMONT_SECRETS_KEY, "
            "so that the other keys can be removed.")

    def handle(self, *args: Any, **options: Any) -> None:
        unreadable = 0
        for kind, count in rotate_encryption().items():
            self.stdout.write(f"{kind}: {count.rotated} re-encrypted, {count.current} already current, "
                              f"{count.unreadable} unreadable")
            unreadable += count.unreadable
        if unreadable:
            # Nonzero, so that a script dropping the old keys next stops here.
            raise CommandError(f"{unreadable} value(s) open with no configured key; keep the keys that did "
                               "encrypt them, or set those values again.")
