"""PostgreSQL's notifications, heard on one connection per event loop (so one per server process).

Two hubs follow them: held claims (builds.claim_waits, channel `harmont_claims`)
and live log streams (builds.stream, channel `harmont_logs`: a job's chunks were
appended, or it ended). The `Listener` of a loop opens its connection when the
first hub follows a channel, LISTENs on every channel at once, and hands each
notice to the hub following its channel. What was sent while it was not
listening is lost, so each (re)connection tells every hub to look again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from django.db import connections

from harmont import claim_notices
from harmont.loop_local import LoopLocal

log = logging.getLogger("harmont.notices")

LOG_CHANNEL = "harmont_logs"
CHANNELS = (claim_notices.CHANNEL, LOG_CHANNEL)
RETRY_SECONDS = 1.0

# Django's own keys in OPTIONS, which are no libpq parameters.
_NOT_CONNINFO = {"pool", "server_side_binding", "isolation_level", "assume_role", "assume_role_default",
                 "cursor_factory", "context"}


def listen_conninfo() -> str:
    """libpq parameters of the default database, for the listener's own connection."""
    from psycopg.conninfo import make_conninfo

    settings_dict = connections["default"].settings_dict
    params = {"dbname": settings_dict["NAME"], "user": settings_dict.get("USER") or None,
              "password": settings_dict.get("PASSWORD") or None, "host": settings_dict.get("HOST") or None,
              "port": settings_dict.get("PORT") or None, "application_name": "harmont-notices",
              **{key: value for key, value in (settings_dict.get("OPTIONS") or {}).items()
                 if key not in _NOT_CONNINFO}}
    return make_conninfo(**{key: value for key, value in params.items() if value is not None})


@dataclass(frozen=True)
class Follower:
    on_notice: Callable[[str], None]  # a payload of the channel
    on_connect: Callable[[], None]  # listening (again): what came meanwhile was missed


class Listener:
    def __init__(self) -> None:
        self.followers: dict[str, Follower] = {}
        self.task: asyncio.Task | None = None
        # Loop time the current connection began listening (None: not listening): news since then was heard.
        self.connected_since: float | None = None

    @property
    def connected(self) -> bool:
        return self.connected_since is not None

    def follow(self, channel: str, follower: Follower) -> asyncio.Task:
        """`follower` hears `channel` from now on; the task that listens (it runs for good)."""
        self.followers[channel] = follower
        if self.connected:
            follower.on_connect()  # it may have missed what came before it followed
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._listen())
        return self.task

    async def _listen(self) -> None:
        import psycopg

        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(listen_conninfo(), autocommit=True)
                async with conn:
                    for channel in CHANNELS:
                        await conn.execute(f"LISTEN {channel}")
                    self.connected_since = asyncio.get_running_loop().time()
                    for follower in list(self.followers.values()):
                        follower.on_connect()
                    async for notify in conn.notifies():
                        follower = self.followers.get(notify.channel)
                        if follower is not None:
                            follower.on_notice(notify.payload)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a lost connection must not end what the hubs hold
                log.warning("notices: %s; listening again in %.0f s", exc, RETRY_SECONDS)
                await asyncio.sleep(RETRY_SECONDS)
            finally:
                self.connected_since = None


listener = LoopLocal(Listener)  # the running event loop's listener


def listening() -> bool:
    """Whether hubs of this process hear of news (PostgreSQL), or must poll (SQLite)."""
    global _vendor
    if _vendor is None:  # asked for every held claim; a process serves one database all its life
        _vendor = connections["default"].vendor
    return _vendor == "postgresql"


_vendor: str | None = None
