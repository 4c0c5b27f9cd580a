"""Statements PostgreSQL plans once per connection: the few that every agent request runs.

Planning, not running, was most of what PostgreSQL spent on a busy agent's job:
2.4 ms of its 4.6 ms per job by pg_stat_statements, the claim statement alone
1.1 ms of planning for 1.2 ms of running (bench/README.md). A statement run on
`cursor()` is prepared on its connection the first time (at the protocol level,
with its parameters bound by the server: harmont.postgres.PreparingCursor) and
only bound and run after that, through Django's cursor wrapper, which counts and
logs it as the one query it is. PostgreSQL plans a prepared statement again by
itself when a table it reads changes, and otherwise keeps a generic plan once
that costs no more than the plans it made for the values.

Only these statements: the ORM's queries keep the client-side binding Django
uses by default. A prepared statement lives as long as the database session:
HARMONT_PREPARED_STATEMENTS=0 turns this off for a pooler that can't keep a
session's prepared statements. SQLite runs every statement as it is (its
connection already caches them).
"""

from __future__ import annotations

from django.conf import settings
from django.db import connection
from django.db.backends.utils import CursorWrapper


def enabled() -> bool:
    return connection.vendor == "postgresql" and settings.PREPARED_STATEMENTS


def cursor() -> CursorWrapper:
    """A cursor (to use as a context manager) whose statements are prepared, where they are (see the module)."""
    return connection.prepared_cursor() if enabled() else connection.cursor()
