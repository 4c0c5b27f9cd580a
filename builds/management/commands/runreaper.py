"""`python manage.py runreaper`: fail jobs of lost agents, time out overdue jobs and builds, prune expired
idempotency keys."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand

from builds.reaper import run_reaper

log = logging.getLogger("harmont.reaper")


class Command(BaseCommand):
    help = "Run the reaper loop (one per deployment is enough; more are harmless)."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--interval", type=float, default=settings.REAPER_INTERVAL_SECONDS)
        parser.add_argument("--once", action="store_true", help="One pass, then exit")

    def handle(self, *args: Any, **options: Any) -> None:
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        run_reaper(stop=stop, interval=options["interval"], once=options["once"])
