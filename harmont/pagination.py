"""Keyset pagination: `?limit=` and an opaque `?cursor=`.

A page is "the next `limit` rows after the last key seen", answered by the
index behind the ordering column, so page 9,000 costs what page 1 costs. The
cursor is the last key, base64url-encoded; it is opaque to clients, not secret.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, TypeVar

from django.core.exceptions import ValidationError
from django.db.models import Model, Q, QuerySet
from rest_framework.request import Request

from harmont.errors import ApiError

DEFAULT_LIMIT = 50
MAX_LIMIT = 100

M = TypeVar("M", bound=Model)


@dataclass(frozen=True)
class Page(Generic[M]):
    items: list[M]
    next_cursor: str | None


def parse_limit(request: Request) -> int:
    raw = request.query_params.get("limit")
    if raw is None or raw == "":
        return DEFAULT_LIMIT
    try:
        value = int(raw)
    except ValueError:
        raise ApiError("invalid_limit", f"limit must be an integer from 1 to {MAX_LIMIT}, got {raw!r}.") from None
    if not 1 <= value <= MAX_LIMIT:
        raise ApiError("invalid_limit", f"limit must be an integer from 1 to {MAX_LIMIT}, got {value}.")
    return value


def _encode(payload: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")


def _decode(raw: str) -> dict[str, Any]:
    """The cursor's JSON object; 400 `invalid_cursor` for anything else."""
    try:
        padded = raw + "=" * (-len(raw) % 4)
        data: Any = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
    except (binascii.Error, UnicodeError, ValueError):
        raise _invalid_cursor() from None
    if not isinstance(data, dict):
        raise _invalid_cursor()
    return data


def _invalid_cursor() -> ApiError:
    return ApiError("invalid_cursor", "cursor does not decode; pass a next_cursor from this list.")


def encode_cursor(value: int) -> str:
    return _encode({"k": value})


def decode_cursor(raw: str) -> int:
    value = _decode(raw).get("k")
    if not isinstance(value, int) or isinstance(value, bool):
        raise _invalid_cursor()
    return value


def page_window(request: Request) -> tuple[int, int | None]:
    """The page's `limit` and the key its cursor continues after (None: the first page); 400s for bad ones."""
    limit = parse_limit(request)
    cursor = request.query_params.get("cursor")
    return limit, decode_cursor(cursor) if cursor else None


def page_of(rows: list[Any], *, limit: int, key: str) -> Page[Any]:
    """The page made of up to `limit + 1` rows read in key order: the extra row only says there is more."""
    has_more = len(rows) > limit
    rows = rows[:limit]
    last = rows[-1] if has_more else None
    next_cursor = encode_cursor(last[key] if isinstance(last, dict) else getattr(last, key)) if has_more else None
    return Page(rows, next_cursor)


def paginate(request: Request, queryset: QuerySet[M], *, key: str, descending: bool = False) -> Page[M]:
    """One keyset page of `queryset` ordered by the integer column `key`.

    `key` must be unique within the queryset (an id, or a build number within
    one pipeline), so "after the last key" never skips or repeats a row. The
    queryset may be of `.values()`: the rows are then dicts.
    """
    limit, after = page_window(request)
    if after is not None:
        queryset = queryset.filter(**{f"{key}__{'lt' if descending else 'gt'}": after})
    return page_of(list(queryset.order_by(f"-{key}" if descending else key)[: limit + 1]), limit=limit, key=key)


def encode_time_cursor(created_at: datetime, pk: Any) -> str:
    return _encode({"t": created_at.isoformat(), "i": str(pk)})


def paginate_by_creation(request: Request, queryset: QuerySet[M]) -> Page[M]:
    """One keyset page of `queryset`, oldest first, ordered by `(created_at, pk)`.

    For tables keyed by UUIDs, where no integer column orders the rows: the
    cursor is the last row's creation time and primary key, and the pair is
    unique, so rows created in the same microsecond are neither skipped nor
    repeated. An index on `(..., created_at, id)` answers each page.
    """
    limit = parse_limit(request)
    cursor = request.query_params.get("cursor")
    if cursor:
        data = _decode(cursor)
        try:
            created_at = datetime.fromisoformat(data["t"])
            pk = queryset.model._meta.pk.to_python(data["i"])
        except (ValueError, TypeError, KeyError, ValidationError):
            raise _invalid_cursor() from None
        if created_at.tzinfo is None or pk is None:
            raise _invalid_cursor()
        queryset = queryset.filter(Q(created_at__gt=created_at) | Q(created_at=created_at, pk__gt=pk))
    rows = list(queryset.order_by("created_at", "pk")[: limit + 1])
    has_more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = encode_time_cursor(rows[-1].created_at, rows[-1].pk) if has_more else None
    return Page(rows, next_cursor)


def _key_value(field: Any, raw: Any) -> Any:
    """One cursor value read back through its model field; 400 `invalid_cursor` for anything else."""
    if not isinstance(raw, str):
        raise _invalid_cursor()
    try:
        value = field.to_python(raw)
    except (ValidationError, TypeError, ValueError):
        raise _invalid_cursor() from None
    if value is None or (isinstance(value, datetime) and value.tzinfo is None):
        raise _invalid_cursor()
    return value


def paginate_by_keys(request: Request, queryset: QuerySet[M], *, keys: tuple[str, ...],
                     descending: bool = False) -> Page[M]:
    """One keyset page of `queryset` ordered by the fields `keys` (all ascending, or all descending).

    The fields together must be unique within the queryset (end with `pk` where
    the others can repeat), so "after the last key seen" never skips or repeats
    a row, also when rows are added or removed between pages. Each must be a
    column the rows never change (a creation time, an id, a name), and an index
    on the queryset's filter columns followed by `keys` answers each page. The
    cursor holds the last row's values as strings.
    """
    limit = parse_limit(request)
    meta = queryset.model._meta
    fields = [meta.pk if key == "pk" else meta.get_field(key) for key in keys]
    cursor = request.query_params.get("cursor")
    if cursor:
        raw = _decode(cursor).get("v")
        if not isinstance(raw, list) or len(raw) != len(keys):
            raise _invalid_cursor()
        values = [_key_value(field, item) for field, item in zip(fields, raw)]
        after = "lt" if descending else "gt"
        # (k1, k2, ...) > (v1, v2, ...), spelled out: k1 > v1, or k1 = v1 and k2 > v2, ...
        beyond = Q()
        for i, key in enumerate(keys):
            beyond |= Q(**{k: v for k, v in zip(keys[:i], values[:i])}, **{f"{key}__{after}": values[i]})
        queryset = queryset.filter(beyond)
    rows = list(queryset.order_by(*(f"-{key}" if descending else key for key in keys))[: limit + 1])
    has_more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = None
    if has_more:
        last = [getattr(rows[-1], key) for key in keys]
        next_cursor = _encode({"v": [v.isoformat() if isinstance(v, datetime) else str(v) for v in last]})
    return Page(rows, next_cursor)
