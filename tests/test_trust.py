"""What the vehicle trusts (agent.core.trust) as pure code: the policy held at start, its
updates, its expiry, and the checks beyond the signature."""

from __future__ import annotations

import time

import pytest

from agent.core.trust import Trust
from agent.wire.errors import Reason, WireError
from agent.wire.keys import KeyRing
from tests.support import FleetKeys, job_spec

NOW = time.time()


def _policy(fleet: FleetKeys, **kw: object) -> bytes:
    """A policy issued at NOW (the suite may run this module minutes after importing it)."""
    return fleet.policy(now=NOW, **kw)  # type: ignore[arg-type]


def test_exactly_one_form_of_trust():
    fleet = FleetKeys()
    with pytest.raises(ValueError, match="exactly one"):
        Trust()
    held, _ = Trust.from_policy(_policy(fleet), None, NOW)
    with pytest.raises(ValueError, match="exactly one"):
        Trust(ring=KeyRing.of(fleet.job_key.public_key()), held=held.policy)


def test_the_installed_policy_is_held_when_nothing_is_stored():
    fleet = FleetKeys()
    trust, source = Trust.from_policy(_policy(fleet), None, NOW)
    assert source == "installed file"
    assert trust.policy is not None and trust.policy.version == 1
    assert trust.ring.get(fleet.issuer) is not None


def test_a_stored_policy_at_least_as_new_is_kept():
    fleet = FleetKeys()
    v2 = _policy(fleet, version=2)
    trust, source = Trust.from_policy(_policy(fleet, version=2), v2, NOW)
    assert source == "state database (v2)"
    assert trust.policy is not None and trust.policy.raw == v2
    trust, source = Trust.from_policy(_policy(fleet, version=1), _policy(fleet, version=3), NOW)
    assert source == "state database (v3)"


def test_a_newer_installed_policy_replaces_the_stored_one_if_its_roots_admit_it():
    fleet = FleetKeys()
    installed = _policy(fleet, version=3)
    trust, source = Trust.from_policy(installed, _policy(fleet, version=2), NOW)
    assert source == "installed file (newer than the stored)"
    assert trust.policy is not None and trust.policy.version == 3


def test_a_newer_installed_policy_the_stored_roots_refuse_is_not_taken():
    fleet, stranger = FleetKeys(), FleetKeys()
    trust, source = Trust.from_policy(_policy(stranger, version=5), _policy(fleet, version=2), NOW)
    assert source.startswith("state database (v2); the installed v5 was refused: ")
    assert trust.policy is not None and trust.policy.version == 2


def test_a_flat_key_list_never_expires_and_takes_no_updates():
    fleet = FleetKeys()
    trust = Trust(ring=KeyRing.of(fleet.job_key.public_key()))
    assert trust.policy is None
    assert trust.valid(NOW + 10**9)
    with pytest.raises(WireError) as err:
        trust.update(_policy(fleet), NOW)
    assert err.value.reason is Reason.UNKNOWN_KEY
    trust.authorize(job_spec(fleet, "veh-1"), "any-key", NOW)  # no scope to check


def test_a_policy_is_valid_until_its_expiry_and_not_at_it():
    fleet = FleetKeys()
    trust, _ = Trust.from_policy(_policy(fleet, valid_s=100.0), None, NOW)
    assert trust.policy is not None
    expires = trust.policy.policy.expires_at
    assert trust.valid(expires - 0.001)
    assert not trust.valid(expires)


def test_updates_newer_are_taken_the_same_one_is_no_change_and_older_are_refused():
    fleet = FleetKeys()
    trust, _ = Trust.from_policy(_policy(fleet, version=2), None, NOW)
    assert trust.policy is not None
    assert trust.update(trust.policy.raw, NOW) is None, "the one held, redelivered"
    new = trust.update(_policy(fleet, version=3), NOW)
    assert new is not None and new.version == 3 and trust.policy is new
    with pytest.raises(WireError) as err:
        trust.update(_policy(fleet, version=1), NOW)
    assert err.value.reason is Reason.REPLAYED
    assert trust.policy.version == 3


def test_an_update_changes_the_ring_of_job_keys():
    fleet, rotated = FleetKeys(), FleetKeys()
    trust, _ = Trust.from_policy(_policy(fleet), None, NOW)
    update = _policy(fleet, version=2, job_keys=[rotated.job_key.public_key()])
    trust.update(update, NOW)
    assert trust.ring.get(rotated.issuer) is not None
    assert trust.ring.get(fleet.issuer) is None


def test_authorize_refuses_a_requester_the_policy_does_not_name():
    fleet, other = FleetKeys(), FleetKeys()
    trust, _ = Trust.from_policy(_policy(fleet), None, NOW)
    spec = job_spec(other, "veh-1")  # sealed to a requester the fleet never named
    spec = spec.model_copy(update={"issuer": fleet.issuer})
    with pytest.raises(WireError) as err:
        trust.authorize(spec, fleet.issuer, NOW)
    assert err.value.reason is Reason.REQUESTER_NOT_ALLOWED
    assert "v1" in err.value.detail
    trust.authorize(job_spec(fleet, "veh-1"), fleet.issuer, NOW)  # the named one passes


def test_the_held_policy_keeps_the_exact_bytes_it_was_given():
    """What is persisted and compared is the signed envelope as received, at each source."""
    fleet = FleetKeys()
    v1, v2, v3 = (_policy(fleet, version=v) for v in (1, 2, 3))
    trust, _ = Trust.from_policy(v1, None, NOW)
    assert trust.policy is not None and trust.policy.raw == v1
    trust, _ = Trust.from_policy(v1, v2, NOW)
    assert trust.policy is not None and trust.policy.raw == v2
    trust, _ = Trust.from_policy(v3, v2, NOW)
    assert trust.policy is not None and trust.policy.raw == v3
    stranger = FleetKeys().policy(version=9)
    trust, _ = Trust.from_policy(stranger, v2, NOW)
    assert trust.policy is not None and trust.policy.raw == v2
    trust, _ = Trust.from_policy(v1, None, NOW)
    trust.update(v2, NOW)
    assert trust.policy is not None and trust.policy.raw == v2
    assert trust.update(v2, NOW) is None, "the bytes held, given again: no change"


@pytest.mark.parametrize(
    ("scope", "detail"),
    [
        ({"job_classes": ("other",)}, "may not sign jobs of class 'digits-eval'"),
        ({"models": ("f" * 64,)}, "may not sign jobs for that model"),
    ],
)
def test_authorize_checks_the_keys_scope_for_this_jobs_class_and_model(scope, detail):
    from broker.policy import make_policy, signed_policy

    fleet = FleetKeys()
    spec = job_spec(fleet, "veh-1")

    def trust_scoped(**key_scope: tuple[str, ...]) -> Trust:
        policy = make_policy(
            version=1,
            roots=[fleet.root.public_key()],
            threshold=1,
            job_keys=[fleet.job_key.public_key()],
            requesters=[fleet.requester.public_key()],
            **key_scope,
        )
        return Trust.from_policy(signed_policy(policy, [fleet.root]), None, NOW)[0]

    with pytest.raises(WireError) as err:
        trust_scoped(**scope).authorize(spec, fleet.issuer, NOW)
    assert err.value.reason is Reason.KEY_OUT_OF_SCOPE
    assert detail in err.value.detail
    if "job_classes" in scope:
        trust_scoped(job_classes=(spec.job_class,)).authorize(spec, fleet.issuer, NOW)
    else:
        trust_scoped(models=(spec.model.sha256,)).authorize(spec, fleet.issuer, NOW)


def test_the_words_of_trusts_refusals():
    fleet, other = FleetKeys(), FleetKeys()
    with pytest.raises(ValueError, match=r"^exactly one of a key ring or a trust policy$"):
        Trust()
    flat = Trust(ring=KeyRing.of(fleet.job_key.public_key()))
    with pytest.raises(WireError) as err:
        flat.update(_policy(fleet), NOW)
    assert err.value.detail == (
        "this vehicle trusts a fixed key list (keys.trusted_job_keys): policy updates are ignored"
    )
    trust, _ = Trust.from_policy(_policy(fleet), None, NOW)
    spec = job_spec(other, "veh-1").model_copy(update={"issuer": fleet.issuer})
    with pytest.raises(WireError) as err:
        trust.authorize(spec, fleet.issuer, NOW)
    assert err.value.detail == (
        "the trust policy v1 names no requester with that key: "
        "a result would go to someone the fleet did not authorize"
    )
