"""The connection pool and the versioned migrations applied at start."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any, LiteralString, TypeVar

import psycopg
from psycopg import AsyncConnection, sql
from psycopg.conninfo import make_conninfo
from psycopg.rows import class_row
from psycopg_pool import AsyncConnectionPool

log = logging.getLogger(__name__)

T = TypeVar("T")
Params = Sequence[Any] | Mapping[str, Any]
# What a cursor executes (psycopg.abc.Query, as this version of its cursors takes it).
Query = LiteralString | bytes | sql.SQL | sql.Composed

_MIGRATION = re.compile(r"^(\d{3})_([a-z0-9_]+)\.sql$")


def pool(
    url: str,
    *,
    schema: str | None = None,
    max_size: int = 10,
    min_size: int = 1,
    timeout_s: float = 30.0,
) -> AsyncConnectionPool:
    """One pool per process; open it with `await pool.open()` (or `async with`).

    `timeout_s` bounds the wait for a connection, including while PostgreSQL is down.
    `min_size` connections are kept open: as many as `max_size` for a server that must
    answer a burst at full speed from its first request (a connection costs milliseconds
    to open).
    """
    kwargs: dict[str, object] = {"autocommit": True}
    if schema is not None:
        # Tests give every test its own schema; the SQL never names one.
        kwargs["options"] = f"-c search_path={schema}"
    return AsyncConnectionPool(
        url,
        min_size=min_size,
        max_size=max_size,
        kwargs=kwargs,
        open=False,
        timeout=timeout_s,
    )


def migrations() -> list[tuple[int, str, str]]:
    """(version, name, sql) for every migration file, in order."""
    found = []
    for entry in resources.files("coupons.ledger").joinpath("migrations").iterdir():
        match = _MIGRATION.match(entry.name)
        if match:
            found.append((int(match.group(1)), match.group(2), entry.read_text()))
    return sorted(found)


async def migrate(conn: AsyncConnection[object], upto: int | None = None) -> list[int]:
    """Apply the migrations not yet applied (up to version `upto`, default all), each in
    its own transaction; returns them."""
    applied: list[int] = []
    async with conn.transaction():
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
    for version, name, text in migrations():
        if upto is not None and version > upto:
            break
        async with conn.transaction():
            # Two processes starting at once must not both apply the same migration.
            await conn.execute("SELECT pg_advisory_xact_lock(7236001)")
            cur = await conn.execute(
                "SELECT 1 FROM schema_migrations WHERE version = %s", (version,)
            )
            if await cur.fetchone():
                continue
            await conn.execute(sql.SQL(text))
            await conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)", (version, name)
            )
            log.info("applied migration %03d_%s", version, name)
            applied.append(version)
    return applied


async def migrate_url(url: str, *, schema: str | None = None, upto: int | None = None) -> list[int]:
    # Only a schema of its own changes `options`: one the URL carries is kept otherwise.
    conninfo = make_conninfo(url, options=f"-c search_path={schema}") if schema else url
    async with await AsyncConnection.connect(conninfo, autocommit=True) as conn:
        if schema is not None:
            await conn.execute(
                sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema))
            )
        return await migrate(conn, upto)


def create_database(admin_url: str, name: str) -> bool:
    """Create database `name` unless it exists; True when this call created it."""
    with psycopg.connect(admin_url, connect_timeout=5, autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            return False
        try:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        except psycopg.errors.DuplicateDatabase:
            return False  # created concurrently by someone else: fine
        return True


def ping(url: str, timeout_s: int = 2) -> None:
    """Raises unless the server at `url` accepts a connection and answers."""
    with psycopg.connect(url, connect_timeout=timeout_s, autocommit=True) as conn:
        conn.execute("SELECT 1")


# Where a statement runs: a connection borrowed from the pool for it, or the caller's own
# connection (inside its transaction, seeing its writes and holding its locks).
Source = AsyncConnectionPool | AsyncConnection[Any]


@asynccontextmanager
async def _connection(source: Source) -> AsyncIterator[AsyncConnection[Any]]:
    if isinstance(source, AsyncConnection):
        yield source
    else:
        async with source.connection() as conn:
            yield conn


async def fetch_all(
    source: Source, row: type[T], query: Query, params: Params | None = None
) -> list[T]:
    """The rows `query` answers, each as a `row` (a dataclass named by its columns)."""
    async with _connection(source) as conn:
        cur = conn.cursor(row_factory=class_row(row))
        await cur.execute(query, params)
        return await cur.fetchall()


async def fetch_one(
    source: Source, row: type[T], query: Query, params: Params | None = None
) -> T | None:
    """The first row `query` answers as a `row`, or None."""
    async with _connection(source) as conn:
        cur = conn.cursor(row_factory=class_row(row))
        await cur.execute(query, params)
        return await cur.fetchone()


async def fetch_written(source: Source, row: type[T], query: Query, params: Params) -> T:
    """The row answered by a statement that cannot miss it: an INSERT ... RETURNING, or the
    read of a row known to exist (written before, or locked by this transaction)."""
    written = await fetch_one(source, row, query, params)
    assert written is not None  # as the caller knows: the row exists
    return written


def given(*columns: LiteralString) -> LiteralString:
    """The condition of optional filters, one a column, each on a text parameter named as
    its column (without the table's alias): a NULL parameter lets every row through."""
    conditions: list[LiteralString] = []
    for column in columns:
        name = column.rpartition(".")[2]
        conditions.append(f"(%({name})s::text IS NULL OR {column} = %({name})s)")
    return " AND ".join(conditions)


async def fetch_by_id(
    pool: AsyncConnectionPool,
    row: type[T],
    select: LiteralString,
    id_column: LiteralString,
    row_id: str,
    tenant_id: str | None,
    tenant_column: LiteralString = "tenant_id",
) -> T | None:
    """The row `select` reads whose `id_column` is `row_id`; with `tenant_id`, only if that
    tenant owns it (its `tenant_column`: a tenant_id column, with the table's alias if any)."""
    return await fetch_one(
        pool,
        row,
        f"{select} WHERE {id_column} = %(id)s AND {given(tenant_column)}",
        {"id": row_id, "tenant_id": tenant_id},
    )
