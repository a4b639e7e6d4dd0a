"""What this vehicle trusts to sign jobs, and whom it may seal results to.

Two forms, chosen in the config's [keys] section:
  trust_policy      a root-signed policy (agent/wire/policy.py): delegated job keys with
                    expiry and scope, the requester keys results may go to, updates over
                    the retained `fleet/v1/policy` topic accepted only as the held policy's
                    roots demand, the held one kept in the state database across restarts;
  trusted_job_keys  a flat list of job-signing keys, for a bench or a test rig: no scope,
                    no expiry, no requester allowlist, no rotation.
Pure decisions over what is held; the daemon does the I/O (topic, state database).
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.wire.errors import Reason, WireError
from agent.wire.keys import KeyRing, ed25519_public
from agent.wire.messages import JobSpec
from agent.wire.policy import (
    TrustPolicy,
    accept_policy,
    job_key_for,
    load_root_policy,
    requester_allowed,
)


@dataclass(frozen=True, slots=True)
class HeldPolicy:
    policy: TrustPolicy
    raw: bytes  # the signed envelope, as received: what is persisted and compared

    @property
    def version(self) -> int:
        return self.policy.version


class Trust:
    """The job-signing keys in force, and the checks a verified job must pass beyond them."""

    def __init__(self, *, ring: KeyRing | None = None, held: HeldPolicy | None = None) -> None:
        if (ring is None) == (held is None):
            raise ValueError("exactly one of a key ring or a trust policy")
        self._held = held
        self._ring = ring if ring is not None else _ring_of(held.policy)  # type: ignore[union-attr]

    @classmethod
    def from_policy(cls, installed: bytes, stored: bytes | None, now: float) -> tuple[Trust, str]:
        """The policy to hold at start, and a line saying which and why.

        The installed file is the anchor (signed by its own roots). A stored policy is one
        accepted over the wire earlier; it is kept if it is at least as new. An installed
        file newer than the stored policy must pass the same rules as an update would.
        """
        file_policy = load_root_policy(installed)
        if stored is None:
            return cls(held=HeldPolicy(file_policy, installed)), "installed file"
        kept = load_root_policy(stored)
        if kept.version >= file_policy.version:
            return cls(held=HeldPolicy(kept, stored)), f"state database (v{kept.version})"
        try:
            newer = accept_policy(installed, kept, now)
        except WireError as err:
            return (
                cls(held=HeldPolicy(kept, stored)),
                f"state database (v{kept.version}); the installed v{file_policy.version} "
                f"was refused: {err.detail}",
            )
        return cls(held=HeldPolicy(newer, installed)), "installed file (newer than the stored)"

    @property
    def ring(self) -> KeyRing:
        """Keys whose signature on a job envelope is checked (the policy's scope comes after)."""
        return self._ring

    @property
    def policy(self) -> HeldPolicy | None:
        return self._held

    def valid(self, now: float) -> bool:
        """False once a held policy has expired: no new jobs until a fresh one arrives."""
        return self._held is None or now < self._held.policy.expires_at

    def authorize(self, job: JobSpec, keyid: str, now: float) -> None:
        """WireError unless the policy lets `keyid` sign this job now and names its requester."""
        if self._held is None:
            return
        policy = self._held.policy
        job_key_for(policy, keyid, job.job_class, job.model.sha256, now)
        if not requester_allowed(policy, job.requester_key):
            raise WireError(
                Reason.REQUESTER_NOT_ALLOWED,
                f"the trust policy v{policy.version} names no requester with that key: "
                "a result would go to someone the fleet did not authorize",
            )

    def update(self, raw: bytes, now: float) -> HeldPolicy | None:
        """Take the policy in `raw` if the held one's roots admit it; None if it is the one held.

        WireError (the held policy stays) for anything else: a flat key ring takes no updates.
        """
        if self._held is None:
            raise WireError(
                Reason.UNKNOWN_KEY,
                "this vehicle trusts a fixed key list (keys.trusted_job_keys): "
                "policy updates are ignored",
            )
        if raw == self._held.raw:
            return None
        new = accept_policy(raw, self._held.policy, now)
        self._held = HeldPolicy(new, raw)
        self._ring = _ring_of(new)
        return self._held


def _ring_of(policy: TrustPolicy) -> KeyRing:
    return KeyRing({k.keyid: ed25519_public(k.public_key) for k in policy.job_keys})
