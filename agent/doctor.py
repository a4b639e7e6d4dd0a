"""`edge-agent doctor` and `edge-agent check-config`: everything `run` would refuse, said first.

One line per check, OK, WARN or FAIL, each FAIL with the fix. `check-config` (the unit's
ExecStartPre) runs the offline checks: the schema, the files and their modes, the keys, the
TLS files, the trust policy and the model pins; it fails only on what `run` refuses at start
(`Check.stops_start`) and reports the rest as warnings, so that an expired policy never
keeps the agent from starting and receiving a fresh one. `doctor`
adds what needs the outside world: the broker (a TLS handshake and an MQTT CONNECT within a
timeout), and compares the vehicle key with the public key the fleet registered.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from agent.assembly import StartupError, check_file_permissions
from agent.config import AgentConfig, ConfigError, load_config
from agent.core.trust import Trust
from agent.inference.store import ModelStore, ModelStoreError
from agent.kit.credentials import CredentialError
from agent.kit.keyfiles import KeyFileError, load_signing_key
from agent.kit.mqtt import client_tls, permanent_refusal
from agent.wire.errors import WireError
from agent.wire.keys import public_b64

DAY_S = 86_400.0
POLICY_WARN_S = 7 * DAY_S


class Verdict(enum.Enum):
    OK = "OK"
    WARN = "WARN"
    FAIL = "FAIL"


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    verdict: Verdict
    detail: str
    # Whether `run` refuses to start on this failure. check-config (ExecStartPre) fails only
    # on these: an expired policy, a model left out or a certificate for the wrong name leave
    # an agent that starts, says so, and can be mended over the wire (a fresh policy).
    stops_start: bool = True


def ok(name: str, detail: str) -> Check:
    return Check(name, Verdict.OK, detail)


def fail(name: str, detail: str, *, stops_start: bool = True) -> Check:
    return Check(name, Verdict.FAIL, detail, stops_start)


def warn(name: str, detail: str) -> Check:
    return Check(name, Verdict.WARN, detail)


def render(checks: list[Check]) -> str:
    return "\n".join(f"{c.verdict.value:<4}  {c.name:<13} {c.detail}" for c in checks)


def failed(checks: list[Check]) -> bool:
    return any(c.verdict is Verdict.FAIL for c in checks)


def for_start(checks: list[Check]) -> list[Check]:
    """The checks as check-config reports them: a failure `run` starts despite is a warning."""
    return [
        c
        if c.verdict is not Verdict.FAIL or c.stops_start
        else warn(c.name, f"{c.detail} (the agent starts anyway)")
        for c in checks
    ]


def _file(name: str, path: Path, what: str, *, secret: bool, fix: str) -> Check:
    if not path.exists():
        return fail(name, f"{what} {path} is missing; {fix}")
    if not path.is_file():
        return fail(name, f"{what} {path} is not a file")
    try:
        check_file_permissions(path, what, secret=secret)
    except StartupError as exc:
        return fail(name, str(exc))
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        return fail(name, f"cannot read {what} {path}: {exc.strerror}")
    return ok(name, f"{path}")


def _config(path: Path) -> tuple[Check, AgentConfig | None]:
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        return fail("config", str(exc).replace("\n", "\n" + " " * 20)), None
    try:
        check_file_permissions(path, "the config", secret=False)
    except StartupError as exc:
        return fail("config", str(exc)), None
    state = "opted in" if cfg.owner.opted_in else "NOT opted in: nothing will run"
    return ok("config", f"{path}: valid (vehicle {cfg.vehicle.id}, owner {state})"), cfg


def _vehicle_key(cfg: AgentConfig, registered: str | None) -> Iterator[Check]:
    path = cfg.keys.vehicle_key
    check = _file(
        "vehicle-key", path, "the vehicle key", secret=True, fix=f"edge-agent keygen --out {path}"
    )
    if check.verdict is not Verdict.OK:
        yield check
        return
    try:
        key = load_signing_key(path)
    except KeyFileError as exc:
        yield fail("vehicle-key", str(exc))
        return
    public = public_b64(key.public_key())
    yield ok("vehicle-key", f"{path} (public key {public})")
    if registered is not None:
        if registered.strip() == public:
            yield ok("registered", "the vehicle key is the one the fleet registered")
        else:
            yield fail(
                "registered",
                f"the vehicle key's public key {public} is not the registered {registered.strip()}:"
                " results would be refused; register this one (edge-fleet register) or restore "
                "the key that was registered",
                stops_start=False,
            )


def _trust(cfg: AgentConfig, now: float) -> Iterator[Check]:
    keys = cfg.keys
    if keys.trusted_job_keys is not None:
        yield _file(
            "trust",
            keys.trusted_job_keys,
            "the trusted job keys",
            secret=False,
            fix="copy the fleet's trusted-job-keys.json there",
        )
        return
    assert keys.trust_policy is not None  # the config's validator demands one of the two
    check = _file(
        "trust",
        keys.trust_policy,
        "the trust policy",
        secret=False,
        fix="copy the fleet's signed policy there (edge-fleet policy sign)",
    )
    if check.verdict is not Verdict.OK:
        yield check
        return
    try:
        trust, _ = Trust.from_policy(keys.trust_policy.read_bytes(), None, now)
    except WireError as exc:
        yield fail("trust", f"the trust policy {keys.trust_policy}: {exc.detail}")
        return
    held = trust.policy
    assert held is not None
    policy = held.policy
    left = policy.expires_at - now
    if left <= 0:
        yield fail(
            "trust",
            f"trust policy v{policy.version} (the installed file) expired "
            f"{-left / DAY_S:.1f} days ago: no job runs until a fresh one arrives from the "
            "fleet (over MQTT, or installed here)",
            stops_start=False,
        )
    elif left < POLICY_WARN_S:
        yield warn(
            "trust",
            f"trust policy v{policy.version} expires in {left / DAY_S:.1f} days; the fleet "
            "should publish a newer one (edge-fleet policy publish)",
        )
    else:
        yield ok("trust", f"trust policy v{policy.version}, expires in {left / DAY_S:.0f} days")
    skew = cfg.agent.max_clock_skew_s
    if now + skew < policy.issued_at:
        yield fail(
            "clock",
            f"this clock reads {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(now))} UTC, before "
            f"the trust policy was issued ({time.strftime('%Y-%m-%d %H:%M', time.gmtime(policy.issued_at))}"
            " UTC): set the time (timedatectl set-ntp true)",
            stops_start=False,
        )
    else:
        yield ok("clock", "not behind the trust policy's issue time")


def _certificate(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _login(cfg: AgentConfig) -> Iterator[Check]:
    b = cfg.broker
    if b.username is None:
        return
    try:
        login = b.login()
    except CredentialError as exc:
        yield fail("broker-login", str(exc))
        return
    secret = f"a password from {b.password_file}" if login and login.password else "no password"
    yield ok("broker-login", f"user {b.username!r}, {secret}")


def _tls(cfg: AgentConfig, now: float) -> Iterator[Check]:
    b = cfg.broker
    if not b.tls:
        yield ok("tls", f"off (a test broker on this machine, {b.host})")
        return
    assert b.ca_file is not None
    fix = "copy it from the fleet's `edge-fleet provision` folder (docs/install.md)"
    if b.cert_file is None or b.key_file is None:  # a login instead of a certificate identity
        yield _file("tls-ca", b.ca_file, "the fleet CA", secret=False, fix=fix)
        return
    files = [
        _file("tls-ca", b.ca_file, "the fleet CA", secret=False, fix=fix),
        _file("tls-cert", b.cert_file, "the vehicle certificate", secret=False, fix=fix),
        _file("tls-key", b.key_file, "the TLS key", secret=True, fix=fix),
    ]
    yield from files
    if any(c.verdict is not Verdict.OK for c in files):
        return
    try:
        ca = _certificate(b.ca_file)
        cert = _certificate(b.cert_file)
        key = serialization.load_pem_private_key(b.key_file.read_bytes(), password=None)
    except ValueError as exc:
        yield fail("tls-files", f"a TLS file does not parse: {exc}")
        return
    problems = []
    names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    cn = str(names[0].value) if names else ""
    if cn != cfg.vehicle.id:
        problems.append(
            f"the certificate is for {cn!r}, not vehicle.id {cfg.vehicle.id!r}: the broker's "
            "ACL would confine this car to another car's topics; use this vehicle's certificate"
        )
    if now >= cert.not_valid_after_utc.timestamp():
        problems.append(
            f"the certificate expired on {cert.not_valid_after_utc:%Y-%m-%d}; get a new one "
            "(edge-fleet provision --vehicle ID)"
        )
    if now < cert.not_valid_before_utc.timestamp():
        problems.append(
            f"the certificate is valid only from {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC: "
            "check this clock"
        )
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        problems.append(
            f"the certificate is not issued by the CA in {b.ca_file}: {exc or 'bad signature'}"
        )
    matched = key.public_key() == cert.public_key()
    if not matched:  # the TLS context cannot load the pair: `run` refuses to start
        yield fail("tls-identity", f"the key in {b.key_file} is not the certificate's key")
    yield from (fail("tls-identity", p, stops_start=False) for p in problems)
    if matched and not problems:
        yield ok(
            "tls-identity",
            f"CN {cn}, issued by the fleet CA, valid until {cert.not_valid_after_utc:%Y-%m-%d}",
        )


def _models(cfg: AgentConfig) -> Iterator[Check]:
    try:
        store = ModelStore.open(
            cfg.models.dir,
            installed=cfg.state.dir / "models",
            allowed_domains=frozenset(cfg.models.allowed_domains),
            max_bytes=cfg.models.max_bytes,
        )
    except ModelStoreError as exc:
        yield fail("models", str(exc))
        return
    for problem in store.problems:
        yield fail("models", f"left out: {problem}", stops_start=False)
    if store.held:
        yield ok(
            "models", f"{len(store.held)} pinned and matching: {', '.join(sorted(store.held))}"
        )
    else:
        yield warn("models", f"no model in {cfg.models.dir}: the car can run no job")


def _state(cfg: AgentConfig) -> Check:
    folder = cfg.state.dir
    if folder.exists():
        return ok("state", f"{folder}")
    if folder.parent.is_dir():
        return ok("state", f"{folder} is created at the first start (systemd's StateDirectory=)")
    return fail("state", f"neither {folder} nor its parent folder exists")


def offline(
    path: Path, *, registered: str | None = None, clock: Callable[[], float] = time.time
) -> tuple[list[Check], AgentConfig | None]:
    """Every check that needs nothing but this machine (what `check-config` runs)."""
    check, cfg = _config(path)
    if cfg is None:
        return [check], None
    now = clock()
    checks = [check]
    checks.extend(_vehicle_key(cfg, registered))
    checks.extend(_trust(cfg, now))
    checks.extend(_tls(cfg, now))
    checks.extend(_login(cfg))
    checks.extend(_models(cfg))
    checks.append(_state(cfg))
    return checks, cfg


async def broker(cfg: AgentConfig, *, timeout_s: float = 5.0) -> Check:
    """A TLS handshake and an MQTT CONNECT with the car's identity, under another client id
    (`<id>-doctor`) so that a running agent's session is not taken over."""
    b = cfg.broker
    where = f"{b.host}:{b.port}"
    tls = None
    if b.tls:
        try:
            tls = client_tls(b.ca_file, b.cert_file, b.key_file)  # type: ignore[arg-type]
        except (OSError, ssl.SSLError) as exc:
            return fail("broker", f"cannot build the TLS context: {exc}")
    try:
        login = b.login()
    except CredentialError as exc:
        return fail("broker", f"not tried: {exc}")
    client = aiomqtt.Client(
        b.host,
        b.port,
        username=login.username if login else None,
        password=login.password if login else None,
        identifier=f"{cfg.vehicle.id}-doctor",
        tls_context=tls,
        timeout=timeout_s,
        keepalive=b.keepalive_s,
    )
    started = time.monotonic()
    try:
        async with asyncio.timeout(timeout_s):
            # The handshake on its own first, so that a TLS failure is told apart (and its
            # socket closed here, not left to paho).
            _, writer = await asyncio.open_connection(
                b.host, b.port, ssl=tls, server_hostname=b.host if tls else None
            )
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()
            async with client:
                pass
    except TimeoutError:
        return fail("broker", f"no answer from {where} within {timeout_s:g} s")
    except ssl.SSLError as exc:
        return fail(
            "broker",
            f"TLS with {where} failed: {exc.reason or exc}; is it the fleet's TLS port, and "
            "is ca_file the fleet CA?",
        )
    except (aiomqtt.MqttError, OSError) as exc:
        refusal = permanent_refusal(exc)
        if refusal is None:
            return fail(
                "broker",
                f"cannot connect to {where}: {exc}; check [broker] host and port, the network, "
                "and that the broker runs",
            )
        return fail(
            "broker",
            f"{where}: refused by the broker: {refusal}; check [broker] username and "
            "password_file (or this vehicle's certificate) against the broker's accounts "
            "and ACL",
        )
    ms = (time.monotonic() - started) * 1000
    return ok(
        "broker", f"{where}: {'TLS and ' if b.tls else ''}MQTT CONNECT accepted in {ms:.0f} ms"
    )


def doctor(
    path: Path,
    *,
    registered: str | None = None,
    timeout_s: float = 5.0,
    clock: Callable[[], float] = time.time,
) -> list[Check]:
    checks, cfg = offline(path, registered=registered, clock=clock)
    if cfg is not None:
        checks.append(asyncio.run(broker(cfg, timeout_s=timeout_s)))
    return checks
