"""What a core operation raises, and how the control plane answers it."""

from __future__ import annotations

from starlette.responses import JSONResponse


class SimError(Exception):
    """What a core operation raises: a protocol-neutral `code` each face maps to its own
    answer (status, error code, body). `status` is set only for an injected fault, whose HTTP
    status the knob chose."""

    def __init__(self, code: str, message: str, status: int | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status


# The generic protocol's HTTP status for each neutral code; the control plane answers in the
# generic protocol whatever the mode.
GENERIC_STATUS: dict[str, int] = {
    "INVALID_REQUEST": 400,
    "UNAUTHORIZED": 401,
    "USER_RESTRICTED": 403,
    "USER_LIMIT_REACHED": 403,
    "NOT_FOUND": 404,
    "BATCH_NOT_FOUND": 404,
    "COUPON_NOT_FOUND": 404,
    "FILE_NOT_FOUND": 404,
    "BATCH_STATE_INVALID": 409,
    "BATCH_PAUSED": 409,
    "BATCH_NOT_RUNNING": 409,
    "BATCH_NOT_STARTED": 409,
    "BUDGET_EXHAUSTED": 409,
    "IDEMPOTENCY_KEY_REUSED": 409,
    "COUPON_EXPIRED": 409,
    "RATE_LIMITED": 429,
    "SYSTEM_ERROR": 500,
}


def generic_error(error: SimError) -> JSONResponse:
    status = error.status or GENERIC_STATUS.get(error.code, 500)
    return JSONResponse({"code": error.code, "message": error.message}, status)
