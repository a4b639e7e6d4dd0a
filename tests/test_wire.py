"""The wire contract: strict JSON, the signed envelope, tensors and HPKE sealing, without a broker."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import importlib
import json
import pkgutil
import sys

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from agent.kit.mqtt import publish_acked
from agent.wire import envelope
from agent.wire.bundle import decode_result_body, encode_result_body, sign_result, verify_result
from agent.wire.codec import dump_model, exactly, parse_model
from agent.wire.errors import Reason, WireError
from agent.wire.keys import KeyRing, key_id
from agent.wire.messages import SUITE, JobSpec, ResultBody, SealedResult
from agent.wire.sealing import open_sealed, result_info, seal
from agent.wire.tensors import Tensor
from agent.wire.topics import Channel, check_vehicle_id, parse_topic, topic
from tests.support import FleetKeys, job_spec

KEY = Ed25519PrivateKey.generate()
RING = KeyRing.of(KEY.public_key())


def _verify(raw: bytes, ring: KeyRing = RING) -> envelope.Verified:
    return envelope.verify(raw, payload_type=envelope.JOB_TYPE, trusted=ring, max_bytes=1 << 20)


def test_pae_matches_dsse_spec_example():
    """PAE is DSSE's: 'DSSEv1 <len> <type> <len> <body>' with ASCII decimal lengths."""
    assert envelope.pae("http://example.com/HelloWorld", b"hello world") == (
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )


def test_envelope_round_trip_returns_exact_payload_and_digest():
    """A signed payload verifies and comes back byte for byte, with the digest of what was signed."""
    payload = b'{"any": "bytes", "even":  "odd spacing"}'
    verified = _verify(envelope.sign(envelope.JOB_TYPE, payload, KEY))
    assert verified.payload == payload
    assert verified.digest == envelope.digest_of(envelope.JOB_TYPE, payload)


def test_payload_type_is_covered_by_the_signature():
    """Relabelling a result envelope as a job breaks the signature."""
    env = json.loads(envelope.sign(envelope.RESULT_TYPE, b"{}", KEY))
    env["payloadType"] = envelope.JOB_TYPE
    with pytest.raises(WireError) as err:
        _verify(json.dumps(env).encode())
    assert err.value.reason is Reason.BAD_SIGNATURE


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", Reason.MALFORMED_ENVELOPE),
        (b"[]", Reason.MALFORMED_ENVELOPE),
        (
            b'{"payloadType": "x", "payloadType": "y", "payload": "", "signatures": []}',
            Reason.MALFORMED_ENVELOPE,
        ),
        (b'{"payloadType": NaN}', Reason.MALFORMED_ENVELOPE),
        (
            b'{"payloadType": "%s", "payload": "not base64!", "signatures": []}'
            % envelope.JOB_TYPE.encode(),
            Reason.MALFORMED_ENVELOPE,
        ),
        (
            b'{"payloadType": "%s", "payload": "", "signatures": [], "extra": 1}'
            % envelope.JOB_TYPE.encode(),
            Reason.MALFORMED_ENVELOPE,
        ),
        (
            b'{"payloadType": "%s", "payload": "", "signatures": []}' % envelope.JOB_TYPE.encode(),
            Reason.UNSIGNED,
        ),
        (b"x" * (1 << 20 + 1), Reason.OVERSIZED),
    ],
    ids=[
        "empty",
        "array",
        "duplicate-key",
        "nan",
        "bad-base64",
        "unknown-field",
        "unsigned",
        "oversized",
    ],
)
def test_malformed_envelopes_are_typed_errors(raw, reason):
    """Every malformed envelope ends in a WireError with its specific reason."""
    with pytest.raises(WireError) as err:
        _verify(raw)
    assert err.value.reason is reason
    assert err.value.detail


def test_unknown_key_and_bad_signature_are_told_apart():
    """A key id nobody trusts is UNKNOWN_KEY; a trusted id with a wrong signature is BAD_SIGNATURE."""
    other = Ed25519PrivateKey.generate()
    raw = envelope.sign(envelope.JOB_TYPE, b"{}", other)
    with pytest.raises(WireError) as err:
        _verify(raw)
    assert err.value.reason is Reason.UNKNOWN_KEY
    env = json.loads(raw)
    env["signatures"][0]["keyid"] = next(iter(RING._keys))
    with pytest.raises(WireError) as err:
        _verify(json.dumps(env).encode())
    assert err.value.reason is Reason.BAD_SIGNATURE


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_envelope_parser_gives_only_typed_errors_on_random_bytes(raw):
    """Arbitrary bytes never raise anything but WireError."""
    with pytest.raises(WireError):
        _verify(raw)


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0), st.integers(min_value=0, max_value=7))
def test_any_single_bit_flip_in_a_signed_job_is_refused(position, bit):
    """Flipping any bit of a signed job envelope makes it fail with a typed error, never verify."""
    raw = bytearray(envelope.sign(envelope.JOB_TYPE, b'{"job": 1}', KEY))
    raw[position % len(raw)] ^= 1 << bit
    try:
        verified = _verify(bytes(raw))
    except WireError:
        return
    # Flips that only change base64 padding bits or JSON whitespace may decode identically.
    assert verified.payload == b'{"job": 1}'


def test_job_spec_round_trips_and_refuses_coercion():
    """JobSpec parses its own output; a string where a number belongs is refused (strict)."""
    spec = job_spec(FleetKeys(), "veh-1")
    assert (
        parse_model(dump_model(spec), JobSpec, what="job", reason=Reason.MALFORMED_PAYLOAD) == spec
    )
    tampered = json.loads(dump_model(spec))
    tampered["attempt"] = "1"
    with pytest.raises(WireError) as err:
        parse_model(
            json.dumps(tampered).encode(), JobSpec, what="job", reason=Reason.MALFORMED_PAYLOAD
        )
    assert "attempt" in err.value.detail


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("expires_at", 0.0, "expires_at must be after issued_at"),
        ("vehicle_id", "a/b", "vehicle_id"),
        ("vehicle_id", "+", "vehicle_id"),
        ("vehicle_id", "veh-1\n", "vehicle_id"),
        ("job_id", "j1\n", "job_id"),
        ("issuer", "0123456789abcdef\n", "issuer"),
        ("requester_key", base64.b64encode(b"short").decode(), "requester_key"),
        ("inputs", {}, "inputs"),
    ],
)
def test_job_spec_rejects_impossible_values_naming_the_field(field, value, needle):
    """Impossible field values are refused with the field named in the detail."""
    raw = json.loads(dump_model(job_spec(FleetKeys(), "veh-1")))
    raw[field] = value
    with pytest.raises(WireError) as err:
        parse_model(json.dumps(raw).encode(), JobSpec, what="job", reason=Reason.MALFORMED_PAYLOAD)
    assert needle in err.value.detail


def _models_of_the_agent_and_the_fleet() -> list[type[BaseModel]]:
    for package in ("agent", "broker"):
        root = importlib.import_module(package)
        for info in pkgutil.walk_packages(root.__path__, prefix=f"{package}."):
            importlib.import_module(info.name)
    found, todo = [], list(BaseModel.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls.__module__.split(".")[0] in ("agent", "broker"):
            found.append(cls)
    return found


def _patterns(schema: object) -> list[str]:
    if isinstance(schema, dict):
        own = [schema["pattern"]] if isinstance(schema.get("pattern"), str) else []
        return own + [p for v in schema.values() for p in _patterns(v)]
    if isinstance(schema, list | tuple):
        return [p for v in schema for p in _patterns(v)]
    return []


def test_every_model_matches_patterns_whole_with_pythons_re():
    """Every model of the agent and the fleet validates `pattern=` with Python's re (the
    Rust engine costs the daemon 0.5 MB), and every pattern is anchored with \\Z: pydantic
    searches, and re's `$` would let a value with a trailing newline through."""
    models = _models_of_the_agent_and_the_fleet()
    assert len(models) > 20
    checked = 0
    for cls in models:
        assert cls.model_config.get("regex_engine") == "python-re", cls
        for pattern in _patterns(cls.__pydantic_core_schema__):
            assert pattern.startswith("^") and pattern.endswith("\\Z"), (cls, pattern)
            checked += 1
    assert checked > 20
    with pytest.raises(ValueError, match="group the alternatives"):
        exactly("a|b")


@pytest.mark.parametrize("dtype", ["float32", "float64", "int64", "uint8", "bool"])
def test_tensor_round_trip_is_exact(dtype):
    """A tensor survives the wire bit for bit, in every supported dtype."""
    arr = (np.arange(24).reshape(2, 3, 4) % 2).astype(dtype)
    back = parse_model(
        dump_model(Tensor.from_numpy(arr)), Tensor, what="t", reason=Reason.MALFORMED_PAYLOAD
    ).to_numpy()
    assert back.dtype == arr.dtype and np.array_equal(back, arr)


@pytest.mark.parametrize(
    "body",
    [
        {"dtype": "float32", "shape": [2], "data": base64.b64encode(b"\0" * 7).decode()},
        {"dtype": "float32", "shape": [-1], "data": ""},
        {"dtype": "complex64", "shape": [1], "data": base64.b64encode(b"\0" * 8).decode()},
        {"dtype": "uint8", "shape": [1 << 40], "data": ""},
        {"dtype": "uint8", "shape": [1] * 9, "data": "AA=="},
    ],
    ids=["short-data", "negative-dim", "unknown-dtype", "absurd-size", "rank-too-high"],
)
def test_bad_tensors_are_refused(body):
    """Tensors whose bytes do not fit their shape and dtype, or are absurd, are refused."""
    with pytest.raises(WireError):
        parse_model(json.dumps(body).encode(), Tensor, what="t", reason=Reason.MALFORMED_PAYLOAD)


def test_sealed_result_opens_only_in_its_own_context():
    """HPKE info binds job, attempt, vehicle and digest: any other context fails to open."""
    requester = X25519PrivateKey.generate()
    info = result_info("job-1", 1, "veh-1", "a" * 64)
    ct = seal(b"secret", requester.public_key(), info)
    assert open_sealed(ct, requester, info) == b"secret"
    for other in (
        result_info("job-2", 1, "veh-1", "a" * 64),
        result_info("job-1", 2, "veh-1", "a" * 64),
        result_info("job-1", 1, "veh-2", "a" * 64),
        result_info("job-1", 1, "veh-1", "b" * 64),
    ):
        with pytest.raises(WireError) as err:
            open_sealed(ct, requester, other)
        assert err.value.reason is Reason.BAD_CIPHERTEXT
    with pytest.raises(WireError):
        open_sealed(ct, X25519PrivateKey.generate(), info)
    flipped = bytearray(ct)
    flipped[-1] ^= 1
    with pytest.raises(WireError):
        open_sealed(bytes(flipped), requester, info)


def test_result_info_is_unambiguous():
    """Length prefixes keep ('ab','c') and ('a','bc') apart."""
    assert result_info("ab", 1, "c", "d") != result_info("a", 1, "bc", "d")


@pytest.mark.parametrize("vid", ["", "+", "#", "a/b", "a+b", "-lead", "x" * 65, "ü"])
def test_vehicle_ids_that_could_widen_an_acl_are_refused(vid):
    """Vehicle ids with wildcards, separators or odd characters never make a topic."""
    with pytest.raises(ValueError, match="not allowed"):
        check_vehicle_id(vid)


def test_topics_round_trip():
    """Every channel topic parses back to its vehicle and channel; foreign topics do not."""
    for channel in Channel:
        assert parse_topic(topic("veh-1", channel)) == ("veh-1", channel)
    assert parse_topic("fleet/v1/vehicles/veh-1/other") is None
    assert parse_topic("elsewhere/v1/vehicles/veh-1/jobs") is None


def _body(**kw: object) -> ResultBody:
    base: dict[str, object] = dict(
        job_id="job-1",
        attempt=2,
        vehicle_id="veh-1",
        model_sha256="a" * 64,
        outputs={
            "label": Tensor.from_numpy(np.array([3, 1], np.int64)),
            "probabilities": Tensor.from_numpy(np.ones((2, 10), np.float32)),
        },
        runtime_ms=1.5,
        finished_at=10.0,
        energy_wh=0.001,
    )
    base.update(kw)
    return ResultBody(**base)  # type: ignore[arg-type]


def test_result_bundles_round_trip_with_raw_bytes():
    """Bodies and sealed results survive their binary bundles exactly, with no base64 inside."""
    body = _body()
    raw = encode_result_body(body)
    assert decode_result_body(raw) == body
    assert body.outputs["probabilities"].data in raw, "tensor bytes are carried raw"
    sealed = SealedResult(
        job_id="job-1",
        attempt=2,
        vehicle_id="veh-1",
        job_digest="b" * 64,
        suite=SUITE,
        ciphertext=b"\x00\xff" * 100,
    )
    message = sign_result(sealed, KEY)
    assert sealed.ciphertext in message, "the ciphertext is carried raw, not base64'd"
    assert verify_result(message, trusted=RING, max_bytes=1 << 20)[0] == sealed


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda raw: b"XXXX" + raw[4:], "bad magic"),
        (lambda raw: raw[:4] + b"\xff\xff\xff\x7f" + raw[8:], "header length"),
        (lambda raw: raw[:-1], "bundle carries"),
        (lambda raw: raw + b"\x00", "bundle carries"),
        (lambda raw: raw[:6], "bad magic"),
    ],
    ids=["magic", "header-length", "short", "long", "truncated"],
)
def test_bad_bundles_are_typed_errors(mutate, needle):
    """Damaged bundles fail with MALFORMED_PAYLOAD saying what is wrong."""
    with pytest.raises(WireError) as err:
        decode_result_body(mutate(encode_result_body(_body())))
    assert err.value.reason is Reason.MALFORMED_PAYLOAD
    assert needle in err.value.detail or needle == "bad magic"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_bundle_decoders_give_only_typed_errors(raw):
    """Arbitrary bytes never raise anything but WireError from either bundle decoder."""
    with pytest.raises(WireError):
        decode_result_body(b"EFB1" + raw)
    with pytest.raises(WireError):
        verify_result(b"EFB1" + raw, trusted=RING, max_bytes=1 << 20)


# ---- job bundles ------------------------------------------------------------


def _big_job(key: Ed25519PrivateKey) -> JobSpec:
    import time as _time

    from agent.wire.messages import Limits, ModelRef
    from agent.wire.tensors import Tensor

    now = _time.time()
    return JobSpec(
        job_id="job-big",
        attempt=1,
        issuer=key_id(key.public_key()),
        issued_at=now,
        expires_at=now + 60,
        vehicle_id="veh-1",
        job_class="ocr",
        model=ModelRef(name="m", sha256="a" * 64, size=10),
        inputs={
            "x": Tensor.from_numpy(
                np.arange(3 * 48 * 320, dtype=np.float32).reshape(1, 3, 48, 320)
            ),
            "n": Tensor.from_numpy(np.array([7], np.int64)),
        },
        limits=Limits(max_runtime_s=10),
        requester_key=b"\x02" * 32,
    )


def test_job_bundle_round_trips_and_binds_the_same_job():
    """A signed job bundle verifies to exactly the JobSpec that was signed, raw tensors and
    all, at 56 % of the JSON envelope's size; its digest is what the fleet recorded."""
    from agent.wire.bundle import sign_job_bundle, verify_job_bundle

    spec = _big_job(KEY)
    raw, digest = sign_job_bundle(spec, KEY)
    verified, job = verify_job_bundle(raw, trusted=RING, max_bytes=1 << 22)
    assert job == spec and verified.digest == digest
    assert len(raw) < 0.6 * len(envelope.sign(envelope.JOB_TYPE, dump_model(spec), KEY))


def _resign_header(raw: bytes, **changes: object) -> bytes:
    """Edit the bundle header and sign it again with the trusted key (a fleet bug, not an
    attacker): what the parser must still refuse."""
    from agent.wire.bundle import JOB_BUNDLE_TYPE

    n = int.from_bytes(raw[4:8], "little")
    env = json.loads(raw[8 : 8 + n])
    header = json.loads(base64.b64decode(env["payload"]))
    header.update(changes)
    signed = envelope.sign(JOB_BUNDLE_TYPE, json.dumps(header).encode(), KEY)
    return raw[:4] + len(signed).to_bytes(4, "little") + signed + raw[8 + n :]


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda raw: raw[:-1] + bytes([raw[-1] ^ 1]), Reason.BAD_SIGNATURE),
        (lambda raw: raw + b"\x00", Reason.BAD_SIGNATURE),
        (lambda raw: raw[:-100], Reason.BAD_SIGNATURE),
        (lambda raw: raw[:20], Reason.MALFORMED_PAYLOAD),
        (lambda raw: b"EFB1" + (10**6).to_bytes(4, "little") + raw[8:], Reason.MALFORMED_PAYLOAD),
        (lambda raw: raw[:30] + bytes([raw[30] ^ 4]) + raw[31:], None),
        (lambda raw: _resign_header(raw, job_id="job/../x"), Reason.MALFORMED_PAYLOAD),
        (lambda raw: _resign_header(raw, surprise=True), Reason.MALFORMED_PAYLOAD),
        (
            lambda raw: _resign_header(
                raw,
                inputs=[
                    {"name": "x", "dtype": "float32", "shape": [1, 3, 48, 320], "nbytes": 184316},
                    {"name": "n", "dtype": "int64", "shape": [1], "nbytes": 12},
                ],
            ),
            Reason.MALFORMED_PAYLOAD,
        ),
    ],
    ids=[
        "tensor-byte-flipped",
        "extra-byte",
        "truncated-tensors",
        "truncated-header",
        "impossible-header-length",
        "header-byte-flipped",
        "bad-job-id",
        "unknown-field",
        "sizes-disagree-with-shapes",
    ],
)
def test_damaged_job_bundles_are_refused(mutate, reason):
    from agent.wire.bundle import sign_job_bundle, verify_job_bundle

    raw, _ = sign_job_bundle(_big_job(KEY), KEY)
    with pytest.raises(WireError) as err:
        verify_job_bundle(mutate(raw), trusted=RING, max_bytes=1 << 22)
    assert err.value.detail
    if reason is not None:
        assert err.value.reason is reason
    else:  # inside the envelope: anything the envelope check says, never accepted
        assert err.value.reason in (
            Reason.MALFORMED_ENVELOPE,
            Reason.MALFORMED_PAYLOAD,
            Reason.BAD_SIGNATURE,
            Reason.UNKNOWN_KEY,
            Reason.WRONG_PAYLOAD_TYPE,
        )


def test_a_result_bundle_or_an_unknown_key_is_not_a_job():
    from agent.wire.bundle import sign_job_bundle, verify_job_bundle

    stranger = Ed25519PrivateKey.generate()
    raw, _ = sign_job_bundle(_big_job(stranger), stranger)
    with pytest.raises(WireError) as err:
        verify_job_bundle(raw, trusted=RING, max_bytes=1 << 22)
    assert err.value.reason is Reason.UNKNOWN_KEY
    result = sign_result(
        SealedResult(
            job_id="j", attempt=1, vehicle_id="v", job_digest="b" * 64, suite=SUITE, ciphertext=b"x"
        ),
        KEY,
    )
    with pytest.raises(WireError) as err:
        verify_job_bundle(result, trusted=RING, max_bytes=1 << 22)
    assert err.value.reason is Reason.WRONG_PAYLOAD_TYPE


async def test_python_wait_for_loses_a_cancellation_that_arrives_with_its_result():
    """The trap publish_acked closes: on Python 3.11, asyncio.wait_for (which aiomqtt's
    publish awaits) returns the result and drops the cancellation when both arrive together."""
    fut = asyncio.get_running_loop().create_future()
    task = asyncio.ensure_future(asyncio.wait_for(fut, 10))
    await asyncio.sleep(0)
    fut.set_result("puback")
    task.cancel()
    if sys.version_info >= (3, 12):
        with pytest.raises(asyncio.CancelledError):
            await task
    else:
        assert await task == "puback"


class _Publisher:
    """aiomqtt's publish as Python 3.11 runs it when the PUBACK and a cancellation meet."""

    def __init__(self, swallow: bool) -> None:
        self.swallow, self.sent, self.waiting = swallow, [], asyncio.Event()

    async def publish(self, topic, payload, qos, retain):
        self.sent.append((topic, payload, qos, retain))
        self.waiting.set()
        if self.swallow:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(30)


async def test_publish_acked_keeps_a_cancellation_the_client_swallowed():
    client = _Publisher(swallow=True)
    task = asyncio.ensure_future(publish_acked(client, "t", b"x", retain=True))
    await client.waiting.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert client.sent == [("t", b"x", 1, True)]
    plain = _Publisher(swallow=False)
    await publish_acked(plain, "t", b"y")  # acknowledged, nothing cancelled: returns
    assert plain.sent == [("t", b"y", 1, False)]
