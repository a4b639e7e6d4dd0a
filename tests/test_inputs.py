"""Bad input at the remaining ways in: the model manifest, the fleet's inbound topics, the
control socket, key files and the command lines."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import shutil
import subprocess
import sys
import time

import aiomqtt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.inference.store import ModelStore, ModelStoreError
from agent.kit.exitcodes import ExitCode
from agent.kit.keyfiles import KeyFileError, load_key_ring, load_requester_key, load_signing_key
from agent.runtime.control import _handle
from broker.collector import Collector
from broker.fleet import FleetNode
from broker.store.sqlite import JobQueue, SqliteStore
from tests.support import MODELS, wait_for


def _copy_models(tmp_path):
    folder = tmp_path / "models"
    shutil.copytree(MODELS, folder)
    return folder


def test_model_store_refuses_a_missing_or_broken_manifest(tmp_path):
    """No manifest, or one that is not a manifest, is a ModelStoreError naming the file."""
    with pytest.raises(ModelStoreError, match="cannot read"):
        ModelStore.open(tmp_path)
    (tmp_path / "manifest.json").write_text('{"version": 1, "models": [{"name": "x"}]}')
    with pytest.raises(ModelStoreError, match="not a valid manifest"):
        ModelStore.open(tmp_path)


def test_model_store_leaves_out_files_that_do_not_match_their_pin(tmp_path):
    """A model file changed on disk is left out with the reason; the others stay held."""
    folder = _copy_models(tmp_path)
    (folder / "burn.onnx").write_bytes(b"not the model")
    store = ModelStore.open(folder)
    assert "burn" not in store.held and "digits" in store.held
    assert any("burn" in p and "does not match its pin" in p for p in store.problems)


def test_model_store_refuses_paths_outside_its_folder(tmp_path):
    """A manifest entry naming a file with a path separator is refused, not followed."""
    folder = _copy_models(tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["models"][0]["file"] = "../digits.onnx"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelStoreError, match="not a valid manifest"):
        ModelStore.open(folder)


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"\xff", "not strict JSON"),
        (b'{"version": 1, "keys": [{"keyid": "00", "public_key": ""}]}', "keys.0.keyid"),
        (
            b'{"version": 1, "keys": [{"keyid": "0123456789abcdef", "public_key": "'
            + b"A" * 43
            + b'="}]}',
            "does not match its public key",
        ),
    ],
    ids=["binary", "bad-keyid", "keyid-mismatch"],
)
def test_trusted_keys_file_errors_name_the_problem(tmp_path, content, needle):
    """A damaged trusted-keys file is a KeyFileError saying what is wrong."""
    path = tmp_path / "trusted.json"
    path.write_bytes(content)
    with pytest.raises(KeyFileError, match=needle):
        load_key_ring(path)


def _pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@settings(max_examples=50, deadline=None)
@given(seed=st.binary(min_size=32, max_size=32), crlf=st.booleans())
def test_private_keys_read_exactly_as_cryptography_reads_them(tmp_path_factory, seed, crlf):
    """The daemon reads RFC 8410 PEM keys without cryptography's general loader: whatever
    the seed and line endings, it gets the very key that loader gets, of the right type."""
    tmp = tmp_path_factory.mktemp("keys")
    for kind, load in (
        (Ed25519PrivateKey, load_signing_key),
        (X25519PrivateKey, load_requester_key),
    ):
        pem = _pem(kind.from_private_bytes(seed))
        if crlf:
            pem = pem.replace(b"\n", b"\r\n")
        path = tmp / f"{kind.__name__}.key"
        path.write_bytes(pem)
        got = load(path)
        expected = serialization.load_pem_private_key(pem, password=None)
        assert isinstance(got, kind)
        assert got.private_bytes_raw() == expected.private_bytes_raw()
        assert got.public_key().public_bytes_raw() == expected.public_key().public_bytes_raw()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl command here")
def test_a_key_made_by_openssl_is_read(tmp_path):
    """An operator's `openssl genpkey -algorithm ed25519` key works as the vehicle key."""
    path = tmp_path / "vehicle.key"
    openssl = shutil.which("openssl")
    assert openssl is not None
    subprocess.run([openssl, "genpkey", "-algorithm", "ed25519", "-out", str(path)], check=True)
    expected = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert load_signing_key(path).private_bytes_raw() == expected.private_bytes_raw()


def _with_public_key(key: Ed25519PrivateKey) -> bytes:
    """RFC 8410's other form (OneAsymmetricKey, version 1, with the public key): not what
    cryptography or OpenSSL write, and one cryptography refuses; so must the agent."""
    seed, public = key.private_bytes_raw(), key.public_key().public_bytes_raw()
    body = (
        bytes.fromhex("020101300506032b6570")
        + bytes.fromhex("04220420")
        + seed
        + bytes.fromhex("812100")
        + public
    )
    der = bytes([0x30, len(body)]) + body
    return (
        b"-----BEGIN PRIVATE KEY-----\n" + base64.encodebytes(der) + b"-----END PRIVATE KEY-----\n"
    )


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda: b"", "is not an unencrypted PEM private key"),
        (lambda: b"\xff\x00 not a key", "is not an unencrypted PEM private key"),
        (lambda: _pem(Ed25519PrivateKey.generate())[:-40], "is not an unencrypted PEM private key"),
        (
            lambda: _pem(Ed25519PrivateKey.generate()).replace(b"MC4C", b"MC4*"),
            "is not an unencrypted PEM private key",
        ),
        (
            lambda: Ed25519PrivateKey.generate().private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"secret"),
            ),
            "is not an unencrypted PEM private key",
        ),
        (
            lambda: _pem(X25519PrivateKey.generate()),
            "holds a X25519PrivateKey, expected an Ed25519",
        ),
        (
            lambda: _pem(ec.generate_private_key(ec.SECP256R1())),
            "holds a ECPrivateKey, expected an Ed25519",
        ),
        (
            lambda: _with_public_key(Ed25519PrivateKey.generate()),
            "is not an unencrypted PEM private key",
        ),
    ],
    ids=["empty", "binary", "cut-short", "bad-base64", "encrypted", "x25519", "p256", "v2-form"],
)
def test_vehicle_key_file_errors_name_the_problem(tmp_path, make, needle):
    """A vehicle key file that is not an unencrypted Ed25519 key is a KeyFileError naming the
    file and what is wrong, the same whether the agent's own reader or cryptography's
    general loader turned it down."""
    path = tmp_path / "vehicle.key"
    path.write_bytes(make())
    with pytest.raises(KeyFileError, match=needle) as err:
        load_signing_key(path)
    assert str(path) in str(err.value)
    with pytest.raises(KeyFileError, match="cannot read key file"):
        load_signing_key(tmp_path / "missing.key")


def test_control_socket_requests_that_are_not_json_are_answered(tmp_path):
    """Garbage on the control socket gets an error reply, never an exception."""
    status = dict
    assert _handle(b"\x00\xff", status, None) == {"ok": False, "error": "request is not JSON"}
    assert _handle(b"[1]", status, None)["ok"] is False
    assert _handle(b'{"op": "set", "fields": {"gear": "D"}}', status, None) == {
        "ok": False,
        "error": "this vehicle has no emulated state to set",
    }
    assert _handle(b'{"op": "set", "fields": []}', status, lambda f: f)["ok"] is False


def test_keygen_never_overwrites_a_key(tmp_path):
    """`edge-agent keygen` onto an existing key exits 73 and leaves the key as it was."""
    key = tmp_path / "vehicle.key"
    run = [sys.executable, "-m", "agent.cli", "keygen", "--out", str(key)]
    assert subprocess.run(run, capture_output=True, check=False).returncode == 0
    before = key.read_bytes()
    again = subprocess.run(run, capture_output=True, text=True, check=False)
    assert again.returncode == ExitCode.KEY_EXISTS
    assert "refusing to overwrite" in again.stderr
    assert key.read_bytes() == before


@pytest.mark.parametrize(
    "argv", [["run", "--nope"], ["vehicle"], ["status", "--socket"], []], ids=str
)
def test_bad_command_lines_exit_2(argv):
    """Unknown or incomplete command lines exit 2 with usage, as argparse does."""
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli", *argv], capture_output=True, text=True, check=False
    )
    assert proc.returncode == ExitCode.USAGE
    assert "usage:" in proc.stderr


@pytest.mark.broker
async def test_fleet_node_refuses_garbage_and_keeps_serving(mosquitto, fleet, tmp_path):
    """Malformed or misattributed work requests, events and status are refused and counted; the
    fleet node keeps serving."""
    queue = JobQueue(tmp_path / "q.db")
    node = FleetNode(
        host="127.0.0.1",
        port=mosquitto.port,
        store=SqliteStore(queue),
        signing_key=fleet.job_key,
        collector=Collector(vehicles={}, requester_key=fleet.requester, digest_for=lambda *a: None),
    )
    task = asyncio.create_task(node.run())
    try:
        await wait_for(node.ready.is_set, what="fleet ready")
        async with aiomqtt.Client("127.0.0.1", mosquitto.port) as client:
            base = "fleet/v1/vehicles/veh-x"
            await client.publish(f"{base}/work", b"\xff not json", qos=1)
            await client.publish(
                f"{base}/events",
                json.dumps(
                    {"vehicle_id": "veh-other", "kind": "released", "at": time.time()}
                ).encode(),
                qos=1,
            )
            await client.publish(f"{base}/status", b'{"vehicle_id": "veh-x"}', qos=1)
            await client.publish(f"{base}/results", b"EFB1", qos=1)
            await client.publish(f"{base}/work", b"x" * 70_000, qos=1)
            await wait_for(lambda: sum(node.refused.values()) >= 5, what="refusals")
            await client.publish(
                f"{base}/work",
                json.dumps(
                    {
                        "vehicle_id": "veh-x",
                        "request_id": 1,
                        "capacity": 1,
                        "models": [],
                        "sent_at": time.time(),
                    }
                ).encode(),
                qos=1,
            )
            await wait_for(lambda: node.work_requests["veh-x"] == 1, what="still serving")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        queue.close()
    assert node.refused == {
        "work:malformed_payload": 1,
        "events:wrong_vehicle": 1,
        "status:malformed_payload": 1,
        "results:unknown_key": 1,
        "work:oversized": 1,
    }


def test_fleet_serve_refuses_plaintext_to_a_remote_broker(tmp_path):
    """`edge-fleet serve` without --pki talks only to a broker on this machine."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "broker.cli",
            "serve",
            "--queue",
            str(tmp_path / "q.db"),
            "--job-key",
            "k",
            "--requester-key",
            "r",
            "--registry",
            "v",
            "--host",
            "192.0.2.7",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert proc.returncode == ExitCode.USAGE
    assert "refusing plaintext to 192.0.2.7" in proc.stderr


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (None, "cannot read the trust policy"),
        (b"not a policy", "malformed_envelope"),
        ("signed-by-a-stranger", "bad_signature"),
        ("a-result-envelope", "wrong_payload_type"),
    ],
    ids=["missing", "garbage", "not-signed-by-its-roots", "wrong-type"],
)
def test_a_bad_installed_trust_policy_stops_the_agent_at_start(tmp_path, content, needle):
    """The installed policy is the vehicle's trust anchor: missing, unreadable, or not signed by a
    threshold of its own roots, the agent refuses to start and says which file and why."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from agent.assembly import StartupError, build_agent
    from agent.config import load_config
    from agent.wire import envelope
    from tests.support import FleetKeys, write_vehicle

    fleet = FleetKeys()
    files = write_vehicle(tmp_path, "veh-anchor", port=1883, fleet=fleet)
    path = files.config_path.parent / "trust-policy.json"
    if content is None:
        path.unlink()
    elif content == "signed-by-a-stranger":
        path.write_bytes(fleet.policy(signers=[Ed25519PrivateKey.generate()]))
    elif content == "a-result-envelope":
        path.write_bytes(envelope.sign(envelope.RESULT_TYPE, b"{}", fleet.root))
    else:
        path.write_bytes(content)
    with pytest.raises(StartupError) as err:
        build_agent(load_config(files.config_path))
    assert needle in str(err.value) and "trust-policy.json" in str(err.value)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["serve", "--max-failures", "0"], "must be at least 1"),
        (["serve", "--max-failures", "three"], "is not a whole number"),
        (["serve", "--lease-s", "-5"], "must be a positive number of seconds"),
        (["serve", "--lease-s", "inf"], "must be a positive number of seconds"),
        (["submit", "--expires-in", "0"], "must be a positive number of seconds"),
        (["submit", "--expires-in", "soon"], "is not a number"),
        (["submit", "--count", "-1"], "must be at least 1"),
    ],
)
def test_fleet_cli_refuses_bad_bounds_saying_which(tmp_path, args, needle):
    """A failure bound, lease or expiry that is not a positive number is refused by
    `edge-fleet` at once (usage error), naming the value; nothing is started or queued."""
    base = {
        "serve": [
            "--queue",
            str(tmp_path / "q.db"),
            "--job-key",
            "k",
            "--requester-key",
            "r",
            "--registry",
            "v",
        ],
        "submit": ["--queue", str(tmp_path / "q.db"), "--requester-key", "r"],
    }[args[0]]
    proc = subprocess.run(
        [sys.executable, "-m", "broker.cli", args[0], *base, *args[1:]],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr
    assert not (tmp_path / "q.db").exists()
