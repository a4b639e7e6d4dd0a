"""How every fleet tool reaches the broker: one set of options (`--host`, `--port`, `--pki` or
`--ca-file`, `--username` with `--password-file` or `--password-credential`) and one checked
result, so that `serve`, `policy publish`, `vehicles`, `simulate` and `demo` agree.

Certificate identity (`--pki`, mutual TLS) stays the default. A login is for a broker that
authenticates by user name; its secret is read from a file or a systemd credential each
time a connection is made, never taken on the command line, where `ps` would show it.
"""

from __future__ import annotations

import argparse
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.kit.credentials import BrokerLogin, CredentialError, load_login
from agent.kit.mqtt import client_tls, is_loopback, permanent_refusal

if TYPE_CHECKING:
    import aiomqtt


class AccessError(ValueError):
    """Options that cannot reach a broker safely; the message says which and what to do."""


class _NeverInline(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, *args: object, **kw: object) -> None:
        parser.error(
            f"{self.option_strings[0]} is not taken: every user can read a command line (ps). "
            "Put the password or token alone in a file only you can read and pass "
            "--password-file FILE (or --password-credential NAME under systemd)"
        )


def add_broker_options(
    p: argparse.ArgumentParser, *, port: int | None = 8883, host: str | None = "127.0.0.1"
) -> None:
    if host is None:  # the demo: by default it starts a broker of its own
        p.add_argument("--host", help="run against this existing broker, not a private mosquitto")
        p.add_argument("--port", type=int, help="its port (default 1883, or 8883 with TLS)")
    else:
        p.add_argument("--host", default=host, help=f"the broker (default {host})")
        p.add_argument("--port", type=int, default=port, help=f"(default {port})")
    p.add_argument(
        "--pki",
        type=Path,
        help="the folder from `edge-fleet provision`: mutual TLS as the fleet-dispatcher "
        "identity (without --pki or --ca-file: plaintext, loopback brokers only)",
    )
    p.add_argument(
        "--ca-file",
        type=Path,
        metavar="PEM",
        help="TLS that checks the broker against this CA, with no client certificate: for a "
        "broker that takes a login (--username) instead",
    )
    p.add_argument("--username", help="log in to the broker as this user")
    p.add_argument(
        "--password-file",
        type=Path,
        metavar="FILE",
        help="the password or token for --username, alone in a file only you can read",
    )
    p.add_argument(
        "--password-credential",
        metavar="NAME",
        help="the same from systemd credential NAME (LoadCredential= in the unit)",
    )
    p.add_argument("--password", "--token", action=_NeverInline, help=argparse.SUPPRESS)


@dataclass(frozen=True)
class BrokerAccess:
    host: str
    port: int
    tls: ssl.SSLContext | None = None
    username: str | None = None
    password_file: Path | None = None
    password_credential: str | None = None
    pki: Path | None = None  # how `tls` was made: the fleet PKI folder (mutual TLS) ...
    ca_file: Path | None = None  # ... or a CA alone (TLS and a login)

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}"

    def login(self) -> BrokerLogin | None:
        """The login, with its secret read now (a rotated file counts at the next connect)."""
        return load_login(self.username, self.password_file, self.password_credential)

    def client(self, **options: Any) -> aiomqtt.Client:
        """An aiomqtt client to this broker with this TLS and login, and `options`."""
        import aiomqtt

        login = self.login()
        return aiomqtt.Client(
            self.host,
            self.port,
            tls_context=self.tls,
            username=login.username if login else None,
            password=login.password if login else None,
            **options,
        )


def access_from_args(args: argparse.Namespace) -> BrokerAccess:
    """The checked options; AccessError when they cannot be used as given."""
    if args.pki is not None and args.ca_file is not None:
        raise AccessError("give --pki (mutual TLS) or --ca-file (TLS and a login), not both")
    if args.ca_file is not None and args.username is None:
        raise AccessError(
            "--ca-file connects with no client certificate: the broker will want --username "
            "and --password-file (or use --pki for a certificate identity)"
        )
    if args.pki is None and args.ca_file is None and not is_loopback(args.host):
        raise AccessError(
            f"refusing plaintext to {args.host}: give --pki (see edge-fleet provision), or "
            "--ca-file with --username"
        )
    tls = None
    try:
        if args.pki is not None:
            from broker.provision import FleetPki

            pki = FleetPki(args.pki)
            tls = client_tls(pki.ca, pki.fleet.cert, pki.fleet.key)
        elif args.ca_file is not None:
            tls = client_tls(args.ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise AccessError(f"cannot set up TLS: {exc}") from None
    access = BrokerAccess(
        host=args.host,
        port=args.port,
        tls=tls,
        username=args.username,
        password_file=args.password_file,
        password_credential=args.password_credential,
        pki=args.pki,
        ca_file=args.ca_file,
    )
    try:
        access.login()  # a missing or unreadable secret is told now, not at the first connect
    except CredentialError as exc:
        raise AccessError(str(exc)) from None
    return access


def broker_said(exc: BaseException) -> str:
    """An MQTT error in words: "refused by the broker: <reason>" for a refusal that no retry
    changes (fix the login, the ACL or the client id), else the error as it is."""
    reason = permanent_refusal(exc)
    return f"refused by the broker: {reason}" if reason else str(exc)
