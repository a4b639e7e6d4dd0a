"""`edge-agent`: the vehicle side's command line.

edge-agent run [--config PATH]        serve (the systemd service runs this)
edge-agent check-config PATH          check a config and the files it names (offline)
edge-agent doctor [--config PATH] [--public-key B64]
                                      everything `run` needs, the broker included
edge-agent pubkey KEYFILE             the public key of a vehicle key, for edge-fleet register
edge-agent keygen --out PATH          make the vehicle's Ed25519 signing key
edge-agent models add FILE --name N --sha256 HEX [--config PATH]
                                      install a model into the state directory's store:
                                      staged, checked against the pin, inspected, moved in
edge-agent models list [--config PATH]
                                      the models the agent will hold, and any left out
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import __version__
from agent.config import DEFAULT_PATH, ConfigError, load_config
from agent.kit import logs
from agent.kit.exitcodes import ExitCode
from agent.kit.keyfiles import write_private_key
from agent.wire.keys import key_id, public_b64


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-agent", description="the vehicle side's command line")
    p.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the agent until SIGTERM")
    run.add_argument("--config", type=Path, default=DEFAULT_PATH, help=f"(default {DEFAULT_PATH})")
    run.add_argument("--console", action="store_true", help="human-readable logs, not JSON")
    run.add_argument(
        "--log-level",
        choices=logs.LEVELS,
        default="info",
        help="the least severe events logged (default info)",
    )
    check = sub.add_parser(
        "check-config",
        help="check a config and the files it names, offline (the unit's ExecStartPre)",
    )
    check.add_argument("path", type=Path, help="the owner config, e.g. /etc/edge-agent/agent.toml")
    doctor = sub.add_parser(
        "doctor", help="check everything `run` needs, the broker included; one line per check"
    )
    doctor.add_argument("--config", type=Path, default=DEFAULT_PATH, help="the owner config")
    doctor.add_argument(
        "--public-key",
        metavar="B64",
        help="the public key the fleet registered for this vehicle, to compare with the key",
    )
    doctor.add_argument(
        "--timeout", type=float, default=5.0, metavar="S", help="for the broker (default 5 s)"
    )
    keygen = sub.add_parser("keygen", help="create the vehicle's signing key")
    keygen.add_argument("--out", type=Path, required=True, help="where to write it (mode 600)")
    pubkey = sub.add_parser(
        "pubkey", help="print the public key of a vehicle key (for edge-fleet register)"
    )
    pubkey.add_argument("key", type=Path, help="the vehicle key file")
    status = sub.add_parser("status", help="show the running agent's state")
    _socket_args(status)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    vehicle = sub.add_parser("vehicle", help="live control of the emulated car")
    vsub = vehicle.add_subparsers(dest="vehicle_command", required=True)
    vset = vsub.add_parser("set", help="set fields, e.g. gear=D plugged_in=false")
    _socket_args(vset)
    vset.add_argument(
        "fields", nargs="+", metavar="KEY=VALUE", help="gear, plugged_in, soc_pct, ..."
    )
    models = sub.add_parser("models", help="install or list models")
    msub = models.add_subparsers(dest="models_command", required=True)
    madd = msub.add_parser("add", help="install a pinned model file")
    madd.add_argument("file", type=Path, help="the .onnx file")
    madd.add_argument("--name", required=True, help="the name jobs use for it")
    madd.add_argument("--sha256", required=True, help="the pin, from the fleet's job spec")
    madd.add_argument("--config", type=Path, default=DEFAULT_PATH, help="the owner config")
    mlist = msub.add_parser("list", help="list the models held")
    mlist.add_argument("--config", type=Path, default=DEFAULT_PATH, help="the owner config")
    return p


def _models(args: argparse.Namespace) -> int:
    from agent.inference.store import ModelStore, ModelStoreError

    try:
        cfg = load_config(args.config)
        store = ModelStore.open(
            cfg.models.dir,
            installed=cfg.state.dir / "models",
            allowed_domains=frozenset(cfg.models.allowed_domains),
            max_bytes=cfg.models.max_bytes,
        )
        if args.models_command == "add":
            held = store.install(args.file, name=args.name, sha256=args.sha256)
            inputs = ", ".join(f"{k} {v.dtype}{list(v.shape)}" for k, v in held.inputs.items())
            print(
                f"installed {held.name} ({held.size} bytes, sha256 {held.sha256[:16]}..): {inputs}"
            )
            print("the agent holds it from its next start or reload (systemctl reload edge-agent)")
            return ExitCode.OK
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return ExitCode.CONFIG
    except ModelStoreError as exc:
        print(f"not installed: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    for name, held in sorted(store.held.items()):
        print(f"{name:<16} {held.size:>10} bytes  sha256 {held.sha256}  {store.path_of(held)}")
    for problem in store.problems:
        print(f"LEFT OUT  {problem}")
    return ExitCode.OK


def _socket_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=DEFAULT_PATH, help="the owner config")
    p.add_argument("--socket", type=Path, help="the control socket (default: from the config)")


def _socket_path(args: argparse.Namespace) -> Path:
    if args.socket is not None:
        return Path(args.socket)
    cfg = load_config(args.config)
    return cfg.vehicle.control_socket or cfg.state.dir / "control.sock"


def _parse_fields(pairs: list[str]) -> dict[str, str]:
    fields = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"{pair!r} is not KEY=VALUE (e.g. gear=D)")
        fields[key] = value
    return fields


def _control(args: argparse.Namespace) -> int:
    from agent.runtime.control import ControlError, request

    try:
        path = _socket_path(args)
        if args.command == "status":
            reply = request(path, {"op": "status"})
        else:
            reply = request(path, {"op": "set", "fields": _parse_fields(args.fields)})
    except ControlError as exc:
        # Not a config problem: the agent is not running (or not answering).
        print(f"{exc}\n(systemctl status edge-agent says why)", file=sys.stderr)
        return ExitCode.UNAVAILABLE
    except (ConfigError, ValueError) as exc:
        print(exc, file=sys.stderr)
        return ExitCode.USAGE if isinstance(exc, ValueError) else ExitCode.CONFIG
    if not reply.get("ok"):
        print(f"refused: {reply.get('error')}", file=sys.stderr)
        return ExitCode.USAGE
    if args.command == "status":
        print(
            json.dumps(reply["status"], indent=2) if args.json else _render_status(reply["status"])
        )
    else:
        print("vehicle now: " + ", ".join(f"{k}={v}" for k, v in reply["state"].items()))
    return ExitCode.OK


def _render_status(st: dict[str, Any]) -> str:
    gate = st["gate"]
    broker = st.get("broker") or {}
    link = (
        f"connected since {broker['connected_since']}"
        if st["connected"] and broker.get("connected_since")
        else "NOT connected"
    )
    lines = [
        f"vehicle   {st['vehicle_id']}",
        f"broker    {broker.get('address', '?')}{' (TLS)' if broker.get('tls') else ''}: {link}",
    ]
    if broker.get("last_error"):
        lines.append(f"          last error {broker['last_error_at']}: {broker['last_error']}")
    lines += [
        f"gate      {'OPEN' if gate['open'] else 'closed'}"
        + ("" if gate["open"] else f"  because: {', '.join(gate['reasons'])}")
        + (
            f"; the owner's hours open at {gate['next_window_opens']}"
            if gate.get("next_window_opens")
            else ""
        ),
    ]
    v = st.get("vehicle")
    if v:
        lines.append(
            f"car       gear {v['gear']}, {'plugged in' if v['plugged_in'] else 'unplugged'}, "
            f"{'charging' if v['charging'] else 'not charging'}, SoC {v['soc_pct']:.1f} %, "
            f"compute {v['compute_temp_c']:.1f} °C / {v['compute_power_w']:.1f} W, "
            f"battery {v['battery_temp_c']:.1f} °C"
        )
        if v["faults"]:
            lines.append(f"FAULTS    {'; '.join(v['faults'])}")
    job = st.get("current_job")
    lines.append(
        f"job       {job['job_id']} (attempt {job['attempt']}, {job['model']})"
        if job
        else "job       none"
    )
    lines.append(f"queued    {st['queued_jobs']}, outbox {st['outbox']}")
    w = st.get("worker") or {}
    lines.append(
        f"worker    pid {w['pid']}, {'computing' if w['computing'] else 'idle'}"
        + (", paused by the power cap" if w.get("paused") else "")
        if w.get("pid")
        else "worker    none (started with the first job)"
    )
    if w.get("unavailable_retry_in_s"):
        lines.append(
            f"          could not start: no work asked for {w['unavailable_retry_in_s']:g} s more"
        )
    policy = st.get("trust_policy_version")
    lines.append(
        f"models    {', '.join(st.get('models') or []) or 'none'}"
        + (f"; trust policy v{policy}" if policy is not None else "")
    )
    e = st["energy"]
    lines.append(
        f"energy    {e['today_wh']:.3f} Wh of {e['daily_allowance_wh']:g} Wh today ({e['day']})"
    )
    return "\n".join(lines)


def _check_config(path: Path) -> int:
    from agent import doctor

    checks = doctor.for_start(doctor.offline(path)[0])
    bad = doctor.failed(checks)
    print(doctor.render(checks), file=sys.stderr if bad else sys.stdout)
    return ExitCode.CONFIG if bad else ExitCode.OK


def _doctor(args: argparse.Namespace) -> int:
    from agent import doctor

    checks = doctor.doctor(args.config, registered=args.public_key, timeout_s=args.timeout)
    print(doctor.render(checks))
    if doctor.failed(checks):
        print(f"\n{sum(c.verdict is doctor.Verdict.FAIL for c in checks)} check(s) failed")
        return ExitCode.CONFIG
    return ExitCode.OK


def _pubkey(path: Path) -> int:
    from agent.kit.keyfiles import KeyFileError, load_signing_key

    try:
        key = load_signing_key(path)
    except KeyFileError as exc:
        print(exc, file=sys.stderr)
        return ExitCode.CONFIG
    print(public_b64(key.public_key()))
    return ExitCode.OK


def _keygen(out: Path) -> int:
    key = Ed25519PrivateKey.generate()
    try:
        write_private_key(out, key)
    except FileExistsError:
        print(f"{out} exists; refusing to overwrite a key (move it away first)", file=sys.stderr)
        return ExitCode.KEY_EXISTS
    except OSError as exc:
        print(f"cannot write {out}: {exc.strerror}", file=sys.stderr)
        return ExitCode.CONFIG
    pub = key.public_key()
    print(f"wrote {out}\nkeyid {key_id(pub)}\npublic_key {public_b64(pub)}")
    return ExitCode.OK


async def _serve(config_path: Path) -> int:
    from agent.assembly import StartupError, build_agent, check_file_permissions

    log = logs.get_logger()
    try:
        check_file_permissions(config_path, "the config", secret=False)
        cfg = load_config(config_path)
        agent = build_agent(cfg)
    except (ConfigError, StartupError) as exc:
        log.error("cannot_start", error=str(exc))  # noqa: TRY400 - the message is the news, not a traceback
        return ExitCode.CONFIG
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():  # a second signal: leave now
            log.warning("second_signal_exit", signal=signal.Signals(signum).name)
            os._exit(ExitCode.CRASH)
        log.info("signal", signal=signal.Signals(signum).name)
        stop.set()

    def on_hangup() -> None:
        try:
            new = load_config(config_path)
        except ConfigError as exc:
            log.error(  # noqa: TRY400 - the problems are the news, not a traceback
                "config_reload_refused", problems=exc.problems, kept="last good config"
            )
            return
        agent.reload(new)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    await agent.run(stop)
    return ExitCode.OK


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check-config":
        return _check_config(args.path)
    if args.command == "doctor":
        return _doctor(args)
    if args.command == "keygen":
        return _keygen(args.out)
    if args.command == "pubkey":
        return _pubkey(args.key)
    if args.command in ("status", "vehicle"):
        return _control(args)
    if args.command == "models":
        return _models(args)
    logs.configure(json=not args.console, level=args.log_level)
    return asyncio.run(_serve(args.config))


if __name__ == "__main__":
    sys.exit(main())
