"""The command line an app or operator uses (`python starter.py ...`).

Coupons: `claim`, `complete-task`, `show`, `cancel`, `list`, `stats`, `repair` print JSON.
Catalog: `batch create|list|show|start|pause|resume|stop|sync`,
`campaign create|update|list|show|pause|resume|end`, `reconcile` and `report` (a
campaign's funnel, with a PNG chart) print a table, or JSON with `--json`.
`batch create` and `campaign create` take `--tenant ID` (default `default`): the tenant
that owns what they create; the other catalog commands see every tenant's (`report
--tenant ID` only that tenant's).
Tenants (the apps that call the HTTP API) and their keys: `tenant create|list`,
`key create|list|revoke` print JSON; a new key's secret (`api_key`) is printed once, by
the command that creates it, and is never stored or shown again.

Exit codes: 0 success; 2 refused, by the service or for bad input (`error: <code>:
<message>` on stderr, with a stable code such as `sold_out`, `campaign_closed`,
`unknown_task`, `invalid_request`); 1 a part that cannot be reached (PostgreSQL,
Temporal, the platform, no worker answering in time) or an unexpected error.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import logging
import sys
import traceback
from collections.abc import Callable, Mapping

import psycopg
from psycopg_pool import PoolTimeout
from temporalio.client import WorkflowFailureError, WorkflowUpdateFailedError
from temporalio.service import RPCError

from app import service
from app.cli import batches, campaigns, coupons, ops, reports, tenants
from app.cli.args import Commands, Nouns, _Parser
from app.cli.render import Answer, CommandResult, print_result
from app.running import settings_from_env
from coupons.config import ConfigError, Settings
from coupons.errors import Refused
from coupons.platforms.base import PlatformError

# Each noun's parser section, in the order `--help` lists them, and its commands (`codec`
# and `doctor` run apart, without the ledger's pool: see `main`).
NOUNS: tuple[tuple[Callable[[Nouns], None], Commands], ...] = (
    (ops.add_codec, {}),
    (coupons.add_parsers, coupons.COMMANDS),
    (ops.add_doctor, {}),
    (batches.add_parsers, batches.COMMANDS),
    (campaigns.add_parsers, campaigns.COMMANDS),
    (tenants.add_parsers, tenants.COMMANDS),
    (reports.add_parsers, reports.COMMANDS),
)
COMMANDS: Commands = {name: command for _, commands in NOUNS for name, command in commands.items()}


def _version() -> str:
    try:
        return importlib.metadata.version("coupon-lifecycle")
    except importlib.metadata.PackageNotFoundError:  # run from a tree that was never installed
        return "(not installed)"


def parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="starter.py", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", required=True)
    for add_parsers, _ in NOUNS:
        add_parsers(sub)
    return p


def _command(args: argparse.Namespace) -> str:
    action = getattr(args, "action", None)
    return f"{args.command} {action}" if action else str(args.command)


async def run(args: argparse.Namespace, settings: Settings) -> CommandResult:
    # A short wait: a person at a prompt wants "PostgreSQL is down" now, not in 30 s.
    async with service.opened(settings, pool_size=2, timeout_s=5) as backends:
        try:
            return await COMMANDS[_command(args)](backends, args)
        except (PoolTimeout, psycopg.OperationalError) as err:
            raise service.Unavailable(f"cannot reach PostgreSQL ({err})") from None
        except PlatformError as err:
            raise service.Unavailable(
                f"the platform at {settings.platform_url} failed: {err} (is it up, and is "
                "PLATFORM_API_KEY the platform's key?)"
            ) from None


def main(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run one command; `environ` (default: the process's) configures it, as for `make run`."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # psycopg_pool logs every failed connection attempt; the one-line error says it all.
    logging.getLogger("psycopg.pool").setLevel(logging.CRITICAL)
    try:
        args = parser().parse_args(argv)
    except SystemExit as exited:  # --help, --version, or bad input (already said on stderr)
        return exited.code if isinstance(exited.code, int) else 2
    if args.command == "doctor":
        try:
            diagnosis = ops.run_doctor(environ)
        except ConfigError as err:
            return _fail(2, str(err))
        return _answered(args, diagnosis)
    if args.command == "codec":
        try:
            print(ops.run_codec(args, environ))
        except ConfigError as err:
            return _fail(2, str(err))
        return 0
    try:
        result = asyncio.run(run(args, settings_from_env(environ)))
    except ConfigError as err:
        return _fail(2, str(err))
    except Refused as err:
        return _fail(2, str(err))
    except WorkflowUpdateFailedError as err:
        # A refusal with a code is `Refused` already (app.service); this is a bug.
        return _fail(1, f"the update failed: {err.cause or err}")
    except WorkflowFailureError as err:
        return _fail(1, f"the workflow failed: {err.cause or err}")
    except service.Unavailable as err:
        return _fail(1, str(err))
    except RPCError as err:
        return _fail(1, f"Temporal answered {err.status.name}: {err}")
    except Exception as err:  # a bug: one line first, then what a developer needs
        _fail(1, f"unexpected {type(err).__name__}: {err}")
        traceback.print_exc()
        return 1
    return _answered(args, result)


def _answered(args: argparse.Namespace, result: CommandResult) -> int:
    try:
        print_result(args, result)
    except BrokenPipeError:
        return 0  # the reader (`| head`) has seen enough
    if isinstance(result, Answer) and result.error:
        return _fail(1, result.error)
    return 0


def _fail(code: int, message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code
