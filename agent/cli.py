"""`edge-agent`: the vehicle side's command line.

edge-agent run [--config PATH]        serve (the systemd service runs this)
edge-agent check-config PATH          validate an owner config; non-zero on error
edge-agent keygen --out PATH          make the vehicle's Ed25519 signing key
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import logs
from agent.config import DEFAULT_PATH, ConfigError, load_config
from agent.exitcodes import ExitCode
from agent.wire.keys import key_id, public_b64, write_private_key


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-agent", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the agent until SIGTERM")
    run.add_argument("--config", type=Path, default=DEFAULT_PATH)
    run.add_argument("--console", action="store_true", help="human-readable logs, not JSON")
    check = sub.add_parser("check-config", help="validate a config file")
    check.add_argument("path", type=Path)
    keygen = sub.add_parser("keygen", help="create the vehicle's signing key")
    keygen.add_argument("--out", type=Path, required=True)
    return p


def _check_config(path: Path) -> int:
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return ExitCode.CONFIG
    state = "opted in" if cfg.owner.opted_in else "NOT opted in: nothing will run"
    print(f"{path}: valid (vehicle {cfg.vehicle.id}, owner {state})")
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
    from agent.assembly import StartupError, build_agent

    log = logs.get_logger()
    try:
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

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    await agent.run(stop)
    return ExitCode.OK


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check-config":
        return _check_config(args.path)
    if args.command == "keygen":
        return _keygen(args.out)
    logs.configure(json=not args.console)
    return asyncio.run(_serve(args.config))


if __name__ == "__main__":
    sys.exit(main())
