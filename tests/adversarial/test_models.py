"""THREATS.md 9-11 against the real agent, worker and broker over mutual TLS: a model file that
does not match its pin, hostile model files, a model that blows the worker's memory limit or
crashes it, and a job that runs past its deadline. Only the job fails, with its reason; the
daemon serves the next honest job."""

from __future__ import annotations

import hashlib
import os
import signal

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from agent.inference.store import ModelStore
from agent.wire.messages import ModelRef
from agent.wire.tensors import Tensor
from tests.adversarial.conftest import VID, Rig
from tests.support import MODELS, burn_spec, job_spec, signed, wait_for

pytestmark = pytest.mark.broker


def _kinds(obs, job_id: str = "job-1") -> list[str]:
    return obs.kinds(job_id)


def _event(obs, kind: str, job_id: str = "job-1") -> dict:
    return next(e for e in obs.events if e["kind"] == kind and e.get("job_id") == job_id)


def _installed(files, name: str, data: bytes) -> ModelRef:
    """Install `data` as model `name` into the vehicle's state store (as `edge-agent models add`)."""
    source = files.config_path.parent / f"{name}.src"
    source.write_bytes(data)
    store = ModelStore.open(MODELS, installed=files.config_path.parent / "state" / "models")
    held = store.install(source, name=name, sha256=hashlib.sha256(data).hexdigest())
    return ModelRef(name=name, sha256=held.sha256, size=held.size)


async def test_a_model_file_changed_on_disk_is_never_run(rig: Rig):
    """An installed model whose file is altered after the agent verified it at start: the worker
    hashes the bytes it loads and refuses them (model_mismatch); nothing runs, no result."""
    fleet = rig.fleet
    files = rig.vehicle()
    ref = _installed(files, "burn-b", (MODELS / "burn.onnx").read_bytes())
    inputs = {
        "x": Tensor.from_numpy(np.ones((1, 256), np.float32)),
        "rows_by_256": Tensor.from_numpy(np.array([10, 256], np.int64)),
    }
    async with rig.serving(files) as (obs, agent):
        path = files.config_path.parent / "state" / "models" / f"{ref.sha256}.onnx"
        data = bytearray(path.read_bytes())
        data[100] ^= 0xFF
        path.write_bytes(bytes(data))
        await obs.send_job(signed(job_spec(fleet, VID, model=ref, inputs=inputs), fleet.job_key))
        await wait_for(lambda: "failed" in _kinds(obs), what="failed")
        assert _event(obs, "failed")["reason"] == "model_mismatch"
        assert obs.results == []
        await rig.still_serves(obs, agent)


async def test_hostile_model_files_are_never_held(rig: Rig):
    """A model with external data, or with a custom-domain operator, cannot enter the store; a job
    naming it is refused (model_unavailable) before any worker sees it."""
    fleet = rig.fleet
    files = rig.vehicle()
    w = numpy_helper.from_array(np.ones((1, 4), np.float32), "w")
    node = helper.make_node("Evil", ["x", "w"], ["y"], domain="com.evil")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [w],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.evil", 1)]
    )
    data = model.SerializeToString()
    source = files.config_path.parent / "evil.onnx"
    source.write_bytes(data)
    store = ModelStore.open(MODELS, installed=files.config_path.parent / "state" / "models")
    with pytest.raises(Exception, match="allowlist"):
        store.install(source, name="evil", sha256=hashlib.sha256(data).hexdigest())
    ref = ModelRef(name="evil", sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    async with rig.serving(files) as (obs, agent):
        inputs = {"x": Tensor.from_numpy(np.ones((1, 4), np.float32))}
        await obs.send_job(signed(job_spec(fleet, VID, model=ref, inputs=inputs), fleet.job_key))
        await wait_for(lambda: "rejected" in _kinds(obs), what="refused")
        assert _event(obs, "rejected")["reason"] == "model_unavailable"
        assert agent.status()["worker"]["pid"] is None, "no worker was started for it"
        await rig.still_serves(obs, agent)


async def test_a_memory_blowup_fails_only_the_job(rig: Rig):
    """A job expanding to ~4 GB under a 512 MB worker limit fails (memory_limit or worker_crashed);
    the daemon keeps serving."""
    fleet = rig.fleet
    files = rig.vehicle(extra="worker_memory_mb = 512")
    async with rig.serving(files) as (obs, agent):
        await obs.send_job(signed(burn_spec(fleet, VID, rows=4_000_000), fleet.job_key))
        await wait_for(lambda: "failed" in _kinds(obs), timeout=30, what="failed")
        assert _event(obs, "failed")["reason"] in ("memory_limit", "worker_crashed")
        assert obs.results == []
        await rig.still_serves(obs, agent)


async def test_a_job_past_its_deadline_is_stopped(rig: Rig):
    """A job that would run ~20 s with a 0.5 s limit is killed at its deadline and fails with
    deadline_exceeded."""
    fleet = rig.fleet
    files = rig.vehicle()
    async with rig.serving(files) as (obs, agent):
        spec = burn_spec(fleet, VID, rows=500_000, max_runtime_s=0.5)
        await obs.send_job(signed(spec, fleet.job_key))
        await wait_for(lambda: "failed" in _kinds(obs), timeout=20, what="failed")
        assert _event(obs, "failed")["reason"] == "deadline_exceeded"
        assert obs.results == []
        await rig.still_serves(obs, agent)


async def test_a_job_that_crashes_the_worker_twice_is_not_retried_here(rig: Rig):
    """A worker killed under the same job twice (as a crashing runtime would): the third attempt
    is refused as poison_job, and other jobs run."""
    fleet = rig.fleet
    files = rig.vehicle()
    async with rig.serving(files) as (obs, agent):
        for attempt in (1, 2):
            warm = f"warm-{attempt}"  # a started worker, so the crash lands mid-job (a crash
            # while the worker starts, before it reads any job, is not held against the job)
            await obs.send_job(signed(burn_spec(fleet, VID, rows=10, job_id=warm), fleet.job_key))
            await wait_for(lambda w=warm: "succeeded" in obs.kinds(w), what="worker warm")
            spec = burn_spec(fleet, VID, rows=500_000, attempt=attempt)
            await obs.send_job(signed(spec, fleet.job_key))
            await wait_for(lambda: agent.status()["worker"]["computing"], what="busy")
            base = agent.status()["worker"]["cpu_s"] or 0.0
            await wait_for(
                lambda b=base: (agent.status()["worker"]["cpu_s"] or 0) > b + 0.1, what="running"
            )
            os.kill(agent.status()["worker"]["pid"], signal.SIGSEGV)
            await wait_for(lambda a=attempt: obs.kinds().count("failed") == a, what="failed")
        await obs.send_job(signed(burn_spec(fleet, VID, rows=10, attempt=3), fleet.job_key))
        await wait_for(lambda: "rejected" in obs.kinds(), what="poison refused")
        assert [e["reason"] for e in obs.events if e["kind"] == "failed"] == ["worker_crashed"] * 2
        assert _event(obs, "rejected")["reason"] == "poison_job"
        assert len(obs.results) == 2, "only the two warm-up jobs have results"
        await rig.still_serves(obs, agent)
