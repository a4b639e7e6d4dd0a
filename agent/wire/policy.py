"""The trust policy (TUF-style, pure code): which keys may sign jobs, for what, and until when.

A fleet root key set, kept offline, signs a policy that delegates job signing to
online keys, each with an expiry and a scope (job classes, models), and names
the requester keys results may be sealed to. A vehicle accepts a new policy
only if:
  - a threshold of the roots of the policy it holds signed it, and, when the
    roots change, a threshold of the new roots too (rotation signed by old and new);
  - its version is higher than the one held (no rollback, no replay);
  - it has not expired and was not issued in the future.
The very first policy comes with the vehicle (a file installed with it) and must
be signed by a threshold of its own roots.

The agent holds one policy at a time (agent/core/trust.py); this module is the
decision, pure and tested on its own.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import Field, model_validator

from agent.wire import envelope
from agent.wire.codec import B64Bytes, WireModel, dump_model, parse_model
from agent.wire.errors import Reason, WireError
from agent.wire.keys import (
    KeyRing,
    TrustedKey,
    ed25519_public,
    key_id,
    raw_public,
    x25519_agreeable,
)
from agent.wire.messages import KEY_ID_RE, NAME_RE, SHA256_RE

POLICY_TYPE = "application/vnd.edge-fleet.policy.v1+json"
MAX_POLICY_BYTES = 256 * 1024


class DelegatedKey(WireModel):
    """An online job-signing key, valid until `expires_at`, for these classes and models
    (empty: any)."""

    keyid: str = Field(pattern=KEY_ID_RE)
    public_key: B64Bytes = Field(min_length=32, max_length=32)
    expires_at: float = Field(ge=0, allow_inf_nan=False)
    job_classes: tuple[str, ...] = Field(default=(), max_length=64)
    models: tuple[str, ...] = Field(default=(), max_length=256)

    @model_validator(mode="after")
    def _well_formed(self) -> DelegatedKey:
        import re

        for name in self.job_classes:
            if not re.fullmatch(NAME_RE, name):
                raise ValueError(f"job class {name!r} is not a valid name")
        for digest in self.models:
            if not re.fullmatch(SHA256_RE, digest):
                raise ValueError(f"model {digest!r} is not a sha256")
        return self


class RequesterKey(WireModel):
    name: str = Field(default="", max_length=128)
    public_key: B64Bytes = Field(min_length=32, max_length=32)

    @model_validator(mode="after")
    def _sealable(self) -> RequesterKey:
        if not x25519_agreeable(self.public_key):
            raise ValueError(
                f"requester {self.name or '(unnamed)'}: the key is a low-order X25519 point; "
                "no result can be sealed to it"
            )
        return self


class TrustPolicy(WireModel):
    version: int = Field(ge=1)
    issued_at: float = Field(ge=0, allow_inf_nan=False)
    expires_at: float = Field(ge=0, allow_inf_nan=False)
    root_keys: tuple[TrustedKey, ...] = Field(min_length=1, max_length=8)
    root_threshold: int = Field(ge=1, le=8)
    job_keys: tuple[DelegatedKey, ...] = Field(default=(), max_length=64)
    requester_keys: tuple[RequesterKey, ...] = Field(default=(), max_length=256)

    @model_validator(mode="after")
    def _consistent(self) -> TrustPolicy:
        if self.expires_at <= self.issued_at:
            raise ValueError("expires_at must be after issued_at")
        if self.root_threshold > len(self.root_keys):
            raise ValueError("root_threshold exceeds the number of root keys")
        pairs = [(k.keyid, k.public_key) for k in self.root_keys]
        pairs += [(k.keyid, k.public_key) for k in self.job_keys]
        for kid, public in pairs:
            if key_id(ed25519_public(public)) != kid:
                raise ValueError(f"keyid {kid} does not match its public key")
        return self

    def roots(self) -> KeyRing:
        return KeyRing({k.keyid: ed25519_public(k.public_key) for k in self.root_keys})


def sign_policy(policy: TrustPolicy, keys: list[Ed25519PrivateKey]) -> bytes:
    """A policy envelope signed by each of `keys` (at most envelope.MAX_SIGNATURES)."""
    payload = dump_model(policy)
    message = envelope.pae(POLICY_TYPE, payload)
    signatures = [
        {"keyid": key_id(k.public_key()), "sig": base64.b64encode(k.sign(message)).decode()}
        for k in keys
    ]
    return json.dumps(
        {
            "payloadType": POLICY_TYPE,
            "payload": base64.b64encode(payload).decode(),
            "signatures": signatures,
        }
    ).encode()


def _count_signers(env: envelope.Envelope, ring: KeyRing) -> int:
    """Distinct keys of `ring` with a valid signature on the envelope (a key id is only a hint)."""
    message = envelope.pae(env.payloadType, env.payload)
    signers: set[str] = set()
    for signature in env.signatures:
        public = ring.get(signature.keyid)
        if public is None or signature.keyid in signers:
            continue
        try:
            public.verify(signature.sig, message)
        except InvalidSignature:
            continue
        signers.add(signature.keyid)
    return len(signers)


def _parse(raw: bytes) -> tuple[envelope.Envelope, TrustPolicy]:
    if len(raw) > MAX_POLICY_BYTES:
        raise WireError(Reason.OVERSIZED, f"policy of {len(raw)} bytes exceeds {MAX_POLICY_BYTES}")
    env = parse_model(
        raw, envelope.Envelope, what="policy envelope", reason=Reason.MALFORMED_ENVELOPE
    )
    if env.payloadType != POLICY_TYPE:
        raise WireError(
            Reason.WRONG_PAYLOAD_TYPE, f"payloadType {env.payloadType!r} is not a policy"
        )
    # Parsed only to learn the new roots; nothing in it is trusted before the signature counts.
    new = parse_model(env.payload, TrustPolicy, what="policy", reason=Reason.MALFORMED_PAYLOAD)
    return env, new


def load_root_policy(raw: bytes) -> TrustPolicy:
    """The policy installed with the vehicle (or kept in its state): signed by a threshold of
    its own roots. No time checks: an expired one is still the anchor for the next, it just
    admits no jobs (job_key_for fails closed)."""
    env, new = _parse(raw)
    have = _count_signers(env, new.roots())
    if have < new.root_threshold:
        raise WireError(
            Reason.BAD_SIGNATURE,
            f"policy v{new.version} has {have} valid signature(s) from its own roots, "
            f"{new.root_threshold} required",
        )
    return new


def accept_policy(
    raw: bytes, held: TrustPolicy | None, now: float, *, max_clock_skew_s: float = 60.0
) -> TrustPolicy:
    """The new policy in `raw`, if the rules above admit it over `held`; WireError otherwise."""
    env, new = _parse(raw)
    needed = [(new.roots(), new.root_threshold, "its own roots")]
    if held is not None:
        needed = [(held.roots(), held.root_threshold, "the current roots")]
        if {k.keyid for k in new.root_keys} != {k.keyid for k in held.root_keys}:
            needed.append((new.roots(), new.root_threshold, "the new roots"))
    for ring, threshold, whose in needed:
        have = _count_signers(env, ring)
        if have < threshold:
            raise WireError(
                Reason.BAD_SIGNATURE,
                f"policy v{new.version} has {have} valid signature(s) from {whose}, "
                f"{threshold} required",
            )
    if held is not None and new.version <= held.version:
        raise WireError(
            Reason.REPLAYED, f"policy v{new.version} is not newer than the held v{held.version}"
        )
    if now >= new.expires_at:
        raise WireError(
            Reason.EXPIRED, f"policy v{new.version} expired {now - new.expires_at:.0f} s ago"
        )
    if new.issued_at > now + max_clock_skew_s:
        raise WireError(Reason.NOT_YET_VALID, f"policy v{new.version} is issued in the future")
    return new


@dataclass(frozen=True, slots=True)
class JobAuthority:
    """What the policy says about one job signature."""

    public_key: Ed25519PublicKey


def job_key_for(
    policy: TrustPolicy, keyid: str, job_class: str, model_sha256: str, now: float
) -> JobAuthority:
    """The delegated key `keyid` if the policy lets it sign this job now; WireError otherwise."""
    if now >= policy.expires_at:
        raise WireError(
            Reason.POLICY_EXPIRED,
            f"the trust policy v{policy.version} has expired: "
            "no new jobs until a fresh one arrives",
        )
    key = next((k for k in policy.job_keys if k.keyid == keyid), None)
    if key is None:
        raise WireError(Reason.UNKNOWN_KEY, f"the policy delegates no key {keyid}")
    if now >= key.expires_at:
        raise WireError(Reason.EXPIRED, f"job-signing key {keyid} expired")
    if key.job_classes and job_class not in key.job_classes:
        raise WireError(
            Reason.KEY_OUT_OF_SCOPE, f"key {keyid} may not sign jobs of class {job_class!r}"
        )
    if key.models and model_sha256 not in key.models:
        raise WireError(Reason.KEY_OUT_OF_SCOPE, f"key {keyid} may not sign jobs for that model")
    return JobAuthority(ed25519_public(key.public_key))


def requester_allowed(policy: TrustPolicy, requester_key: bytes) -> bool:
    """Results may be sealed only to keys the policy names (an empty list allows none)."""
    return any(k.public_key == requester_key for k in policy.requester_keys)


def trusted_key(key: Ed25519PublicKey) -> TrustedKey:
    return TrustedKey(keyid=key_id(key), public_key=raw_public(key))
