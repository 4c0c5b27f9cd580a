"""Model instances from hand-written SQL, for the few reads every API request makes.

Building and compiling an ORM query costs this process 0.5 to 1 ms of CPU, several
times what PostgreSQL spends planning and answering it. On the requests that
authenticate a token and resolve a build from the URL, that was most of the request.
Those few queries are written out as SQL instead, and `Columns` turns their rows
back into model instances exactly as the ORM would have built them:

- the same per-database converters run on each value (SQLite hands back
  datetimes and UUIDs as text; the ORM's converters are what parse them), and
- fields not selected are deferred, as with `.only()`: reading one later loads it.

Scoping stays in the SQL itself (the caller's membership is a join condition),
never in a cache.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Callable, Generic, TypeVar

from django.db import connection
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import Model

M = TypeVar("M", bound=Model)


class Columns(Generic[M]):
    """Some (or all) concrete fields of `model`: the SQL that selects them, and the instance they load into."""

    def __init__(self, model: type[M], names: Sequence[str] | None = None) -> None:
        concrete = list(model._meta.concrete_fields)
        wanted = concrete if names is None else [model._meta.get_field(name) for name in names]
        if model._meta.pk not in wanted:
            raise ValueError(f"{model.__name__}: the primary key must be selected")
        # Model.from_db expects the loaded values in the model's field order.
        self.model = model
        self.fields = sorted(set(wanted), key=concrete.index)
        self.attnames = tuple(field.attname for field in self.fields)
        self._converters: dict[str, list[tuple[int, list[Callable[..., Any]], Any]]] = {}

    def select(self, alias: str) -> str:
        """`alias."col", ...` in the order `load` reads them."""
        return ", ".join(f'{alias}."{field.column}"' for field in self.fields)

    def load(self, cells: Iterator[Any], connection: BaseDatabaseWrapper) -> M:
        """The next `len(self.fields)` values of a row, as an instance loaded from `connection`."""
        values = [next(cells) for _ in self.fields]
        for position, converters, column in self._converters_for(connection):
            value = values[position]
            for converter in converters:
                value = converter(value, column, connection)
            values[position] = value
        return self.model.from_db(connection.alias, self.attnames, values)

    def _converters_for(self, connection: BaseDatabaseWrapper) -> list[tuple[int, list[Callable[..., Any]], Any]]:
        # What SQLCompiler.get_converters collects for a selected column; fixed per connection.
        found = self._converters.get(connection.alias)
        if found is None:
            found = []
            for position, field in enumerate(self.fields):
                column = field.get_col(self.model._meta.db_table)
                converters = connection.ops.get_db_converters(column) + column.get_db_converters(connection)
                if converters:
                    found.append((position, converters, column))
            self._converters[connection.alias] = found
        return found


def first_row(sql: str, params: Sequence[Any]) -> Iterator[Any] | None:
    """The cells of the query's first row, in order, for `Columns.load`; None when there is no row."""
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        row = cursor.fetchone()
    return None if row is None else iter(row)
