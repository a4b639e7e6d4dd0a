"""A signed job in, an encrypted result out, through the real broker and onnxruntime."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from agent.wire import envelope
from agent.wire.bundle import decode_result_body, verify_result
from agent.wire.keys import KeyRing
from agent.wire.sealing import open_sealed, result_info
from tests.support import (
    MODELS,
    holdout,
    job_spec,
    observing,
    running_agent,
    signed,
    wait_for,
    write_vehicle,
)

pytestmark = pytest.mark.broker


async def test_job_runs_and_result_decrypts_to_local_prediction(mosquitto, fleet, tmp_path):
    """An eligible agent runs a signed job; the sealed result opens to onnxruntime's own answer."""
    files = write_vehicle(tmp_path, "veh-e2e", port=mosquitto.port, fleet=fleet)
    x = holdout()[0][:5]
    spec = job_spec(fleet, "veh-e2e", x=x)
    raw_job = signed(spec, fleet.job_key)
    async with observing(mosquitto.port, "veh-e2e") as obs, running_agent(files):
        await obs.send_job(raw_job)
        await wait_for(lambda: obs.results, what="a result")
        await wait_for(lambda: "succeeded" in obs.kinds(), what="succeeded event")

    sealed, _ = verify_result(
        obs.results[0], trusted=KeyRing.of(files.key.public_key()), max_bytes=1 << 22
    )
    digest = envelope.digest_of(
        envelope.JOB_TYPE,
        envelope.verify(
            raw_job,
            payload_type=envelope.JOB_TYPE,
            trusted=KeyRing.of(fleet.job_key.public_key()),
            max_bytes=1 << 20,
        ).payload,
    )
    assert sealed.job_digest == digest
    info = result_info("job-1", 1, "veh-e2e", digest)
    body = decode_result_body(open_sealed(sealed.ciphertext, fleet.requester, info))
    local = ort.InferenceSession(str(MODELS / "digits.onnx")).run(None, {"X": x})
    assert body.outputs["label"].to_numpy().tolist() == local[0].tolist()
    np.testing.assert_allclose(body.outputs["probabilities"].to_numpy(), local[1], rtol=1e-6)
    assert obs.kinds() == ["accepted", "running", "succeeded"]
