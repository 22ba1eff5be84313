"""Event subjects and envelopes: pure encode/decode, no I/O."""
from __future__ import annotations

import json
import time
import uuid
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any

from services.common.errors import CneiError, ErrorCode

STREAM = "CNEI_EVENTS"
STREAM_SUBJECTS = ["cnei.>"]

MODEL_PUBLISHED = "cnei.model.published"
MODEL_DELETED = "cnei.model.deleted"  # a version (or one variant) deleted from the registry
DEPLOYMENT_UPDATED = "cnei.deployment.updated"
MODEL_LOADED = "cnei.model.loaded"  # put back in service (Triton's RepositoryModelLoad)
MODEL_UNLOADED = "cnei.model.unloaded"  # taken out of service (RepositoryModelUnload)
NODE_UP = "cnei.node.up"
REQUEST_FAILOVER = "cnei.request.failover"
INFERENCE_ESCALATED = "cnei.inference.escalated"
INFERENCE_DISAGREEMENT = "cnei.inference.disagreement"
NODE_METRICS = "cnei.node.metrics"
NODE_DOWN = "cnei.node.down"
FEDERATED_ROUND_COMPLETED = "cnei.federated.round.completed"
FEDERATED_JOB_COMPLETED = "cnei.federated.job.completed"
FEDERATED_JOB_FAILED = "cnei.federated.job.failed"


@dataclass(frozen=True)
class Envelope:
    """One event: who sent what, when, under which trace."""

    type: str
    source: str
    payload: dict[str, Any]
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    time: float = field(default_factory=time.time)
    trace: dict[str, str] = field(default_factory=dict)


def encode(envelope: Envelope) -> bytes:
    return json.dumps(asdict(envelope), separators=(",", ":"), sort_keys=True).encode()


def decode(data: bytes) -> Envelope:
    """Parse an envelope; raises ValueError naming what is missing."""
    try:
        obj = json.loads(data)
    except ValueError as exc:  # JSONDecodeError, or bytes that are not UTF-8/16/32
        raise ValueError(f"event is not JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"event is not a JSON object but {type(obj).__name__}")
    missing = {"type", "source", "payload", "id", "time"} - set(obj)
    if missing:
        raise ValueError(f"event lacks fields {sorted(missing)}")
    try:
        return Envelope(
            type=obj["type"], source=obj["source"], payload=obj["payload"],
            id=obj["id"], time=float(obj["time"]), trace=dict(obj.get("trace") or {}),
        )
    except (TypeError, ValueError) as exc:
        raise ValueError(f"event has a malformed time or trace: {exc}") from exc


class RecentIds:
    """The ids of the last `size` envelopes seen: an event delivered again (a publish retried
    after its first try reached live subscribers but JetStream never acknowledged it) is known."""

    def __init__(self, size: int = 4096):
        self.size = size
        self._ids: OrderedDict[str, None] = OrderedDict()

    def first_time(self, envelope_id: str) -> bool:
        """True the first time an id is seen (while it is among the last `size`), else False."""
        if envelope_id in self._ids:
            self._ids.move_to_end(envelope_id)
            return False
        self._ids[envelope_id] = None
        if len(self._ids) > self.size:
            self._ids.popitem(last=False)
        return True


class EventRefused(CneiError):
    """An event NATS would never take (JetStream refuses it): not sent, not kept in the outbox."""

    code = ErrorCode.INVALID_ARGUMENT
    reason_label = "refused"

    def __init__(self, subject: str, event_id: str, reason: str):
        self.subject, self.event_id, self.reason = subject, event_id, reason
        super().__init__(f"event {event_id} on {subject} dropped: {reason}")


class EventTooLarge(EventRefused):
    """An event over NATS's max_payload (headers and data); its publisher may send a smaller one."""

    reason_label = "too_large"

    def __init__(self, subject: str, event_id: str, size_bytes: int, limit_bytes: int):
        self.size_bytes, self.limit_bytes = size_bytes, limit_bytes
        super().__init__(subject, event_id, f"{size_bytes} bytes, over the {limit_bytes} bytes NATS takes")
