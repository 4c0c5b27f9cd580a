"""The PostgreSQL backend's health check (harmont/postgres/base.py): no round trip for a quiet connection,
Django's own check, and a new connection, for one the server ended."""

from __future__ import annotations

import time

import psycopg
import pytest
from django.conf import settings
from django.db import connection

from tests.helpers import is_postgres

pytestmark = [pytest.mark.skipif(not is_postgres(), reason="the backend is PostgreSQL's"),
              pytest.mark.django_db(transaction=True)]


def next_request() -> None:
    # What Django does between two requests on a persistent connection: the next one checks it again.
    connection.close_if_unusable_or_obsolete()
    assert not connection.health_check_done


def backend_pid() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return cursor.fetchone()[0]


def from_another_session(sql: str, params: list) -> None:
    db = settings.DATABASES["default"]
    with psycopg.connect(host=db["HOST"], port=db["PORT"] or 5432, user=db["USER"], dbname=db["NAME"],
                         autocommit=True) as other:
        other.execute(sql, params)


def test_a_quiet_connection_is_checked_without_asking_the_server(monkeypatch):
    pid = backend_pid()
    asked: list[bool] = []
    monkeypatch.setattr(connection, "is_usable", lambda: asked.append(True) or True)
    next_request()

    connection.close_if_health_check_failed()

    assert asked == [] and connection.health_check_done
    assert backend_pid() == pid  # the same session went on


def test_a_connection_the_server_ended_is_replaced_before_the_request_uses_it():
    pid = backend_pid()
    next_request()
    from_another_session("SELECT pg_terminate_backend(%s)", [pid])
    deadline = time.monotonic() + 5
    while connection._quiet() and time.monotonic() < deadline:
        time.sleep(0.01)  # the server's goodbye is on its way
    assert not connection._quiet()

    connection.close_if_health_check_failed()  # Django's own check answers: it is gone

    assert connection.connection is None
    assert backend_pid() != pid


def test_a_connection_with_something_to_read_gets_the_real_check(monkeypatch):
    # A message the server sent unasked: here a notification another session made, to one this session hears.
    with connection.cursor() as cursor:
        cursor.execute("LISTEN harmont_health_check_test")
    asked: list[bool] = []
    real = connection.is_usable
    monkeypatch.setattr(connection, "is_usable", lambda: asked.append(True) or real())
    next_request()
    from_another_session("NOTIFY harmont_health_check_test", [])
    deadline = time.monotonic() + 5
    while connection._quiet() and time.monotonic() < deadline:
        time.sleep(0.01)

    connection.close_if_health_check_failed()

    assert asked == [True] and connection.health_check_done
    with connection.cursor() as cursor:
        cursor.execute("UNLISTEN *")
