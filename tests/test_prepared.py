"""Statements prepared once per PostgreSQL connection (harmont/prepared.py, harmont/postgres/base.py):
prepared on their first run and counted as one query each, prepared again whenever PostgreSQL or
psycopg forgot them (a rollback, a new connection, a changed column type), Django's errors, and
the ORM's own queries left as they were."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from django.db import DatabaseError, connection, transaction
from django.db.utils import DataError
from django.test.utils import CaptureQueriesContext

from harmont import prepared
from harmont.postgres.base import PreparingCursor
from organizations.models import Organization
from tests.helpers import is_postgres

postgres_only = pytest.mark.skipif(not is_postgres(), reason="prepared statements are PostgreSQL's")


def run(sql: str, params: list[Any]) -> tuple[Any, ...] | None:
    with prepared.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchone()


def prepared_statements() -> list[str]:
    # Read on the connection they were prepared on: they live only in its session.
    with connection.cursor() as cursor:
        cursor.execute("SELECT statement FROM pg_prepared_statements ORDER BY statement")
        return [statement for (statement,) in cursor.fetchall()]


@postgres_only
@pytest.mark.django_db
def test_a_statement_is_prepared_on_its_first_run_and_counted_as_one_query():
    sql = "SELECT %s::int + 1 AS counted"
    with CaptureQueriesContext(connection) as queries:
        answers = [run(sql, [n]) for n in (1, 2, 3)]

    assert answers == [(2,), (3,), (4,)]
    assert prepared_statements().count("SELECT $1::int + 1 AS counted") == 1
    # Logged with its values, as Django logs any query.
    assert [query["sql"] for query in queries.captured_queries] == [
        "SELECT 1::int + 1 AS counted", "SELECT 2::int + 1 AS counted", "SELECT 3::int + 1 AS counted"]


@postgres_only
@pytest.mark.django_db
def test_a_percent_sign_and_a_like_escape_reach_postgresql_as_written():
    assert run("SELECT %s LIKE 'a\\%%', 'x%%s'", ["a%"]) == (True, "x%s")


@postgres_only
@pytest.mark.django_db(transaction=True)
def test_after_a_rollback_the_statement_runs_again():
    sql = "SELECT %s::int * 2 AS after_rollback"
    assert run(sql, [2]) == (4,)
    with pytest.raises(RuntimeError), transaction.atomic():
        assert run(sql, [3]) == (6,)
        raise RuntimeError("rolled back")
    assert run(sql, [4]) == (8,)


@postgres_only
@pytest.mark.django_db(transaction=True)
def test_a_new_connection_prepares_the_statement_again():
    sql = "SELECT %s::int - 1 AS reconnected"
    assert run(sql, [5]) == (4,)
    first = connection.connection
    connection.close()

    assert run(sql, [6]) == (5,)
    assert connection.connection is not first
    assert prepared_statements().count("SELECT $1::int - 1 AS reconnected") == 1


@postgres_only
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("in_transaction", [False, True])
def test_a_changed_column_type_fails_one_run_and_the_next_prepares_anew(in_transaction):
    with connection.cursor() as cursor:
        cursor.execute("CREATE TABLE t_changing (x integer, y integer)")
        cursor.execute("INSERT INTO t_changing VALUES (7, 8)")
    try:
        sql = "SELECT y FROM t_changing WHERE x = %s"
        assert run(sql, [7]) == (8,)
        # A migration from another process: this session's cache of statements doesn't see it.
        db = connection.settings_dict
        with psycopg.connect(host=db["HOST"], port=db["PORT"] or 5432, user=db["USER"], dbname=db["NAME"],
                             autocommit=True) as other:
            other.execute("ALTER TABLE t_changing ALTER COLUMN y TYPE text")
        with pytest.raises(DatabaseError):  # "cached plan must not change result type"
            if in_transaction:
                with transaction.atomic():
                    run(sql, [7])
            else:
                run(sql, [7])
        assert run(sql, [7]) == ("8",)
    finally:
        with connection.cursor() as cursor:
            cursor.execute("DROP TABLE t_changing")


@postgres_only
@pytest.mark.django_db
def test_an_error_of_a_prepared_statement_is_djangos():
    with pytest.raises(DataError) as raised, transaction.atomic():
        run("SELECT 1 / %s", [0])
    assert not isinstance(raised.value, psycopg.Error)
    assert isinstance(raised.value.__cause__, psycopg.errors.DivisionByZero)


@postgres_only
@pytest.mark.django_db
def test_the_orms_queries_are_not_prepared():
    for _ in range(8):  # past any threshold
        list(Organization.objects.filter(slug="prepared-or-not"))
    assert not [statement for statement in prepared_statements() if "prepared-or-not" in statement
                or "organizations_organization" in statement]


@postgres_only
@pytest.mark.django_db
def test_turned_off_statements_run_on_the_ordinary_cursor(settings):
    settings.PREPARED_STATEMENTS = False
    before = prepared_statements()
    with prepared.cursor() as cursor:
        assert not isinstance(cursor.cursor, PreparingCursor)
        cursor.execute("SELECT %s::int + 2 AS turned_off", [40])
        assert cursor.fetchone() == (42,)
    assert prepared_statements() == before


@pytest.mark.skipif(is_postgres(), reason="SQLite's case")
@pytest.mark.django_db
def test_on_sqlite_a_statement_runs_as_it_is():
    with CaptureQueriesContext(connection) as queries:
        assert run("SELECT %s + 1, 'a%%' LIKE 'a%%'", [41]) == (42, 1)
    assert [query["sql"] for query in queries.captured_queries] == ["SELECT 41 + 1, 'a%' LIKE 'a%'"]
