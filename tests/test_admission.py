"""Admission of a verified job as pure code: binding, freshness, replay, model pin, inputs."""

from __future__ import annotations

import time

import numpy as np
import pytest

from agent.core.admission import AdmissionContext, HeldModel, InputSpec, admit
from agent.kit.backoff import ReconnectBackoff
from agent.wire.errors import Reason, WireError
from agent.wire.messages import ModelRef
from agent.wire.tensors import Tensor
from tests.support import DIGITS_REF, FleetKeys, job_spec

FLEET = FleetKeys()
NOW = time.time()
HELD = HeldModel(
    "digits", DIGITS_REF.sha256, DIGITS_REF.size, {"X": InputSpec("float32", (None, 64))}
)


def ctx(**kw: object) -> AdmissionContext:
    base: dict[str, object] = dict(
        vehicle_id="veh-1",
        now=NOW,
        max_clock_skew_s=60,
        max_input_bytes=1 << 20,
        seen=set(),
        models={"digits": HELD},
    )
    base.update(kw)
    return AdmissionContext(**base)  # type: ignore[arg-type]


def test_good_job_is_admitted_with_its_model():
    """A fresh job for this vehicle and a held model is admitted."""
    assert admit(job_spec(FLEET, "veh-1", issued_at=NOW), FLEET.issuer, ctx()) is HELD


@pytest.mark.parametrize(
    ("spec_kw", "ctx_kw", "signer", "reason"),
    [
        ({}, {}, "0123456789abcdef", Reason.BAD_SIGNATURE),
        ({}, {"vehicle_id": "veh-2"}, None, Reason.WRONG_VEHICLE),
        ({}, {"now": NOW + 61}, None, Reason.EXPIRED),
        ({"issued_at": NOW + 61}, {}, None, Reason.NOT_YET_VALID),
        ({}, {"seen": {("job-1", 1)}}, None, Reason.REPLAYED),
        ({}, {"models": {}}, None, Reason.MODEL_UNAVAILABLE),
        (
            {"model": ModelRef(name="digits", sha256="f" * 64, size=DIGITS_REF.size)},
            {},
            None,
            Reason.MODEL_MISMATCH,
        ),
        (
            {"inputs": {"Y": Tensor.from_numpy(np.zeros((1, 64), np.float32))}},
            {},
            None,
            Reason.BAD_INPUTS,
        ),
        (
            {"inputs": {"X": Tensor.from_numpy(np.zeros((1, 64), np.float64))}},
            {},
            None,
            Reason.BAD_INPUTS,
        ),
        (
            {"inputs": {"X": Tensor.from_numpy(np.zeros((64,), np.float32))}},
            {},
            None,
            Reason.BAD_INPUTS,
        ),
        ({}, {"max_input_bytes": 100}, None, Reason.BAD_INPUTS),
    ],
    ids=[
        "issuer-not-signer",
        "other-vehicle",
        "expired",
        "future",
        "replay",
        "no-model",
        "model-pin",
        "input-name",
        "input-dtype",
        "input-rank",
        "input-too-big",
    ],
)
def test_each_refusal_has_its_reason(spec_kw, ctx_kw, signer, reason):
    """Each admission rule refuses with its own reason code."""
    spec = job_spec(FLEET, "veh-1", **{"issued_at": NOW, **spec_kw})
    with pytest.raises(WireError) as err:
        admit(spec, signer or FLEET.issuer, ctx(**ctx_kw))
    assert err.value.reason is reason


def test_backoff_is_capped_full_jitter_and_grows():
    """Delays stay within [0, min(cap, base*2^n)], and the ceiling reaches the cap."""
    import random

    backoff = ReconnectBackoff(base_s=0.5, cap_s=8.0, rng=random.Random(1))
    seen = [backoff.next_delay(float(n)) for n in range(50)]
    for n, d in enumerate(seen):
        assert 0 <= d <= min(8.0, 0.5 * 2**n)
    assert max(seen[10:]) > 4.0, "ceiling reaches the cap"


@pytest.mark.parametrize(
    ("up_for_s", "reset"),
    [(0.0, False), (5.0, False), (29.9, False), (30.0, True), (3600.0, True)],
)
def test_only_a_connection_that_stayed_healthy_resets_the_backoff(up_for_s, reset):
    """After five failed attempts the ceiling is at the cap; a connection that then lasts less
    than healthy_after_s (a peer that accepts and fails) leaves it there, one that lasts
    that long brings it back to the base."""
    backoff = ReconnectBackoff(base_s=0.5, cap_s=8.0, healthy_after_s=30.0)
    for n in range(5):
        backoff.next_delay(float(n))
    assert backoff.ceiling_s == 8.0
    backoff.connected(100.0)
    backoff.next_delay(100.0 + up_for_s)
    # Reset: that delay was drawn under the base (0.5 s) and the next ceiling is 1 s.
    assert backoff.ceiling_s == (1.0 if reset else 8.0)
