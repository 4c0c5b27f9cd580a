"""The JSON parser every API view uses, and how large a body each view takes."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from rest_framework.exceptions import ParseError
from rest_framework.parsers import JSONParser


class SafeJSONParser(JSONParser):
    """DRF's JSON parser, but a pathologically nested body is a 400, not a crash.

    The stdlib decoder raises RecursionError (not ValueError) on very deep
    nesting, which DRF's parser lets through.
    """

    def parse(self, stream: Any, media_type: str | None = None, parser_context: dict | None = None) -> Any:
        try:
            return super().parse(stream, media_type, parser_context)
        except RecursionError:
            raise ParseError("JSON nested too deeply.") from None



# ---------------------------------------------------------------- body limits

# What a view's `body_limit` names: the setting holding the most bytes its request bodies may have.
# Every other API view takes HARMONT_MAX_JSON_BYTES; RequestIdMiddleware enforces the limit
# before the view (or anything else) reads the body.
DEFAULT_BODY_LIMIT = "MAX_JSON_BYTES"
# Chunked bodies are read in pieces of this size, so a refused one costs at most its limit and one piece.
READ_PIECE_BYTES = 64 * 1024


def body_limit_for(view_func: Any) -> int:
    """The body limit (bytes) of the view behind `view_func` (DRF's as_view keeps the class as `.cls`)."""
    name = getattr(getattr(view_func, "cls", None), "body_limit", None) or DEFAULT_BODY_LIMIT
    return int(getattr(settings, name))


def takes_chunked_body(view_func: Any) -> bool:
    """False for views that stream their body themselves and need its length (`chunked_body = False`)."""
    return getattr(getattr(view_func, "cls", None), "chunked_body", True)


def read_chunked_body(stream: Any, *, limit: int) -> bytes | None:
    """A body sent without Content-Length, read up to `limit` bytes; None once it passes the limit.

    Neither Django nor DRF read such a body (they take its length as 0), so it
    is read here, counted piece by piece as it arrives, and never held whole
    when it is too large.
    """
    pieces: list[bytes] = []
    size = 0
    while True:
        piece = stream.read(min(READ_PIECE_BYTES, limit + 1 - size))
        if not piece:
            return b"".join(pieces)
        size += len(piece)
        if size > limit:
            return None
        pieces.append(piece)
