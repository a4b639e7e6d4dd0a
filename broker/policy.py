"""The fleet's side of the trust policy: write one, sign it with root keys, publish it retained.

Root keys are meant to live offline (a laptop without network, an HSM): `edge-fleet policy
sign` runs there and writes a file; `edge-fleet policy publish` (online, with the fleet tool's
certificate) puts that file on the retained `fleet/v1/policy` topic, where every vehicle picks
it up on its next connection. The publisher needs no root key.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Sequence

import aiomqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from agent.kit.credentials import BrokerLogin
from agent.kit.mqtt import NO_DELAY, publish_acked
from agent.wire.keys import key_id, raw_public
from agent.wire.policy import DelegatedKey, RequesterKey, TrustPolicy, sign_policy, trusted_key
from agent.wire.topics import POLICY_TOPIC

DAY_S = 86_400.0


def make_policy(
    *,
    version: int,
    roots: Sequence[Ed25519PublicKey],
    threshold: int,
    job_keys: Sequence[Ed25519PublicKey],
    requesters: Sequence[X25519PublicKey],
    valid_s: float = 30 * DAY_S,
    job_key_valid_s: float | None = None,
    job_classes: tuple[str, ...] = (),
    models: tuple[str, ...] = (),
    now: float | None = None,
) -> TrustPolicy:
    """A policy delegating `job_keys` (each with the same scope and expiry) and naming
    `requesters`; ValueError (pydantic's) when it is inconsistent."""
    issued = time.time() if now is None else now
    key_expiry = issued + (valid_s if job_key_valid_s is None else job_key_valid_s)
    return TrustPolicy(
        version=version,
        issued_at=issued,
        expires_at=issued + valid_s,
        root_keys=tuple(trusted_key(k) for k in roots),
        root_threshold=threshold,
        job_keys=tuple(
            DelegatedKey(
                keyid=key_id(k),
                public_key=raw_public(k),
                expires_at=key_expiry,
                job_classes=job_classes,
                models=models,
            )
            for k in job_keys
        ),
        requester_keys=tuple(
            RequesterKey(name=key_id(k), public_key=raw_public(k)) for k in requesters
        ),
    )


def signed_policy(policy: TrustPolicy, signers: Sequence[Ed25519PrivateKey]) -> bytes:
    """The policy envelope; for a root rotation, pass both the old and the new roots."""
    return sign_policy(policy, list(signers))


async def publish_policy(
    raw: bytes,
    *,
    host: str,
    port: int,
    tls: ssl.SSLContext | None,
    identifier: str = "",
    login: BrokerLogin | None = None,
) -> None:
    """Publish `raw` retained on the policy topic (QoS 1: returns once the broker has it)."""
    async with aiomqtt.Client(
        host,
        port,
        identifier=identifier or None,
        tls_context=tls,
        socket_options=NO_DELAY,
        timeout=10,
        username=login.username if login else None,
        password=login.password if login else None,
    ) as client:
        await publish_acked(client, POLICY_TOPIC, raw, retain=True)


async def retained_policy(
    *,
    host: str,
    port: int,
    tls: ssl.SSLContext | None,
    wait_s: float = 2.0,
    login: BrokerLogin | None = None,
) -> bytes | None:
    """The policy retained on the broker now (what every car takes as its next anchor), or
    None when none is retained. The broker sends a retained message right after SUBACK."""
    async with aiomqtt.Client(
        host,
        port,
        tls_context=tls,
        socket_options=NO_DELAY,
        timeout=10,
        username=login.username if login else None,
        password=login.password if login else None,
    ) as c:
        await c.subscribe(POLICY_TOPIC, qos=1)
        try:
            async with asyncio.timeout(wait_s):
                async for message in c.messages:
                    if isinstance(message.payload, bytes) and message.payload:
                        return message.payload
        except TimeoutError:
            return None
    return None
