"""`python manage.py prune`: delete old builds with their files, or stored files no row names."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from builds.services.retention import prune_builds, prune_orphans


class Command(BaseCommand):
    help = ("Delete finished builds older than --builds-older-than DAYS (jobs, logs, sources, workspaces, "
            "artifacts), or with --orphans the stored files no row names.")

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--builds-older-than", type=int, metavar="DAYS",
                            help="Delete finished builds created more than DAYS days ago")
        parser.add_argument("--keep-last", type=int, default=0, metavar="N",
                            help="Keep each pipeline's newest N builds whatever their age")
        parser.add_argument("--orphans", action="store_true",
                            help="Delete stored files under sources/, workspaces/ and artifacts/ that no row names")
        parser.add_argument("--dry-run", action="store_true", help="Report what would be deleted; delete nothing")

    def handle(self, *args: Any, **options: Any) -> None:
        days, keep_last, dry_run = options["builds_older_than"], options["keep_last"], options["dry_run"]
        if days is None and not options["orphans"]:
            raise CommandError("Say what to prune: --builds-older-than DAYS and/or --orphans.")
        if days is not None and days < 0:
            raise CommandError("--builds-older-than must be 0 or more days.")
        if keep_last < 0:
            raise CommandError("--keep-last must be 0 or more.")
        if keep_last and days is None:
            raise CommandError("--keep-last goes with --builds-older-than.")
        verb = "Would delete" if dry_run else "Deleted"
        if days is not None:
            report = prune_builds(older_than_days=days, keep_last=keep_last, dry_run=dry_run)
            self.stdout.write(f"{verb} {report.builds} build(s), {report.jobs} job(s), {report.log_chunks} "
                              f"log chunk(s), {report.artifacts} artifact(s), {report.files} stored file(s).")
        if options["orphans"]:
            orphans = prune_orphans(dry_run=dry_run)
            self.stdout.write(f"{verb} {orphans.files} orphaned stored file(s).")
