"""The embedded parts start, stop, restart and survive a SIGKILL: real processes, no mocks."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import ListSearchAttributesRequest
from temporalio.client import Client
from temporalio.common import SearchAttributeKey, SearchAttributePair, TypedSearchAttributes

from app.embedded import (
    BACKGROUND_NICE,
    DEV_SERVER_DYNAMIC_CONFIG,
    EmbeddedPostgres,
    ManagedProcess,
    SearchAttributeConflict,
    TemporalDevServer,
    find_binary,
    free_port,
    free_ports,
    ports,
    process_start_time,
    same_process_alive,
    stop_recorded,
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
        # Usable at once: the server, which caches its search attributes, was restarted
        # after registering it (without the restart: "no mapping defined for search
        # attribute AddedLater").
        client = await Client.connect(grown.address)
        handle = await client.start_workflow(
            "NoWorkerNeeded",
            id="names-added-later",
            task_queue="nobody",
            search_attributes=TypedSearchAttributes(
                [SearchAttributePair(SearchAttributeKey.for_int("AddedLater"), 1)]
            ),
        )
        await handle.terminate()
    finally:
        grown.stop()

    changed = TemporalDevServer(db_file, port, None, {"CouponState": "Text"})
    with pytest.raises(SearchAttributeConflict, match="CouponState"):
        changed.start()
    assert not changed.alive


def test_the_dev_server_reads_its_task_queues_often_enough_and_a_given_value_wins() -> None:
    """Its one history shard must not hand tasks to matching on the default 50 ms beat."""
    server = TemporalDevServer(
        None, free_port(), None, {}, dynamic_config={"history.visibilityProcessorMaxPollRPS": 7}
    )
    argv = [str(a) for a in server._argv()]
    values = [argv[i + 1] for i, a in enumerate(argv) if a == "--dynamic-config-value"]
    assert "history.transferProcessorMaxPollRPS=200" in values
    assert DEV_SERVER_DYNAMIC_CONFIG["history.transferProcessorMaxPollRPS"] == 200
    # Given values override the defaults rather than being passed twice.
    assert [v for v in values if v.startswith("history.visibilityProcessorMaxPollRPS=")] == [
        "history.visibilityProcessorMaxPollRPS=7"
    ]


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


def _gone_within(pid: int, start_time: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while same_process_alive(pid, start_time):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


# A parent that starts three children and waits to be killed: one told to die with it, one
# told so as another user (as PostgreSQL runs under root), one not.
_PARENT = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from app.embedded import ManagedProcess
    log = Path(sys.argv[1])
    user = "nobody" if os.geteuid() == 0 else None
    children = [
        ManagedProcess("tied", ["sleep", "120"], log, die_with_parent=True),
        ManagedProcess("tied-other-user", ["sleep", "120"], log, die_with_parent=True, user=user),
        ManagedProcess("free", ["sleep", "120"], log),
    ]
    for child in children:
        child.start()
    print(" ".join(f"{c.pid}:{c.start_time}" for c in children), flush=True)
    time.sleep(120)
    """
)


def test_children_told_to_die_with_their_parent_go_when_it_is_killed(tmp_path: Path) -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", _PARENT, str(tmp_path / "children.log")],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert parent.stdout is not None
    pids = [c.split(":") for c in parent.stdout.readline().split()]
    tied, tied_other_user, free = [(int(pid), int(start)) for pid, start in pids]
    try:
        parent.kill()
        parent.wait(timeout=10)
        assert _gone_within(*tied, timeout_s=5)
        assert _gone_within(*tied_other_user, timeout_s=5)
        assert same_process_alive(*free)
        # Not ours to reap, known by pid and start time: a wrong start time is another process.
        assert not stop_recorded(free[0], free[1] + 1, signal.SIGTERM)
        assert same_process_alive(*free)
    finally:
        stopped = stop_recorded(*free, signal.SIGTERM, timeout_s=5)
    assert stopped and not same_process_alive(*free)


def test_the_parent_death_signal_follows_the_starting_thread(tmp_path: Path) -> None:
    """Why it is an option: a child started from a thread that ends gets it then."""
    tied = ManagedProcess("tied", ["sleep", "120"], tmp_path / "log", die_with_parent=True)
    free = ManagedProcess("free", ["sleep", "120"], tmp_path / "log")
    for child in (tied, free):
        starter = threading.Thread(target=child.start)
        starter.start()
        starter.join()
    try:
        deadline = time.monotonic() + 5
        while tied.alive and time.monotonic() < deadline:
            time.sleep(0.05)
        assert tied.returncode == -signal.SIGTERM
        assert free.alive
    finally:
        tied.stop(timeout_s=5)
        free.stop(timeout_s=5)


def test_a_recorded_process_deaf_to_its_stop_signal_is_killed(tmp_path: Path) -> None:
    deaf = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print(flush=True); time.sleep(120)",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert deaf.stdout is not None
        deaf.stdout.readline()  # its handler is set
        start_time = process_start_time(deaf.pid)
        assert start_time is not None
        began = time.monotonic()
        assert stop_recorded(deaf.pid, start_time, signal.SIGTERM, timeout_s=0.5)
        assert time.monotonic() - began < 5
        assert deaf.wait(timeout=5) == -signal.SIGKILL
    finally:
        if deaf.poll() is None:
            os.kill(deaf.pid, signal.SIGKILL)
            deaf.wait()


def test_a_background_child_and_its_session_are_niced_keeping_its_death_signal(
    tmp_path: Path,
) -> None:
    probe = (
        "import ctypes, os, signal; sig = ctypes.c_int();"
        " ctypes.CDLL(None).prctl(2, ctypes.byref(sig), 0, 0, 0);"  # PR_GET_PDEATHSIG
        " group = open('/proc/self/autogroup').read().split()[-1]"
        " if os.path.exists('/proc/self/autogroup') else 'none';"
        " print(os.nice(0), sig.value, group)"
    )
    child = ManagedProcess(
        "probe",
        [sys.executable, "-c", probe],
        tmp_path / "probe.log",
        die_with_parent=True,
        nice=BACKGROUND_NICE,
    )
    child.start()
    deadline = time.monotonic() + 10
    while child.alive and time.monotonic() < deadline:
        time.sleep(0.05)
    child.stop()
    niceness, death_signal, group = child.log_tail().splitlines()[-1].split()
    assert (int(niceness), int(death_signal)) == (os.nice(0) + BACKGROUND_NICE, signal.SIGTERM)
    # Where the kernel shares the CPU by session, the child's session is niced as well.
    expected_group = niceness if Path("/proc/self/autogroup").exists() else "none"
    assert group == expected_group


def test_a_port_handed_out_is_not_handed_out_again_while_promised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two pickers at once (two pytest-xdist processes, say) get different ports, even from a
    range so small that two free picks of 300 would share some: each leaves its ports
    promised in the shared file, which the other reads under the same lock."""
    low = ports._ephemeral_low()
    monkeypatch.setattr(ports, "_PICK_FLOOR", low - 1000)
    monkeypatch.setattr(ports, "PROMISES", tmp_path / "ports.json")
    first = free_ports(300)
    second = free_ports(300)
    assert not set(first) & set(second)
    promised = json.loads((tmp_path / "ports.json").read_text())
    assert set(map(int, promised)) == set(first) | set(second)
    # A promise ends: once PROMISE_S has passed, its ports are free to hand out again.
    monkeypatch.setattr(ports, "PROMISE_S", 0.0)
    free_ports(1)
    assert len(json.loads((tmp_path / "ports.json").read_text())) == 1
    # A file that is not ours (or not what we wrote) is replaced, not a reason to fail.
    (tmp_path / "ports.json").write_text("[1, 2]")
    assert len(free_ports(3)) == 3
    assert len(json.loads((tmp_path / "ports.json").read_text())) == 3


def test_free_ports_come_from_below_the_ephemeral_range_distinct_and_bindable() -> None:
    """An outgoing connection can take a port the kernel handed out, before our child binds
    it: the ports are picked where no outgoing connection draws from."""
    low = ports._ephemeral_low()
    picked = free_ports(20)
    assert len(set(picked)) == 20
    assert all(ports._PICK_FLOOR <= p < low for p in picked), (low, picked)
    for port in picked:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", port))
