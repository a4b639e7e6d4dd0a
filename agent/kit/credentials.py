"""Broker logins (a user name and a password or token) for brokers that want one, read from a
file or a systemd credential at each connection, never written in a config or on a command
line, and the broker's refusals that no retry will change.

Certificate identity (mutual TLS) stays the default; a login is for a broker that
authenticates by user name: ejabberd's mod_mqtt, a managed broker with tokens. The secret
is read when a connection is made, so a rotated file takes effect at the next reconnect,
and it is never logged: `BrokerLogin`'s repr hides it.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

MAX_SECRET_BYTES = 8192  # a JWT with a few claims is ~1 KB; a "password" of megabytes is a mistake
CREDENTIAL_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,128}")


class CredentialError(ValueError):
    """A login that cannot be used: says which file or setting, what is wrong, what to do."""


@dataclass(frozen=True)
class BrokerLogin:
    username: str
    password: str | None = field(default=None, repr=False)


def read_secret(path: Path) -> str:
    """The password or token in `path`: one line, UTF-8, at most MAX_SECRET_BYTES; a final
    newline (as `echo` writes it) is dropped. Refused when others may read the file."""
    try:
        st = path.stat()
    except OSError as exc:
        raise CredentialError(
            f"cannot read the broker password file {path}: {exc.strerror}"
        ) from None
    if not stat.S_ISREG(st.st_mode):
        raise CredentialError(f"the broker password file {path} is not a regular file")
    if st.st_mode & stat.S_IROTH:
        raise CredentialError(
            f"the broker password file {path} is readable by every user (mode "
            f"{stat.S_IMODE(st.st_mode):o}): chmod 600 it, or use a systemd credential"
        )
    if st.st_size > MAX_SECRET_BYTES:
        raise CredentialError(
            f"the broker password file {path} holds {st.st_size} bytes; a password or token "
            f"is at most {MAX_SECRET_BYTES}: is it the right file?"
        )
    try:
        raw = path.read_bytes()[: MAX_SECRET_BYTES + 1]
    except OSError as exc:
        raise CredentialError(
            f"cannot read the broker password file {path}: {exc.strerror}"
        ) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CredentialError(f"the broker password file {path} is not UTF-8 text") from None
    secret = text.removesuffix("\n").removesuffix("\r")
    if not secret:
        raise CredentialError(f"the broker password file {path} is empty")
    if any(c in secret for c in "\n\r\0"):
        raise CredentialError(
            f"the broker password file {path} holds more than one line: put only the "
            "password or token in it"
        )
    return secret


def credential_path(name: str, environ: Mapping[str, str] | None = None) -> Path:
    """The file of systemd credential `name` (LoadCredential= or LoadCredentialEncrypted= in
    the unit), in the folder systemd names in $CREDENTIALS_DIRECTORY."""
    if not CREDENTIAL_NAME.fullmatch(name):
        raise CredentialError(f"{name!r} is not a systemd credential name (letters, digits, _.@-)")
    folder = (os.environ if environ is None else environ).get("CREDENTIALS_DIRECTORY")
    if not folder:
        raise CredentialError(
            f"password_credential = {name!r} needs the agent started by systemd with "
            f"LoadCredential={name}:<file>; $CREDENTIALS_DIRECTORY is not set here. Outside "
            "systemd, use password_file"
        )
    return Path(folder) / name


def load_login(
    username: str | None,
    password_file: Path | None = None,
    password_credential: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> BrokerLogin | None:
    """The login these settings name, with its secret read now; None without a user name."""
    if username is None:
        if password_file is not None or password_credential is not None:
            raise CredentialError("a broker password needs a username to go with it")
        return None
    if password_file is not None and password_credential is not None:
        raise CredentialError("name one of password_file or password_credential, not both")
    if password_credential is not None:
        password_file = credential_path(password_credential, environ)
    secret = read_secret(password_file) if password_file is not None else None
    return BrokerLogin(username, secret)
