"""Flow files: the platform's own record of what a batch sent and what was used, downloaded
and verified by their SHA1 (as WeChat Pay publishes its use-flow files)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import datetime

import httpx
import pytest

from coupons.platforms.base import (
    FlowKind,
    FlowRecord,
    PlatformRefused,
    PlatformUnavailable,
    SendRequest,
)
from coupons.platforms.generic.adapter import RestPlatform
from coupons.platforms.simcore.core import FLOW_FILES_KEPT

from .conftest import SimControl, StartSimulator, batch_spec, new_key, running_batch

FLOW_HEADER = b"coupon_id,batch_id,user_id,idempotency_key,at\r\n"


class RewritingTransport(httpx.AsyncBaseTransport):
    """The real network, except that answers on paths containing `marker` are rewritten: what
    a corrupt download or a tampering proxy does. Every request is recorded."""

    def __init__(self, marker: str, rewrite: Callable[[bytes], bytes]) -> None:
        self._real = httpx.AsyncHTTPTransport()
        self._marker = marker
        self._rewrite = rewrite
        self.requests: list[httpx.Request] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        response = await self._real.handle_async_request(request)
        if self._marker not in request.url.path:
            return response
        content = await response.aread()
        await response.aclose()
        return httpx.Response(
            response.status_code,
            headers={"content-type": response.headers["content-type"]},
            content=self._rewrite(content),
        )

    async def aclose(self) -> None:
        await self._real.aclose()


async def test_flows_record_what_was_sent_and_used(platform: RestPlatform, sim: SimControl) -> None:
    batch = await running_batch(platform, batch_spec(quantity=10))
    requests = [SendRequest(batch.batch_id, new_key("user"), new_key("send")) for _ in range(3)]
    coupons = [await platform.send_coupon(request) for request in requests]
    await platform.send_coupon(requests[0])  # a replay is no second line
    used = [(await sim.use(coupon.coupon_id)).json() for coupon in (coupons[2], coupons[0])]

    sent_flow = await platform.batch_flow(batch.batch_id, FlowKind.SENT)
    used_flow = await platform.batch_flow(batch.batch_id, FlowKind.USED)

    expected_sent = [
        FlowRecord(c.coupon_id, batch.batch_id, c.user_id, r.idempotency_key, c.sent_at)
        for c, r in zip(coupons, requests, strict=True)
    ]
    expected_used = [
        FlowRecord(u["coupon_id"], batch.batch_id, u["user_id"], None, at(u["used_at"]))
        for u in used
    ]
    assert sent_flow == sorted(expected_sent, key=lambda r: (r.at, r.coupon_id))
    assert used_flow == sorted(expected_used, key=lambda r: (r.at, r.coupon_id))


def at(value: str) -> datetime:
    return datetime.fromisoformat(value)


async def test_a_new_batch_has_empty_flows(platform: RestPlatform) -> None:
    batch = await platform.create_batch(batch_spec())

    assert await platform.batch_flow(batch.batch_id, FlowKind.SENT) == []
    assert await platform.batch_flow(batch.batch_id, FlowKind.USED) == []


async def test_the_flow_file_is_csv_and_hashes_as_announced(
    platform: RestPlatform, sim: SimControl
) -> None:
    batch = await running_batch(platform)
    request = SendRequest(batch.batch_id, "flow,user", new_key("send"))  # a comma is quoted
    await platform.send_coupon(request)

    descriptor = (await sim.http.get(f"/v1/batches/{batch.batch_id}/flows/sent")).json()
    download = await sim.http.get(descriptor["url"])

    assert descriptor["url"].startswith(f"{sim.url}/v1/files/")
    assert (descriptor["hash_type"], descriptor["records"]) == ("SHA1", 1)
    assert download.headers["content-type"].startswith("text/csv")
    assert hashlib.sha1(download.content).hexdigest() == descriptor["hash_value"]
    assert download.content.startswith(FLOW_HEADER)
    assert b'"flow,user"' in download.content
    flow = await platform.batch_flow(batch.batch_id, FlowKind.SENT)
    assert [record.user_id for record in flow] == ["flow,user"]


async def test_unknown_flows_and_files_are_not_found(
    platform: RestPlatform, sim: SimControl
) -> None:
    batch = await platform.create_batch(batch_spec())

    with pytest.raises(PlatformRefused) as no_batch:
        await platform.batch_flow("bat_nope", FlowKind.SENT)
    no_kind = await sim.http.get(f"/v1/batches/{batch.batch_id}/flows/refunded")
    no_file = await sim.http.get("/v1/files/not-a-token")

    assert no_batch.value.code == "BATCH_NOT_FOUND"
    assert no_kind.status_code == 404
    assert (no_file.status_code, no_file.json()["code"]) == (404, "FILE_NOT_FOUND")


async def test_only_the_newest_flow_files_are_kept(platform: RestPlatform, sim: SimControl) -> None:
    batch = await platform.create_batch(batch_spec())
    path = f"/v1/batches/{batch.batch_id}/flows/used"

    urls = [(await sim.http.get(path)).json()["url"] for _ in range(FLOW_FILES_KEPT + 1)]

    assert (await sim.http.get(urls[0])).json()["code"] == "FILE_NOT_FOUND"
    assert (await sim.http.get(urls[-1])).content == FLOW_HEADER
    assert len(set(urls)) == len(urls)  # every token is new


async def test_a_tampered_flow_file_is_unavailable(sim: SimControl) -> None:
    forged = b"cpn_forged,bat_x,mallory,,2030-01-01T00:00:00+00:00\r\n"
    transport = RewritingTransport("/v1/files/", lambda content: content + forged)
    async with httpx.AsyncClient(transport=transport) as client:
        platform = RestPlatform(sim.url, client=client)
        batch = await running_batch(platform)
        await platform.send_coupon(SendRequest(batch.batch_id, new_key("user"), new_key("send")))

        with pytest.raises(PlatformUnavailable) as tampered:
            await platform.batch_flow(batch.batch_id, FlowKind.SENT)

    assert tampered.value.code == "BAD_FLOW_FILE"


async def test_a_flow_file_off_the_platform_is_never_fetched(sim: SimControl) -> None:
    def elsewhere(content: bytes) -> bytes:
        descriptor = json.loads(content)
        descriptor["url"] = "http://files.example.net/v1/files/stolen"
        return json.dumps(descriptor).encode()

    transport = RewritingTransport("/flows/", elsewhere)
    async with httpx.AsyncClient(transport=transport) as client:
        platform = RestPlatform(sim.url, api_key="our-key", client=client)
        batch = await platform.create_batch(batch_spec())

        with pytest.raises(PlatformUnavailable) as refused:
            await platform.batch_flow(batch.batch_id, FlowKind.SENT)

    assert refused.value.code == "BAD_FLOW_URL"
    assert {request.url.host for request in transport.requests} == {httpx.URL(sim.url).host}


async def test_flow_files_need_the_api_key(start_simulator: StartSimulator) -> None:
    process = start_simulator(env={"PLATFORM_API_KEY": "s3cret-key"})
    platform = RestPlatform(process.url, api_key="s3cret-key")
    try:
        batch = await running_batch(platform)
        await platform.send_coupon(SendRequest(batch.batch_id, new_key("user"), new_key("send")))
        flow = await platform.batch_flow(batch.batch_id, FlowKind.SENT)
        async with httpx.AsyncClient(base_url=process.url) as http:
            headers = {"Authorization": "Bearer s3cret-key"}
            path = f"/v1/batches/{batch.batch_id}/flows/sent"
            url = (await http.get(path, headers=headers)).json()["url"]
            anonymous = await http.get(url)
    finally:
        await platform.aclose()

    assert len(flow) == 1
    assert (anonymous.status_code, anonymous.json()["code"]) == (401, "UNAUTHORIZED")
