"""Template filters shared by the pages (`{% load harmont_pages %}`)."""

from __future__ import annotations

from datetime import datetime

from django import template
from django.utils import timezone
from django.utils.html import format_html
from django.utils.safestring import SafeString
from django.utils.timesince import timesince

register = template.Library()


@register.filter
def ago(value: datetime | None) -> SafeString | str:
    """`<time>` with "3 minutes ago" (the exact UTC time on hover); "just now" under a minute."""
    if value is None:
        return ""
    now = timezone.now()
    text = "just now" if (now - value).total_seconds() < 60 else f"{timesince(value, now, depth=1)} ago"
    return format_html('<time datetime="{}" title="{} UTC">{}</time>', value.isoformat(),
                       value.strftime("%Y-%m-%d %H:%M:%S"), text)
