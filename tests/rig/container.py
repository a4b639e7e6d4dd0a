"""A Debian root for the rig test: debootstrapped once into a cache outside the repository,
copied per run, booted under systemd-nspawn (no systemd is PID 1 on these machines), entered
with nsenter. A foreign-architecture root runs commands under qemu-user through binfmt_misc.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

CACHE = Path(os.environ.get("RIG_TEST_CACHE", "/var/cache/edge-agent-rig"))
MIRROR = "http://deb.debian.org/debian"
PACKAGES = "systemd,systemd-sysv,dbus,ca-certificates,python3,procps"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class RigError(Exception):
    pass


def log(message: str) -> None:
    print(f"[rig {time.strftime('%H:%M:%S')}] {message}", flush=True)


def ensure_binfmt_aarch64() -> None:
    """qemu-aarch64 registered with binfmt_misc (mounting it where it is not)."""
    misc = Path("/proc/sys/fs/binfmt_misc")
    if not (misc / "register").exists():
        subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(misc)], check=True)
    if not (misc / "qemu-aarch64").exists():
        subprocess.run(["update-binfmts", "--enable", "qemu-aarch64"], check=True)


def image(suite: str, arch: str) -> Path:
    """The cached root for this release and CPU, debootstrapped on first use."""
    root = CACHE / f"{suite}-{arch}"
    if (root / "usr/bin/python3").exists():
        return root
    if arch != "amd64":
        ensure_binfmt_aarch64()
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = CACHE / f"{suite}-{arch}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    log(f"debootstrap {suite} {arch} into {root} (once; cached)")
    subprocess.run(
        ["debootstrap", f"--arch={arch}", "--variant=minbase", f"--include={PACKAGES}",
         suite, str(tmp), MIRROR],
        check=True, stdout=subprocess.DEVNULL, timeout=1800,
    )  # fmt: skip
    tmp.rename(root)
    return root


class Booted:
    """A copy of a cached root, booted with its own systemd as PID 1 of its namespaces."""

    def __init__(self, suite: str, arch: str, workdir: Path) -> None:
        self.suite, self.arch = suite, arch
        self.root = workdir / f"{suite}-{arch}"
        self._nspawn: subprocess.Popen[bytes] | None = None
        self.leader = 0

    def boot(self, hosts: dict[str, str]) -> None:
        source = image(self.suite, self.arch)
        shutil.rmtree(self.root, ignore_errors=True)
        subprocess.run(["cp", "-a", "--reflink=auto", str(source), str(self.root)], check=True)
        hosts_file = self.root / "etc/hosts"
        if not hosts_file.exists():  # debootstrap writes none; an installed system has these
            hosts_file.write_text("127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n")
        with hosts_file.open("a") as f:
            for name, address in hosts.items():
                f.write(f"{address} {name}\n")
        self._nspawn = subprocess.Popen(
            ["systemd-nspawn", "--register=no", "--keep-unit", "--quiet", "--console=passive",
             "-b", "-D", str(self.root), f"--machine=rig-{self.suite}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            children = Path(f"/proc/{self._nspawn.pid}/task/{self._nspawn.pid}/children")
            if self._nspawn.poll() is not None:
                raise RigError(f"systemd-nspawn exited with {self._nspawn.returncode}")
            pids = children.read_text().split() if children.exists() else []
            if pids:
                self.leader = int(pids[0])
                state = self.sh("systemctl is-system-running || true", check=False).stdout.strip()
                if state in ("running", "degraded"):
                    return
            time.sleep(0.5)
        raise RigError("the container's systemd did not finish booting in 60 s")

    def sh(
        self,
        script: str,
        *,
        env: dict[str, str] | None = None,
        check: bool = True,
        timeout: float = 300,
    ) -> subprocess.CompletedProcess[str]:
        """Run a bash script as root inside the container (errexit, pipefail)."""
        argv = ["nsenter", "-t", str(self.leader), "-a", "--", "/usr/bin/env", "-i",
                f"PATH={PATH}", "HOME=/root", "LANG=C.UTF-8"]  # fmt: skip
        argv += [f"{k}={v}" for k, v in (env or {}).items()]
        argv += ["/bin/bash", "-euo", "pipefail", "-c", script]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise RigError(
                f"in the {self.suite} container, exit {proc.returncode}:\n{script}\n"
                f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}"
            )
        return proc

    def shutdown(self) -> None:
        proc, self._nspawn = self._nspawn, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # nspawn asks the container's systemd to power off
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)


def foreign(
    root: Path, script: str, *, env: dict[str, str], timeout: float = 600
) -> subprocess.Popen[str]:
    """Start a bash script in a (not booted) root of another CPU, under qemu-user; returns the
    running process (its output on stdout)."""
    argv = ["systemd-nspawn", "--register=no", "--keep-unit", "--quiet", "--pipe", "-D", str(root),
            "/usr/bin/env", "-i", f"PATH={PATH}", "HOME=/root", "LANG=C.UTF-8"]  # fmt: skip
    argv += [f"{k}={v}" for k, v in env.items()]
    argv += ["/bin/bash", "-euo", "pipefail", "-c", script]
    return subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
