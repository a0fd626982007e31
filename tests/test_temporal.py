"""Reaching Temporal as production does (`coupons/temporal.py`).

`connect()` to a Temporal that demands mutual TLS, as Temporal Cloud or a secured cluster
does: the dev server has no TLS, so a TLS-terminating proxy in front of it (client
certificates required, ALPN h2 as gRPC needs) stands in for the cluster's frontend. And the
worker's check that the namespace knows our search attributes."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest
from temporalio.common import SearchAttributeKey
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment

from app.embedded import free_port
from coupons.config import ConfigError, Settings
from coupons.model import SEARCH_ATTRIBUTES
from coupons.temporal import check_search_attributes, connect


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path  # signed by another CA: the proxy must turn it away
    stranger_key: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    dns: str | None = None,
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    issuer_name, issuer_key = issuer if issuer is not None else (name, key)
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if dns is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(dns)]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Path:
    path.with_suffix(".pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.with_suffix(".key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path.with_suffix(".pem")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    ca_key, other_ca_key = _key(), _key()
    ca = _cert("coupons test CA", ca_key, None, ca=True)
    other_ca = _cert("another CA", other_ca_key, None, ca=True)
    _write(root / "ca", ca, ca_key)
    server_key, client_key, stranger_key = _key(), _key(), _key()
    server = _cert("temporal.test", server_key, (ca.subject, ca_key), dns="temporal.test")
    client = _cert("coupons worker", client_key, (ca.subject, ca_key))
    stranger = _cert("stranger", stranger_key, (other_ca.subject, other_ca_key))
    return Pki(
        ca=root / "ca.pem",
        server_cert=_write(root / "server", server, server_key),
        server_key=root / "server.key",
        client_cert=_write(root / "client", client, client_key),
        client_key=root / "client.key",
        stranger_cert=_write(root / "stranger", stranger, stranger_key),
        stranger_key=root / "stranger.key",
    )


@contextlib.asynccontextmanager
async def mtls_frontend(target: str, pki: Pki) -> AsyncIterator[str]:
    """A TLS frontend on a free port that requires a client certificate of our CA and
    forwards the decrypted HTTP/2 to the dev server at `target`."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=pki.ca)
    context.load_cert_chain(pki.server_cert, pki.server_key)
    context.verify_mode = ssl.CERT_REQUIRED
    context.set_alpn_protocols(["h2"])
    host, port = target.rsplit(":", 1)

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.CancelledError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(host, int(port))
        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))

    listen = free_port()
    server = await asyncio.start_server(serve, "127.0.0.1", listen, ssl=context)
    try:
        yield f"127.0.0.1:{listen}"
    finally:
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 5)


def _tls_settings(address: str, pki: Pki, cert: Path, key: Path) -> Settings:
    return replace(
        Settings(),
        temporal_address_override=address,
        temporal_tls=True,
        temporal_tls_ca_file=pki.ca,
        temporal_tls_cert_file=cert,
        temporal_tls_key_file=key,
        temporal_tls_server_name="temporal.test",
        temporal_api_key="test-api-key",  # sent as a bearer; the dev server ignores it
    ).check()


async def test_connect_speaks_mutual_tls_with_the_settings_files(
    dev_env: WorkflowEnvironment, pki: Pki
) -> None:
    target = dev_env.client.service_client.config.target_host
    async with mtls_frontend(target, pki) as address:
        client = await connect(_tls_settings(address, pki, pki.client_cert, pki.client_key))
        # Any call at all goes through the frontend: the dev server answers through mTLS.
        counted = await client.count_workflows("WorkflowType='UserCouponWorkflow'")
        assert counted.count >= 0

        # A certificate of another CA is turned away by the frontend, and so is none at all.
        stranger = _tls_settings(address, pki, pki.stranger_cert, pki.stranger_key)
        with pytest.raises(RuntimeError):
            await asyncio.wait_for(connect(stranger), 20)
        plain = replace(
            stranger,
            temporal_tls_cert_file=None,
            temporal_tls_key_file=None,
        )
        with pytest.raises((RuntimeError, RPCError)):
            await asyncio.wait_for(connect(plain), 20)


async def test_a_namespace_missing_a_search_attribute_is_refused_by_name(
    dev_env: WorkflowEnvironment,
) -> None:
    """The worker checks at start: without it every coupon's upsert would fail its workflow
    task in a loop while the ledger moves on."""
    await check_search_attributes(dev_env.client, "default")  # all registered by the fixture
    missing = SearchAttributeKey.for_keyword("CouponShoeSize")
    with pytest.raises(ConfigError, match="lacks the search attributes CouponShoeSize"):
        await check_search_attributes(dev_env.client, "default", [*SEARCH_ATTRIBUTES, missing])


async def test_a_search_attribute_of_another_type_is_refused_naming_both_types(
    dev_env: WorkflowEnvironment,
) -> None:
    """A Text attribute where we need a Keyword would pass a check by name and split every
    value into words: the check is by type too."""
    await dev_env.client.operator_service.add_search_attributes(
        AddSearchAttributesRequest(
            namespace="default",
            search_attributes={"CouponWordy": IndexedValueType.INDEXED_VALUE_TYPE_TEXT},
        )
    )
    wordy = SearchAttributeKey.for_keyword("CouponWordy")
    with pytest.raises(ConfigError, match="CouponWordy is Text, not Keyword"):
        await check_search_attributes(dev_env.client, "default", [*SEARCH_ATTRIBUTES, wordy])
