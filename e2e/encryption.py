"""What Temporal itself stores: the coupon's input as `temporal workflow show` prints it.

Read with a client that has no codec, so the check that the Web UI shows the input decoded
proves the codec server at work, not payloads that were never encrypted.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from coupons.config import Settings
from coupons.temporal import connect
from e2e.seed import Coupon


@dataclass(frozen=True)
class StoredInput:
    workflow_id: str
    encodings: list[str]
    # The user id readable in the stored bytes, or a JSON encoding (no codec applied).
    in_clear: bool

    @property
    def problem(self) -> str | None:
        if not self.encodings:
            return f"{self.workflow_id}: no input in its started event"
        if self.in_clear:
            return (
                f"{self.workflow_id}: its input is stored in clear in Temporal's history "
                f"(encoding {', '.join(self.encodings)}); the payload codec is not on"
            )
        return None


async def stored_input(settings: Settings, coupon: Coupon) -> StoredInput:
    client = await connect(replace(settings, codec_keys_file=None))
    history = await client.get_workflow_handle(coupon.workflow_id).fetch_history()
    started = history.events[0].workflow_execution_started_event_attributes
    encodings = []
    in_clear = False
    for payload in started.input.payloads:
        encoding = payload.metadata.get("encoding", b"").decode(errors="replace")
        encodings.append(encoding)
        in_clear |= coupon.user_id.encode() in payload.data or encoding.startswith("json/")
    return StoredInput(coupon.workflow_id, encodings, in_clear)
