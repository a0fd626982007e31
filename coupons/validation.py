"""Identifiers as the service accepts them, checked before anything is written."""

from __future__ import annotations

import re

from coupons.errors import InvalidField

_ID = re.compile(r"[A-Za-z0-9._@-]{1,64}")


def validate_id(kind: str, value: str) -> str:
    """`value` if it is a valid `kind` id (campaign, user, batch, task, ...), else refused."""
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise InvalidField(
            kind, f"{value!r} is not valid: use 1 to 64 letters, digits, '.', '_', '@' or '-'"
        )
    return value
