"""`edge-agent doctor` and `check-config`: each failure they list, provoked and caught.

A car that will not start under systemd should say why before it is started: every case
here is a setup `run` refuses (or that would run and fail later), and doctor must name it
with the fix, exit non-zero, and not call the rest of the setup bad.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import doctor
from agent.kit.exitcodes import ExitCode
from agent.kit.keyfiles import write_private_key
from agent.wire.keys import public_b64
from broker.provision import FleetPki, provision
from tests.adversarial.conftest import OTHER, VID, Rig
from tests.support import MODELS, VehicleFiles

DAY = 86_400.0


def own_tls(files: VehicleFiles, pki: FleetPki, cert_of: str = VID) -> Path:
    """Copies of the TLS files beside the config (so a test may break them), named in it."""
    d = files.config_path.parent / "tls"
    d.mkdir()
    identity = pki.vehicle(cert_of)
    for src, name in (
        (pki.ca, "ca.pem"),
        (identity.cert, "vehicle.pem"),
        (identity.key, "tls.key"),
    ):
        shutil.copy(src, d / name)
    (d / "tls.key").chmod(0o600)
    text = files.config_path.read_text()
    text = text.replace(str(pki.ca), str(d / "ca.pem"))
    text = text.replace(str(pki.vehicle(VID).cert), str(d / "vehicle.pem"))
    text = text.replace(str(pki.vehicle(VID).key), str(d / "tls.key"))
    files.config_path.write_text(text)
    return d


def verdicts(checks: list[doctor.Check]) -> dict[str, list[tuple[doctor.Verdict, str]]]:
    out: dict[str, list[tuple[doctor.Verdict, str]]] = {}
    for c in checks:
        out.setdefault(c.name, []).append((c.verdict, c.detail))
    return out


def only_failure(checks: list[doctor.Check], name: str, words: str) -> None:
    """Exactly the named check fails, saying `words`; everything else passes."""
    bad = [c for c in checks if c.verdict is doctor.Verdict.FAIL]
    assert {c.name for c in bad} == {name}, doctor.render(checks)
    assert any(words in c.detail for c in bad), doctor.render(bad)


def test_a_good_setup_passes_every_check_broker_included(rig: Rig) -> None:
    files = rig.vehicle()
    (files.config_path.parent / "trust-policy.json").write_bytes(rig.fleet.policy(valid_s=30 * DAY))
    key = public_b64(files.key.public_key())
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli", "doctor", "--config", str(files.config_path),
         "--public-key", key],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    names = {line.split()[1] for line in lines}
    assert {"config", "vehicle-key", "registered", "trust", "clock", "tls-identity", "models",
            "broker"} <= names  # fmt: skip
    assert all(line.startswith("OK") for line in lines), proc.stdout
    assert "MQTT CONNECT accepted" in proc.stdout


Break = Callable[[VehicleFiles, Path, FleetPki], None]


def _chmod(path: str, mode: int) -> Break:
    return lambda f, tls, pki: (f.config_path.parent / path).chmod(mode)


def _remove(path: str) -> Break:
    return lambda f, tls, pki: (f.config_path.parent / path).unlink()


def _other_cert(f: VehicleFiles, tls: Path, pki: FleetPki) -> None:
    shutil.copy(pki.vehicle(OTHER).cert, tls / "vehicle.pem")


def _foreign_ca(f: VehicleFiles, tls: Path, pki: FleetPki) -> None:
    other = provision(tls.parent / "other-pki", [VID])
    shutil.copy(other.vehicle(VID).cert, tls / "vehicle.pem")
    shutil.copy(other.vehicle(VID).key, tls / "tls.key")


def _wrong_tls_key(f: VehicleFiles, tls: Path, pki: FleetPki) -> None:
    shutil.copy(pki.vehicle(OTHER).key, tls / "tls.key")


def _garbage_key(f: VehicleFiles, tls: Path, pki: FleetPki) -> None:
    (f.config_path.parent / "vehicle.key").write_text("not a key\n")


def _pin_mismatch(f: VehicleFiles, tls: Path, pki: FleetPki) -> None:
    models = f.config_path.parent / "models"
    shutil.copytree(MODELS, models)
    data = bytearray((models / "digits.onnx").read_bytes())
    data[-1] ^= 0xFF
    (models / "digits.onnx").write_bytes(bytes(data))
    text = f.config_path.read_text().replace(str(MODELS), str(models))
    f.config_path.write_text(text)


def _unsigned_policy(f: VehicleFiles, tls: Path, pki: FleetPki) -> None:
    rogue = Ed25519PrivateKey.generate()
    from tests.support import FleetKeys

    (f.config_path.parent / "trust-policy.json").write_bytes(FleetKeys().policy(signers=[rogue]))


# The last field: whether `run` refuses to start on it, so that check-config (ExecStartPre)
# must fail too. The others it reports as warnings: the agent starts, and says so.
CASES = [
    pytest.param(
        _remove("vehicle.key"), "vehicle-key", "edge-agent keygen --out", True, id="no-key"
    ),
    pytest.param(_chmod("vehicle.key", 0o644), "vehicle-key", "chmod 600", True, id="key-readable"),
    pytest.param(_garbage_key, "vehicle-key", "vehicle.key", True, id="key-garbage"),
    pytest.param(_chmod("agent.toml", 0o664), "config", "chmod go-w", True, id="config-664"),
    pytest.param(_remove("trust-policy.json"), "trust", "missing", True, id="no-policy"),
    pytest.param(_unsigned_policy, "trust", "valid signature", True, id="policy-forged"),
    pytest.param(_remove("tls/ca.pem"), "tls-ca", "missing", True, id="no-ca"),
    pytest.param(_remove("tls/tls.key"), "tls-key", "missing", True, id="no-tls-key"),
    pytest.param(_chmod("tls/tls.key", 0o640), "tls-key", "chmod 600", True, id="tls-key-readable"),
    pytest.param(_other_cert, "tls-identity", "not vehicle.id", True, id="cert-of-another-car"),
    pytest.param(
        _foreign_ca, "tls-identity", "not issued by the CA", False, id="cert-of-another-ca"
    ),
    pytest.param(
        _wrong_tls_key, "tls-identity", "not the certificate's key", True, id="tls-key-mismatch"
    ),
    pytest.param(_pin_mismatch, "models", "left out", False, id="model-pin-mismatch"),
]


@pytest.mark.parametrize(("breaks", "name", "words", "stops_start"), CASES)
def test_each_broken_file_is_named_with_its_fix(
    rig: Rig, breaks: Break, name: str, words: str, stops_start: bool
) -> None:
    files = rig.vehicle()
    tls = own_tls(files, rig.pki)
    assert not doctor.failed(doctor.offline(files.config_path)[0])
    breaks(files, tls, rig.pki)
    checks, _ = doctor.offline(files.config_path)
    only_failure(checks, name, words)
    # check-config (ExecStartPre) refuses what `run` would refuse, so systemd never starts
    # `run` on it; what `run` starts despite, it shows as a warning and passes.
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli", "check-config", str(files.config_path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    if stops_start:
        assert proc.returncode == ExitCode.CONFIG, proc.stdout + proc.stderr
        assert words in proc.stderr
    else:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        warning = next(line for line in proc.stdout.splitlines() if words in line)
        assert warning.startswith("WARN") and "the agent starts anyway" in warning


def test_the_issue_setup_check_config_called_valid_is_refused(rig: Rig, tmp_path: Path) -> None:
    """The case from the field: key, policy, models and TLS files missing, config mode 664."""
    files = rig.vehicle()
    tls = own_tls(files, rig.pki)
    shutil.rmtree(tls)
    (files.config_path.parent / "vehicle.key").unlink()
    (files.config_path.parent / "trust-policy.json").unlink()
    files.config_path.write_text(files.config_path.read_text().replace(str(MODELS), "nowhere"))
    files.config_path.chmod(0o664)
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli", "check-config", str(files.config_path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == ExitCode.CONFIG
    assert "chmod go-w" in proc.stderr
    files.config_path.chmod(0o644)
    checks, _ = doctor.offline(files.config_path)
    failing = {c.name for c in checks if c.verdict is doctor.Verdict.FAIL}
    assert {"vehicle-key", "trust", "tls-ca", "tls-cert", "tls-key", "models"} <= failing


def test_registered_key_mismatch_is_caught(rig: Rig) -> None:
    files = rig.vehicle()
    other = public_b64(Ed25519PrivateKey.generate().public_key())
    only_failure(doctor.offline(files.config_path, registered=other)[0], "registered", other)


def test_policy_expiry_warns_within_a_week_and_fails_after(rig: Rig) -> None:
    files = rig.vehicle()
    policy = files.config_path.parent / "trust-policy.json"
    policy.write_bytes(rig.fleet.policy(valid_s=3 * DAY))
    checks, _ = doctor.offline(files.config_path)
    assert not doctor.failed(checks)
    assert (doctor.Verdict.WARN, "expires in") in [
        (v, d[d.index("expires in") : d.index("expires in") + 10])
        for v, d in verdicts(checks)["trust"]
    ]
    later = time.time() + 4 * DAY
    only_failure(doctor.offline(files.config_path, clock=lambda: later)[0], "trust", "expired")
    # check-config must not keep an agent with an expired installed policy from starting:
    # it holds a newer one from the state database, or receives one over MQTT.
    policy.write_bytes(rig.fleet.policy(now=time.time() - 10 * DAY, valid_s=3 * DAY))
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli", "check-config", str(files.config_path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert any(line.startswith("WARN") and "expired" in line for line in proc.stdout.splitlines())


def test_a_clock_behind_the_policy_and_an_expired_certificate(rig: Rig) -> None:
    files = rig.vehicle()
    policy = files.config_path.parent / "trust-policy.json"
    policy.write_bytes(rig.fleet.policy(now=time.time() + 2 * DAY, valid_s=30 * DAY))
    only_failure(doctor.offline(files.config_path)[0], "clock", "timedatectl")
    future = time.time() + 5 * 365 * DAY
    (files.config_path.parent / "trust-policy.json").write_bytes(
        rig.fleet.policy(valid_s=10 * 365 * DAY)
    )
    checks, _ = doctor.offline(files.config_path, clock=lambda: future)
    only_failure(checks, "tls-identity", "expired")


@pytest.mark.parametrize("where", ["closed-port", "plaintext-for-tls"])
def test_an_unreachable_or_wrong_broker_fails_within_the_timeout(
    rig: Rig, mosquitto, where: str
) -> None:
    files = rig.vehicle()
    if where == "closed-port":
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    else:
        port = mosquitto.port  # a plaintext broker: the TLS handshake fails
    files.config_path.write_text(
        files.config_path.read_text().replace(f"port = {rig.port}", f"port = {port}")
    )
    started = time.monotonic()
    checks = doctor.doctor(files.config_path, timeout_s=2.0)
    assert time.monotonic() - started < 10
    only_failure(checks, "broker", f"localhost:{port}")


def test_pubkey_prints_what_register_takes_and_refuses_a_bad_file(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    write_private_key(tmp_path / "vehicle.key", key)
    ok = subprocess.run(
        [sys.executable, "-m", "agent.cli", "pubkey", str(tmp_path / "vehicle.key")],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert ok.returncode == 0 and ok.stdout.strip() == public_b64(key.public_key())
    (tmp_path / "bad.key").write_text("nope")
    bad = subprocess.run(
        [sys.executable, "-m", "agent.cli", "pubkey", str(tmp_path / "bad.key")],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert bad.returncode == ExitCode.CONFIG and "bad.key" in bad.stderr


def test_keys_handed_over_by_systemd_pass_the_mode_check_only_there(
    rig: Rig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """systemd 257 hands credentials over with mode 440 (the service's group) in a folder
    only the service can enter: fine there, and still refused anywhere else."""
    files = rig.vehicle()
    creds = tmp_path / "creds"
    creds.mkdir()
    shutil.copy(files.config_path.parent / "vehicle.key", creds / "vehicle.key")
    (creds / "vehicle.key").chmod(0o440)
    text = files.config_path.read_text()
    files.config_path.write_text(
        text.replace(
            'vehicle_key = "vehicle.key"', 'vehicle_key = "${CREDENTIALS_DIRECTORY}/vehicle.key"'
        )
    )
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert "vehicle-key" not in {
        c.name for c in doctor.offline(files.config_path)[0] if c.verdict is doctor.Verdict.FAIL
    }
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    (files.config_path.parent / "credentials").mkdir()
    shutil.copy(creds / "vehicle.key", files.config_path.parent / "credentials" / "vehicle.key")
    only_failure(doctor.offline(files.config_path)[0], "vehicle-key", "chmod 600")
