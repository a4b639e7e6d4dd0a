"""Work hints: how an idle car stays quiet and still picks up new work within seconds.

Without hints a car with an open gate and no work asks every `work_request_interval_s`
(2 s): 30 messages a minute per car, 25M messages/s for 50M idle cars. With them:

  - a work request that leases nothing is answered with `no_work` and a `retry_after_s`
    (the fleet's choice: 720-900 s by default, jittered; a car heeds at most 900 s): the
    car asks again only after that, or sooner when its own state changes (a slot frees,
    the gate reopens);
  - the fleet keeps such cars on a parked list; when jobs for a model they hold are
    queued it sends `work_available` to as many of them as there are jobs (AWS IoT Jobs'
    notify-next is the anchor), and they ask at once.

Pull with leases stays the contract: a hint never carries a job, and a lost hint costs at
most one `retry_after_s`. Hints travel on the vehicle's own jobs topic, signed by a
fleet job key like a job (payload type HINT_TYPE), bound to the vehicle and short-lived:
nobody but the fleet can silence a car or make it ask. An agent from before hints
refuses one as a job of the wrong payload type and keeps asking every interval.
"""

from __future__ import annotations

import json
from enum import StrEnum

from pydantic import Field, model_validator

from agent.wire import envelope
from agent.wire.codec import WireModel, dump_model, parse_model
from agent.wire.errors import Reason, WireError
from agent.wire.keys import KeyRing
from agent.wire.messages import VEHICLE_ID_RE

HINT_TYPE = "application/vnd.edge-fleet.hint.v1+json"
# What envelope.sign writes first for a hint: the link tells a hint from a job by it.
HINT_PREFIX = b'{"payloadType":' + json.dumps(HINT_TYPE).encode()
MAX_HINT_BYTES = 2048
MAX_HINT_LIFETIME_S = 300.0
MAX_RETRY_AFTER_S = 3600.0


class HintKind(StrEnum):
    NO_WORK = "no_work"
    WORK_AVAILABLE = "work_available"


class WorkHint(WireModel):
    vehicle_id: str = Field(pattern=VEHICLE_ID_RE)
    kind: HintKind
    retry_after_s: float = Field(default=0.0, ge=0, le=MAX_RETRY_AFTER_S, allow_inf_nan=False)
    issued_at: float = Field(ge=0, allow_inf_nan=False)
    expires_at: float = Field(ge=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _lifetime(self) -> WorkHint:
        if not 0 < self.expires_at - self.issued_at <= MAX_HINT_LIFETIME_S:
            raise ValueError(f"a hint lives more than 0 and at most {MAX_HINT_LIFETIME_S:.0f} s")
        return self


def sign_hint(hint: WorkHint, key: object) -> bytes:
    return envelope.sign(HINT_TYPE, dump_model(hint), key)  # type: ignore[arg-type]


def is_hint(raw: bytes) -> bool:
    return raw.startswith(HINT_PREFIX)


def verify_hint(
    raw: bytes, *, trusted: KeyRing, vehicle_id: str, now: float, max_skew_s: float
) -> WorkHint:
    """A hint signed by a trusted job key, for this vehicle, not expired; else WireError."""
    verified = envelope.verify(
        raw, payload_type=HINT_TYPE, trusted=trusted, max_bytes=MAX_HINT_BYTES
    )
    hint = parse_model(verified.payload, WorkHint, what="hint", reason=Reason.MALFORMED_PAYLOAD)
    if hint.vehicle_id != vehicle_id:
        raise WireError(Reason.WRONG_VEHICLE, f"hint names {hint.vehicle_id}")
    if now > hint.expires_at + max_skew_s:
        raise WireError(Reason.EXPIRED, f"hint expired at {hint.expires_at:.0f}")
    if hint.issued_at > now + max_skew_s:
        raise WireError(Reason.NOT_YET_VALID, f"hint issued at {hint.issued_at:.0f}, in the future")
    return hint
