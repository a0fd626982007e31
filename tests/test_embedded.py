"""The embedded parts start, stop, restart and survive a SIGKILL: real processes, no mocks."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import ListSearchAttributesRequest
from temporalio.client import Client

from coupons.embedded import (
    EmbeddedPostgres,
    SearchAttributeConflict,
    TemporalDevServer,
    find_binary,
    free_port,
)

COUPON_ATTRIBUTES = {"CouponState": "Keyword", "CampaignId": "Keyword", "UserId": "Keyword"}


@pytest.fixture
def postgres(tmp_path: Path) -> Iterator[EmbeddedPostgres]:
    server = EmbeddedPostgres(tmp_path / "pg", free_port())
    try:
        yield server
    finally:
        server.stop()
    assert not server.alive


def _count_rows(server: EmbeddedPostgres) -> int:
    with psycopg.connect(server.url()) as conn:
        row = conn.execute("SELECT count(*) FROM marks").fetchone()
    assert row is not None
    return int(row[0])


def _add_row(server: EmbeddedPostgres) -> None:
    with psycopg.connect(server.url()) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS marks (id serial PRIMARY KEY)")
        conn.execute("INSERT INTO marks DEFAULT VALUES")


def test_postgres_keeps_data_across_stop_and_start(postgres: EmbeddedPostgres) -> None:
    postgres.start()
    assert postgres.url() == f"postgresql://postgres@127.0.0.1:{postgres.port}/coupons"
    with psycopg.connect(postgres.url()) as conn:
        assert conn.execute("SELECT current_database(), current_setting('fsync')").fetchone() == (
            "coupons",
            "on",
        )
    _add_row(postgres)
    first_pid = postgres.pid

    postgres.stop()
    assert not postgres.alive
    assert not (postgres.data_dir / "postmaster.pid").exists()

    postgres.start()
    assert postgres.pid != first_pid
    assert _count_rows(postgres) == 1

    postgres.restart()
    _add_row(postgres)
    assert _count_rows(postgres) == 2


def test_postgres_starts_after_sigkill(postgres: EmbeddedPostgres) -> None:
    postgres.start()
    _add_row(postgres)

    postgres.kill()
    assert not postgres.alive
    pid_file = postgres.data_dir / "postmaster.pid"
    assert pid_file.exists(), "a SIGKILLed server leaves its pid file behind"

    postgres.start()
    assert _count_rows(postgres) == 1, "committed rows survive the crash"

    # After a reboot the pid recorded in the stale file may belong to an unrelated live
    # process, which PostgreSQL alone would take for a running server.
    postgres.kill()
    squatter = subprocess.Popen(["sleep", "30"])
    try:
        lines = pid_file.read_text().splitlines()
        pid_file.write_text("\n".join([str(squatter.pid), *lines[1:]]) + "\n")
        postgres.start()
        assert _count_rows(postgres) == 1
    finally:
        squatter.kill()
        squatter.wait()


async def _custom_attributes(address: str) -> dict[str, int]:
    client = await Client.connect(address)
    response = await client.operator_service.list_search_attributes(
        ListSearchAttributesRequest(namespace="default")
    )
    return dict(response.custom_attributes)


KEYWORD = IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD


async def test_temporal_restarts_on_same_db_file_with_search_attributes(tmp_path: Path) -> None:
    db_file = tmp_path / "temporal.db"
    port = free_port()
    server = TemporalDevServer(db_file, port, None, COUPON_ATTRIBUTES)
    try:
        server.start()
        assert server.address == f"127.0.0.1:{port}"
        assert db_file.exists()
        registered = await _custom_attributes(server.address)
        assert {name: registered.get(name) for name in COUPON_ATTRIBUTES} == dict.fromkeys(
            COUPON_ATTRIBUTES, KEYWORD
        )

        # Same flags again on an existing file: start-dev ignores them, nothing fails.
        server.restart()
        registered = await _custom_attributes(server.address)
        assert {name: registered.get(name) for name in COUPON_ATTRIBUTES} == dict.fromkeys(
            COUPON_ATTRIBUTES, KEYWORD
        )
    finally:
        server.stop()
    assert not server.alive

    # An attribute added since the file was created is registered too (start-dev alone
    # would silently skip it), and a changed type is refused with a clear error.
    grown = TemporalDevServer(db_file, port, None, {**COUPON_ATTRIBUTES, "AddedLater": "Int"})
    try:
        grown.start()
        registered = await _custom_attributes(grown.address)
        assert registered["AddedLater"] == IndexedValueType.INDEXED_VALUE_TYPE_INT
        assert registered["UserId"] == KEYWORD
    finally:
        grown.stop()

    changed = TemporalDevServer(db_file, port, None, {"CouponState": "Text"})
    with pytest.raises(SearchAttributeConflict, match="CouponState"):
        changed.start()
    assert not changed.alive


def test_temporal_sigkill_then_start(tmp_path: Path) -> None:
    server = TemporalDevServer(tmp_path / "temporal.db", free_port(), None, COUPON_ATTRIBUTES)
    try:
        server.start()
        server.kill()
        assert not server.alive
        server.start()
        assert server.alive
    finally:
        server.stop()


def test_find_binary_names_the_missing_package() -> None:
    assert find_binary("temporal").name == "temporal"
    with pytest.raises(FileNotFoundError, match="no-such-tool"):
        find_binary("no-such-tool")
