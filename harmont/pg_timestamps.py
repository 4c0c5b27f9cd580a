"""Reading PostgreSQL timestamps with psycopg's C loader, not Django's pure-Python one.

Django's PostgreSQL backend registers its own `timestamptz` loader on every connection: a
subclass of psycopg's pure-Python loader that replaces the time zone of each value it parsed.
With psycopg's C implementation installed (`psycopg[binary]`) that skips the C loader, so each
timestamp is matched by a regular expression in Python and each query builds the loader again
in Python: a 50-build page's 200 timestamps cost 0.8 ms that way and 0.16 ms in C (bench/README.md).

When the connection's session time zone is UTC and Django wants UTC (`USE_TZ`, no per-database
`TIME_ZONE`: what harmont/settings.py configures), both loaders give the same aware datetimes in
`datetime.timezone.utc`, so the C one is registered in Django's place. Elsewhere nothing changes.
"""

from __future__ import annotations

import datetime
from typing import Any

from django.db.backends.signals import connection_created

try:
    from psycopg import pq
    from psycopg.adapt import Loader
except ImportError:  # psycopg 2, or SQLite only
    pq = None  # type: ignore[assignment]

_UTC = datetime.timezone.utc


def _native_loader() -> type | None:
    if pq is None or pq.__impl__ not in ("c", "binary"):
        return None
    if pq.__impl__ == "binary":
        from psycopg_binary._psycopg import TimestamptzLoader as CLoader
    else:
        from psycopg_c._psycopg import TimestamptzLoader as CLoader

    class UtcTimestamptzLoader(Loader):
        """psycopg's C loader behind the `timezone` attribute Django's cursors check (its C type takes no
        subclass): Django sees the zone it wants and leaves the loader alone."""

        timezone = _UTC

        def __init__(self, oid: int, context: Any = None) -> None:
            super().__init__(oid, context)
            self.load = CLoader(oid, context).load  # type: ignore[method-assign]

        def load(self, data: Any) -> datetime.datetime:  # replaced per instance by the C loader's
            raise NotImplementedError

    return UtcTimestamptzLoader


_LOADER = _native_loader()


def _register(sender: Any, connection: Any, **kwargs: Any) -> None:
    if connection.vendor != "postgresql" or _LOADER is None or connection.timezone is not _UTC:
        return
    raw = connection.connection
    if raw.info.timezone is _UTC:  # the session's zone, which the C loader reads values in
        raw.adapters.register_loader("timestamptz", _LOADER)


def use_native_timestamp_loader() -> None:
    """Register the C loader on every new PostgreSQL connection where it gives what Django's would."""
    connection_created.connect(_register, dispatch_uid="harmont.pg_timestamps")
