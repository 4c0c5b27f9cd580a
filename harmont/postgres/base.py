"""Django's PostgreSQL backend (`ENGINE: harmont.postgres`), whose health check asks the server only when in doubt.

With CONN_HEALTH_CHECKS Django sends `SELECT 1` before the first query of every
request on a reused connection: a round trip, and a transaction of PostgreSQL's,
per request (a sixth of the transactions of a busy agent's job). A connection the
server ended (a restart, pg_terminate_backend, idle_session_timeout) says so on its
socket: PostgreSQL sends its FATAL message and closes, and the socket reads ready.
Between requests nothing else arrives on these connections (they LISTEN to nothing:
the notices have a connection of their own). So an idle connection whose socket has
nothing to read, and that the driver has seen no fault on, counts as checked; any
other gets Django's real check, and a dead one is replaced before the request uses
it, as before. A connection that broke silently (a network cut with no reset) fails
either way: the `SELECT 1` would hang where the request's query does.
"""

from __future__ import annotations

import select

from django.db.backends.postgresql import base
from psycopg import pq


class DatabaseWrapper(base.DatabaseWrapper):
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
