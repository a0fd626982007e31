"""Tenants (the apps that call the HTTP API) and their keys: `tenant create|list`,
`key create|list|revoke`, printed as JSON. A new key's secret (`api_key`) is printed once,
by the command that creates it, and is never stored or shown again."""

from __future__ import annotations

import argparse
from typing import Any

from app import service
from app.cli.args import Commands, Nouns, ident, rule
from app.service import SCOPES, ApiKey, Backends
from coupons import validation as rules


def add_parsers(nouns: Nouns) -> None:
    _tenant_parser(nouns.add_parser("tenant", help="tenants: the apps that call the HTTP API"))
    _key_parser(nouns.add_parser("key", help="a tenant's API keys"))


def _tenant_parser(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True)
    c = sub.add_parser("create", help="a new tenant and its first key (scope admin), shown once")
    c.add_argument("--name", required=True, type=rule(rules.NAME), help="unique")
    sub.add_parser("list", help="every tenant")


def _key_parser(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True)
    c = sub.add_parser("create", help="a new API key of a tenant; its secret is shown once")
    c.add_argument("--tenant", required=True, type=ident("tenant"))
    c.add_argument("--scope", required=True, choices=SCOPES)
    ls = sub.add_parser("list", help="a tenant's keys: ids, scopes, times (never secrets)")
    ls.add_argument("--tenant", required=True, type=ident("tenant"))
    r = sub.add_parser("revoke", help="revoke a key for good (again is a no-op)")
    r.add_argument("key", type=ident("key"))


async def cmd_tenant_create(b: Backends, args: argparse.Namespace) -> dict[str, Any]:
    tenant, key = await service.create_tenant(b, args.name)
    return {
        "tenant_id": tenant.id,
        "name": tenant.name,
        "created_at": tenant.created_at,
        "key_id": key.key_id,
        "scope": key.scope,
        # The only time the secret is shown: only its digest is stored.
        "api_key": key.api_key,
    }


async def cmd_tenant_list(b: Backends, args: argparse.Namespace) -> dict[str, Any]:
    found = await service.list_tenants(b)
    return {"tenants": [{"id": t.id, "name": t.name, "created_at": t.created_at} for t in found]}


async def cmd_key_create(b: Backends, args: argparse.Namespace) -> dict[str, Any]:
    key = await service.create_key(b, args.tenant, args.scope)
    return {
        "tenant_id": key.tenant_id,
        "key_id": key.key_id,
        "scope": key.scope,
        "api_key": key.api_key,
    }


def _key_json(key: ApiKey) -> dict[str, Any]:
    """A key as lists show it: never its secret, nor the secret's digest."""
    return {
        "key_id": key.id,
        "tenant_id": key.tenant_id,
        "scope": key.scope,
        "created_at": key.created_at,
        "revoked_at": key.revoked_at,
    }


async def cmd_key_list(b: Backends, args: argparse.Namespace) -> dict[str, Any]:
    found = await service.list_keys(b, args.tenant)
    return {"tenant_id": args.tenant, "keys": [_key_json(k) for k in found]}


async def cmd_key_revoke(b: Backends, args: argparse.Namespace) -> dict[str, Any]:
    return _key_json(await service.revoke_key(b, args.key))


COMMANDS: Commands = {
    "tenant create": cmd_tenant_create,
    "tenant list": cmd_tenant_list,
    "key create": cmd_key_create,
    "key list": cmd_key_list,
    "key revoke": cmd_key_revoke,
}
