"""Provisioning: a fleet CA, the broker's certificate, the fleet tools' and each vehicle's.

With python `cryptography` only (no openssl shell-outs). ECDSA P-256 keys, PEM
files, private keys written 0600. The broker uses a client certificate's
common name as the MQTT username (`use_identity_as_username`), and its ACL
confines `%u` to `fleet/v1/vehicles/%u/...`: a vehicle id that could widen that
pattern (`+`, `#`, `/`, empty) or take a fleet tool's identity is refused here.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.wire.topics import check_vehicle_id

FLEET_IDENTITY = "fleet-dispatcher"
RESERVED_PREFIX = "fleet-"
_CA_DAYS = 5 * 365
_LEAF_DAYS = 365


class ProvisionError(Exception):
    """Raised when an identity cannot be provisioned (a bad vehicle id, an existing file)."""


@dataclass(frozen=True)
class Identity:
    cert: Path
    key: Path


@dataclass(frozen=True)
class FleetPki:
    folder: Path

    @property
    def ca(self) -> Path:
        return self.folder / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.folder / "ca.key"

    @property
    def broker(self) -> Identity:
        return Identity(self.folder / "broker.pem", self.folder / "broker.key")

    @property
    def fleet(self) -> Identity:
        return Identity(
            self.folder / f"{FLEET_IDENTITY}.pem", self.folder / f"{FLEET_IDENTITY}.key"
        )

    def vehicle(self, vehicle_id: str) -> Identity:
        return Identity(
            self.folder / "vehicles" / f"{vehicle_id}.pem",
            self.folder / "vehicles" / f"{vehicle_id}.key",
        )


def check_provisionable(vehicle_id: str) -> str:
    """The id, if it is safe as an MQTT username and ACL level; ProvisionError otherwise."""
    try:
        check_vehicle_id(vehicle_id)
    except ValueError as exc:
        raise ProvisionError(str(exc)) from None
    if vehicle_id.startswith(RESERVED_PREFIX):
        raise ProvisionError(
            f"vehicle id {vehicle_id!r} starts with {RESERVED_PREFIX!r}, reserved for fleet tools"
        )
    return vehicle_id


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edge-fleet"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def create_ca(pki: FleetPki, *, name: str = "edge-fleet CA") -> None:
    if pki.ca.exists() or pki.ca_key.exists():
        raise ProvisionError(f"a CA already exists in {pki.folder}; refusing to replace it")
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=_CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_key(pki.ca_key, key)
    _write_cert(pki.ca, cert)


def _issue(
    pki: FleetPki,
    identity: Identity,
    common_name: str,
    *,
    server: bool,
    hosts: tuple[str, ...] = (),
) -> None:
    if identity.cert.exists() or identity.key.exists():
        raise ProvisionError(f"{identity.cert.name} already exists; refusing to replace it")
    ca_key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ProvisionError(f"{pki.ca_key} is not the fleet CA's EC key")
    ca_cert = x509.load_pem_x509_certificate(pki.ca.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=_LEAF_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
    )
    if hosts:
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    _write_key(identity.key, key)
    _write_cert(identity.cert, builder.sign(ca_key, hashes.SHA256()))


def issue_broker(pki: FleetPki, hosts: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")) -> None:
    _issue(pki, pki.broker, "broker", server=True, hosts=hosts)


def issue_fleet(pki: FleetPki) -> None:
    _issue(pki, pki.fleet, FLEET_IDENTITY, server=False)


def issue_vehicle(pki: FleetPki, vehicle_id: str) -> Identity:
    check_provisionable(vehicle_id)
    identity = pki.vehicle(vehicle_id)
    _issue(pki, identity, vehicle_id, server=False)
    return identity


def provision(folder: Path, vehicles: list[str], hosts: tuple[str, ...] = ()) -> FleetPki:
    """A new fleet PKI in `folder` (CA, broker, fleet tools), plus the vehicles named."""
    for vid in vehicles:  # all ids are checked before anything is written
        check_provisionable(vid)
    pki = FleetPki(folder)
    if not pki.ca.exists():
        create_ca(pki)
        issue_broker(pki, hosts or ("localhost", "127.0.0.1", "::1"))
        issue_fleet(pki)
    for vid in vehicles:
        issue_vehicle(pki, vid)
    return pki
