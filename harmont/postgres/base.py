"""Django's PostgreSQL backend (`ENGINE: harmont.postgres`) with two additions for the hot paths.

A health check that asks the server only when in doubt. With CONN_HEALTH_CHECKS
Django sends `SELECT 1` before the first query of every request on a reused
connection: a round trip, and a transaction of PostgreSQL's, per request (a sixth
of the transactions of a busy agent's job). A connection the server ended (a
restart, pg_terminate_backend, idle_session_timeout) says so on its socket:
PostgreSQL sends its FATAL message and closes, and the socket reads ready. Between
requests nothing else arrives on these connections (they LISTEN to nothing: the
notices have a connection of their own). So an idle connection whose socket has
nothing to read, and that the driver has seen no fault on, counts as checked; any
other gets Django's real check, and a dead one is replaced before the request uses
it, as before. A connection that broke silently (a network cut with no reset) fails
either way: the `SELECT 1` would hang where the request's query does.

And a cursor whose statements are prepared (`prepared_cursor`): what
harmont.prepared runs the agent path's statements on.
"""

from __future__ import annotations

import select
from typing import Any

from django.conf import settings
from django.db.backends.postgresql import base
from django.db.backends.utils import CursorWrapper
import psycopg
from psycopg import pq


class PreparingCursor(base.ServerBindingCursor):
    """Parameters bound by the server, and every statement prepared on its first run.

    psycopg keeps the statements it prepared per connection (the last 100), and
    forgets them all after a ROLLBACK, a DEALLOCATE ALL, or a DROP or ALTER of the
    session's own, to prepare them again.
    """

    def execute(self, query: Any, params: Any = None, *, prepare: bool | None = None,
                binary: bool | None = None) -> Any:
        try:
            return super().execute(query, params, prepare=True, binary=binary)
        except psycopg.errors.FeatureNotSupported:
            # "cached plan must not change result type": a migration changed the type of a column
            # the statement answers. In a transaction, its rollback makes psycopg forget (and the
            # server drop) the connection's statements; outside one nothing would, so forget them
            # here: the next run prepares anew.
            if self.connection.info.transaction_status == pq.TransactionStatus.IDLE:
                self.connection.execute("DEALLOCATE ALL")
            raise


class DatabaseOperations(base.DatabaseOperations):
    def last_executed_query(self, cursor: Any, sql: str, params: Any) -> str | None:
        # What Django logs (and tests capture) for a statement of a PreparingCursor: the SQL
        # with its values, composed the way Django composes it under server-side binding.
        if isinstance(cursor, PreparingCursor):
            try:
                return self.compose_sql(sql, params)
            except psycopg.errors.DataError:
                return None
        return super().last_executed_query(cursor, sql, params)


class DatabaseWrapper(base.DatabaseWrapper):
    ops_class = DatabaseOperations

    def get_connection_params(self) -> dict[str, Any]:
        params = super().get_connection_params()
        if settings.PREPARED_STATEMENTS and params.get("prepare_threshold") is None:
            # Django turns psycopg's prepared statements off (a None threshold), for poolers.
            # Only PreparingCursor asks for them: the ORM's client-side binding cursors never prepare.
            params["prepare_threshold"] = 5
        return params

    def prepared_cursor(self) -> CursorWrapper:
        """A cursor of this connection whose statements PostgreSQL plans once (PreparingCursor).

        As `cursor()`, but for the class of the driver's cursor: Django's
        wrapper counts, logs and translates the errors of what runs on it.
        """
        self.close_if_health_check_failed()
        self.ensure_connection()
        with self.wrap_database_errors:
            cursor = PreparingCursor(self.connection)
            # What create_cursor does for the connection's time zone.
            loader = self.connection.adapters.get_loader(base.TIMESTAMPTZ_OID, pq.Format.TEXT)
            if self.timezone != loader.timezone:
                base.register_tzloader(self.timezone, cursor)
            return self._prepare_cursor(cursor)

    def close_if_health_check_failed(self) -> None:
        if (self.connection is not None and self.health_check_enabled and not self.health_check_done
                and not self.pool and self._quiet()):
            self.health_check_done = True
            return
        super().close_if_health_check_failed()

    def _quiet(self) -> bool:
        """The connection is idle, unbroken, and the server has sent nothing since its last answer."""
        driver = self.connection
        if driver.broken or driver.closed:
            return False
        pgconn = driver.pgconn
        if pgconn.status != pq.ConnStatus.OK or pgconn.transaction_status != pq.TransactionStatus.IDLE:
            return False
        # poll, not select: a worker's descriptors may be numbered past select's 1024.
        poller = select.poll()
        poller.register(pgconn.socket, select.POLLIN | select.POLLPRI)
        return not poller.poll(0)
