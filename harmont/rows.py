"""The one style of raw SQL: names from `_meta`, values as the ORM sends them, rows loaded as the ORM loads them.

Raw SQL is kept for what the ORM can't say (UPDATE ... RETURNING with SKIP
LOCKED, INSERT ... ON CONFLICT that reports what it inserted, a data-modifying
WITH, a join against unnest'ed arrays) and for the few reads every API and
agent request makes, where building and compiling an ORM query cost the process
several times what the database spends answering it (numbers in bench/README.md).
Each app keeps its statements in one module (`<app>/sql.py`), written with:

- `Table`: a model's table and columns, quoted, from `_meta` (never a literal
  table or column name);
- `db_value`: a parameter as the ORM would send it for that column (UUIDs are
  text on SQLite, datetimes are stored in UTC, and so on);
- `Columns` and `first_row`: a row read back into model instances exactly as
  the ORM would have built them: the same per-database converters run on each
  value, and fields not selected are deferred, as with `.only()`.

Scoping stays in the SQL itself (the caller's membership is a join condition),
never in a cache.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Callable, Generic, TypeVar

from django.db import connection
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import Model

from harmont import prepared as prepared_statements

M = TypeVar("M", bound=Model)


class Table:
    """A model's table for SQL text: `str(t)` names it (with its alias), `t.state` names a column.

    `Table(Job, "j")` reads `"builds_job" j` and `j."state"`; without an alias
    columns are qualified by the table's own name. `t.bare("state")` is the
    unqualified column an UPDATE's SET takes. Attribute names are field names
    (`t.build` is the `build_id` column).
    """

    def __init__(self, model: type[Model], alias: str | None = None) -> None:
        # Underscored: every other attribute name is a field's column.
        self._model = model
        self._alias = alias
        self._table = connection.ops.quote_name(model._meta.db_table)

    def __str__(self) -> str:
        return f"{self._table} {self._alias}" if self._alias else self._table

    def bare(self, field: str) -> str:
        return connection.ops.quote_name(self._model._meta.get_field(field).column)

    def __getattr__(self, field: str) -> str:
        if field.startswith("_"):
            raise AttributeError(field)
        name = f"{self._alias or self._table}.{self.bare(field)}"
        setattr(self, field, name)  # statements are built per call: the next read is a plain attribute
        return name


def db_value(model: type[Model], field: str, value: Any) -> Any:
    """`value` as the ORM would send it for that column."""
    return model._meta.get_field(field).get_db_prep_save(value, connection)


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

    def select(self, table: Table) -> str:
        """`alias."col", ...` in the order `load` reads them."""
        return ", ".join(getattr(table, field.name) for field in self.fields)

    def load(self, cells: Iterator[Any], connection: BaseDatabaseWrapper) -> M:
        """The next `len(self.fields)` values of a row, as an instance loaded from `connection`."""
        return self.model.from_db(connection.alias, self.attnames, self.values(cells, connection))

    def values(self, cells: Iterator[Any], connection: BaseDatabaseWrapper) -> list[Any]:
        """The next `len(self.fields)` values of a row as the ORM converts them, in `attnames` order."""
        values = [next(cells) for _ in self.fields]
        for position, converters, column in self._converters_for(connection):
            value = values[position]
            for converter in converters:
                value = converter(value, column, connection)
            values[position] = value
        return values

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


def first_row(sql: str, params: Sequence[Any], *, prepared: bool = False) -> Iterator[Any] | None:
    """The cells of the query's first row, in order, for `Columns.load`; None when there is no row.

    `prepared`: on PostgreSQL the statement is prepared once per connection
    (harmont.prepared), for the few reads every agent request makes.
    """
    with (prepared_statements.cursor() if prepared else connection.cursor()) as cursor:
        cursor.execute(sql, params)
        row = cursor.fetchone()
    return None if row is None else iter(row)
