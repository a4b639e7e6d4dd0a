"""Keys and their file formats, shared by both sides.

Ed25519 signs jobs (fleet) and results (vehicle); X25519 receives sealed
results (requester). A key id is sha256(raw public key)[:16] in hex: a hint
for finding the key, never a security decision. Private keys are PEM PKCS#8
(written 0600 by agent/kit/keyfiles.py, the file edge: this module reads no file);
public keys travel as base64 of the raw 32 bytes.

The vehicle reads one private key at start, in the one encoding this module (and
`openssl genpkey`) writes: RFC 8410's PKCS#8, 16 fixed bytes then the 32-byte
seed. That encoding is recognised exactly and handed to cryptography as raw
bytes; anything else goes to cryptography's general PEM loader. The general
loader's package imports every other key type (RSA, DSA, DH, EC, SSH, legacy
ciphers): 1.7 MB of the daemon's resident memory while the car drives, against
a 50 MB budget (docs/performance.md).
"""

from __future__ import annotations

import base64
import binascii
import hashlib

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from pydantic import Field

from agent.wire.codec import B64Bytes, WireModel, b64encode, dump_model, exactly, parse_model
from agent.wire.errors import Reason, WireError
from agent.wire.topics import VEHICLE_ID_PATTERN


class KeyFileError(Exception):
    """Raised when a key file is missing, unreadable, or not the key it should be."""


# RFC 8410 section 7: SEQUENCE { version 0, AlgorithmIdentifier { OID }, OCTET STRING {
# OCTET STRING (32 bytes) } }, with no attributes and no public key: what cryptography
# and OpenSSL write for these keys.
_ED25519_PKCS8 = bytes.fromhex("302e020100300506032b657004220420")  # OID 1.3.101.112
_X25519_PKCS8 = bytes.fromhex("302e020100300506032b656e04220420")  # OID 1.3.101.110
_PEM_BEGIN, _PEM_END = b"-----BEGIN PRIVATE KEY-----", b"-----END PRIVATE KEY-----"


def raw_public(key: Ed25519PublicKey | X25519PublicKey) -> bytes:
    return key.public_bytes_raw()


def key_id(key: Ed25519PublicKey | X25519PublicKey) -> str:
    return hashlib.sha256(raw_public(key)).hexdigest()[:16]


def private_pem(key: Ed25519PrivateKey | X25519PrivateKey) -> bytes:
    """`key` as PEM PKCS#8 (RFC 8410), the one form this project writes."""
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def private_key_from_pem(data: bytes, where: str) -> Ed25519PrivateKey | X25519PrivateKey | object:
    """The private key in `data` (read from `where`, named in errors); KeyFileError if none."""
    key = _read_rfc8410(data)
    if key is not None:
        return key
    from cryptography.hazmat.primitives import serialization

    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{where} is not an unencrypted PEM private key: {exc}") from None


def _read_rfc8410(pem: bytes) -> Ed25519PrivateKey | X25519PrivateKey | None:
    """The key, if `pem` is exactly an RFC 8410 PKCS#8 Ed25519 or X25519 key in one PEM block
    (line breaks as any editor leaves them); None for anything else, decided by the general
    loader."""
    lines = pem.strip().splitlines()
    if len(lines) < 3 or lines[0].strip() != _PEM_BEGIN or lines[-1].strip() != _PEM_END:
        return None
    try:
        der = base64.b64decode(b"".join(line.strip() for line in lines[1:-1]), validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(der) != 48:
        return None
    if der[:16] == _ED25519_PKCS8:
        return Ed25519PrivateKey.from_private_bytes(der[16:])
    if der[:16] == _X25519_PKCS8:
        return X25519PrivateKey.from_private_bytes(der[16:])
    return None


def signing_key_from_pem(data: bytes, where: str) -> Ed25519PrivateKey:
    key = private_key_from_pem(data, where)
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{where} holds a {type(key).__name__}, expected an Ed25519 key")
    return key


def requester_key_from_pem(data: bytes, where: str) -> X25519PrivateKey:
    key = private_key_from_pem(data, where)
    if not isinstance(key, X25519PrivateKey):
        raise KeyFileError(f"{where} holds a {type(key).__name__}, expected an X25519 key")
    return key


def ed25519_public(raw: bytes) -> Ed25519PublicKey:
    try:
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError:
        raise ValueError("not a 32-byte Ed25519 public key") from None


def x25519_public(raw: bytes) -> X25519PublicKey:
    try:
        return X25519PublicKey.from_public_bytes(raw)
    except ValueError:
        raise ValueError("not a 32-byte X25519 public key") from None


# The u-coordinates of the points of small order on Curve25519 and its twist (libsodium's
# blocklist, reduced mod p). A clamped X25519 scalar is a multiple of the cofactor 8, so the
# shared secret with any of them is zero, which HPKE (and cryptography) refuse. Checked here by
# arithmetic: building a probe key with cryptography would import its RSA module into the
# idle daemon (1.7 MB). tests/test_wire.py checks this set against cryptography's exchange.
_P25519 = 2**255 - 19
_LOW_ORDER_U = frozenset(
    {
        0,
        1,
        325606250916557431795983626356110631294008115727848805560023387167927233504,
        39382357235489614581723060781553021112529911719440698176882885853963445705823,
        _P25519 - 1,
    }
)


def x25519_agreeable(raw: bytes) -> bool:
    """False for a key no shared secret can be agreed with (a point of low order, in any of
    its encodings, or not 32 bytes): sealing a result to it would fail after the job ran."""
    if len(raw) != 32:
        return False
    u = (int.from_bytes(raw, "little") & ((1 << 255) - 1)) % _P25519  # RFC 7748 decoding
    return u not in _LOW_ORDER_U


def sealable_x25519_public(raw: bytes) -> X25519PublicKey:
    """The requester key in `raw`; ValueError if no result could be sealed to it."""
    key = x25519_public(raw)
    if not x25519_agreeable(raw):
        raise ValueError(
            "a low-order X25519 point (no shared secret can be agreed with it): "
            "no result can be sealed to this key"
        )
    return key


class TrustedKey(WireModel):
    keyid: str = Field(pattern=exactly(r"[0-9a-f]{16}"))
    public_key: B64Bytes = Field(min_length=32, max_length=32)
    name: str = Field(default="", max_length=128)


class TrustedKeysFile(WireModel):
    """The file of job-signing public keys a vehicle trusts (named in its config)."""

    version: int = Field(ge=1, le=1)
    keys: tuple[TrustedKey, ...] = Field(max_length=64)


class VehicleKey(WireModel):
    vehicle_id: str = Field(pattern=exactly(VEHICLE_ID_PATTERN))
    public_key: B64Bytes = Field(min_length=32, max_length=32)


class VehicleRegistryFile(WireModel):
    """The fleet's record of each vehicle's result-signing public key."""

    version: int = Field(ge=1, le=1)
    vehicles: tuple[VehicleKey, ...]


class KeyRing:
    """Ed25519 public keys by key id."""

    def __init__(self, keys: dict[str, Ed25519PublicKey]) -> None:
        self._keys = dict(keys)

    @classmethod
    def of(cls, *keys: Ed25519PublicKey) -> KeyRing:
        return cls({key_id(k): k for k in keys})

    def get(self, keyid: str) -> Ed25519PublicKey | None:
        return self._keys.get(keyid)

    def __len__(self) -> int:
        return len(self._keys)

    def to_file(self) -> bytes:
        entries = tuple(
            TrustedKey(keyid=kid, public_key=raw_public(k)) for kid, k in self._keys.items()
        )
        return dump_model(TrustedKeysFile(version=1, keys=entries))

    @classmethod
    def from_file(cls, raw: bytes, where: str) -> KeyRing:
        """Parse a trusted-keys file's bytes; KeyFileError (naming `where`) on anything wrong."""
        try:
            parsed = parse_model(
                raw, TrustedKeysFile, what="trusted keys file", reason=Reason.MALFORMED_PAYLOAD
            )
        except WireError as exc:
            raise KeyFileError(f"{where}: {exc.detail}") from None
        keys: dict[str, Ed25519PublicKey] = {}
        for entry in parsed.keys:
            try:
                pub = ed25519_public(entry.public_key)
            except ValueError as exc:
                raise KeyFileError(f"{where}: key {entry.keyid}: {exc}") from None
            if key_id(pub) != entry.keyid:
                raise KeyFileError(
                    f"{where}: keyid {entry.keyid} does not match its public key "
                    f"(expected {key_id(pub)})"
                )
            keys[entry.keyid] = pub
        return cls(keys)


def public_b64(key: Ed25519PublicKey | X25519PublicKey) -> str:
    return b64encode(raw_public(key))
