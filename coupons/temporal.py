"""What every entry point needs from Temporal: a client built from the settings.

One place decides how we reach Temporal (address, namespace, TLS or mTLS, API key), how
payloads are encoded (AES-GCM encrypted when a key ring is configured, see `coupons.codec`),
and, for the worker, the runtime that serves Prometheus metrics.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import ListSearchAttributesRequest
from temporalio.client import Client, TLSConfig
from temporalio.common import SearchAttributeKey
from temporalio.converter import DataConverter
from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig
from temporalio.service import RPCError, RPCStatusCode

from coupons.config import ConfigError, Settings
from coupons.metrics import HISTOGRAM_BUCKETS
from coupons.model import SEARCH_ATTRIBUTES

log = logging.getLogger(__name__)


async def connect(settings: Settings, runtime: Runtime | None = None) -> Client:
    return await Client.connect(
        settings.temporal_address,
        namespace=settings.temporal_namespace,
        tls=tls_config(settings),
        api_key=api_key(settings),
        data_converter=data_converter(settings),
        runtime=runtime,
    )


async def check_search_attributes(
    client: Client, namespace: str, keys: Sequence[SearchAttributeKey[Any]] = SEARCH_ATTRIBUTES
) -> None:
    """Refuse a namespace that lacks one of our search attributes: every coupon's upsert would
    fail its workflow task, over and over, while the ledger says it moved on."""
    try:
        answer = await client.operator_service.list_search_attributes(
            ListSearchAttributesRequest(namespace=namespace)
        )
    except RPCError as err:
        if err.status != RPCStatusCode.PERMISSION_DENIED:
            raise
        log.warning("cannot list the search attributes of %s (%s): not checked", namespace, err)
        return
    registered = {**answer.custom_attributes, **answer.system_attributes}
    missing = [key.name for key in keys if key.name not in registered]
    if missing:
        raise ConfigError(
            f"namespace {namespace!r} lacks the search attributes {', '.join(missing)}: "
            "register each once with `temporal operator search-attribute create "
            f"--namespace {namespace} --name <name> --type Keyword`"
        )
    # By type too: a Text CouponState would be accepted and split each value into words, so
    # `CouponState = 'issued'` would stop finding what it finds today.
    wrong = [
        f"{key.name} is {_type_name(has)}, not {_type_name(needs)}"
        for key in keys
        if (has := int(registered[key.name])) != (needs := int(key.indexed_value_type))
    ]
    if wrong:
        raise ConfigError(
            f"namespace {namespace!r} has search attributes of another type: {'; '.join(wrong)}"
            " (a search attribute's type cannot change: remove it and register it again)"
        )


def _type_name(value: int) -> str:
    """`Keyword` for INDEXED_VALUE_TYPE_KEYWORD, as the temporal CLI names the types."""
    name = IndexedValueType.Name(value).removeprefix("INDEXED_VALUE_TYPE_")  # type: ignore[arg-type]
    return "".join(part.capitalize() for part in name.split("_"))


def data_converter(settings: Settings) -> DataConverter:
    """The default converter, with the payload codec when payloads are to be encrypted."""
    if settings.codec_keys_file is None:
        return DataConverter.default
    from coupons.codec import encrypted_converter

    return encrypted_converter(_readable("CODEC_KEYS_FILE", settings.codec_keys_file))


def tls_config(settings: Settings) -> TLSConfig | None:
    """None when nothing asks for TLS: the SDK then speaks plaintext, except with an API key,
    which it never sends in clear (TLS on by default)."""
    files = (
        settings.temporal_tls_ca_file,
        settings.temporal_tls_cert_file,
        settings.temporal_tls_key_file,
    )
    if not settings.temporal_tls and all(path is None for path in files):
        return None
    ca, cert, key = (
        None if path is None else _readable(name, path).read_bytes()
        for name, path in zip(
            ("TEMPORAL_TLS_CA_FILE", "TEMPORAL_TLS_CERT_FILE", "TEMPORAL_TLS_KEY_FILE"),
            files,
            strict=True,
        )
    )
    return TLSConfig(
        server_root_ca_cert=ca,
        client_cert=cert,
        client_private_key=key,
        domain=settings.temporal_tls_server_name,
    )


def api_key(settings: Settings) -> str | None:
    if settings.temporal_api_key_file is not None:
        key = _readable("TEMPORAL_API_KEY_FILE", settings.temporal_api_key_file).read_text()
        return key.strip() or None
    return settings.temporal_api_key


def worker_runtime(settings: Settings) -> Runtime | None:
    """A runtime whose Prometheus endpoint serves the SDK's metrics and ours (activities'
    `activity.metric_meter()`), or None when WORKER_METRICS_PORT is off."""
    if settings.worker_metrics_port is None:
        return None
    address = f"{settings.metrics_host}:{settings.worker_metrics_port}"
    # Our histograms measure seconds; the exporter's default buckets are milliseconds.
    metrics = PrometheusConfig(bind_address=address, histogram_bucket_overrides=HISTOGRAM_BUCKETS)
    return Runtime(telemetry=TelemetryConfig(metrics=metrics))


def _readable(name: str, path: Path) -> Path:
    if not path.is_file():
        raise ConfigError(f"{name}={path}: no such file")
    return path
