"""Unix time in nanoseconds, the unit log chunks carry on the wire (what the hosted service and `hm` use)."""

from __future__ import annotations

from datetime import datetime, timezone

# 2**63 - 1 ns is in the year 2262: every instant a chunk can have fits a signed 64-bit integer.
MAX_NS = 2**63 - 1
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def is_unix_ns(value: object) -> bool:
    """An int (never a bool) that is a Unix time in nanoseconds this server stores."""
    return type(value) is int and 0 <= value <= MAX_NS


def ns_from_datetime(value: datetime) -> int:
    """`value` (aware) as Unix nanoseconds, exact to its microsecond (no float rounding)."""
    delta = value - _EPOCH
    return ((delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds) * 1_000


def datetime_from_ns(value: int) -> datetime:
    """Unix nanoseconds as an aware UTC datetime (to the microsecond: what datetime holds)."""
    seconds, ns = divmod(value, 1_000_000_000)
    return datetime.fromtimestamp(seconds, tz=timezone.utc).replace(microsecond=ns // 1_000)
