"""Worker versioning: which worker deployment version a worker process is, and how a new
version becomes the one new workflows and auto-upgrading ones run on.

A version is the deployment's name (TEMPORAL_DEPLOYMENT_NAME) and a build id. The short
workflows (catalog sync, reconciliation, campaign end) are PINNED: a run stays on the
version it started on, so a change to them needs no patch as long as the old version's
workers run until its runs are drained. A coupon's workflow lives for a month: it is
AUTO_UPGRADE (the workers' default), moved to the current version at its next workflow
task, so its changes still go behind `workflow.patched` and replay tests.

The build id defaults to one derived from the workflow code (`code_build_id`), so every
deployment of changed workflow code is a new version and a deployment of anything else
(the API, the command line, the ledger) is not.
"""

from __future__ import annotations

import ast
import asyncio
import functools
import hashlib
import importlib.util
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from temporalio import workflow
from temporalio.api.deployment.v1 import WorkerDeploymentInfo
from temporalio.api.enums.v1 import RoutingConfigUpdateState, WorkerDeploymentVersionStatus
from temporalio.api.workflowservice.v1 import (
    DescribeWorkerDeploymentRequest,
    SetWorkerDeploymentCurrentVersionRequest,
)
from temporalio.client import Client
from temporalio.common import VersioningBehavior, WorkerDeploymentVersion
from temporalio.service import RPCError, RPCStatusCode
from temporalio.worker import WorkerDeploymentConfig

import workflows
from coupons.config import Settings

log = logging.getLogger(__name__)

# Our packages: a workflow module's imports from these are part of what decides its commands
# (the machine, the data shapes, the activities' names and the timeouts next to them).
_OURS = ("workflows", "coupons", "activities")
# Libraries whose code runs inside the workflows: an upgrade of either is a new version.
_IN_WORKFLOWS = ("temporalio", "python-statemachine")
# How long a worker waits to make its version current: its pollers reach the server a
# moment after it starts, those of its second task queue a moment later still.
ROLLOUT_TIMEOUT_S = 60.0
# A worker's own rollout that failed is tried again after this, doubling up to the cap.
ROLLOUT_RETRY_S = 2.0
ROLLOUT_RETRY_CAP_S = 60.0
_RETRY_S = 0.25
# A version that was never current or ramping (or created by hand, not yet polled).
_NEW = (
    WorkerDeploymentVersionStatus.WORKER_DEPLOYMENT_VERSION_STATUS_INACTIVE,
    WorkerDeploymentVersionStatus.WORKER_DEPLOYMENT_VERSION_STATUS_CREATED,
)
_CURRENT = WorkerDeploymentVersionStatus.WORKER_DEPLOYMENT_VERSION_STATUS_CURRENT
# The server answers these while the version's pollers (all its task queues') are not
# seen yet: asked again until they are.
_NOT_YET = (RPCStatusCode.NOT_FOUND, RPCStatusCode.FAILED_PRECONDITION)


class RolloutTimeout(RuntimeError):
    """The version did not become current in time (its pollers never all showed)."""


# ----- which version this is -------------------------------------------------------------


def worker_version(settings: Settings) -> WorkerDeploymentVersion:
    """The version the workers of this process are."""
    build_id = settings.temporal_build_id_override or code_build_id()
    return WorkerDeploymentVersion(settings.temporal_deployment_name, build_id)


# What a workflow that declares no behavior is on our workers: the coupon's, a month long,
# moves to each new version at its next task (its changes behind patches, as before).
DEFAULT_BEHAVIOR = VersioningBehavior.AUTO_UPGRADE


def deployment_config(version: WorkerDeploymentVersion) -> WorkerDeploymentConfig:
    """A worker's deployment options: workflows that declare no behavior (the coupon's)
    DEFAULT_BEHAVIOR; the short ones declare PINNED in their `workflow.defn`."""
    return WorkerDeploymentConfig(
        version=version,
        use_worker_versioning=True,
        default_versioning_behavior=DEFAULT_BEHAVIOR,
    )


def behavior_of(workflow_class: type) -> VersioningBehavior:
    """How runs of `workflow_class` move between versions on our workers."""
    declared = workflow._Definition.must_from_class(workflow_class).versioning_behavior
    return declared or DEFAULT_BEHAVIOR


@functools.cache
def code_build_id() -> str:
    """`<package version>-<12 hex>`: the package's version, for people, and a hash of what
    decides the workflows' commands: the source of every module in `workflows/`, of each
    module of ours they import, and the versions of the libraries that run inside them.

    Not the SDK's default (a hash of the bytecode of every module loaded, which changes
    with anything the process imports: an API fix would make a new version and leave the
    pinned runs waiting for the old one's workers for nothing). Read once per process: the
    workers it builds later are the same version even if the files changed meanwhile."""
    digest = hashlib.sha256()
    for path in workflow_sources():
        # By its place in the tree, so a checkout anywhere gives the same id.
        name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else Path(path.name)
        digest.update(name.as_posix().encode())
        digest.update(path.read_bytes())
    for library in _IN_WORKFLOWS:
        digest.update(f"{library}=={metadata.version(library)}".encode())
    return f"{_package_version()}-{digest.hexdigest()[:12]}"


ROOT = Path(workflows.__file__).resolve().parent.parent


def workflow_sources() -> list[Path]:
    """The files `code_build_id` hashes, in a stable order."""
    found = set(Path(workflows.__file__).resolve().parent.glob("*.py"))
    for path in list(found):
        found.update(_our_imports(path))
    return sorted(found)


def _our_imports(path: Path) -> Iterator[Path]:
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] in _OURS and (source := _source_of(name)) is not None:
                yield source


def _source_of(module: str) -> Path | None:
    """The file of module `module`; None for a name that is not a module (an attribute)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        return None
    return Path(spec.origin).resolve()


def _package_version() -> str:
    try:
        return metadata.version("coupon-lifecycle")
    except metadata.PackageNotFoundError:
        return "0"  # a tree that was never installed


# ----- making a version current -------------------------------------------------------------


@dataclass(frozen=True)
class Rollout:
    """What `roll_out` did: made the version current, found it current, or left it (it
    was current once and was replaced: a rollback is an operator's decision)."""

    version: WorkerDeploymentVersion
    outcome: str  # "made current", "already current", "left"


async def roll_out(
    client: Client, version: WorkerDeploymentVersion, timeout_s: float = ROLLOUT_TIMEOUT_S
) -> Rollout:
    """WORKER_VERSION_ROLLOUT=auto: make this new version current once its workers poll.

    Only a new version: one that was current before and has since been replaced (draining,
    drained) is left as it is, so a worker of an old build restarted during a rollout does
    not take the deployment back and move the auto-upgrading coupons to older code. The
    server itself refuses a version whose workers do not poll every task queue the current
    one does (`ignore_missing_task_queues` unset), so no queue is left without workers."""
    deadline = time.monotonic() + timeout_s
    while True:
        info, status = await _describe_when_polled(client, version, deadline)
        if status == _CURRENT:
            return Rollout(version, "already current")
        if status not in _NEW:
            name = WorkerDeploymentVersionStatus.Name(status)
            log.warning(
                "worker version %s was current before and is now %s: not made current again "
                "(`temporal worker deployment set-current-version` does it by hand)",
                version.to_canonical_string(),
                name.removeprefix("WORKER_DEPLOYMENT_VERSION_STATUS_").lower(),
            )
            return Rollout(version, "left")
        try:
            await _set_current(client, version, conflict_token=info.conflict_token)
        except RPCError as err:
            # Not all its task queues polled yet, or another worker changed the deployment
            # meanwhile (the conflict token): look again.
            if err.status not in (*_NOT_YET, RPCStatusCode.ABORTED) or _past(deadline):
                raise
            await asyncio.sleep(_RETRY_S)
            continue
        await wait_routed(client, version, deadline)
        log.info("worker version %s is current", version.to_canonical_string())
        return Rollout(version, "made current")


async def roll_out_beside(
    client: Client, version: WorkerDeploymentVersion, retry_s: float = ROLLOUT_RETRY_S
) -> None:
    """`roll_out` beside a starting worker, tried again after each failure (`retry_s`,
    doubling up to ROLLOUT_RETRY_CAP_S) until it is done; each failure is logged.

    Until its version is current the server dispatches none of its tasks, so one failed try
    must not be the last: a worker that started while Temporal restarted (its calls
    refused, then no poller seen in time) had no task for the rest of a chaos run."""
    wait = retry_s
    while True:
        try:
            await roll_out(client, version)
            return
        except Exception:
            log.exception(
                "worker version %s not made current yet; trying again in %.0f s "
                "(`temporal worker deployment set-current-version` does it by hand)",
                version.to_canonical_string(),
                wait,
            )
        await asyncio.sleep(wait)
        wait = min(2 * wait, ROLLOUT_RETRY_CAP_S)


async def make_current(
    client: Client,
    version: WorkerDeploymentVersion,
    timeout_s: float = ROLLOUT_TIMEOUT_S,
    *,
    allow_no_pollers: bool = False,
) -> None:
    """Make `version` current whatever it was (a rollback, a manual rollout) once its
    workers poll (or at once, `allow_no_pollers`: for workers about to start), and wait
    until every task queue routes by it."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            await _set_current(client, version, allow_no_pollers=allow_no_pollers)
            break
        except RPCError as err:
            if err.status not in _NOT_YET or _past(deadline):
                raise
            await asyncio.sleep(_RETRY_S)
    await wait_routed(client, version, deadline)


async def current_version(client: Client, deployment_name: str) -> WorkerDeploymentVersion | None:
    """The deployment's current version; None while unversioned workers have the work."""
    routing = (await _describe(client, deployment_name)).worker_deployment_info.routing_config
    current = routing.current_deployment_version
    if not current.build_id:
        return None
    return WorkerDeploymentVersion(current.deployment_name, current.build_id)


async def wait_routed(client: Client, version: WorkerDeploymentVersion, deadline: float) -> None:
    """Until the deployment's routing names `version` current and has reached every task
    queue and partition: before that a task may still be routed by the previous version."""
    while True:
        info = (await _describe(client, version.deployment_name)).worker_deployment_info
        current = info.routing_config.current_deployment_version
        done = info.routing_config_update_state in (
            RoutingConfigUpdateState.ROUTING_CONFIG_UPDATE_STATE_COMPLETED,
            # A server from before the state was reported: its update is synchronous.
            RoutingConfigUpdateState.ROUTING_CONFIG_UPDATE_STATE_UNSPECIFIED,
        )
        if done and current.build_id == version.build_id:
            return
        if _past(deadline):
            raise RolloutTimeout(f"{version.to_canonical_string()} never routed: {info}")
        await asyncio.sleep(_RETRY_S)


# ----- the calls -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Described:
    worker_deployment_info: WorkerDeploymentInfo
    conflict_token: bytes


async def _describe(client: Client, deployment_name: str) -> _Described:
    answer = await client.workflow_service.describe_worker_deployment(
        DescribeWorkerDeploymentRequest(namespace=client.namespace, deployment_name=deployment_name)
    )
    return _Described(answer.worker_deployment_info, answer.conflict_token)


async def _describe_when_polled(
    client: Client, version: WorkerDeploymentVersion, deadline: float
) -> tuple[_Described, WorkerDeploymentVersionStatus.ValueType]:
    """The deployment and the status of `version` in it, once a poller of it was seen."""
    while True:
        try:
            found = await _describe(client, version.deployment_name)
            status = _status_of(found, version)
            if status is not None:
                return found, status
        except RPCError as err:
            if err.status != RPCStatusCode.NOT_FOUND:
                raise
        if _past(deadline):
            raise RolloutTimeout(
                f"no worker of {version.to_canonical_string()} seen polling in time"
            )
        await asyncio.sleep(_RETRY_S)


def _status_of(
    found: _Described, version: WorkerDeploymentVersion
) -> WorkerDeploymentVersionStatus.ValueType | None:
    for summary in found.worker_deployment_info.version_summaries:
        if summary.deployment_version.build_id == version.build_id:
            return summary.status
    return None


async def _set_current(
    client: Client,
    version: WorkerDeploymentVersion,
    conflict_token: bytes = b"",
    *,
    allow_no_pollers: bool = False,
) -> None:
    await client.workflow_service.set_worker_deployment_current_version(
        SetWorkerDeploymentCurrentVersionRequest(
            namespace=client.namespace,
            deployment_name=version.deployment_name,
            build_id=version.build_id,
            conflict_token=conflict_token,
            identity=f"coupon worker {version.build_id}",
            allow_no_pollers=allow_no_pollers,
        )
    )


def _past(deadline: float) -> bool:
    return time.monotonic() >= deadline
