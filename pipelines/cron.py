"""Cron arithmetic for pipeline schedules, from `croniter` (no home-made cron parsing).

Five fields, read as wall-clock time in the schedule's IANA time zone, so
`0 9 * * 1-5` is nine in the morning there in summer and winter alike. A
wall-clock time a daylight saving change skips is due at the first minute after
the gap; one it repeats is due at each of its two UTC instants (croniter's
behaviour with a zone-aware start). Pure functions: no ORM.
"""

from __future__ import annotations

import zoneinfo
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone
from functools import lru_cache
from typing import Any

from croniter import croniter

CRON_FIELDS = 5
CRON_MAX_LENGTH = 100


@lru_cache(maxsize=1)
def _zones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones())


def cron_problem(cron: Any) -> str | None:
    """Why `cron` is no 5-field cron expression croniter accepts (None: it is one)."""
    if not isinstance(cron, str) or not cron.strip():
        return "Must be a cron expression of 5 fields: minute hour day-of-month month day-of-week."
    if len(cron) > CRON_MAX_LENGTH:
        return f"At most {CRON_MAX_LENGTH} characters."
    if len(cron.split()) != CRON_FIELDS:
        return (f"Must have exactly 5 fields (minute hour day-of-month month day-of-week); "
                f"got {len(cron.split())}.")
    if not croniter.is_valid(cron):
        return "Not a valid cron expression."
    return None


def zone_problem(name: Any) -> str | None:
    """Why `name` is no IANA time zone name (None: it is one)."""
    if not isinstance(name, str) or name not in _zones():
        return "Must be an IANA time zone name, such as UTC or Europe/Berlin."
    return None


def next_due_after(*, cron: str, zone: str, after: datetime) -> datetime:
    """The first due time strictly after `after`, in UTC."""
    start = after.astimezone(zoneinfo.ZoneInfo(zone))
    return croniter(cron, start).get_next(datetime).astimezone(dt_timezone.utc)


def latest_due_at_or_before(*, cron: str, zone: str, moment: datetime) -> datetime:
    """The last due time at or before `moment`, in UTC (croniter's `get_prev` is strict, hence the second)."""
    start = (moment + timedelta(seconds=1)).astimezone(zoneinfo.ZoneInfo(zone))
    return croniter(cron, start).get_prev(datetime).astimezone(dt_timezone.utc)
