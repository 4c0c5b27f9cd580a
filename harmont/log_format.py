"""The json log format (HARMONT_LOG_FORMAT=json): one JSON object per line.

Loaded by the logging configuration while the settings load, so it depends on
nothing but the standard library. Each record goes out as `{"time", "level",
"logger", "message", ...}` plus whatever it carries in `extra` and, while a
request is being answered (harmont.logs), its `request_id`.
"""

from __future__ import annotations

import contextvars
import json
import logging
from datetime import datetime, timezone
from typing import Any

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("harmont_request_id", default=None)

# What every LogRecord has; anything else on a record came from `extra` and goes out as a field.
_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = REQUEST_ID.get()
        if request_id is not None:
            entry["request_id"] = request_id
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, separators=(",", ":"))
