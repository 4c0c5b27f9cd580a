"""A job's start report, held back while the command runs: a quick job reports it with its finish.

A job that ends within a moment (`START_REPORT_DELAY`) then costs its agent two requests, the
finish (which claims the next job) and nothing else, where it cost three: the start alone was a
quarter of the server's work per job of a busy agent (bench/README.md). The start goes out on its
own when the command outlives the delay (from the heartbeat's thread), or before the first log
shipment, so the server never sees output of a job it thinks not started. Whoever takes the
report first sends it; it goes out exactly once.

Only against a server whose job spec says `start_with_finish`: an older one would take a finish
of a job it never saw start as no start at all.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

# How long a command may run before its start is reported on its own (seconds).
START_REPORT_DELAY = 0.5


class PendingStart:
    """The start report of one job, sent at most once: by `send` (its own request) or taken by the finish."""

    def __init__(self, body: dict[str, Any], send: Callable[[dict[str, Any]], None], *, delay: float) -> None:
        self.body = body
        self.delay = delay
        self._send = send
        self._lock = threading.Lock()
        self._began = time.monotonic()
        self._taken = False

    @property
    def due_in(self) -> float:
        """Seconds until the report should go out on its own (0: now)."""
        return max(0.0, self._began + self.delay - time.monotonic())

    def send(self) -> None:
        """Report the start now, in its own request, unless it was already reported or taken.

        A request that failed leaves the report to the finish, which carries it then.
        """
        # The lock is held through the request: a finish taking the report meanwhile waits for
        # it, so the start never reaches the server after the finish.
        with self._lock:
            if self._taken:
                return
            self._taken = True
            try:
                self._send(self._report())
            except BaseException:
                self._taken = False
                raise

    def take_for_finish(self) -> dict[str, Any] | None:
        """The start for the finish report (`started`), when it has not gone out: with how long ago it was."""
        with self._lock:
            if self._taken:
                return None
            self._taken = True
            return self._report()

    def _report(self) -> dict[str, Any]:
        # The command started a while ago: the server dates the start back by as much.
        return {**self.body, "elapsed_seconds": round(time.monotonic() - self._began, 6)}
