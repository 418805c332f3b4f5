"""SQLAlchemy's compiled SQL run on the SQLite driver's own connection, with SQLAlchemy's own bind
and result processors: the same statements, parameters and stored values, without the execution
layer around them. For the statements of every call (issue 20): the suppression lookup
(`overrides.DriverLookup`) and the inserts of the call records (`DriverInsert`)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc


def _impl(type_: sa.types.TypeEngine, dialect: sa.Dialect) -> sa.types.TypeEngine:
    # The dialect's own type, which carries the processors SQLAlchemy would run (SQLite's DATETIME
    # text, under UtcDateTime's UTC rules).
    return type_.dialect_impl(dialect)


def bind_processors(compiled: sa.sql.compiler.Compiled, dialect: sa.Dialect) -> list[tuple]:
    """(parameter name, bind processor or None) in the order of the statement's `?`s."""
    if compiled.positiontup is None:
        raise ValueError(f"{dialect.name}: a driver statement needs a positional paramstyle")
    return [(name, _impl(compiled.binds[name].type, dialect).bind_processor(dialect))
            for name in compiled.positiontup]


def result_processors(columns: Iterable[sa.ColumnElement], dialect: sa.Dialect) -> list:
    return [_impl(column.type, dialect).result_processor(dialect, None) for column in columns]


def bound(params: Sequence[tuple], values: Mapping[str, Any]) -> list:
    return [values[name] if process is None else process(values[name])
            for name, process in params]


def wrapped(exc: sqlite3.Error, sql: str, dialect: sa.Dialect) -> sa_exc.DBAPIError:
    """`exc` as SQLAlchemy would have raised it (OperationalError for a locked or missing
    database, IntegrityError for a constraint...), its parameters hidden (PHI)."""
    return sa_exc.DBAPIError.instance(sql, None, exc, sqlite3.Error, hide_parameters=True,
                                      dialect=dialect)


class DriverInsert:
    """`INSERT INTO table (keys) VALUES (?, ...)` as SQLAlchemy compiles it for `dialect`
    (SQLite); `run` inserts rows (mappings with exactly those keys) with one `executemany`, in
    the transaction the connection is in."""

    def __init__(self, table: sa.Table, keys: Iterable[str], dialect: sa.Dialect):
        compiled = sa.insert(table).compile(dialect=dialect, column_keys=sorted(keys))
        self.sql = str(compiled)
        self.params = bind_processors(compiled, dialect)
        self.dialect = dialect

    def run(self, dbapi_connection: Any, rows: Sequence[Mapping[str, Any]]) -> None:
        params = self.params
        try:
            dbapi_connection.executemany(self.sql, [bound(params, row) for row in rows])
        except sqlite3.Error as exc:
            raise wrapped(exc, self.sql, self.dialect) from exc
