"""Template filters shared by the pages (`{% load harmont_pages %}`), and the duration
formatting the build page's status poll shares with them."""

from __future__ import annotations

from datetime import datetime

from django import template
from django.utils import timezone
from django.utils.html import format_html
from django.utils.safestring import SafeString
from django.utils.timesince import timesince

from builds.models import Build, Job
from harmont.labels import with_emoji
from harmont.redaction import redact_url_credentials

register = template.Library()


@register.filter
def emoji(label: str | None) -> str:
    """`{{ job.name|emoji }}`: shortcodes as emoji (harmont.labels); the template still escapes the text."""
    return with_emoji(label)


@register.filter
def ago(value: datetime | None) -> SafeString | str:
    """`<time>` with "3 minutes ago" (the exact UTC time on hover); "just now" under a minute."""
    if value is None:
        return ""
    now = timezone.now()
    text = "just now" if (now - value).total_seconds() < 60 else f"{timesince(value, now, depth=1)} ago"
    return format_html('<time datetime="{}" title="{} UTC">{}</time>', value.isoformat(),
                       value.strftime("%Y-%m-%d %H:%M:%S"), text)


def duration_seconds(row: Build | Job, now: datetime) -> float | None:
    """Seconds from start to finish, or to `now` while it runs; None before it started."""
    if row.started_at is None:
        return None
    return max(0.0, ((row.finished_at or now) - row.started_at).total_seconds())


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    whole = int(seconds)
    if whole < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{whole} s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes} m {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} m"


@register.filter
def duration(row: Build | Job) -> str:
    """`{{ build|duration }}`: "4.2 s", "3 m 07 s", "1 h 02 m"; a running row counts up to now, "" before it started."""
    return format_duration(duration_seconds(row, timezone.now()))


@register.filter
def seconds(value: float | None) -> str:
    """`{{ trends.p50_seconds|seconds }}`: a number of seconds as `duration` words it; "—" for none."""
    return format_duration(value) or "—"


@register.filter
def percent(value: float | None) -> str:
    """`{{ 0.934|percent }}` → "93%" ("—" for none); never rounds a failure to 0% or a miss to 100%."""
    if value is None:
        return "—"
    shown = round(value * 100)
    if shown == 0 and value > 0:
        return "<1%"
    if shown == 100 and value < 1:
        return ">99%"
    return f"{shown}%"


@register.filter
def without_credentials(url: str | None) -> str:
    """A repository URL as pages show it: no user or token (those are for the agents' checkout)."""
    return redact_url_credentials(url or "")
