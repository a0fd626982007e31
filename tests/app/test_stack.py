"""`make run`'s stack as a user meets it: started, used through `starter.py`, stopped,
started again on the same data, with nothing lost."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from app.embedded import find_binary, free_ports, listens, same_process_alive, stop_recorded
from app.running import RECORD_NAME
from coupons.ledger import claims as ledger
from coupons.ledger import db
from coupons.tenants import create_tenant

ROOT = Path(__file__).resolve().parents[2]


# Each server's port, all different (free_port twice in a row may give the same one).
PORTS = (
    "PG_PORT",
    "TEMPORAL_PORT",
    "TEMPORAL_UI_PORT",
    "SIMULATOR_PORT",
    "API_PORT",
    "WORKER_METRICS_PORT",
)


class RunningStack:
    def __init__(self, data_dir: Path, platform: str = "generic") -> None:
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("SIM_", "PLATFORM"))},
            "PLATFORM": platform,
            "DATA_DIR": str(data_dir),
            **dict(zip(PORTS, map(str, free_ports(len(PORTS))), strict=True)),
            # Its record in a registry of its own, not the user's (app.running).
            "COUPONS_STATE_DIR": str(data_dir.parent / "state"),
        }
        for key in ("DATABASE_URL", "TEMPORAL_ADDRESS", "PLATFORM_URL"):
            self.env.pop(key, None)
        self.data_dir = data_dir
        self.log = data_dir.parent / "stack.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def database_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.env['PG_PORT']}/coupons"

    def start(self, timeout_s: float = 90) -> None:
        self.log.write_text("")
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "app.stack"],
                cwd=ROOT,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout_s
        while "coupon service up" not in self.log.read_text():
            assert self.process.poll() is None, f"stack exited:\n{self.log.read_text()}"
            assert time.monotonic() < deadline, f"stack not up:\n{self.log.read_text()}"
            time.sleep(0.2)

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        assert self.process is not None
        self.process.send_signal(sig)
        rc = self.process.wait(timeout=60)
        self.process = None
        return rc

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=10)
        self.process = None

    def record(self) -> dict[str, Any]:
        record: dict[str, Any] = json.loads((self.data_dir / RECORD_NAME).read_text())
        return record

    def cli(
        self, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """`starter.py` in a shell with the stack's environment, or `env`."""
        return subprocess.run(
            [sys.executable, "starter.py", *args],
            cwd=ROOT,
            env=self.env if env is None else env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def cli_many(self, calls: list[list[str]]) -> list[subprocess.CompletedProcess[str]]:
        with ThreadPoolExecutor(max_workers=5) as pool:
            return list(pool.map(lambda args: self.cli(*args), calls))

    def sim_stats(self) -> dict[str, int]:
        url = f"http://127.0.0.1:{self.env['SIMULATOR_PORT']}/sim/stats"
        stats: dict[str, int] = httpx.get(url, timeout=10).json()
        return stats

    def worker_pid(self) -> int:
        banner = self.log.read_text().split("coupon service up")[-1]
        match = re.search(r"Worker\s+pid (\d+)", banner)
        assert match, banner
        return int(match.group(1))

    def api_pid(self) -> int:
        banner = self.log.read_text().split("coupon service up")[-1]
        match = re.search(r"API\s+http://127.0.0.1:(\d+)\s.*\(pid (\d+);", banner)
        assert match and match.group(1) == self.env["API_PORT"], banner
        return int(match.group(2))

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.env['API_PORT']}"

    def states(self) -> dict[str, int]:
        with psycopg.connect(self.database_url) as conn:
            rows = conn.execute(
                "SELECT c.state, count(*), count(r.coupon_id) FROM claims c"
                " LEFT JOIN receipts r USING (coupon_id) WHERE c.campaign_id = 'demo'"
                " GROUP BY c.state"
            ).fetchall()
        for state, n, receipts in rows:
            assert receipts == (n if state == "issued" else 0), f"{state}: receipts {receipts}/{n}"
        return {state: n for state, n, _ in rows}

    def wait_states(self, expected: dict[str, int], timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while (seen := self.states()) != expected:
            assert time.monotonic() < deadline, f"ledger shows {seen}, expected {expected}"
            time.sleep(0.5)

    def temporal_count(self, query: str) -> int:
        out = subprocess.run(
            [
                str(find_binary("temporal")),
                "workflow",
                "count",
                "--query",
                query,
                "--address",
                f"127.0.0.1:{self.env['TEMPORAL_PORT']}",
                "-o",
                "json",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        return int(json.loads(out)["count"])


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[RunningStack]:
    running = RunningStack(tmp_path / "data")
    yield running
    if running.process is not None:
        running.stop()


def test_twenty_claims_ten_tasks_then_restart_and_the_rest(stack: RunningStack) -> None:
    users = [f"user{i}" for i in range(1, 21)]
    stack.start()
    claims = stack.cli_many([["claim", "--campaign", "demo", "--user", u] for u in users])
    assert [c.returncode for c in claims] == [0] * 20, claims
    coupons = {json.loads(c.stdout)["user_id"]: json.loads(c.stdout)["coupon_id"] for c in claims}
    assert all(json.loads(c.stdout)["state"] == "received" for c in claims)

    done = stack.cli_many(
        [["complete-task", "--coupon", coupons[u], "--task", "first-order"] for u in users[:10]]
    )
    assert [c.returncode for c in done] == [0] * 10, done
    stack.wait_states({"issued": 10, "received": 10})
    deadline = time.monotonic() + 30  # visibility trails the workflows by a moment
    while stack.temporal_count("CouponState='issued'") != 10:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert stack.temporal_count("CouponState='received'") == 10

    assert stack.stop() == 0
    stack.start()
    assert stack.states() == {"issued": 10, "received": 10}, "nothing lost across the restart"
    rest = stack.cli_many(
        [
            ["complete-task", "--coupon", coupons[u], "--task", "first-order", "--wait"]
            for u in users[10:]
        ]
    )
    assert [c.returncode for c in rest] == [0] * 10, rest
    assert all(json.loads(c.stdout)["state"] == "usable" for c in rest)
    stack.wait_states({"issued": 20})
    with psycopg.connect(stack.database_url) as conn:
        distinct = conn.execute(
            "SELECT count(DISTINCT platform_coupon_id) FROM receipts"
        ).fetchone()
    assert distinct == (20,)


def test_command_line_answers_and_exit_codes(stack: RunningStack) -> None:
    stack.start()
    first = stack.cli("claim", "--campaign", "demo", "--user", "ann")
    assert first.returncode == 0, first.stderr
    coupon = json.loads(first.stdout)
    assert coupon["created"] is True and coupon["state"] == "received"

    again = stack.cli("claim", "--campaign", "demo", "--user", "ann")
    assert (again.returncode, json.loads(again.stdout)["coupon_id"]) == (0, coupon["coupon_id"])
    assert json.loads(again.stdout)["created"] is False

    bad = {
        ("claim", "--campaign", "nope", "--user", "ann"): "unknown_campaign",
        ("claim", "--campaign", "demo", "--user", "bad user!"): "is not valid",
        ("show", "--coupon", "demo:nobody:1"): "no coupon",
        (
            "complete-task",
            "--coupon",
            coupon["coupon_id"],
            "--task",
            "survey",
        ): "unknown_task: unknown task",
        (
            "complete-task",
            "--coupon",
            coupon["coupon_id"],
            "--task",
            "survey",
            "--wait",
        ): "unknown_task: unknown task",
    }
    bad[("stats", "--campaign", "nope")] = "unknown_campaign"
    for args, reason in bad.items():
        result = stack.cli(*args)
        assert (result.returncode, result.stdout) == (2, ""), (args, result)
        assert reason in result.stderr, (args, result.stderr)
    assert stack.cli("claim").returncode == 2  # usage error

    shown = stack.cli("show", "--coupon", coupon["coupon_id"])
    assert shown.returncode == 0
    view = json.loads(shown.stdout)
    assert view["tasks"] == {
        "required": ["first-order"],
        "done": [],
        "deadline": view["tasks"]["deadline"],
    }
    assert [e["to_state"] for e in view["events"]] == ["received"]

    listed = stack.cli("list", "--campaign", "demo", "--user", "ann")
    assert listed.returncode == 0, listed.stderr
    assert [c["coupon_id"] for c in json.loads(listed.stdout)["coupons"]] == [coupon["coupon_id"]]
    assert stack.cli("list", "--campaign", "demo", "--state", "bogus").returncode == 2

    cancelled = stack.cli("cancel", "--coupon", coupon["coupon_id"])
    assert (cancelled.returncode, json.loads(cancelled.stdout)["state"]) == (0, "cancelled")
    twice = stack.cli("cancel", "--coupon", coupon["coupon_id"])
    assert twice.returncode == 2 and "is cancelled: it is finished" in twice.stderr, twice.stderr
    stack.wait_states({"cancelled": 1})


def test_worker_killed_mid_send_and_a_lost_workflow_start_lose_nothing(
    tmp_path: Path,
) -> None:
    stack = RunningStack(tmp_path / "data")
    # Answers come 1.5 s after each send is applied: the kill lands while they are pending.
    stack.env.update({"SIM_LATENCY_MS": "1500", "CLAIM_REPAIR_AFTER_S": "1"})
    users = [f"k{i}" for i in range(10)]
    try:
        stack.start()
        claims = stack.cli_many([["claim", "--campaign", "demo", "--user", u] for u in users])
        coupons = [json.loads(c.stdout)["coupon_id"] for c in claims]
        stats = stack.sim_stats()
        done = stack.cli_many(
            [["complete-task", "--coupon", c, "--task", "first-order"] for c in coupons]
        )
        assert [c.returncode for c in done] == [0] * 10
        deadline = time.monotonic() + 30
        while stack.sim_stats()["sends_applied"] - stats["sends_applied"] < 3:
            assert time.monotonic() < deadline, "sends never started"
            time.sleep(0.05)
        os.kill(stack.worker_pid(), signal.SIGKILL)

        # A claim whose process died before starting its workflow.
        asyncio.run(ledger_only_claim(stack.database_url, "demo", "crashed"))

        # The stack restarts the worker; the killed sends time out and are resent with
        # the same keys.
        stack.wait_states({"issued": 10, "received": 1}, timeout_s=120)
        assert stack.sim_stats()["sends_applied"] - stats["sends_applied"] == 10
        deadline = time.monotonic() + 30
        while stack.temporal_count("UserId='crashed'") != 1:
            assert time.monotonic() < deadline, "the lost workflow start was never repaired"
            time.sleep(0.5)
        assert "worker exited" in stack.log.read_text()
    finally:
        if stack.process is not None:
            assert stack.stop() == 0


async def ledger_only_claim(url: str, campaign: str, user: str) -> None:
    async with db.pool(url, max_size=1) as pool:
        await ledger.claim(pool, campaign, user)


def test_the_api_beside_the_worker_and_the_platforms_callback(stack: RunningStack) -> None:
    stack.start()
    data = Path(stack.env["DATA_DIR"])
    secret_file = data / "platform-callback-secret"
    assert secret_file.stat().st_mode & 0o777 == 0o600
    assert secret_file.read_text().strip() not in stack.log.read_text()
    admin = asyncio.run(new_tenant_key(stack.database_url))
    with httpx.Client(base_url=stack.api_url, timeout=30) as api:
        assert api.get("/health").json() == {"status": "ok"}
        assert api.get("/openapi.json").json()["info"]["title"]
        assert api.get("/docs").status_code == 200
        assert api.get("/v1/batches").status_code == 401
        headers = {"Authorization": f"Bearer {admin}"}
        batch = api.post("/v1/batches", json={"quantity": 10}, headers=headers).json()
        campaign = api.post(
            "/v1/campaigns",
            json={"batch_id": batch["id"], "quota": 5, "tasks": [{"key": "first-order"}]},
            headers=headers,
        ).json()
        coupon = api.post(
            f"/v1/campaigns/{campaign['id']}/claims", json={"user_id": "ann"}, headers=headers
        ).json()
        done = api.post(
            f"/v1/coupons/{coupon['coupon_id']}/tasks/first-order/complete",
            json={"user_id": "ann"},
            headers=headers,
        )
        assert done.json()["state"] == "usable", done.text
        path = f"/v1/coupons/{coupon['coupon_id']}"
        receipt = _wait_for(lambda: api.get(path, headers=headers).json()["receipt"], 30)

        # A shop till marks it used at the platform; its callback redeems it at once.
        platform = f"http://127.0.0.1:{stack.env['SIMULATOR_PORT']}"
        key = (data / "platform-api-key").read_text().strip()
        began = time.monotonic()
        used = httpx.post(
            f"{platform}/sim/coupons/{receipt['platform_coupon_id']}/use",
            headers={"Authorization": f"Bearer {key}"},
        )
        assert used.status_code == 200, used.text
        _wait_for(lambda: api.get(path, headers=headers).json()["state"] == "redeemed", 2)
        took = time.monotonic() - began
        print(f"redeemed {took:.2f} s after the platform marked it used")

        # The stack restarts an API that died, as it does the worker.
        os.kill(stack.api_pid(), signal.SIGKILL)
        _wait_for(lambda: "API exited" in stack.log.read_text(), 10)
        _wait_for(lambda: _answers(api), 30)
        assert api.get(path, headers=headers).json()["state"] == "redeemed"
    assert stack.stop() == 0


def test_api_processes_share_the_port_and_the_metrics_and_one_killed_the_others_answer(
    tmp_path: Path,
) -> None:
    stack = RunningStack(tmp_path / "data")
    stack.env["API_PROCESSES"] = "2"
    claims = 30
    try:
        stack.start()
        apis = {name: pid for name, pid, _ in _children(stack.record()) if name.startswith("API")}
        assert list(apis) == ["API", "API 2"]
        assert f"(pids {apis['API']}, {apis['API 2']};" in stack.log.read_text()
        admin = asyncio.run(new_tenant_key(stack.database_url))
        headers = {"Authorization": f"Bearer {admin}"}
        with httpx.Client(base_url=stack.api_url, headers=headers, timeout=30) as api:
            batch = api.post("/v1/batches", json={"quantity": claims}).json()
            campaign = api.post(
                "/v1/campaigns",
                json={"batch_id": batch["id"], "quota": claims, "tasks": [{"key": "t"}]},
            ).json()
        path = f"/v1/campaigns/{campaign['id']}/claims"
        # Each on a connection of its own: the kernel spreads connections, not requests.
        for n in range(claims):
            answer = httpx.post(
                f"{stack.api_url}{path}", json={"user_id": f"u{n}"}, headers=headers, timeout=30
            )
            assert answer.status_code == 201, answer.text
        logs = stack.data_dir / "logs"
        served = {
            name: (logs / log).read_text().count(f"POST {path}")
            for name, log in (("API", "api.log"), ("API 2", "api-2.log"))
        }
        assert sum(served.values()) == claims and min(served.values()) > 0, served
        # Whichever process a scrape reaches, it counts every process's claims.
        for _ in range(6):
            assert _claims_created(stack.api_url) == claims

        os.kill(apis["API 2"], signal.SIGKILL)
        # Until its socket is closed, the kernel may still hand it connections (reset when
        # it dies): a process killed midway loses those, as a single process would.
        port = int(stack.env["API_PORT"])
        _wait_for(lambda: not listens(apis["API 2"], port), 10)
        for _ in range(10):
            assert httpx.get(f"{stack.api_url}/health", timeout=5).status_code == 200
        _wait_for(lambda: "API 2 exited" in stack.log.read_text(), 10)
        restarted = _wait_for(
            lambda: (
                {n: p for n, p, _ in _children(stack.record()) if n == "API 2"}.get("API 2")
                not in (None, apis["API 2"])
            ),
            30,
        )
        assert restarted
        # The dead process's claims still counted beside the live ones'.
        for _ in range(6):
            assert _claims_created(stack.api_url) == claims
        assert stack.stop() == 0
    finally:
        if stack.process is not None:
            stack.kill()


def _claims_created(api_url: str) -> float:
    text = httpx.get(f"{api_url}/metrics", timeout=10).text
    match = re.search(r'^coupons_claims_total\{outcome="created"\} (\S+)$', text, re.M)
    assert match, text
    return float(match.group(1))


def _answers(api: httpx.Client) -> bool:
    try:
        return api.get("/health").status_code == 200
    except httpx.TransportError:
        return False


def _wait_for(check: Callable[[], Any], timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (value := check()):
        assert time.monotonic() < deadline, f"not within {timeout_s} s"
        time.sleep(0.05)
    return value


async def new_tenant_key(url: str) -> str:
    async with db.pool(url, max_size=1) as pool:
        _, key = await create_tenant(pool, "stack-test")
    return key.api_key


@pytest.mark.parametrize(
    ("platform", "platform_keys"),
    [
        ("wechat", "public_key"),
        ("wechat", "certificates"),
        ("wechat", "switching"),
        ("alipay", None),
    ],
)
def test_each_platform_protocol_runs_the_whole_lifecycle(
    tmp_path: Path, platform: str, platform_keys: str | None
) -> None:
    """`PLATFORM=wechat|alipay make run`: the simulator speaks that protocol with the test
    merchant it generated, and batch, claim, task, issue, the redemption callback and
    reconciliation all go through the platform's own adapter. WeChat Pay three times: a
    merchant on its public key, one on platform certificates, one in the middle of the switch
    (answers signed by the public key its requests name, the callback by a certificate it must
    fetch); each batch valid 30 days, so each coupon's validity must be its stock's window."""
    data = tmp_path / "data"
    stack = RunningStack(data, platform)
    if platform_keys is not None:
        stack.env["WECHAT_PLATFORM_KEYS"] = platform_keys
        # The platform's wait for a new stock, shortened: the catalog still waits it out.
        stack.env["SIM_WECHAT_START_DELAY_S"] = "2"
        # Switching: the callback comes signed by the platform certificate, which the API's
        # adapter (holding the public key its answers come signed with) has never fetched.
        stack.env["SIM_WECHAT_SWITCH_PUBLIC_SHARE"] = "0"
    try:
        stack.start()
        assert f"({platform} simulator," in stack.log.read_text()
        keys = data / "platform-keys" / platform
        private = sorted(keys.glob("*private*")) + sorted(keys.glob("apiclient_key.pem"))
        assert private and all(f.stat().st_mode & 0o777 == 0o600 for f in private), private
        admin = asyncio.run(new_tenant_key(stack.database_url))
        headers = {"Authorization": f"Bearer {admin}"}
        with httpx.Client(base_url=stack.api_url, timeout=30, headers=headers) as api:
            batch = api.post("/v1/batches", json={"quantity": 10, "valid_days": 30}).json()
            assert batch["status"] == "running", batch
            campaign = api.post(
                "/v1/campaigns",
                json={"batch_id": batch["id"], "quota": 5, "tasks": [{"key": "first-order"}]},
            ).json()
            coupons = [
                api.post(f"/v1/campaigns/{campaign['id']}/claims", json={"user_id": user}).json()
                for user in ("ann", "bob")
            ]
            for coupon in coupons:
                done = api.post(
                    f"/v1/coupons/{coupon['coupon_id']}/tasks/first-order/complete",
                    json={"user_id": coupon["user_id"]},
                )
                assert done.json()["state"] == "usable", done.text
            paths = [f"/v1/coupons/{coupon['coupon_id']}" for coupon in coupons]

            def receipt(path: str) -> Any:
                return _wait_for(lambda: api.get(path).json()["receipt"], 60)

            receipts = [receipt(path) for path in paths]
            assert len({r["platform_coupon_id"] for r in receipts}) == 2
            sim = f"http://127.0.0.1:{stack.env['SIMULATOR_PORT']}"
            if platform == "wechat":
                # Valid 30 days: the stock's window, which every coupon's validity is.
                ends_at = datetime.fromisoformat(batch["ends_at"])
                assert ends_at - datetime.fromisoformat(batch["starts_at"]) == timedelta(days=30)
                held = httpx.get(f"{sim}/sim/batches/{batch['platform_batch_id']}/coupons")
                platform_ends = {
                    c["coupon_id"]: datetime.fromisoformat(c["valid_until"])
                    for c in held.json()["coupons"]
                }
                for r in receipts:
                    valid_until = datetime.fromisoformat(r["valid_until"])
                    assert valid_until == ends_at == platform_ends[r["platform_coupon_id"]], r

            # ann's coupon is used at the till: the platform's signed callback redeems it.
            used = httpx.post(f"{sim}/sim/coupons/{receipts[0]['platform_coupon_id']}/use")
            assert used.status_code == 200, used.text
            _wait_for(lambda: api.get(paths[0]).json()["state"] == "redeemed", 30)
            events = api.get(paths[0]).json()["events"]
            assert events[-1]["cause"] == "redeemed (callback)", events
            # Delivered on the API's answer, which the simulator reads a moment later.
            _wait_for(
                lambda: (
                    [
                        n["state"]
                        for n in httpx.get(f"{sim}/sim/notifications").json()["notifications"]
                    ]
                    == ["delivered"]
                ),
                10,
            )
            assert api.get(paths[1]).json()["state"] == "issued"

            # bob's coupon is used with no callback (none is sent while callback_url is off):
            # reconciliation finds the use through this platform's adapter and repairs it.
            httpx.put(f"{sim}/sim/knobs", json={"callback_url": ""}).raise_for_status()
            till = f"{sim}/sim/coupons/{receipts[1]['platform_coupon_id']}/use"
            httpx.post(till).raise_for_status()
            found = stack.cli("reconcile", "--batch", batch["id"], "--json")
            assert found.returncode == 0, found.stderr
            report = json.loads(found.stdout)
            assert report["mismatches"] == 1 and report["repaired"] == 1, report
            assert api.get(paths[1]).json()["state"] == "redeemed"
        log = stack.log.read_text() + "".join(
            f.read_text(errors="replace") for f in (data / "logs").glob("*.log")
        )
        for secret in private:
            body = secret.read_text().splitlines()[1]  # a line of the key itself
            assert body not in log, f"{secret.name} leaked into a log"
    finally:
        if stack.process is not None:
            assert stack.stop() == 0


def _children(record: dict[str, Any]) -> list[tuple[str, int, int]]:
    return [(c["name"], c["pid"], c["start_time"]) for c in record["children"]]


def _running(children: list[tuple[str, int, int]]) -> list[str]:
    return [f"{name} ({pid})" for name, pid, start in children if same_process_alive(pid, start)]


def _none_running_within(children: list[tuple[str, int, int]], timeout_s: float) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while (left := _running(children)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def _stop_any(children: list[tuple[str, int, int]]) -> None:
    """A failed test leaves nothing running either (by recorded pid and start time)."""
    for _name, pid, start in reversed(children):
        stop_recorded(pid, start, signal.SIGKILL, timeout_s=5)


def test_a_killed_stack_takes_its_servers_along_and_the_next_start_finds_its_data(
    tmp_path: Path,
) -> None:
    stack = RunningStack(tmp_path / "data")
    state = Path(stack.env["COUPONS_STATE_DIR"])
    children: list[tuple[str, int, int]] = []
    try:
        stack.start()
        assert stack.process is not None
        record = stack.record()
        children = _children(record)
        assert [name for name, _, _ in children] == [
            "PostgreSQL",
            "Temporal",
            "platform simulator",
            "worker",
            "API",
        ]
        registered = state / f"{stack.process.pid}.json"
        assert registered.read_text() == (stack.data_dir / RECORD_NAME).read_text()
        assert record["data_dir"] == str(stack.data_dir.resolve())
        claimed = stack.cli("claim", "--campaign", "demo", "--user", "u1")
        assert claimed.returncode == 0, claimed.stderr

        began = time.monotonic()
        stack.kill()
        assert _none_running_within(children, timeout_s=30) == []
        gone_s = time.monotonic() - began

        stack.start()
        assert "left running" not in stack.log.read_text()  # nothing was
        assert stack.states() == {"received": 1}
        again = stack.cli("claim", "--campaign", "demo", "--user", "u1")
        assert json.loads(again.stdout)["coupon_id"] == json.loads(claimed.stdout)["coupon_id"]
        children = _children(stack.record())

        assert stack.stop() == 0
        last = stack.log.read_text().splitlines()[-1]
        assert last == (
            "stopped API, worker, platform simulator, Temporal, PostgreSQL; "
            f"data kept in {stack.data_dir.resolve()}"
        )
        assert _running(children) == []
        assert not (stack.data_dir / RECORD_NAME).exists()
        assert list(state.iterdir()) == []
        print(f"every server gone {gone_s:.1f} s after the stack's SIGKILL")
    finally:
        if stack.process is not None:
            stack.kill()
        _stop_any(children)


# A stack whose servers outlive it (no die_with_parent), as one that could not tell them to
# go would leave them: SIGKILLed, it leaves its servers and its record behind.
_STACK_KEEPING_ITS_SERVERS = """
import sys, time
from coupons.config import Settings
from app.stack import Stack

Stack(Settings.from_env(), record=True).start()
print("up", flush=True)
time.sleep(300)
"""


def test_the_next_start_stops_what_a_dead_stack_left_running(tmp_path: Path) -> None:
    stack = RunningStack(tmp_path / "data")
    out = tmp_path / "old-stack.log"
    children: list[tuple[str, int, int]] = []
    with out.open("wb") as log:
        old = subprocess.Popen(
            [sys.executable, "-c", _STACK_KEEPING_ITS_SERVERS],
            cwd=ROOT,
            env=stack.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_for(lambda: old.poll() is not None or b"up\n" in out.read_bytes(), 90)
        assert old.poll() is None, out.read_text()
        children = _children(stack.record())
        assert [name for name, _, _ in children] == [
            "PostgreSQL",
            "Temporal",
            "platform simulator",
            "worker",
        ]
        old.kill()
        old.wait(timeout=10)
        assert len(_running(children)) == 4

        stack.start()
        said = ", ".join(f"{name} (pid {pid})" for name, pid, _ in reversed(children))
        assert (
            f"stopped what the stack that ran here before (pid {old.pid}) left running: {said}"
            in stack.log.read_text()
        )
        assert _running(children) == []
        assert stack.cli("claim", "--campaign", "demo", "--user", "u2").returncode == 0
        # Its terminal closed: the stack stops in order, as on Ctrl-C.
        assert stack.stop(signal.SIGHUP) == 0
        assert stack.log.read_text().splitlines()[-1].startswith("stopped API, worker, ")
    finally:
        if old.poll() is None:
            old.kill()
            old.wait()
        if stack.process is not None:
            stack.kill()
        _stop_any(children)


def test_a_plain_shell_beside_a_wechat_stack_follows_it_and_a_contrary_one_is_refused(
    tmp_path: Path,
) -> None:
    """Issue 14's first moment: `PLATFORM=wechat make run`, then `starter.py claim` in a shell
    that never exported PLATFORM. It used to write to the WeChat ledger under the generic key
    ring, leaving a coupon no worker could read; now it follows the stack, and a shell that
    says another platform is refused before anything is written."""
    stack = RunningStack(tmp_path / "data", "wechat")
    stack.env["SIM_WECHAT_START_DELAY_S"] = "1"  # the demo stock's registration, shortened
    try:
        stack.start()
        # The second shell knows only the moved ports of PostgreSQL and Temporal.
        plain = {
            k: v
            for k, v in stack.env.items()
            if k not in ("PLATFORM", "DATA_DIR", "SIMULATOR_PORT", "TEMPORAL_UI_PORT")
        }
        claimed = stack.cli("claim", "--campaign", "demo", "--user", "ann", env=plain)
        assert claimed.returncode == 0, claimed.stderr
        coupon = json.loads(claimed.stdout)
        assert coupon["created"] is True
        done = stack.cli(
            "complete-task",
            "--coupon",
            coupon["coupon_id"],
            "--task",
            "first-order",
            "--wait",
            env=plain,
        )
        assert done.returncode == 0, done.stderr
        stack.wait_states({"issued": 1})  # the stack's worker read it, and sent it to WeChat

        contrary = {**plain, "PLATFORM": "alipay"}
        refused = stack.cli("claim", "--campaign", "demo", "--user", "bob", env=contrary)
        assert refused.returncode == 2, refused
        assert "PLATFORM: this shell says alipay, the stack runs wechat" in refused.stderr
        assert stack.states() == {"issued": 1}
        assert stack.temporal_count("WorkflowType = 'UserCouponWorkflow'") == 1
    finally:
        if stack.process is not None:
            stack.stop()
