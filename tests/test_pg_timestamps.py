"""PostgreSQL timestamps read by psycopg's C loader (harmont/pg_timestamps.py) are what Django's loader reads."""

from __future__ import annotations

import datetime
from types import SimpleNamespace

import pytest
from django.db import connection

from harmont import pg_timestamps
from tests.helpers import is_postgres

VALUES = ["2026-12-04 19:45:29.577444+00", "2026-01-01 00:00:00+00", "2026-01-01 00:00:00.000001+00",
          "2026-06-30 23:59:59.999999+02", "0001-01-01 00:00:00+00", "9999-12-31 23:59:59.999999+00",
          "2024-02-29 12:00:00.5-07:30"]


def read(values: list[str]) -> list[datetime.datetime]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT v::timestamptz FROM unnest(%s::text[]) AS v", [values])
        return [row[0] for row in cursor.fetchall()]


@pytest.mark.skipif(not is_postgres(), reason="PostgreSQL's loaders")
@pytest.mark.django_db
def test_the_native_loader_reads_what_djangos_reads():
    from django.db.backends.postgresql.psycopg_any import register_tzloader

    connection.ensure_connection()
    raw = connection.connection
    assert raw.adapters.get_loader(1184, 0).__name__ == "UtcTimestamptzLoader"
    native = read(VALUES)

    saved = raw.adapters
    try:
        raw._adapters = type(saved)(saved)  # a copy, so Django's loader goes back out with it
        register_tzloader(datetime.timezone.utc, raw)
        assert raw.adapters.get_loader(1184, 0).__name__ == "SpecificTzLoader"
        djangos = read(VALUES)
    finally:
        raw._adapters = saved

    assert native == djangos
    assert all(value.tzinfo is datetime.timezone.utc for value in native)
    assert native[2].microsecond == 1 and native[3] == datetime.datetime(2026, 6, 30, 21, 59, 59, 999999,
                                                                          tzinfo=datetime.timezone.utc)


def test_a_connection_in_another_zone_keeps_djangos_loader():
    registered = []
    raw = SimpleNamespace(info=SimpleNamespace(timezone=datetime.timezone.utc),
                          adapters=SimpleNamespace(register_loader=lambda *args: registered.append(args)))
    elsewhere = SimpleNamespace(vendor="postgresql", timezone=datetime.timezone(datetime.timedelta(hours=2)),
                                connection=raw)
    pg_timestamps._register(None, elsewhere)
    assert registered == []

    raw.info.timezone = datetime.timezone(datetime.timedelta(hours=1))  # the session's zone is not UTC
    pg_timestamps._register(None, SimpleNamespace(vendor="postgresql", timezone=datetime.timezone.utc,
                                                  connection=raw))
    assert registered == []

    raw.info.timezone = datetime.timezone.utc
    pg_timestamps._register(None, SimpleNamespace(vendor="postgresql", timezone=datetime.timezone.utc,
                                                  connection=raw))
    assert len(registered) == 1
