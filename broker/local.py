"""Starts and stops a private Mosquitto on a free loopback port (tests, demo, rigs)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from agent.kit.mqtt import is_loopback

if TYPE_CHECKING:
    from broker.provision import FleetPki


class BrokerError(Exception):
    """Raised when the local Mosquitto cannot be found or does not come up."""


INSTALL_HINT = "install it with: sudo apt-get install -y mosquitto"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _user_line() -> str:
    """Started as root, mosquitto drops to the `mosquitto` user, which cannot read a private
    temporary folder (its log and ACL files): this local broker stays the user that started it."""
    return "user root" if os.geteuid() == 0 else ""


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()), None
    )
    if found is None:
        raise BrokerError(f"the mosquitto binary is not installed; {INSTALL_HINT}")
    return found


def _passwd_binary() -> str:
    """mosquitto_passwd, from the same package as the broker."""
    return shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"


class LocalMosquitto:
    """A mosquitto process of our own, listening on 127.0.0.1:`port`."""

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        pki: FleetPki | None = None,
        host: str = "127.0.0.1",
        persistence: bool | None = None,
        logins: dict[str, str] | None = None,
    ) -> None:
        """Plaintext on loopback, or with `pki`: TLS with client certificates and the ACL
        (which may listen beyond loopback, on `host`). `persistence` (on by default with
        `pki`) keeps retained messages and offline sessions across a restart, in `workdir`.
        `logins` (user -> password; plaintext only) turns anonymous clients away."""
        if logins and pki is not None:
            raise BrokerError(
                "logins are for the plaintext test broker; the TLS one uses certificates"
            )
        self.logins = dict(logins or {})
        if pki is None and not is_loopback(host):
            raise BrokerError(f"a plaintext broker listens on loopback only, not {host}")
        self.workdir = workdir
        self.pki = pki
        self.host = host
        self.port = port or free_port()
        self._proc: subprocess.Popen[bytes] | None = None
        self.log_file = workdir / "mosquitto.log"
        self.persistence = pki is not None if persistence is None else persistence

    def start(self, timeout_s: float = 10.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        files = resources.files("broker")
        conf = self.workdir / "mosquitto.conf"
        persistence = (
            f"persistence true\npersistence_location {self.workdir}/\nautosave_interval 60"
            if self.persistence
            else "persistence false"
        )
        if self.pki is None:
            template = files.joinpath("mosquitto/local.conf").read_text()
            conf.write_text(
                template.format(
                    port=self.port,
                    log_file=self.log_file,
                    user_line=_user_line(),
                    persistence=persistence,
                    auth=self._password_file() if self.logins else "allow_anonymous true",
                )
            )
        else:
            acl = self.workdir / "acl"
            acl.write_text(files.joinpath("mosquitto/acl").read_text())
            template = files.joinpath("mosquitto/secure.conf").read_text()
            conf.write_text(
                template.format(
                    port=self.port,
                    host=self.host,
                    log_file=self.log_file,
                    cafile=self.pki.ca,
                    certfile=self.pki.broker.cert,
                    keyfile=self.pki.broker.key,
                    acl_file=acl,
                    user_line=_user_line(),
                    persistence=persistence,
                )
            )

        self.log_file.touch()
        # Something else on the port would answer the readiness probe below while mosquitto
        # has already exited: find out first.
        try:
            with socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind((self.host, self.port))
        except OSError as exc:
            raise BrokerError(
                f"cannot listen on {self.host}:{self.port}: {exc.strerror}; another program "
                "holds that port: choose another with --port"
            ) from None
        self._proc = subprocess.Popen(
            [mosquitto_binary(), "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                log = self.log_file.read_text(errors="replace")[-2000:]
                raise BrokerError(f"mosquitto exited with {self._proc.returncode}: {err}{log}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise BrokerError(f"mosquitto did not listen on {self.host}:{self.port} in {timeout_s} s")

    def _password_file(self) -> str:
        """The users of `logins`, hashed by mosquitto_passwd, and no anonymous clients."""
        path = self.workdir / "passwords"
        path.unlink(missing_ok=True)
        for user, password in self.logins.items():
            flags = ["-b"] if path.exists() else ["-c", "-b"]
            subprocess.run(
                [_passwd_binary(), *flags, str(path), user, password],
                check=True,
                capture_output=True,
            )
        path.chmod(0o600)
        return f"allow_anonymous false\npassword_file {path}"

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if proc.stderr:
            proc.stderr.close()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> LocalMosquitto:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
