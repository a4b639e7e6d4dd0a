"""`make rig-test`: the .deb installed in a booted Debian, following the README literally.

For Debian 12 and Debian 13 (amd64), in a container booted with its own systemd:
  1. the README's install section, block by block: fleet blocks on this machine (the
     fleet, from the clone's venv), vehicle blocks inside the container; `scp` to the car
     is a copy into the container's root (the only stand-in);
  2. then what a rig owner relies on: READY and STATUS, `systemctl reload` applying a
     change, an error the test provokes found by `journalctl -p err`, the watchdog
     restarting a SIGSTOPped agent, `edge-agent models add` into the DynamicUser state
     directory, `systemctl stop` exiting 0, `systemd-analyze security` at 2.0 or lower,
     and (Debian 12) state and keys kept by an upgrade and a remove, deleted by purge.
Then the arm64 package in a Debian 12 arm64 root under qemu-user: install, doctor, 30 jobs.

Measured, into bench/results/rig.json: fresh container to the first accepted result, the
.deb sizes, the agent's idle RSS under systemd, the security exposure score.

Usage: python -m tests.rig.run [--only bookworm|trixie|arm64]...
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from tests.rig.container import Booted, RigError, ensure_binfmt_aarch64, foreign, image, log
from tests.rig.readme import install_blocks

REPO = Path(__file__).resolve().parents[2]
DEB = REPO / "dist" / "deb"
RESULTS = REPO / "bench" / "results" / "rig.json"
BROKER_HOST = "localhost"  # the fleet and the car share this machine's loopback
VEHICLE_HOST = "root@rig-car"
RELEASE = {"bookworm": "deb12", "trixie": "deb13"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def deb_for(suite: str, arch: str) -> Path:
    found = sorted(DEB.glob(f"edge-agent_*+{RELEASE[suite]}_{arch}.deb"))
    if not found:
        raise RigError(f"no package for {suite} {arch} in {DEB}: run `make deb` first")
    return found[-1]


class Fleet:
    """The fleet machine: README fleet blocks in bash, in a private HOME, the clone's venv on
    PATH, and `scp` to or from the car as a copy into or out of the container's root."""

    def __init__(self, home: Path, car_root: Path, names: str, env: dict[str, str]) -> None:
        self.home, self.car_root, self.names = home, car_root, names
        self.env = {
            "PATH": f"{REPO / '.venv' / 'bin'}:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": str(home),
            "LANG": "C.UTF-8",
            **env,
        }
        self.background: list[subprocess.Popen[bytes]] = []

    def _script(self, block: str) -> str:
        car = re.escape(VEHICLE_HOST)
        scp = (
            'scp() { local args=(); for a in "$@"; do '
            f'args+=("$(printf %s "$a" | sed -E "s#^{car}:#{self.car_root}#")"); done; '
            'cp "${args[@]}"; }\n'
        )
        return scp + self.names + "\n" + block

    def run(self, block: str) -> str:
        proc = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", self._script(block)],
            env=self.env, capture_output=True, text=True, timeout=600, check=False,
        )  # fmt: skip
        if proc.returncode != 0:
            raise RigError(
                f"fleet block, exit {proc.returncode}:\n{block}\n--- stdout\n{proc.stdout[-3000:]}"
                f"\n--- stderr\n{proc.stderr[-3000:]}"
            )
        return proc.stdout

    def start(self, block: str, name: str) -> None:
        out = (self.home / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            ["bash", "-euo", "pipefail", "-c", self._script(block)],
            env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        self.background.append(proc)
        time.sleep(2.0)
        if proc.poll() is not None:
            raise RigError(f"{name} exited at once:\n{(self.home / f'{name}.log').read_text()}")

    def stop(self) -> None:
        for proc in self.background:
            end(proc)


def end(proc: subprocess.Popen[bytes] | subprocess.Popen[str], timeout: float = 20) -> None:
    """SIGTERM to the process group a test started, SIGKILL if it does not go in time."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def first_result_after(queue: Path, started: float, out: dict[str, float]) -> threading.Thread:
    """Note the wall time from `started` to the first job done in the fleet's queue."""

    def watch() -> None:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline and "first_result_s" not in out:
            if queue.exists():
                try:
                    with sqlite3.connect(f"file:{queue}?mode=ro", uri=True, timeout=1) as db:
                        (done,) = db.execute(
                            "SELECT COUNT(*) FROM jobs WHERE state='done'"
                        ).fetchone()
                except sqlite3.Error:
                    done = 0
                if done:
                    out["first_result_s"] = round(time.monotonic() - started, 1)
                    return
            time.sleep(0.25)

    thread = threading.Thread(target=watch, name="first-result", daemon=True)
    thread.start()
    return thread


def show(car: Booted, *props: str) -> dict[str, str]:
    text = car.sh(f"systemctl show edge-agent -p {' -p '.join(props)}").stdout
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def wait_until(what: str, check: object, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.5)
    raise RigError(f"timed out after {timeout:g} s waiting for {what}")


def status_json(car: Booted) -> dict[str, object]:
    return json.loads(car.sh("edge-agent status --json").stdout)  # type: ignore[no-any-return]


def owner_checks(car: Booted, report: dict[str, object], *, lifecycle: bool) -> None:
    """What an owner or operator relies on from the unit, after the README's steps."""
    props = show(car, "ActiveState", "SubState", "StatusText", "Type", "MainPID")
    if props["ActiveState"] != "active" or not props["StatusText"]:
        raise RigError(f"not READY with a STATUS: {props}")
    report["status_text"] = props["StatusText"]
    log(f"  READY; STATUS={props['StatusText']!r}")

    # Idle RSS under systemd: after the jobs, once the worker has stopped (worker_idle_s).
    wait_until(
        "the worker to stop when idle",
        lambda: not (status_json(car).get("worker") or {}).get("pid"),
        60,
    )  # type: ignore[union-attr]
    pid = show(car, "MainPID")["MainPID"]
    rss = car.sh(f"grep VmRSS /proc/{pid}/status").stdout.split()[1]
    report["idle_rss_mb"] = round(int(rss) / 1024, 1)
    log(f"  idle RSS {report['idle_rss_mb']} MB")

    # A model installed by root into the dynamic user's state directory, taken at reload.
    car.sh(
        "f=/usr/share/edge-agent/models/burn.onnx; "
        'edge-agent models add "$f" --name burn-copy --sha256 "$(sha256sum "$f" | cut -d" " -f1)"'
        " && systemctl reload edge-agent"
    )
    wait_until(
        "the added model held", lambda: "burn-copy" in (status_json(car).get("models") or [])
    )  # type: ignore[operator]
    log("  models add into the state directory: held after reload")

    # Reload applies a change: the owner opts out, the gate closes for that reason.
    car.sh(
        "sed -i 's/^opted_in = true/opted_in = false/' /etc/edge-agent/agent.toml"
        " && systemctl reload edge-agent"
    )
    wait_until(
        "the opt-out applied by reload",
        lambda: "not_opted_in" in (status_json(car)["gate"]["reasons"]),  # type: ignore[index]
    )
    car.sh(
        "sed -i 's/^opted_in = false/opted_in = true/' /etc/edge-agent/agent.toml"
        " && systemctl reload edge-agent"
    )
    log("  systemctl reload applied an opt-out, then the opt-in again")

    # An error the test provokes, found by priority: a broken config refused at reload.
    car.sh(
        "cp /etc/edge-agent/agent.toml /root/good.toml"
        " && echo 'colour = 1' >> /etc/edge-agent/agent.toml && systemctl reload edge-agent"
    )
    wait_until(
        "journalctl -p err to show the refused reload",
        lambda: (
            "config_reload_refused"
            in car.sh("journalctl -u edge-agent -p err --no-pager -o cat", check=False).stdout
        ),
    )
    car.sh("cp /root/good.toml /etc/edge-agent/agent.toml")
    log("  journalctl -p err shows config_reload_refused")

    # The watchdog restarts a frozen agent (a drop-in shortens WatchdogSec for the test).
    car.sh(
        "mkdir -p /etc/systemd/system/edge-agent.service.d && printf '[Service]\\nWatchdogSec=4\\n'"
        " > /etc/systemd/system/edge-agent.service.d/rig.conf"
        " && systemctl daemon-reload && systemctl restart edge-agent"
    )
    frozen = show(car, "MainPID")["MainPID"]
    car.sh(f"kill -STOP {frozen}")
    wait_until(
        "the watchdog to restart the SIGSTOPped agent",
        lambda: (
            (p := show(car, "MainPID", "ActiveState", "NRestarts"))["MainPID"] not in ("0", frozen)
            and p["ActiveState"] == "active"
            and int(p["NRestarts"]) >= 1
        ),
        timeout=60,
    )
    car.sh("rm -r /etc/systemd/system/edge-agent.service.d && systemctl daemon-reload")
    log("  the watchdog restarted a SIGSTOPped agent")

    exposure = car.sh(
        "systemd-analyze security edge-agent.service --no-pager 2>&1 | tail -1"
    ).stdout
    score = float(re.search(r"level for edge-agent\.service:\s*([0-9.]+)", exposure).group(1))  # type: ignore[union-attr]
    report["security_exposure"] = score
    if score > 2.0:
        raise RigError(f"systemd-analyze security: {exposure.strip()} (want 2.0 or lower)")
    log(f"  systemd-analyze security: {score}")

    car.sh("systemctl stop edge-agent")
    props = show(car, "Result", "ExecMainStatus", "ActiveState")
    if props["Result"] != "success" or props["ExecMainStatus"] != "0":
        raise RigError(f"systemctl stop did not end cleanly: {props}")
    log("  systemctl stop: exit 0")

    if lifecycle:
        kept = (
            "/etc/edge-agent/credentials/vehicle.key /var/lib/private/edge-agent/state.db "
            "/etc/edge-agent/agent.toml"
        )
        car.sh("apt-get install -y --reinstall /root/edge-agent_*.deb >/dev/null 2>&1")
        car.sh(f"ls {kept} >/dev/null")
        car.sh("apt-get remove -y edge-agent >/dev/null 2>&1")
        car.sh(f"ls {kept} >/dev/null && ! command -v edge-agent")
        car.sh("apt-get purge -y edge-agent >/dev/null 2>&1")
        car.sh("! ls -d /etc/edge-agent /var/lib/private/edge-agent /opt/edge-agent 2>/dev/null")
        log("  reinstall and remove kept keys, config and state; purge deleted them")


def booted_run(suite: str, work: Path) -> dict[str, object]:
    report: dict[str, object] = {"suite": suite, "arch": "amd64"}
    port = free_port()
    blocks = install_blocks(REPO / "README.md")
    names = next(b.script for b in blocks if b.where == "names")
    env = {"VEHICLE_ID": "veh-000001", "BROKER_HOST": BROKER_HOST, "BROKER_PORT": str(port),
           "BROKER_LISTEN": "127.0.0.1", "VEHICLE_HOST": VEHICLE_HOST}  # fmt: skip
    car = Booted(suite, "amd64", work)
    image(suite, "amd64")  # debootstrap (once) before the clock starts
    started = time.monotonic()
    car.boot({})
    report["boot_s"] = round(time.monotonic() - started, 1)
    deb = deb_for(suite, "amd64")
    shutil.copy(deb, car.root / "root" / deb.name)
    home = work / f"fleet-{suite}"
    home.mkdir()
    fleet = Fleet(home, car.root, names, env)
    first_result_after(home / "edge-fleet" / "queue.db", started, report)
    try:
        for i, block in enumerate(b for b in blocks if b.where != "names"):
            log(f"{suite}: README block {i + 1} ({block.where})")
            if block.where == "fleet":
                fleet.run(block.script)
            elif block.where == "fleet-background":
                fleet.start(block.script, f"background-{i + 1}")
            else:
                out = car.sh(names + "\n" + block.script, env=env, timeout=600)
                if "edge-agent status" in block.script:
                    report["status_after_jobs"] = out.stdout.splitlines()[:3]
        done = json.loads(fleet.run("cd ~/edge-fleet && edge-fleet jobs --queue queue.db"))
        if done.get("done") != 20:
            raise RigError(f"not every job done: {done}")
        report["jobs_done"] = done["done"]
        log(
            f"{suite}: 20/20 jobs done; first result {report.get('first_result_s')} s after boot started"
        )
        owner_checks(car, report, lifecycle=suite == "bookworm")
    except RigError as exc:
        journal = car.sh("journalctl -u edge-agent -n 40 --no-pager -o cat || true", check=False)
        raise RigError(f"{exc}\n--- the agent's journal in {suite}\n{journal.stdout}") from None
    finally:
        fleet.stop()
        car.shutdown()
    return report


ARM_SCRIPT = """
cd /root && apt-get install -y -qq ./edge-agent_*.deb >/dev/null
install -m 644 trust-policy.json /etc/edge-agent/trust-policy.json
install -m 600 vehicle.key /etc/edge-agent/credentials/vehicle.key
cp agent.toml /etc/edge-agent/agent.toml
edge-agent doctor --config /etc/edge-agent/agent.toml
echo DOCTOR-OK
exec edge-agent run --config /etc/edge-agent/agent.toml
"""


def arm64_run(work: Path) -> dict[str, object]:
    """Install the arm64 package in an arm64 root (qemu-user), doctor it, run 30 jobs against
    a plaintext loopback fleet on this machine. A smoke test, not timing."""
    sys.path.insert(0, str(REPO))
    from broker.agent_config import agent_toml

    report: dict[str, object] = {"suite": "bookworm", "arch": "arm64"}
    ensure_binfmt_aarch64()  # after a reboot the cached root is there, the registration not
    source = image("bookworm", "arm64")
    root = work / "bookworm-arm64"
    subprocess.run(["cp", "-a", "--reflink=auto", str(source), str(root)], check=True)
    deb = deb_for("bookworm", "arm64")
    shutil.copy(deb, root / "root" / deb.name)
    port = free_port()
    home = work / "fleet-arm64"
    fleet_dir = home / "edge-fleet"
    fleet_dir.mkdir(parents=True)
    env = {"PATH": f"{REPO / '.venv' / 'bin'}:/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8"}
    ef = [str(REPO / ".venv" / "bin" / "edge-fleet")]

    def fleet(*args: str) -> str:
        return subprocess.run(
            [*ef, *args],
            cwd=fleet_dir,
            env=env,
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout

    fleet("keygen", "--root-key", "root.key")
    fleet("keygen", "--job-key", "job.key", "--trusted-out", "trusted.json")
    fleet("keygen", "--requester-key", "requester.key")
    fleet("policy", "sign", "--root-key", "root.key", "--job-key", "job.key", "--requester-key",
          "requester.key", "--version", "1", "--out", "trust-policy.json")  # fmt: skip
    car_key = root / "root" / "vehicle.key"
    subprocess.run(
        [sys.executable, "-m", "agent.cli", "keygen", "--out", str(car_key)],
        check=True,
        capture_output=True,
        cwd=REPO,
    )
    pub = subprocess.run(
        [sys.executable, "-m", "agent.cli", "pubkey", str(car_key)],
        check=True,
        capture_output=True,
        text=True,
        cwd=REPO,
    ).stdout.strip()
    fleet(
        "register", "--registry", "vehicles.json", "--vehicle-id", "veh-arm64", "--public-key", pub
    )
    shutil.copy(fleet_dir / "trust-policy.json", root / "root" / "trust-policy.json")
    (root / "root" / "agent.toml").write_text(
        agent_toml(
            "veh-arm64",
            port=port,
            scenario=Path("/usr/share/edge-agent/scenarios/parked-charging.toml"),
            models=Path("/usr/share/edge-agent/models"),
            settings={"keys": {"vehicle_key": "${CREDENTIALS_DIRECTORY}/vehicle.key",
                               "trust_policy": "/etc/edge-agent/trust-policy.json"},
                      "state": {"dir": "/var/lib/edge-agent"}},
        )
    )  # fmt: skip
    fleet("submit", "--queue", "queue.db", "--requester-key", "requester.key", "--count", "30")
    broker = subprocess.Popen(
        [*ef, "broker", "--port", str(port)],
        cwd=fleet_dir,
        env=env,
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    serve = subprocess.Popen(
        [*ef, "serve", "--queue", "queue.db", "--job-key", "job.key", "--requester-key",
         "requester.key", "--registry", "vehicles.json", "--port", str(port)],
        cwd=fleet_dir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    started = time.monotonic()
    car = foreign(root, ARM_SCRIPT, env={})
    lines: list[str] = []

    def read() -> None:
        for line in car.stdout or []:
            lines.append(line)

    threading.Thread(target=read, name="arm64-agent", daemon=True).start()
    wait_s = os.environ.get("RIG_ARM64_WAIT_S", "900")
    try:
        result = subprocess.run(
            [*ef, "jobs", "--queue", "queue.db", "--wait-done", wait_s],
            cwd=fleet_dir,
            env=env,
            capture_output=True,
            text=True,
            timeout=660,
            check=False,
        )
        counts = json.loads(result.stdout)
        if counts.get("done") != 30:
            raise RigError(f"arm64: not every job done: {counts}\n" + "".join(lines[-40:]))
        if not any("DOCTOR-OK" in line for line in lines):
            raise RigError("arm64: doctor did not pass:\n" + "".join(lines[-40:]))
        report.update(jobs_done=30, wall_s=round(time.monotonic() - started, 1))
        report["doctor"] = [line.rstrip() for line in lines if line[:4] in ("OK  ", "WARN", "FAIL")]
        log(f"arm64: doctor passed, 30/30 jobs done in {report['wall_s']} s under qemu-user")
    finally:
        for proc in (car, serve, broker):
            end(proc, timeout=30)
        shutil.rmtree(root, ignore_errors=True)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rig-test")
    parser.add_argument("--only", action="append", choices=["bookworm", "trixie", "arm64"])
    args = parser.parse_args(argv)
    which = args.only or ["bookworm", "trixie", "arm64"]
    # SIGTERM (a CI timeout) unwinds like Ctrl-C, so containers and fleet processes are ended.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    if os.geteuid() != 0:
        print("the rig test boots containers: run it as root", file=sys.stderr)
        return 2
    results: dict[str, object] = {
        "machine": subprocess.run(
            ["uname", "-srm"], capture_output=True, text=True, check=False
        ).stdout.strip(),
        "deb_sizes_mb": {
            p.name: round(p.stat().st_size / 1e6, 1) for p in sorted(DEB.glob("*.deb"))
        },
        "runs": [],
    }
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="rig-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        try:
            for name in which:
                log(f"=== {name}")
                run = arm64_run(work) if name == "arm64" else booted_run(name, work)
                results["runs"].append(run)  # type: ignore[union-attr]
        except RigError as exc:
            print(f"RIG TEST FAILED: {exc}", file=sys.stderr)
            return 1
    results["wall_s"] = round(time.monotonic() - started, 1)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    log(f"rig test passed in {results['wall_s']} s; {RESULTS.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
