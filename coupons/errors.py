"""Refusals: a request the service understood and declined, with a stable code.

Callers act on the code (`sold_out`, `unknown_task`, ...); the message is for people.
"""

from __future__ import annotations


class Refused(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class InvalidField(Refused):
    """Bad input in one named field of a definition; nothing was written."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__("invalid_request", f"{field}: {message}")
        self.field = field
        self.detail = message


UNKNOWN_TASK = "unknown_task"
WRONG_STATE = "wrong_state"
