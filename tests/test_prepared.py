"""Statements prepared once per PostgreSQL connection (harmont/prepared.py): how a
statement is written out for PREPARE and EXECUTE, how a logged EXECUTE reads back,
and on a real connection that it is prepared once, survives a rollback, is prepared
again on a new connection, can be turned off, and fails with Django's errors.
"""

from __future__ import annotations

import time
from typing import Any

import psycopg
import pytest
from django.db import DatabaseError, connection, transaction
from django.db.utils import DataError, ProgrammingError
from django.test.utils import CaptureQueriesContext

from harmont import prepared
from tests.helpers import is_postgres

postgres_only = pytest.mark.skipif(not is_postgres(), reason="prepared statements are PostgreSQL's")
sqlite_only = pytest.mark.skipif(is_postgres(), reason="SQLite runs every statement as it is")


def run(label: str, sql: str, params: list[Any]) -> tuple[Any, ...] | None:
    with connection.cursor() as cursor:
        prepared.execute(cursor, label, sql, params)
        return cursor.fetchone()


def prepared_names() -> list[str]:
    # Read on the connection the statements were prepared on: they live only in its session.
    with connection.cursor() as cursor:
        cursor.execute("SELECT name FROM pg_prepared_statements ORDER BY name")
        return [name for (name,) in cursor.fetchall()]


# ===================================================================== statement and text_of


def test_placeholders_are_numbered_in_order():
    sql = "SELECT %s::int + %s::int, %s::text"
    made = prepared.statement("t_numbered", sql)
    assert made.prepare == f"PREPARE {made.name} AS SELECT $1::int + $2::int, $3::text"


def test_a_doubled_percent_is_one_percent_sign_and_no_placeholder():
    # The LIKE escape `\%` must reach PostgreSQL as is, and `%%s` is a percent sign and an `s`.
    made = prepared.statement("t_percent", "SELECT %s LIKE 'a\\%%', '%%s', %s")
    assert made.prepare == f"PREPARE {made.name} AS SELECT $1 LIKE 'a\\%', '%s', $2"
    assert made.execute == f"EXECUTE {made.name}(%s, %s)"


def test_the_name_starts_with_the_label_and_differs_for_different_sql():
    one = prepared.statement("t_named", "SELECT %s::int")
    other = prepared.statement("t_named", "SELECT %s::int + 1")
    assert one.name.startswith("t_named_") and other.name.startswith("t_named_")
    assert one.name != other.name
    # Built again from the same parts, a statement has the same name: it is prepared once, not per call.
    assert prepared.statement("t_named", "SELECT %s::int").name == one.name


def test_execute_binds_one_placeholder_per_parameter():
    made = prepared.statement("t_arguments", "SELECT %s::int, %s::int, %s::int")
    assert made.execute == f"EXECUTE {made.name}(%s, %s, %s)"
    assert made.execute.count("%s") == 3


def test_a_statement_without_parameters_is_executed_without_parentheses():
    # `EXECUTE name()` is a syntax error in PostgreSQL.
    made = prepared.statement("t_no_arguments", "SELECT 1")
    assert made.prepare == f"PREPARE {made.name} AS SELECT 1"
    assert made.execute == f"EXECUTE {made.name}"


def test_an_execute_reads_back_as_its_statement():
    sql = "SELECT %s::text || %s::int"
    made = prepared.statement("t_read_back", sql)
    assert prepared.text_of(made.execute) == sql
    # As a query log shows it: with the bound literals after the name.
    assert prepared.text_of(f"EXECUTE {made.name}('a', 1)") == sql


def test_other_sql_reads_back_unchanged():
    prepared.statement("t_unchanged", "SELECT %s::int")
    for sql in ["SELECT 1", "SELECT %s::int", "EXECUTE some_statement_of_another('a')", "UPDATE t SET x = 1"]:
        assert prepared.text_of(sql) == sql


# ===================================================================== on PostgreSQL


@postgres_only
@pytest.mark.django_db
def test_a_statement_is_prepared_once_per_connection():
    sql = "SELECT %s::int + 1"
    made = prepared.statement("t_once", sql)
    assert made.name not in prepared_names()

    with CaptureQueriesContext(connection) as queries:
        answers = [run("t_once", sql, [n]) for n in (1, 10, 100)]

    assert answers == [(2,), (11,), (101,)]
    assert prepared_names().count(made.name) == 1
    # One query per execute, the EXECUTE: the PREPARE goes on the driver's connection, uncounted.
    logged = [query["sql"] for query in queries.captured_queries]
    assert len(logged) == 3
    assert all(text.startswith(f"EXECUTE {made.name}(") for text in logged)
    assert [prepared.text_of(text) for text in logged] == [sql] * 3


@postgres_only
@pytest.mark.django_db
def test_a_percent_sign_reaches_postgresql_as_one():
    sql = "SELECT 'a%%' LIKE %s, 'a%%' LIKE 'a\\%%'"
    assert run("t_like", sql, ["a%"]) == (True, True)
    assert run("t_like", sql, ["b%"]) == (False, True)


# A real transaction, not the savepoint a django_db test's own transaction would make of atomic().
@postgres_only
@pytest.mark.django_db(transaction=True)
def test_a_statement_prepared_in_a_rolled_back_transaction_is_still_prepared():
    sql = "SELECT %s::int * 2"
    made = prepared.statement("t_rolled_back", sql)

    class Abandoned(Exception):
        pass

    with pytest.raises(Abandoned), transaction.atomic():
        assert run("t_rolled_back", sql, [2]) == (4,)
        raise Abandoned

    # The module still counts it prepared, so this is an EXECUTE of what the rollback kept.
    assert run("t_rolled_back", sql, [3]) == (6,)
    assert prepared_names().count(made.name) == 1


# Closing the connection needs a test outside a transaction of its own.
@postgres_only
@pytest.mark.django_db(transaction=True)
def test_a_new_connection_prepares_the_statement_again():
    sql = "SELECT %s::int - 1"
    made = prepared.statement("t_reconnect", sql)
    assert run("t_reconnect", sql, [5]) == (4,)
    before = connection.connection

    connection.close()

    assert run("t_reconnect", sql, [7]) == (6,)
    assert connection.connection is not before
    assert prepared_names().count(made.name) == 1


@postgres_only
@pytest.mark.django_db
def test_turned_off_a_statement_runs_as_plain_sql(settings):
    settings.PREPARED_STATEMENTS = False
    sql = "SELECT %s::int + 2"
    before = prepared_names()

    with CaptureQueriesContext(connection) as queries:
        assert run("t_turned_off", sql, [40]) == (42,)

    assert [query["sql"] for query in queries.captured_queries] == ["SELECT 40::int + 2"]
    assert prepared_names() == before


@postgres_only
@pytest.mark.django_db
def test_an_error_running_a_prepared_statement_is_djangos():
    sql = "SELECT 1 / %s"
    # In a savepoint, so the connection can still be asked what was prepared.
    with pytest.raises(DataError) as raised, transaction.atomic():
        run("t_division", sql, [0])
    assert not isinstance(raised.value, psycopg.Error)
    assert isinstance(raised.value.__cause__, psycopg.errors.DivisionByZero)
    # The error came from the EXECUTE of a prepared statement, not from plain SQL.
    assert prepared.statement("t_division", sql).name in prepared_names()


@postgres_only
@pytest.mark.django_db
def test_an_error_preparing_a_statement_is_djangos():
    # PREPARE runs on the driver's connection, outside Django's cursor and the errors it translates.
    with pytest.raises(ProgrammingError) as raised:
        run("t_unpreparable", "SELECT no_such_column + %s", [1])
    assert isinstance(raised.value, DatabaseError) and not isinstance(raised.value, psycopg.Error)


@postgres_only
@pytest.mark.django_db(transaction=True)
def test_a_changed_result_type_fails_once_and_the_connection_is_replaced():
    with connection.cursor() as cursor:
        cursor.execute("CREATE TABLE t_changing (x integer, y integer)")
        cursor.execute("INSERT INTO t_changing VALUES (7, 8)")
    try:
        sql = "SELECT y FROM t_changing WHERE x = %s"
        assert run("t_changing", sql, [7]) == (8,)
        with connection.cursor() as cursor:
            cursor.execute("ALTER TABLE t_changing ALTER COLUMN y TYPE text")
        assert connection.close_at is None or connection.close_at > time.monotonic() + 1
        with pytest.raises(DatabaseError):
            run("t_changing", sql, [7])
        # What the end of a request does: the connection is past its time, so it goes.
        assert connection.close_at is not None and connection.close_at <= time.monotonic()
        connection.close_if_unusable_or_obsolete()
        assert connection.connection is None
        assert run("t_changing", sql, [7]) == ("8",)
    finally:
        with connection.cursor() as cursor:
            cursor.execute("DROP TABLE t_changing")


# ===================================================================== on SQLite


@sqlite_only
@pytest.mark.django_db
def test_on_sqlite_a_statement_runs_as_it_is():
    with CaptureQueriesContext(connection) as queries:
        assert run("t_sqlite", "SELECT %s + 1, 'a%%' LIKE 'a%%'", [41]) == (42, 1)
    assert [query["sql"] for query in queries.captured_queries] == ["SELECT 41 + 1, 'a%' LIKE 'a%'"]
