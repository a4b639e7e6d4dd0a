"""The one builder of a vehicle's `agent.toml`, for everything that writes one: the demo's
cars, the test suite and the benchmarks. Sections and keys are those of docs/config.md;
callers override values per section (None removes a key) and may append raw lines.

Hand-written because the format needed is tiny (tables of scalars) and tomllib reads
but does not write; a TOML writer dependency would be larger than this module.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from broker.provision import FleetPki

SECTIONS = ("owner", "vehicle", "limits", "broker", "keys", "models", "state", "agent")


def broker_settings(pki: FleetPki | None, vehicle_id: str, port: int) -> dict[str, Any]:
    """The `[broker]` keys: mutual TLS with this PKI's identity for `vehicle_id`, or, without
    a PKI, plaintext to a private broker on loopback."""
    if pki is None:
        return {"tls": False, "host": "127.0.0.1", "port": port}
    identity = pki.vehicle(vehicle_id)
    return {
        "tls": True,
        "host": "localhost",
        "port": port,
        "ca_file": str(pki.ca),
        "cert_file": str(identity.cert),
        "key_file": str(identity.key),
    }


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, dt.date):
        return v.isoformat()
    if isinstance(v, Path):
        return json.dumps(str(v))
    if isinstance(v, str):
        return json.dumps(v)  # a TOML basic string: JSON's escapes are TOML's
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    raise TypeError(f"no TOML form for {type(v).__name__}")


def agent_toml(
    vehicle_id: str,
    *,
    port: int,
    scenario: Path,
    models: Path,
    pki: FleetPki | None = None,
    trust: str = "policy",
    settings: Mapping[str, Mapping[str, Any]] | None = None,
    raw: Mapping[str, str] | None = None,
    header: str = "",
) -> str:
    """A vehicle's config. `trust`: "policy" (a root-signed trust-policy.json, as on a car)
    or "keys" (a fixed trusted-job-keys.json, a bench rig's). `settings` overrides keys per
    section; `raw` appends lines to a section as written."""
    sections: dict[str, dict[str, Any]] = {
        "owner": {
            "opted_in": True,
            "consent_version": "2026-11",
            "consent_date": dt.date(2026, 11, 1),
        },
        "vehicle": {"id": vehicle_id, "scenario": scenario},
        "limits": {"max_compute_temp_c": 85.0, "resume_compute_temp_c": 80.0, "gate_hold_s": 0.0},
        "broker": broker_settings(pki, vehicle_id, port),
        "keys": {
            "vehicle_key": "vehicle.key",
            **(
                {"trust_policy": "trust-policy.json"}
                if trust == "policy"
                else {"trusted_job_keys": "trusted-job-keys.json"}
            ),
        },
        "models": {"dir": models},
        "state": {"dir": "state"},
        "agent": {},
    }
    for name, values in (settings or {}).items():
        if name not in sections:
            raise ValueError(f"agent.toml has no section [{name}]")
        for key, value in values.items():
            if value is None:
                sections[name].pop(key, None)
            else:
                sections[name][key] = value
    lines = [f"# {header}"] if header else []
    for name in SECTIONS:
        lines.append(f"[{name}]")
        lines += [f"{key} = {_value(value)}" for key, value in sections[name].items()]
        if raw and raw.get(name):
            lines.append(raw[name].strip("\n"))
        lines.append("")
    return "\n".join(lines)
