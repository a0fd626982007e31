"""The OpenAPI document and the docs, as clients and schemathesis read them."""

from __future__ import annotations

from typing import get_args

import httpx

from app.api.app import create_app
from app.api.models import State
from coupons.config import Settings
from coupons.lifecycle import STATES


async def _get(path: str) -> httpx.Response:
    app = create_app(Settings())  # no backends: neither needs the ledger
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
        return await http.get(path)


async def test_every_operation_documents_its_key_and_its_problems() -> None:
    schema = (await _get("/openapi.json")).json()
    assert schema["openapi"].startswith("3.1")
    operations = [
        (path, method, operation)
        for path, methods in schema["paths"].items()
        for method, operation in methods.items()
    ]
    assert len(operations) >= 20
    for path, method, operation in operations:
        where = f"{method.upper()} {path}"
        for status, response in operation["responses"].items():
            if int(status) >= 400:
                assert list(response["content"]) == ["application/problem+json"], where
        if path.startswith("/v1/"):
            assert operation["security"] == [{"HTTPBearer": []}], where
            assert operation["x-required-scope"] in ("app", "admin"), where
            assert {"401", "403", "413", "422"} <= set(operation["responses"]), where
            if method in ("post", "patch"):
                assert "400" in operation["responses"], where
        else:
            assert "security" not in operation, where
    scopes = {
        (path, method): operation.get("x-required-scope") for path, method, operation in operations
    }
    assert scopes[("/v1/batches", "post")] == "admin"
    assert scopes[("/v1/campaigns/{campaign_id}/claims", "post")] == "app"
    assert "HTTPValidationError" not in schema["components"]["schemas"]


def test_the_documented_states_are_the_lifecycles() -> None:
    assert set(get_args(State)) == set(STATES)


async def test_the_docs_work_offline() -> None:
    page = await _get("/docs")
    assert page.status_code == 200
    assert "/docs/assets/swagger-ui-bundle.js" in page.text and "cdn" not in page.text.lower()
    script = await _get("/docs/assets/swagger-ui-bundle.js")
    assert script.status_code == 200 and len(script.content) > 100_000
