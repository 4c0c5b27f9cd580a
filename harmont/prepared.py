"""Statements PostgreSQL plans once per connection: the few that every agent request runs.

Planning, not running, was most of what PostgreSQL spent on a busy agent's job:
2.4 ms of its 4.6 ms per job by pg_stat_statements, the claim statement alone
1.1 ms of planning for 1.2 ms of running (bench/README.md). A statement run through
`execute` is prepared on its connection the first time (PREPARE, sent on the
driver's connection, so it is no query of the request's own and query counts stay
what they were) and from then on run with EXECUTE through Django's cursor, which
counts and logs it as the one query it is. PostgreSQL plans a prepared statement
again by itself when a table it reads changes (a migration), and otherwise keeps a
generic plan once that costs no more than the plans it made for the values; a
migration that changes the type of a column the statement answers fails it once
per connection, which is then replaced.

A prepared statement lives as long as the database session, and only there:
HARMONT_PREPARED_STATEMENTS=0 turns this off for a pooler that hands a server
session from one client to another between transactions (PgBouncer in transaction
mode), where a statement prepared through one session would be missing in the next.
SQLite runs every statement as it is (its connection already caches them).
"""

from __future__ import annotations

import functools
import hashlib
import re
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.db import DatabaseError
from django.db.backends.utils import CursorWrapper

# What psycopg's client-side binding reads in a query: `%s` a parameter, `%%` a percent sign.
_PLACEHOLDER = re.compile(r"%%|%s")

# The statements prepared on each driver connection (a new connection prepares them again).
_prepared: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()
# Each name's statement, for reading a logged EXECUTE back (text_of).
_texts: dict[str, str] = {}
_EXECUTE = re.compile(r"EXECUTE (\w+)")
# feature_not_supported: "cached plan must not change result type".
_CACHED_PLAN_CHANGED = "0A000"


@dataclass(frozen=True)
class Statement:
    name: str
    prepare: str  # PREPARE name AS <the statement with $1, $2, ...>
    execute: str  # EXECUTE name(%s, ...), for the cursor to bind


@functools.cache
def statement(label: str, sql: str) -> Statement:
    """`sql` (with `%s` placeholders) as a prepared statement named after `label` and the text itself.

    The text's digest is part of the name: statements built from parts (one
    per combination of columns set, say) each get a name of their own.
    """
    name = f"{label}_{hashlib.sha1(sql.encode()).hexdigest()[:12]}"
    count = 0

    def number(match: re.Match[str]) -> str:
        nonlocal count
        if match.group() == "%%":
            return "%"
        count += 1
        return f"${count}"

    body = _PLACEHOLDER.sub(number, sql)
    _texts[name] = sql
    arguments = f"({', '.join(['%s'] * count)})" if count else ""
    return Statement(name, f"PREPARE {name} AS {body}", f"EXECUTE {name}{arguments}")


def text_of(sql: str) -> str:
    """A logged query as the statement it ran: an EXECUTE of this module's is its prepared statement's text."""
    found = _EXECUTE.match(sql)
    return _texts.get(found.group(1), sql) if found else sql


def enabled(cursor: CursorWrapper) -> bool:
    return cursor.db.vendor == "postgresql" and settings.PREPARED_STATEMENTS


def execute(cursor: CursorWrapper, label: str, sql: str, params: Sequence[Any]) -> None:
    """Run `sql` with `params` on `cursor`; on PostgreSQL as a statement prepared once per connection."""
    if not enabled(cursor):
        cursor.execute(sql, params)
        return
    prepared = statement(label, sql)
    driver = cursor.db.connection
    names = _prepared.get(driver)
    if names is None:
        names = _prepared.setdefault(driver, set())
    if prepared.name not in names:
        # PREPARE is not transactional: a rollback of the transaction it ran in keeps it.
        # Its errors are Django's, as the cursor's would be (and mark the connection for a check).
        with cursor.db.wrap_database_errors:
            driver.execute(prepared.prepare)
        names.add(prepared.name)
    try:
        cursor.execute(prepared.execute, params)
    except DatabaseError as error:
        if getattr(error.__cause__, "sqlstate", None) == _CACHED_PLAN_CHANGED:
            # A migration changed the type of a column the statement answers, and PostgreSQL
            # won't run its plan with the new type. The connection goes at the end of the request
            # (as one past CONN_MAX_AGE), and the next one prepares the statement as it now reads.
            cursor.db.close_at = time.monotonic()
        raise
