"""THREATS.md 8 and the trust policy (TUF-style) against the real agent and broker over mutual TLS:
revoked and expired job keys, updates not signed by the roots (a hostile online key), root
rotation signed by old and new, rollback across a restart, requesters the policy does not name,
keys signing outside their scope, an expired policy failing closed, and a vehicle trying to
replace the fleet's policy."""

from __future__ import annotations

import asyncio
import time

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.wire.keys import key_id, raw_public
from agent.wire.policy import load_root_policy
from agent.wire.topics import POLICY_TOPIC
from tests.adversarial.conftest import OTHER, VID, Rig, publish_policy_as
from tests.support import fleet_client, job_spec, running_agent, signed, wait_for

pytestmark = pytest.mark.broker


def _held(agent) -> int:
    return agent.status()["trust_policy_version"]


def _rejections(obs) -> list[str]:
    return [e["reason"] for e in obs.events if e["kind"] == "rejected"]


def _install(files, raw: bytes) -> None:
    (files.config_path.parent / "trust-policy.json").write_bytes(raw)


async def test_a_key_the_new_policy_revokes_signs_nothing_more(private_rig: Rig):
    """v2 replaces the job key: a job signed by the old key is refused (unknown_key), one signed
    by the new key runs."""
    rig, fleet = private_rig, private_rig.fleet
    new_key = Ed25519PrivateKey.generate()
    files = rig.vehicle()
    async with rig.serving(files) as (obs, agent):
        await publish_policy_as(rig, fleet.policy(2, job_keys=[new_key.public_key()]))
        await wait_for(lambda: _held(agent) == 2, what="policy v2 taken")
        await obs.send_job(signed(job_spec(fleet, VID, job_id="job-old-key"), fleet.job_key))
        await wait_for(lambda: _rejections(obs), what="old key refused")
        assert _rejections(obs) == ["unknown_key"]
        spec = job_spec(fleet, VID, job_id="job-new-key", issuer=key_id(new_key.public_key()))
        await obs.send_job(signed(spec, new_key))
        await wait_for(lambda: "succeeded" in obs.kinds("job-new-key"), what="new key's job runs")
        assert agent.counts["running"] == 1
        assert len(obs.results) == 1


async def test_an_expired_job_key_signs_nothing(rig: Rig):
    """A delegated key past its expiry is refused even though the policy itself is valid."""
    fleet = rig.fleet
    files = rig.vehicle()
    _install(files, fleet.policy(job_key_valid_s=-60.0))
    async with rig.serving(files) as (obs, agent):
        await obs.send_job(signed(job_spec(fleet, VID), fleet.job_key))
        await wait_for(lambda: _rejections(obs), what="refused")
        assert _rejections(obs) == ["expired"]
        assert "job-signing key" in next(e for e in obs.events if e["kind"] == "rejected")["detail"]
        assert agent.counts["running"] == 0 and obs.results == []


async def test_an_online_key_cannot_sign_itself_a_new_policy(private_rig: Rig):
    """A stolen job key signs a v2 delegating the attacker's key: refused (no root signature),
    v1 stays in force, the attacker's jobs are refused, honest jobs still run."""
    rig, fleet = private_rig, private_rig.fleet
    attacker = Ed25519PrivateKey.generate()
    files = rig.vehicle()
    async with rig.serving(files) as (obs, agent):
        forged = fleet.policy(2, job_keys=[attacker.public_key()], signers=[fleet.job_key])
        await publish_policy_as(rig, forged)
        await wait_for(lambda: agent.counts["policy_rejected.bad_signature"] == 1, what="refused")
        assert _held(agent) == 1
        await obs.send_job(signed(job_spec(fleet, VID, job_id="job-evil"), attacker))
        await wait_for(lambda: _rejections(obs), what="attacker's job refused")
        assert _rejections(obs) == ["unknown_key"]
        await rig.still_serves(obs, agent)


async def test_root_rotation_needs_the_old_and_the_new_roots(private_rig: Rig):
    """New roots signing alone are refused; old and new together are taken; after that the
    old root alone no longer speaks for the fleet."""
    rig, fleet = private_rig, private_rig.fleet
    new_root = Ed25519PrivateKey.generate()
    files = rig.vehicle()
    rotated = dict(roots=[new_root.public_key()])
    async with rig.serving(files) as (obs, agent):
        await publish_policy_as(rig, fleet.policy(2, signers=[new_root], **rotated))
        await wait_for(lambda: agent.counts["policy_rejected.bad_signature"] == 1, what="refused")
        assert _held(agent) == 1
        await publish_policy_as(rig, fleet.policy(3, signers=[fleet.root, new_root], **rotated))
        await wait_for(lambda: _held(agent) == 3, what="rotation taken")
        await publish_policy_as(rig, fleet.policy(4, signers=[fleet.root], **rotated))
        await wait_for(lambda: agent.counts["policy_rejected.bad_signature"] == 2, what="old root")
        assert _held(agent) == 3
        await publish_policy_as(rig, fleet.policy(5, signers=[new_root], **rotated))
        await wait_for(lambda: _held(agent) == 5, what="new root alone, after rotation")
        await rig.still_serves(obs, agent)


async def test_rollback_is_refused_and_the_newer_policy_survives_a_restart(private_rig: Rig):
    """After v2, a replayed v1 is refused; a restarted agent (installed file v1) holds v2 from its
    state database and refuses the retained v1 again; its status reports v2."""
    rig, fleet = private_rig, private_rig.fleet
    files = rig.vehicle()
    v1 = (files.config_path.parent / "trust-policy.json").read_bytes()
    async with running_agent(files) as agent:
        await publish_policy_as(rig, fleet.policy(2))
        await wait_for(lambda: _held(agent) == 2, what="v2")
        await publish_policy_as(rig, v1)
        await wait_for(
            lambda: agent.counts["policy_rejected.replayed"] == 1, what="rollback refused"
        )
        assert _held(agent) == 2
    async with running_agent(files) as agent:
        assert _held(agent) == 2
        await wait_for(lambda: agent.counts["policy_rejected.replayed"] == 1, what="retained v1")
        assert agent.status_message(online=True).policy_version == 2


async def test_results_go_only_to_requesters_the_policy_names(rig: Rig):
    """A validly signed job asking for its result to be sealed to an unknown key is refused."""
    fleet = rig.fleet
    stranger = X25519PrivateKey.generate()
    files = rig.vehicle()
    async with rig.serving(files) as (obs, agent):
        spec = job_spec(fleet, VID, requester_key=raw_public(stranger.public_key()))
        await obs.send_job(signed(spec, fleet.job_key))
        await wait_for(lambda: _rejections(obs), what="refused")
        assert _rejections(obs) == ["requester_not_allowed"]
        assert agent.counts["running"] == 0 and obs.results == []
        await rig.still_serves(obs, agent)


async def test_a_key_signs_only_within_its_scope(rig: Rig):
    """A key delegated for class `burn` cannot sign a `digits-eval` job."""
    fleet = rig.fleet
    files = rig.vehicle()
    _install(files, fleet.policy(job_classes=("burn",)))
    async with rig.serving(files) as (obs, agent):
        await obs.send_job(signed(job_spec(fleet, VID), fleet.job_key))
        await wait_for(lambda: _rejections(obs), what="refused")
        assert _rejections(obs) == ["key_out_of_scope"]
        assert agent.counts["running"] == 0 and obs.results == []


async def test_an_expired_policy_fails_closed_until_a_fresh_one_arrives(private_rig: Rig):
    """With its policy expired the agent asks for no work, refuses jobs, and says why in its
    status; a fresh policy from the fleet reopens the gate and honest jobs run."""
    rig, fleet = private_rig, private_rig.fleet
    files = rig.vehicle()
    _install(files, fleet.policy(now=time.time() - 2 * 86_400.0, valid_s=86_400.0))
    async with rig.serving(files) as (obs, agent):
        await wait_for(lambda: agent.gate.last is not None, what="first look")
        assert "trust_policy_expired" in [r.value for r in agent.gate.last.reasons]
        assert "trust_policy_expired" in agent.status_message(online=True).reasons
        await obs.send_job(signed(job_spec(fleet, VID), fleet.job_key))
        await wait_for(lambda: _rejections(obs), what="refused")
        assert _rejections(obs) == ["trust_policy_expired"]
        assert obs.work == [], "no work asked for under an expired policy"
        await publish_policy_as(rig, fleet.policy(2))
        await wait_for(lambda: agent.gate.is_open, timeout=15, what="gate reopens")
        await rig.still_serves(obs, agent)


async def test_a_vehicle_cannot_replace_or_clear_the_fleet_policy(private_rig: Rig):
    """The ACL lets only the fleet tools write the policy topic: a vehicle's publish (even of a
    validly root-signed policy it got hold of, or an empty one clearing the retained copy) is
    dropped, and a new subscriber still gets the fleet's."""
    rig, fleet = private_rig, private_rig.fleet
    await publish_policy_as(rig, fleet.policy(2))
    await publish_policy_as(rig, fleet.policy(9), who=OTHER)
    await publish_policy_as(rig, b"", who=OTHER)
    got: list[bytes] = []
    async with fleet_client(rig.port, rig.pki) as client:
        await client.subscribe(POLICY_TOPIC, qos=1)

        async def first() -> None:
            async for m in client.messages:
                got.append(m.payload)  # type: ignore[arg-type]
                return

        await asyncio.wait_for(first(), timeout=5)
    assert load_root_policy(got[0]).version == 2
