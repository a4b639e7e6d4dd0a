"""The trust policy as pure code: thresholds, rotation by old and new roots, rollback, expiry, scope."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.wire.errors import Reason, WireError
from agent.wire.keys import key_id, raw_public
from agent.wire.policy import (
    DelegatedKey,
    RequesterKey,
    TrustPolicy,
    accept_policy,
    job_key_for,
    requester_allowed,
    sign_policy,
    trusted_key,
)

NOW = time.time()
ROOTS = [Ed25519PrivateKey.generate() for _ in range(3)]
NEW_ROOTS = [Ed25519PrivateKey.generate() for _ in range(3)]
JOB_KEY = Ed25519PrivateKey.generate()
MODEL = "a" * 64


def policy(version: int, roots=ROOTS, threshold: int = 2, **kw: object) -> TrustPolicy:
    fields: dict[str, object] = dict(
        version=version,
        issued_at=NOW - 10,
        expires_at=NOW + 3600,
        root_keys=tuple(trusted_key(k.public_key()) for k in roots),
        root_threshold=threshold,
        job_keys=(
            DelegatedKey(
                keyid=key_id(JOB_KEY.public_key()),
                public_key=raw_public(JOB_KEY.public_key()),
                expires_at=NOW + 600,
                job_classes=("digits-eval",),
                models=(MODEL,),
            ),
        ),
        requester_keys=(RequesterKey(name="lab", public_key=b"\x01" * 32),),
    )
    fields.update(kw)
    return TrustPolicy(**fields)  # type: ignore[arg-type]


V1 = accept_policy(sign_policy(policy(1), ROOTS[:2]), None, NOW)


def test_first_policy_needs_a_threshold_of_its_own_roots():
    """Installed with the vehicle, v1 must carry 2 of its 3 roots' signatures."""
    assert V1.version == 1
    with pytest.raises(WireError) as err:
        accept_policy(sign_policy(policy(1), ROOTS[:1]), None, NOW)
    assert err.value.reason is Reason.BAD_SIGNATURE
    assert "1 valid signature(s) from its own roots, 2 required" in err.value.detail


def test_update_needs_the_current_roots():
    """v2 signed by keys that are not the current roots is refused, whatever it says."""
    strangers = [Ed25519PrivateKey.generate() for _ in range(3)]
    forged = sign_policy(policy(2, roots=strangers), strangers[:2])
    with pytest.raises(WireError) as err:
        accept_policy(forged, V1, NOW)
    assert err.value.reason is Reason.BAD_SIGNATURE
    assert accept_policy(sign_policy(policy(2), ROOTS[1:]), V1, NOW).version == 2


def test_root_rotation_needs_old_and_new_roots():
    """Rotating to new roots takes a threshold of the old and of the new roots."""
    rotated = policy(2, roots=NEW_ROOTS)
    with pytest.raises(WireError, match="from the new roots"):
        accept_policy(sign_policy(rotated, ROOTS[:2]), V1, NOW)
    with pytest.raises(WireError, match="from the current roots"):
        accept_policy(sign_policy(rotated, NEW_ROOTS[:2]), V1, NOW)
    v2 = accept_policy(sign_policy(rotated, [*ROOTS[:2], *NEW_ROOTS[:2]]), V1, NOW)
    assert {k.keyid for k in v2.root_keys} == {key_id(k.public_key()) for k in NEW_ROOTS}
    with pytest.raises(WireError):  # the old roots alone no longer sign anything
        accept_policy(sign_policy(policy(3), ROOTS[:2]), v2, NOW)


def test_rollback_and_replay_are_refused():
    """A policy whose version is not above the held one is refused, however well signed."""
    v2 = accept_policy(sign_policy(policy(2), ROOTS[:2]), V1, NOW)
    for version in (1, 2):
        with pytest.raises(WireError) as err:
            accept_policy(sign_policy(policy(version), ROOTS[:2]), v2, NOW)
        assert err.value.reason is Reason.REPLAYED


def test_expired_or_future_policy_is_refused():
    """Freeze attacks end at the policy's expiry; a policy from the future is refused too."""
    stale = policy(2, issued_at=NOW - 7200, expires_at=NOW - 3600)
    with pytest.raises(WireError) as err:
        accept_policy(sign_policy(stale, ROOTS[:2]), V1, NOW)
    assert err.value.reason is Reason.EXPIRED
    future = policy(2, issued_at=NOW + 3600, expires_at=NOW + 7200)
    with pytest.raises(WireError) as err:
        accept_policy(sign_policy(future, ROOTS[:2]), V1, NOW)
    assert err.value.reason is Reason.NOT_YET_VALID


def test_one_key_signing_twice_counts_once():
    """Two signatures by the same root are one signer: no threshold by repetition."""
    raw = json.loads(sign_policy(policy(2), ROOTS[:1]))
    raw["signatures"] = raw["signatures"] * 2
    with pytest.raises(WireError, match="1 valid signature"):
        accept_policy(json.dumps(raw).encode(), V1, NOW)


def test_tampered_policy_is_refused():
    """Changing the payload after signing leaves no valid signature."""
    raw = json.loads(sign_policy(policy(2), ROOTS[:2]))
    import base64

    body = json.loads(base64.b64decode(raw["payload"]))
    body["root_threshold"] = 1
    raw["payload"] = base64.b64encode(json.dumps(body).encode()).decode()
    with pytest.raises(WireError) as err:
        accept_policy(json.dumps(raw).encode(), V1, NOW)
    assert err.value.reason in (Reason.BAD_SIGNATURE, Reason.MALFORMED_PAYLOAD)


@pytest.mark.parametrize(
    ("keyid", "job_class", "model", "now", "reason"),
    [
        ("0" * 16, "digits-eval", MODEL, NOW, Reason.UNKNOWN_KEY),
        (None, "weather", MODEL, NOW, Reason.KEY_OUT_OF_SCOPE),
        (None, "digits-eval", "b" * 64, NOW, Reason.KEY_OUT_OF_SCOPE),
        (None, "digits-eval", MODEL, NOW + 601, Reason.EXPIRED),
        (None, "digits-eval", MODEL, NOW + 3601, Reason.POLICY_EXPIRED),
    ],
    ids=[
        "unknown-key",
        "class-out-of-scope",
        "model-out-of-scope",
        "key-expired",
        "policy-expired",
    ],
)
def test_delegated_keys_act_only_within_their_scope(keyid, job_class, model, now, reason):
    """A job key signs only its classes and models, until its expiry and the policy's."""
    with pytest.raises(WireError) as err:
        job_key_for(V1, keyid or key_id(JOB_KEY.public_key()), job_class, model, now)
    assert err.value.reason is reason


def test_in_scope_job_key_and_requester_allowlist():
    """The delegated key is returned in scope; results go only to listed requesters."""
    authority = job_key_for(V1, key_id(JOB_KEY.public_key()), "digits-eval", MODEL, NOW)
    assert raw_public(authority.public_key) == raw_public(JOB_KEY.public_key())
    assert requester_allowed(V1, b"\x01" * 32)
    assert not requester_allowed(V1, b"\x02" * 32)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_policy_parser_gives_only_typed_errors(raw):
    """Arbitrary bytes offered as a policy give WireError, never another exception."""
    with pytest.raises(WireError):
        accept_policy(raw, V1, NOW)


def _fleet_cli(*args: str, cwd) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "broker.cli", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd=cwd,
    )


@pytest.mark.broker
async def test_policy_cli_signs_offline_and_publishes_retained(tmp_path, mosquitto):
    """`edge-fleet policy sign` writes a policy a vehicle would install; a threshold above the
    roots is refused (exit 2, nothing written); `policy publish` puts it on the retained topic."""
    import asyncio

    import aiomqtt

    from agent.wire.policy import load_root_policy
    from agent.wire.topics import POLICY_TOPIC

    for args in (
        ["--root-key", "root.key"],
        ["--job-key", "job.key", "--trusted-out", "t.json"],
        ["--requester-key", "req.key"],
    ):
        assert _fleet_cli("keygen", *args, cwd=tmp_path).returncode == 0
    common = ["policy", "sign", "--root-key", "root.key", "--job-key", "job.key"]
    bad = _fleet_cli(
        *common, "--version", "1", "--threshold", "2", "--out", "bad.json", cwd=tmp_path
    )
    assert bad.returncode == 2 and "root_threshold" in bad.stderr
    assert not (tmp_path / "bad.json").exists()
    good = _fleet_cli(
        *common, "--requester-key", "req.key", "--version", "3", "--out", "p.json", cwd=tmp_path
    )
    assert good.returncode == 0, good.stderr
    raw = (tmp_path / "p.json").read_bytes()
    assert load_root_policy(raw).version == 3
    published = _fleet_cli(
        "policy", "publish", "--policy", "p.json", "--port", str(mosquitto.port), cwd=tmp_path
    )
    assert published.returncode == 0, published.stderr
    remote = _fleet_cli(  # refused before any connection: nothing is sent to 192.0.2.7
        "policy", "publish", "--policy", "p.json", "--host", "192.0.2.7", cwd=tmp_path
    )
    assert remote.returncode == 2 and "refusing plaintext to 192.0.2.7" in remote.stderr
    async with aiomqtt.Client("127.0.0.1", mosquitto.port) as client:
        await client.subscribe(POLICY_TOPIC, qos=1)
        message = await asyncio.wait_for(anext(aiter(client.messages)), timeout=5)
        assert message.payload == raw
        await client.publish(POLICY_TOPIC, b"", qos=1, retain=True)  # clear it for other tests
