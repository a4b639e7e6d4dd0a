"""Starts and stops a private ejabberd (its MQTT broker, mod_mqtt) on a free loopback port,
with a few registered users: the second MQTT implementation `make interop` runs against.

ejabberd is started with `ejabberdctl foreground` under its own config, spool and log folders
in `workdir` and its own Erlang node name, so it touches nothing of a system ejabberd. As
root, ejabberdctl runs the server as the `ejabberd` user (the Debian package creates it),
so `workdir` is handed to that user.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import time
from pathlib import Path

from broker.local import free_port

CONFIG = """\
hosts:
  - "localhost"
loglevel: info
auth_method: [internal]
listen:
  -
    port: {port}
    ip: "127.0.0.1"
    module: mod_mqtt
    backlog: 1000
modules:
  mod_mqtt: {{}}
"""


class EjabberdError(Exception):
    pass


class LocalEjabberd:
    def __init__(self, workdir: Path, users: dict[str, str]) -> None:
        self.workdir = workdir
        self.users = users
        self.host = "127.0.0.1"
        self.port = free_port()
        self.node = f"edge{self.port}@localhost"
        self._proc: subprocess.Popen[bytes] | None = None

    def _ctl(self, *args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.ctl, "--ctl-config", str(self.workdir / "ejabberdctl.cfg"), *args],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
            cwd=self.workdir,
        )

    @property
    def ctl(self) -> str:
        found = shutil.which("ejabberdctl") or "/usr/sbin/ejabberdctl"
        if not Path(found).exists():
            raise EjabberdError("ejabberd is not installed: `make interop` installs it (apt-get)")
        return found

    def start(self, timeout_s: float = 60.0) -> None:
        if os.geteuid() != 0:
            raise EjabberdError("ejabberdctl runs the server as the ejabberd user: run as root")
        w = self.workdir
        for sub in ("spool", "logs"):
            (w / sub).mkdir(parents=True, exist_ok=True)
        (w / "ejabberd.yml").write_text(CONFIG.format(port=self.port))
        (w / "ejabberdctl.cfg").write_text(
            f'ERL_OPTIONS="-env ERL_CRASH_DUMP_BYTES 0"\n'
            f"EJABBERD_PID_PATH={w}/ejabberd.pid\n"
            f"EJABBERD_CONFIG_PATH={w}/ejabberd.yml\n"
            f"ERLANG_NODE={self.node}\n"
            f"SPOOL_DIR={w}/spool\n"
            f"LOGS_DIR={w}/logs\n"
        )
        user = pwd.getpwnam("ejabberd")
        for path in [w, *w.rglob("*")]:
            os.chown(path, user.pw_uid, user.pw_gid)
        w.chmod(0o755)
        with (w / "foreground.log").open("wb") as log:
            self._proc = subprocess.Popen(
                [self.ctl, "--ctl-config", str(w / "ejabberdctl.cfg"), "foreground"],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=w,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise EjabberdError(f"ejabberd exited: {self.log_tail()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    break
            except OSError:
                time.sleep(0.1)
        else:
            self.stop()
            raise EjabberdError(f"ejabberd did not listen in {timeout_s:g} s: {self.log_tail()}")
        for name, password in self.users.items():
            done = self._ctl("register", name, "localhost", password)
            if done.returncode != 0:
                raise EjabberdError(f"cannot register {name}: {done.stdout}{done.stderr}")

    def log_tail(self) -> str:
        log = self.workdir / "foreground.log"
        return log.read_text(errors="replace")[-2000:] if log.exists() else ""

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            self._ctl("stop", timeout_s=60)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    def __enter__(self) -> LocalEjabberd:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
