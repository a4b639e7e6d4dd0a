"""`edge-fleet` fed what an operator gets wrong: each a clear message and an exit code, no
traceback, and nothing published or written that should not be."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from agent.kit.exitcodes import ExitCode
from broker.local import LocalMosquitto
from broker.policy import publish_policy, retained_policy
from tests.support import FleetKeys

FLEET = [sys.executable, "-m", "broker.cli"]


def fleet(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*FLEET, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_both_commands_say_their_version(tmp_path: Path) -> None:
    import agent

    for cmd in (FLEET, [sys.executable, "-m", "agent.cli"]):
        out = subprocess.run([*cmd, "--version"], capture_output=True, text=True, check=False)
        assert out.returncode == 0 and agent.__version__ in out.stdout


@pytest.mark.broker
def test_broker_on_a_busy_port_is_refused_not_reported_listening(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = fleet("broker", "--port", str(port), "--workdir", "b", cwd=tmp_path)
    assert out.returncode == ExitCode.CONFIG
    assert "another program holds that port" in out.stderr
    assert "mosquitto on" not in out.stdout


def test_a_plaintext_broker_beyond_loopback_is_refused(tmp_path: Path) -> None:
    out = fleet("broker", "--listen", "0.0.0.0", cwd=tmp_path)  # noqa: S104 - refused, never bound
    assert out.returncode == ExitCode.CONFIG
    assert "loopback only" in out.stderr


def test_tls_broker_without_a_pki_says_how_to_make_one(tmp_path: Path) -> None:
    out = fleet("broker", "--tls", "pki", cwd=tmp_path)
    assert out.returncode == ExitCode.CONFIG
    assert "edge-fleet provision --dir pki" in out.stderr


def test_submit_into_a_missing_folder_and_jobs_of_no_queue(tmp_path: Path) -> None:
    assert fleet("keygen", "--requester-key", "r.key", cwd=tmp_path).returncode == 0
    out = fleet("submit", "--queue", "nodir/q.db", "--requester-key", "r.key", cwd=tmp_path)
    assert out.returncode == ExitCode.CONFIG
    assert "nodir does not exist (mkdir -p nodir)" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "nodir").exists()
    none = fleet("jobs", "--queue", "q.db", cwd=tmp_path)
    assert none.returncode == ExitCode.CONFIG and "no queue at q.db" in none.stderr
    ok = fleet(
        "submit", "--queue", "q.db", "--requester-key", "r.key", "--count", "3", cwd=tmp_path
    )
    assert ok.returncode == 0
    assert json.loads(ok.stdout)["states"] == {"queued": 3}
    counts = fleet("jobs", "--queue", "q.db", cwd=tmp_path)
    assert json.loads(counts.stdout) == {"queued": 3}
    waiting = fleet("jobs", "--queue", "q.db", "--wait-done", "1", cwd=tmp_path)
    assert waiting.returncode != 0, "jobs still queued: --wait-done must not say done"


@pytest.mark.parametrize("bad", ["not-base64!", "AAAA", "x" * 200])
def test_register_a_bad_public_key_says_what_one_looks_like(tmp_path: Path, bad: str) -> None:
    out = fleet(
        "register", "--registry", "v.json", "--vehicle-id", "veh-1", "--public-key", bad,
        cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == ExitCode.USAGE
    assert "is not an Ed25519 public key in base64" in out.stderr
    assert "edge-agent pubkey" in out.stderr
    assert "binascii" not in out.stderr.lower()
    assert not (tmp_path / "v.json").exists()


@pytest.mark.broker
def test_policy_publish_refuses_a_policy_the_cars_would_refuse(tmp_path: Path) -> None:
    """The retained policy is what every car holds: one signed by other roots (or not newer)
    is refused before it can replace it; a proper v2 is published."""
    fleet_keys = FleetKeys()
    good = fleet_keys.policy(version=1)
    rogue = FleetKeys().policy(version=5)  # another fleet's roots
    (tmp_path / "rogue.json").write_bytes(rogue)
    (tmp_path / "v2.json").write_bytes(fleet_keys.policy(version=2))
    (tmp_path / "v1-again.json").write_bytes(fleet_keys.policy(version=1))
    broker = LocalMosquitto(tmp_path / "mq")
    broker.start()
    try:
        asyncio.run(publish_policy(good, host="127.0.0.1", port=broker.port, tls=None))
        for name, words in (("rogue.json", "valid signature"), ("v1-again.json", "not newer")):
            out = fleet(
                "policy", "publish", "--policy", name, "--port", str(broker.port), cwd=tmp_path
            )
            assert out.returncode == ExitCode.CONFIG, out.stdout + out.stderr
            assert "the cars hold policy v1" in out.stderr and words in out.stderr
            held = asyncio.run(retained_policy(host="127.0.0.1", port=broker.port, tls=None))
            assert held == good, "the good policy is still the retained one"
        out = fleet(
            "policy", "publish", "--policy", "v2.json", "--port", str(broker.port), cwd=tmp_path
        )
        assert out.returncode == 0, out.stderr
        held = asyncio.run(retained_policy(host="127.0.0.1", port=broker.port, tls=None))
        assert held == (tmp_path / "v2.json").read_bytes()
    finally:
        broker.stop()


def test_every_flag_of_both_commands_has_help_text():
    """`--help` is the first thing an operator reads: no flag or argument without a line."""
    import argparse

    from agent.cli import _parser as agent_parser
    from broker.cli import _parser as fleet_parser

    def missing(parser: argparse.ArgumentParser, path: str) -> list[str]:
        out = []
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    out += missing(sub, f"{path} {name}")
            elif not action.help:
                out.append(f"{path} {action.option_strings or action.dest}")
        return out

    assert missing(agent_parser(), "edge-agent") + missing(fleet_parser(), "edge-fleet") == []


@pytest.mark.broker
def test_policy_publish_replaces_a_retained_message_that_is_no_policy(tmp_path: Path) -> None:
    """Garbage retained on the policy topic anchors nothing (every car refuses it): it must
    not keep the fleet from publishing a good policy over it."""
    (tmp_path / "v1.json").write_bytes(FleetKeys().policy(version=1))
    broker = LocalMosquitto(tmp_path / "mq")
    broker.start()
    try:
        asyncio.run(publish_policy(b"{not a policy", host="127.0.0.1", port=broker.port, tls=None))
        out = fleet(
            "policy", "publish", "--policy", "v1.json", "--port", str(broker.port), cwd=tmp_path
        )
        assert out.returncode == 0, out.stderr
        assert "no valid policy" in out.stdout
        held = asyncio.run(retained_policy(host="127.0.0.1", port=broker.port, tls=None))
        assert held == (tmp_path / "v1.json").read_bytes()
    finally:
        broker.stop()
