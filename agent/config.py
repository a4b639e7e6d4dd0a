"""The owner's config: a TOML file an owner or rig operator edits by hand.

Parsed once, strictly: unknown keys and impossible values are refused, and
every error names the key, the bad value and what is allowed. Relative paths
are taken relative to the file's own folder. Environment variables named
EDGE_AGENT_<SECTION>__<KEY> override the file (for systemd `Environment=`).
docs/config.md documents every key.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import tomllib
import zoneinfo
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from agent.core.schedule import AllowedHours, parse_window
from agent.kit.credentials import BrokerLogin, load_login
from agent.kit.mqtt import is_loopback
from agent.wire.codec import REGEX_ENGINE, exactly
from agent.wire.topics import VEHICLE_ID_PATTERN

DEFAULT_PATH = Path("/etc/edge-agent/agent.toml")


class ConfigError(Exception):
    """Raised when the config file is missing, not TOML, or has keys or values that are not allowed."""

    def __init__(self, path: Path, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"config {path} is not valid:\n{lines}")


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", regex_engine=REGEX_ENGINE)


class OwnerSection(_Section):
    opted_in: bool = Field(default=False, strict=True)  # a TOML true/false, never "yes"
    consent_version: str = ""
    consent_date: dt.date | None = None
    timezone: str = "UTC"
    hours: dict[Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"], tuple[str, ...]] = {}
    accepted_issuers: tuple[str, ...] = ()
    accepted_job_classes: tuple[str, ...] = ()

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"unknown time zone {value!r}: use an IANA name such as 'Europe/Berlin'"
            ) from None
        return value

    @field_validator("hours")
    @classmethod
    def _windows(cls, value: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
        for day, windows in value.items():
            for window in windows:
                try:
                    parse_window(window)
                except ValueError as exc:
                    raise ValueError(f"{day}: {exc}") from None
        return value

    @field_validator("accepted_issuers")
    @classmethod
    def _key_ids(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for kid in value:
            if not re.fullmatch(r"[0-9a-f]{16}", kid):
                raise ValueError(f"{kid!r} is not a key id (16 lowercase hex characters)")
        return value

    @model_validator(mode="after")
    def _consent_recorded(self) -> OwnerSection:
        if self.opted_in and (not self.consent_version or self.consent_date is None):
            raise ValueError(
                "opted_in = true needs consent_version and consent_date: "
                "record which consent text the owner agreed to and when"
            )
        return self

    @property
    def zone(self) -> zoneinfo.ZoneInfo:
        return zoneinfo.ZoneInfo(self.timezone)

    @property
    def allowed_hours(self) -> AllowedHours:
        return AllowedHours.from_config({str(day): windows for day, windows in self.hours.items()})


class VehicleSection(_Section):
    id: str = Field(pattern=exactly(VEHICLE_ID_PATTERN))
    source: Literal["emulated", "host"] = "emulated"
    scenario: Path | None = None
    time_scale: float = Field(default=1.0, gt=0, le=10_000)
    control_socket: Path | None = None


class SensorsSection(_Section):
    """Where a rig's real sensors are read (used when vehicle.source = "host")."""

    sysfs_root: Path = Path("/")
    power: Literal["auto", "rapl", "ina3221", "pmic", "none"] = "auto"
    vcgencmd: str = "vcgencmd"
    compute_max_w: float | None = Field(default=None, gt=0, le=2000)


class LimitsSection(_Section):
    min_soc_pct: float = Field(default=20.0, ge=0, lt=100)
    resume_soc_pct: float = Field(default=25.0, gt=0, le=100)
    max_battery_temp_c: float = Field(default=45.0, gt=0, le=80)
    resume_battery_temp_c: float = Field(default=40.0, gt=-40, le=80)
    max_compute_temp_c: float = Field(default=80.0, gt=0, le=120)
    resume_compute_temp_c: float = Field(default=75.0, gt=-40, le=120)
    gate_hold_s: float = Field(default=30.0, ge=0, le=3600)
    power_cap_w: float = Field(default=15.0, gt=0, le=2000)
    daily_energy_wh: float = Field(default=100.0, gt=0, le=100_000)

    @model_validator(mode="after")
    def _resume_inside_limits(self) -> LimitsSection:
        pairs = (
            (
                "resume_compute_temp_c",
                self.resume_compute_temp_c,
                "max_compute_temp_c",
                self.max_compute_temp_c,
            ),
            (
                "resume_battery_temp_c",
                self.resume_battery_temp_c,
                "max_battery_temp_c",
                self.max_battery_temp_c,
            ),
        )
        for rname, rvalue, mname, mvalue in pairs:
            if rvalue >= mvalue:
                raise ValueError(
                    f"{rname} ({rvalue}) must be below {mname} ({mvalue}), "
                    "or the gate would reopen while still too hot"
                )
        if self.resume_soc_pct <= self.min_soc_pct:
            raise ValueError(
                f"resume_soc_pct ({self.resume_soc_pct}) must be above min_soc_pct "
                f"({self.min_soc_pct}), or the gate would reopen while the battery is too low"
            )
        return self


class BrokerSection(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=8883, ge=1, le=65535)
    keepalive_s: int = Field(default=30, ge=5, le=3600)
    tls: bool = True
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    # A login, for a broker that authenticates by user name (certificates stay the default).
    # The password or token lives alone in a file, e.g. "${CREDENTIALS_DIRECTORY}/broker-password"
    # under systemd's LoadCredential=; it is read at each connection, never kept in here.
    username: str | None = Field(default=None, min_length=1, max_length=256)
    password_file: Path | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_inline_secret(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in ("password", "token", "secret"):
                if key in data:
                    raise ValueError(
                        f"`{key}` is never written in the config (configs end up in backups "
                        "and bug reports): put it alone in a file only the agent can read and "
                        'name it with password_file, e.g. "${CREDENTIALS_DIRECTORY}/'
                        'broker-password" with LoadCredential= in the unit'
                    )
        return data

    @model_validator(mode="after")
    def _tls_or_local_test(self) -> BrokerSection:
        if self.password_file is not None and self.username is None:
            raise ValueError("password_file needs a username to go with it")
        if self.tls:
            # With a login, the certificate pair is optional (the broker checks the login).
            wanted = ("ca_file",) if self.username else ("ca_file", "cert_file", "key_file")
            missing = [k for k in wanted if getattr(self, k) is None]
            if missing:
                raise ValueError(
                    f"tls = true needs {', '.join(missing)}: the fleet CA, and this vehicle's "
                    "certificate and key from `edge-fleet provision` (or a username for a "
                    "broker that takes a login)"
                )
            if (self.cert_file is None) != (self.key_file is None):
                raise ValueError("cert_file and key_file go together: give both or neither")
        elif not is_loopback(self.host):
            raise ValueError(
                f"tls = false is only for a test broker on this machine, not {self.host!r}: "
                "set ca_file, cert_file and key_file and keep tls = true"
            )
        return self

    def login(self) -> BrokerLogin | None:
        """The login, with its secret read now; CredentialError if it cannot be read."""
        return load_login(self.username, self.password_file)


class KeysSection(_Section):
    vehicle_key: Path
    trust_policy: Path | None = None
    trusted_job_keys: Path | None = None

    @model_validator(mode="after")
    def _one_trust_anchor(self) -> KeysSection:
        if (self.trust_policy is None) == (self.trusted_job_keys is None):
            raise ValueError(
                "name exactly one of trust_policy (the fleet's root-signed policy, for vehicles) "
                "or trusted_job_keys (a fixed key list, for a bench rig)"
            )
        return self


class ModelsSection(_Section):
    dir: Path
    max_bytes: int = Field(default=256 * 1024 * 1024, ge=1024, le=8 * 1024**3)
    allowed_domains: tuple[str, ...] = ("", "ai.onnx", "ai.onnx.ml")

    @field_validator("allowed_domains")
    @classmethod
    def _domains(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for domain in value:
            if not re.fullmatch(r"[A-Za-z0-9_.-]{0,128}", domain):
                raise ValueError(f"{domain!r} is not an operator domain name")
        return value


class StateSection(_Section):
    dir: Path = Path("/var/lib/edge-agent")


class AgentSection(_Section):
    capacity: int = Field(default=2, ge=1, le=64)
    work_request_interval_s: float = Field(default=2.0, gt=0, le=600)
    vehicle_poll_s: float = Field(default=0.1, ge=0.005, le=10)
    closed_poll_s: float = Field(default=1.0, ge=0.005, le=60)
    max_message_bytes: int = Field(default=1024 * 1024, ge=1024, le=64 * 1024 * 1024)
    max_input_bytes: int = Field(default=4 * 1024 * 1024, ge=1, le=64 * 1024 * 1024)
    max_clock_skew_s: float = Field(default=60.0, ge=0, le=3600)
    intra_op_threads: int = Field(default=1, ge=1, le=64)
    worker_memory_mb: int = Field(default=2048, ge=256, le=1_048_576)
    worker_idle_s: float = Field(default=10.0, ge=0, le=3600)
    duty_slot_s: float = Field(default=0.1, ge=0.01, le=2.0)
    governor_period_s: float = Field(default=0.5, ge=0.05, le=10.0)
    outbox_max: int = Field(default=500, ge=1, le=1_000_000)
    metrics_port: int = Field(default=0, ge=0, le=65535)  # 0: no endpoint, nothing recorded
    heartbeat_s: float = Field(default=10.0, ge=0.1, le=3600)
    # "lean": a job that succeeds costs the job, its result and a work request on the wire
    # (accepted, running and succeeded stay on the car); "all": every event is published
    # (for watching jobs on the broker while debugging). agent/wire/messages.FOLDED_EVENTS.
    job_events: Literal["lean", "all"] = "lean"
    shutdown_grace_s: float = Field(default=5.0, ge=0, le=300)
    # onnxruntime execution providers in order of preference; those the installed build
    # lacks are skipped (logged), and the CPU is always the last fallback.
    execution_providers: tuple[str, ...] = ("CPUExecutionProvider",)

    @field_validator("execution_providers")
    @classmethod
    def _provider_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for name in value:
            if not re.fullmatch(r"[A-Za-z][A-Za-z0-9]{0,62}ExecutionProvider", name):
                raise ValueError(
                    f"{name!r} is not an onnxruntime execution provider name "
                    "(e.g. CUDAExecutionProvider, TensorrtExecutionProvider, CPUExecutionProvider)"
                )
        return value


class AgentConfig(BaseModel):
    """The whole file. Sections: owner, vehicle, sensors, limits, broker, keys, models, state, agent."""

    model_config = ConfigDict(frozen=True, extra="forbid", regex_engine=REGEX_ENGINE)

    owner: OwnerSection = OwnerSection()
    vehicle: VehicleSection
    sensors: SensorsSection = SensorsSection()
    limits: LimitsSection = LimitsSection()
    broker: BrokerSection
    keys: KeysSection
    models: ModelsSection
    state: StateSection = StateSection()
    agent: AgentSection = AgentSection()

    @model_validator(mode="after")
    def _shipped_models_apart_from_installed(self) -> AgentConfig:
        if self.models.dir == self.state.dir / "models":
            raise ValueError(
                f"models.dir {self.models.dir} is where installed models live "
                "(<state.dir>/models): point it at the shipped, read-only models instead "
                "(e.g. /usr/share/edge-agent/models)"
            )
        return self


ENV_PREFIX = "EDGE_AGENT_"
SECTIONS = tuple(AgentConfig.model_fields)


def _env_value(text: str) -> Any:
    """An environment value read as a TOML value (`true`, `1884`, `["a", "b"]`, `"x"`), or,
    when it is not one (`broker.example`), as the string itself."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def env_overrides(
    environ: Mapping[str, str],
) -> tuple[dict[str, dict[str, Any]], dict[str, str], list[str]]:
    """The file's keys overridden from the environment (for a systemd drop-in's `Environment=`):
    EDGE_AGENT_<SECTION>__<KEY>=VALUE, names in any case. Returns the overrides as sections of
    the file, which variable set each `section.key`, and the problems: a variable with our
    prefix that names no section and key is refused rather than a misspelling ignored.

    Written here rather than taken from pydantic-settings: this rule is all the daemon needs
    from it, and the daemon has a 50 MB memory budget with little room (docs/performance.md).
    """
    sections: dict[str, dict[str, Any]] = {}
    origin: dict[str, str] = {}
    problems = []
    for name in sorted(environ):
        if not name.upper().startswith(ENV_PREFIX):
            continue
        section, sep, key = name[len(ENV_PREFIX) :].lower().partition("__")
        if not sep or not key or "__" in key:
            problems.append(
                f"environment variable {name}: expected {ENV_PREFIX}<SECTION>__<KEY>, "
                f"e.g. {ENV_PREFIX}BROKER__PORT=1884"
            )
        elif section not in SECTIONS:
            problems.append(
                f"environment variable {name}: no section `{section}` "
                f"(sections: {', '.join(SECTIONS)})"
            )
        else:
            sections.setdefault(section, {})[key] = _env_value(environ[name])
            origin[f"{section}.{key}"] = name
    return sections, origin, problems


def _overlay(data: dict[str, Any], overrides: dict[str, dict[str, Any]]) -> None:
    for section, keys in overrides.items():
        table = data.setdefault(section, {})
        if isinstance(table, dict):
            table.update(keys)


_PATH_KEYS = (
    ("vehicle", "scenario"),
    ("vehicle", "control_socket"),
    ("sensors", "sysfs_root"),
    ("broker", "ca_file"),
    ("broker", "cert_file"),
    ("broker", "key_file"),
    ("broker", "password_file"),
    ("keys", "vehicle_key"),
    ("keys", "trusted_job_keys"),
    ("keys", "trust_policy"),
    ("models", "dir"),
    ("state", "dir"),
)


CREDENTIALS = "${CREDENTIALS_DIRECTORY}"


def credentials_dir(base: Path, environ: Mapping[str, str]) -> Path:
    """Where `${CREDENTIALS_DIRECTORY}` in a path points: systemd's credentials folder under the
    unit (LoadCredential=), else `credentials/` beside the config, the folder the packaged unit
    loads them from, so that `check-config` and `doctor` run by root see the same files."""
    loaded = environ.get("CREDENTIALS_DIRECTORY")
    return Path(loaded) if loaded else base / "credentials"


def _resolve_paths(data: dict[str, Any], base: Path, environ: Mapping[str, str]) -> None:
    for section, key in _PATH_KEYS:
        table = data.get(section)
        if isinstance(table, dict) and isinstance(table.get(key), str):
            text = table[key].replace(CREDENTIALS, str(credentials_dir(base, environ)))
            table[key] = str((base / text).resolve())


def _describe(err: Any, origin: dict[str, str]) -> str:
    loc = ".".join(str(p) for p in err["loc"] if p != "[key]")
    if loc in origin:
        return f"{_problem(err, loc)} (set by the environment variable {origin[loc]})"
    return _problem(err, loc)


def _problem(err: Any, loc: str) -> str:
    if "[key]" in err["loc"]:
        return f"`{loc}`: unknown key: {err['msg']}"
    if err["type"] == "extra_forbidden":
        return f"`{loc}`: unknown key (check its spelling; docs/config.md lists every key)"
    if err["type"] == "missing":
        return f"`{loc}`: required key is missing"
    value = err.get("input")
    if err["type"] in ("bool_type", "bool_parsing"):
        return f"`{loc}` = {value!r}: must be true or false (a TOML boolean, without quotes)"
    msg = str(err["msg"]).removeprefix("Value error, ")
    if isinstance(value, dict):
        return f"`{loc or '(file)'}`: {msg}"
    return f"`{loc}` = {value!r}: {msg}"


def parse_config(text: str, *, path: Path, environ: Mapping[str, str] | None = None) -> AgentConfig:
    """Parse config text (the file at `path`) with the environment's overrides (`environ`,
    os.environ by default); raise ConfigError listing every problem."""
    environ = os.environ if environ is None else environ
    overrides, origin, problems = env_overrides(environ)
    if problems:
        raise ConfigError(path, problems)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, [f"not valid TOML: {exc}"]) from None
    _overlay(data, overrides)
    _resolve_paths(data, path.parent, environ)
    try:
        return AgentConfig(**data)
    except ValidationError as exc:
        raise ConfigError(path, [_describe(e, origin) for e in exc.errors()]) from None


def load_config(path: Path) -> AgentConfig:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(path, [f"cannot read the file: {exc.strerror}"]) from None
    except UnicodeDecodeError:
        raise ConfigError(path, ["the file is not UTF-8 text"]) from None
    return parse_config(text, path=path)
