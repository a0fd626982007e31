"""A bounded property-based run of schemathesis against /openapi.json, as the README gives
it: no 5xx, and every answer as the schema says (status, media type, headers, body)."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import pytest

from tests.app.api.conftest import Api, Tenant, claim, make_campaign

pytestmark = pytest.mark.usefixtures("workers")

CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
        "response_schema_conformance",
    ]
)
MAX_EXAMPLES = 10
TIME_LIMIT_S = 120


async def test_schemathesis_finds_nothing(
    api: Api, tenant_a: Tenant, served: str, tmp_path: Path
) -> None:
    # Something real to find, so generated requests meet more than 404s.
    campaign = await make_campaign(api, tenant_a)
    await claim(api, tenant_a, campaign["id"], "alice")
    command = [
        str(Path(sys.executable).with_name("schemathesis")),
        "run",
        f"{served}/openapi.json",
        "--header",
        f"Authorization:{tenant_a.admin['Authorization']}",
        "--checks",
        CHECKS,
        "--max-examples",
        str(MAX_EXAMPLES),
        # One worker: CPython 3.11 can fail parsing source in two threads at once
        # ("AST constructor recursion depth mismatch"), which Hypothesis does.
        "--workers",
        "1",
        "--request-timeout",
        "30",
        "--suppress-health-check",
        "all",
        "--report-dir",
        str(tmp_path),
    ]
    began = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        *command,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=tmp_path,
        env={"NO_COLOR": "1", "PATH": str(Path(sys.executable).parent)},
    )
    async with asyncio.timeout(TIME_LIMIT_S):
        output, _ = await process.communicate()
    text = output.decode(errors="replace")
    print(text[-3000:])
    print(f"schemathesis took {time.monotonic() - began:.1f} s")
    assert process.returncode == 0, text[-6000:]
