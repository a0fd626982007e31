"""The operator-mistakes scenario's shells (`chaos.operator`): a shell beside the stack
(none of the service's settings but the stack's ports), the commands run from it, and the
child process that dies between the platform's answer and the ledger's write. That child is
this module, `python -m chaos.shells '{"batch_id": ..., "operation": ..., "crash_on": ...}'`,
run with the plain shell's environment: one catalog call, as `starter.py batch ...` makes
it, with the ledger's completion write for `crash_on` replaced by `os._exit(137)`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

from app.running import settings_from_env
from chaos.harness import Harness
from coupons import catalog
from coupons.config import SECRET_SETTINGS
from coupons.ledger import batches, db
from coupons.platforms.base import BatchAction
from coupons.platforms.configured import make_platform

log = logging.getLogger("chaos.operator")

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# The exit code of the child that dies between the platform's answer and the ledger's write.
CRASHED = 137
# One `starter.py` command (or crash child) may take this long.
COMMAND_TIMEOUT_S = 90.0
# The quantity of each batch the child creates.
CRASH_BATCH_QUANTITY = 10


def registry(harness: Harness) -> Path:
    return harness.settings.data_dir.parent / "stacks"


def shell_env(harness: Harness, **given: str) -> dict[str, str]:
    """A shell beside the stack: none of the service's settings but the stack's ports (and
    `given`), the scenario's registry in place of the user's."""
    settings = harness.settings
    ours = set(settings.to_env()) | SECRET_SETTINGS
    ours |= {"COUPONS_CONFIG", "DATABASE_URL", "TEMPORAL_ADDRESS", "PLATFORM_URL"}
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in ours and not name.startswith(("SIM_", "WECHAT_", "ALIPAY_"))
    }
    env["COUPONS_STATE_DIR"] = str(registry(harness))
    env["TEMPORAL_PORT"] = str(settings.temporal_port)
    env["PG_PORT"] = str(settings.pg_port)
    env.update(given)
    return env


@dataclass
class Answered:
    argv: list[str]
    rc: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)

    def describe(self) -> str:
        said = (self.err.strip() or self.out.strip()).splitlines()
        return f"`{' '.join(self.argv)}` exit {self.rc}: {said[-1][:200] if said else ''}"


async def command(env: Mapping[str, str], *argv: str) -> Answered:
    """Run `python <argv>` in the project with `env`; its exit code and output."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *argv,
        cwd=PROJECT_ROOT,
        env=dict(env),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), COMMAND_TIMEOUT_S)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return Answered(list(argv), process.returncode, out.decode(errors="replace"), err.decode())


async def starter(env: Mapping[str, str], *argv: str) -> Answered:
    answered = await command(env, "starter.py", *argv)
    log.info("%s", answered.describe())
    return answered


# ----- the child that dies between the platform's answer and the ledger's write ---------


@contextlib.contextmanager
def dying_at_completion(operation: str) -> Iterator[None]:
    """While inside, the ledger's write that completes an `operation` intent kills this
    process (exit CRASHED): the platform has answered, the ledger never hears of it. The one
    fault this forces, at that exact point; the fault runs and the intent tests use it."""
    complete = batches.complete_intent

    async def die_before_writing(
        pool: Any, intent: batches.BatchIntent, *rest: Any
    ) -> batches.Batch:
        if intent.operation == operation:
            os._exit(CRASHED)
        return await complete(pool, intent, *rest)

    with mock.patch.object(batches, "complete_intent", die_before_writing):
        yield


async def _child(order: Mapping[str, str]) -> None:
    """One catalog call, as `starter.py batch ...` makes it from a plain shell (this process's
    environment); dies at the ledger write that completes `crash_on`."""
    settings = settings_from_env().with_stack_secrets()
    platform = make_platform(settings)
    try:
        with dying_at_completion(order["crash_on"]):
            async with db.pool(settings.database_url, max_size=2) as pool:
                batch_id = order["batch_id"]
                if order["operation"] == "create":
                    await catalog.batches.create_batch(
                        pool, platform, batch_id, quantity=CRASH_BATCH_QUANTITY
                    )
                else:
                    action = BatchAction(order["operation"])
                    await catalog.batches.change_batch(pool, platform, batch_id, action)
    finally:
        await platform.aclose()


if __name__ == "__main__":
    asyncio.run(_child(json.loads(sys.argv[1])))
    # The SDK's native runtime may abort at exit after the work is done (see starter.py).
    sys.stdout.flush()
    os._exit(0)
