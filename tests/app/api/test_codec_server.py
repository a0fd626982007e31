"""The codec server the Temporal Web UI and CLI call: Temporal's remote codec protocol over
HTTP, who may call it, CORS for the Web UI, and the real `temporal workflow show` reading
encrypted payloads through it."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format
from temporalio.api.common.v1 import Payload
from temporalio.client import Client
from temporalio.converter import DataConverter

from app.api.codec import RedactPathToken
from app.embedded import find_binary
from coupons.codec import ENCRYPTED, KEY_ID, encrypted_converter, ensure_keys, load_keys
from coupons.config import Settings
from coupons.model import CouponInput
from tests.app.api.conftest import Api, Tenant
from tests.conftest import TASK, close_workflows, new_id

TOKEN = "codec-token-for-tests-3b9f0c1e7d"
UI = "http://127.0.0.1:8233"
USER = "user-7c1d2e"
COUPON = CouponInput(
    coupon_id=f"spring:{USER}:1",
    campaign_id="spring",
    user_id=USER,
    batch_id="b-spring",
    required_tasks=[TASK],
    claimed_at=datetime(2026, 11, 2, 9, 30, tzinfo=UTC),
    task_deadline=None,
)
WEB_UI_HEADERS = {"content-type": "application/json", "x-namespace": "default", "origin": UI}


@pytest.fixture
def api_settings(api_settings: Settings, tmp_path: Path) -> Settings:
    """The API's settings with the codec on: a key ring and a codec token."""
    keys = tmp_path / "codec-keys.json"
    ensure_keys(keys)
    return replace(api_settings, codec_keys_file=keys, codec_token=TOKEN)


def as_json(payloads: list[Payload]) -> dict[str, Any]:
    """Payloads as the Web UI and CLI send them: proto JSON, bytes in base64."""
    return {"payloads": [json_format.MessageToDict(p) for p in payloads]}


def of_json(body: dict[str, Any]) -> list[Payload]:
    return [json_format.ParseDict(p, Payload()) for p in body["payloads"]]


async def encrypted(api: Api, values: list[Any]) -> list[Payload]:
    """What the service's workers store: values encrypted with the API's key ring."""
    assert api.settings.codec_keys_file is not None
    return await encrypted_converter(api.settings.codec_keys_file).encode(values)


# ----------------------------------------------------------------- the protocol


async def test_decode_gives_back_what_the_workers_encrypted(api: Api) -> None:
    sealed = await encrypted(api, [COUPON, None, USER])
    answer = await api.http.post(
        f"/codec/{TOKEN}/decode", json=as_json(sealed), headers=WEB_UI_HEADERS
    )
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/json"
    body = answer.json()
    # The Web UI reads metadata and data as base64 of JSON.
    first = body["payloads"][0]
    assert base64.b64decode(first["metadata"]["encoding"]) == b"json/plain"
    assert USER in base64.b64decode(first["data"]).decode()
    converter = DataConverter.default
    assert await converter.decode(of_json(body), [CouponInput, type(None), str]) == [
        COUPON,
        None,
        USER,
    ]


async def test_encode_then_decode_round_trips_with_the_current_key(api: Api) -> None:
    clear = await DataConverter.default.encode([COUPON, USER])
    headers = {"authorization": f"Bearer {TOKEN}", "x-namespace": "default"}
    encoded = await api.http.post("/codec/encode", json=as_json(clear), headers=headers)
    assert encoded.status_code == 200, encoded.text
    sealed = of_json(encoded.json())
    assert api.settings.codec_keys_file is not None
    current = load_keys(api.settings.codec_keys_file).current.encode()
    assert all(p.metadata["encoding"] == ENCRYPTED for p in sealed)
    assert all(p.metadata[KEY_ID] == current for p in sealed)
    assert all(USER.encode() not in p.data for p in sealed)
    decoded = await api.http.post("/codec/decode", json=encoded.json(), headers=headers)
    assert decoded.status_code == 200, decoded.text
    assert of_json(decoded.json()) == clear


async def test_payloads_in_clear_pass_through(api: Api) -> None:
    clear = await DataConverter.default.encode([COUPON])
    answer = await api.http.post(f"/codec/{TOKEN}/decode", json=as_json(clear))
    assert answer.status_code == 200, answer.text
    assert of_json(answer.json()) == clear


async def test_what_cannot_be_decoded_is_a_400_naming_the_key(api: Api) -> None:
    [sealed] = await encrypted(api, [USER])
    tampered = Payload(metadata=sealed.metadata, data=sealed.data[:-1] + b"\0")
    answer = await api.http.post(f"/codec/{TOKEN}/decode", json=as_json([tampered]))
    assert answer.status_code == 400
    problem = answer.json()
    assert problem["code"] == "undecodable_payload"
    assert sealed.metadata[KEY_ID].decode() in problem["detail"]
    assert problem["instance"] == "/codec/***/decode"  # never the token
    for body in (b"{not json", b'{"payloads": [{"data": "not base64!"}]}'):
        answer = await api.http.post(
            f"/codec/{TOKEN}/decode", content=body, headers={"content-type": "application/json"}
        )
        assert (answer.status_code, answer.json()["code"]) == (400, "malformed_payloads")


async def test_encode_refuses_another_namespace(api: Api) -> None:
    clear = await DataConverter.default.encode([USER])
    answer = await api.http.post(
        f"/codec/{TOKEN}/encode", json=as_json(clear), headers={"x-namespace": "payments"}
    )
    assert (answer.status_code, answer.json()["code"]) == (400, "wrong_namespace")


# ----------------------------------------------------------------- who may call


async def test_who_may_call(api: Api, tenant_a: Tenant) -> None:
    body = as_json(await encrypted(api, [USER]))

    async def status(path: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
        answer = await api.http.post(path, json=body, headers=headers)
        assert answer.headers["content-type"].startswith(
            "application/problem+json" if answer.status_code >= 400 else "application/json"
        )
        return answer.status_code, answer.json().get("code", "ok")

    assert await status("/codec/decode") == (401, "unauthorized")
    assert await status("/codec/decode", {"authorization": "Bearer nope"}) == (401, "unauthorized")
    assert await status("/codec/decode", tenant_a.app) == (403, "forbidden")
    assert await status("/codec/decode", tenant_a.admin) == (200, "ok")
    assert await status("/codec/decode", {"authorization": f"Bearer {TOKEN}"}) == (200, "ok")
    assert await status(f"/codec/{TOKEN}/decode") == (200, "ok")
    assert await status(f"/codec/{TOKEN}x/decode") == (404, "not_found")
    # An admin key is not a path token: the path takes the codec token only.
    key = tenant_a.admin["Authorization"].removeprefix("Bearer ")
    assert await status(f"/codec/{key}/decode") == (404, "not_found")
    wrong = await api.http.post(f"/codec/{TOKEN}x/decode", json=body)
    assert TOKEN not in wrong.text


async def test_no_codec_token_means_no_path_endpoint(api: Api) -> None:
    api.backends.settings = replace(api.settings, codec_token=None)
    answer = await api.http.post("/codec/None/decode", json={"payloads": []})
    assert (answer.status_code, answer.json()["code"]) == (404, "not_found")
    answer = await api.http.post("/codec//decode", json={"payloads": []})
    assert answer.status_code == 404


async def test_with_the_codec_off_there_is_nothing_to_decode(api: Api) -> None:
    api.backends.settings = replace(api.settings, codec_keys_file=None)
    answer = await api.http.post(f"/codec/{TOKEN}/decode", json={"payloads": []})
    assert answer.status_code == 404
    assert "CODEC_KEYS_FILE" in answer.json()["detail"]


async def test_unreadable_keys_are_a_503_naming_the_file(api: Api, tmp_path: Path) -> None:
    broken = tmp_path / "broken-keys.json"
    broken.write_text("{}")
    api.backends.settings = replace(api.settings, codec_keys_file=broken)
    answer = await api.http.post(f"/codec/{TOKEN}/decode", json={"payloads": []})
    assert (answer.status_code, answer.json()["code"]) == (503, "unavailable")
    assert str(broken) in answer.json()["detail"]


async def test_the_codec_routes_stay_out_of_the_openapi_document(api: Api) -> None:
    paths = (await api.http.get("/openapi.json")).json()["paths"]
    assert not [path for path in paths if path.startswith("/codec")]


@pytest.mark.parametrize(
    ("path", "logged"),
    [
        (f"/codec/{TOKEN}/decode", "/codec/***/decode"),
        (f"/codec/{TOKEN}", "/codec/***"),  # a probe of the bare token, 404, still hidden
        (f"/codec/{TOKEN}/", "/codec/***/"),
        ("/codec/decode", "/codec/decode"),  # the header-authenticated routes keep their names
        ("/codec/encode", "/codec/encode"),
    ],
)
def test_the_access_log_never_shows_the_path_token(path: str, logged: str) -> None:
    record = logging.LogRecord(
        "uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5000", "POST", path, "1.1", 200), None,
    )  # fmt: skip
    assert RedactPathToken().filter(record)
    assert record.getMessage() == f'127.0.0.1:5000 - "POST {logged} HTTP/1.1" 200'


# ----------------------------------------------------------------- CORS for the Web UI


async def test_the_web_uis_preflight_is_answered(api: Api) -> None:
    for path in (f"/codec/{TOKEN}/decode", "/codec/decode", "/codec/whatever/encode"):
        answer = await api.http.options(
            path,
            headers={
                "origin": UI,
                "access-control-request-method": "POST",
                "access-control-request-headers": "content-type,x-namespace,authorization",
            },
        )
        assert answer.status_code == 204, answer.text
        assert answer.headers["access-control-allow-origin"] == UI
        assert answer.headers["access-control-allow-credentials"] == "true"
        assert "POST" in answer.headers["access-control-allow-methods"]
        allowed = {h.strip() for h in answer.headers["access-control-allow-headers"].split(",")}
        assert {"content-type", "x-namespace", "authorization"} <= allowed


async def test_another_origin_is_not_allowed(api: Api) -> None:
    evil = "http://evil.example"
    preflight = await api.http.options(
        f"/codec/{TOKEN}/decode",
        headers={"origin": evil, "access-control-request-method": "POST"},
    )
    assert preflight.status_code == 403
    assert "access-control-allow-origin" not in preflight.headers
    # Even with the token, a page of that origin cannot read the answer.
    answer = await api.http.post(
        f"/codec/{TOKEN}/decode", json={"payloads": []}, headers={"origin": evil}
    )
    assert "access-control-allow-origin" not in answer.headers
    assert answer.headers["vary"] == "Origin"


async def test_errors_carry_cors_headers_for_the_web_ui(api: Api) -> None:
    """So the UI can read why, instead of a bare network error."""
    answer = await api.http.post("/codec/decode", json={"payloads": []}, headers={"origin": UI})
    assert answer.status_code == 401
    assert answer.headers["access-control-allow-origin"] == UI


# ----------------------------------------------------------------- the real CLI


async def test_temporal_workflow_show_reads_payloads_only_through_the_codec(
    api: Api, served: str
) -> None:
    """`temporal workflow show` prints the stored payloads encrypted; with the codec
    endpoint (header token or path token), decrypted."""
    assert api.settings.codec_keys_file is not None
    config = api.client.config()
    config["data_converter"] = encrypted_converter(api.settings.codec_keys_file)
    client = Client(**config)
    # No worker: the started event's input is all this needs.
    workflow_id = new_id("codec-show")
    await client.start_workflow(
        "UserCouponWorkflow", COUPON, id=workflow_id, task_queue=new_id("nobody")
    )
    try:
        address = api.client.service_client.config.target_host

        async def show(*codec: str) -> tuple[bytes, bytes]:
            process = await asyncio.create_subprocess_exec(
                str(find_binary("temporal")), "workflow", "show", "--workflow-id", workflow_id,
                "--address", address, "--namespace", api.client.namespace, "--output", "json",
                *codec,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, err = await process.communicate()
            assert process.returncode == 0, err.decode()
            # The started event's input, as printed (proto JSON: bytes in base64).
            started = json.loads(out)["events"][0]["workflowExecutionStartedEventAttributes"]
            [payload] = started["input"]["payloads"]
            encoding = base64.b64decode(payload["metadata"]["encoding"])
            return encoding, base64.b64decode(payload["data"])

        stored = await show()
        assert stored[0] == ENCRYPTED and USER.encode() not in stored[1]
        for codec in (
            ["--codec-endpoint", f"{served}/codec", "--codec-auth", f"Bearer {TOKEN}"],
            ["--codec-endpoint", f"{served}/codec/{TOKEN}"],
        ):
            encoding, data = await show(*codec)
            assert encoding == b"json/plain" and USER.encode() in data, codec
    finally:
        await close_workflows(api.client, [workflow_id])
