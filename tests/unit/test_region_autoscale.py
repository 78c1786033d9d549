"""How a region agent carries out an autoscaled count: which replicas start and which stop."""

from __future__ import annotations

from anycast.control.rollout import artifacts_for_region
from anycast.control.scaling import with_counts
from anycast.region.reconcile import Observed, plan_region

ART = "a" * 64


def test_scaling_down_stops_a_replica_still_starting_before_one_that_serves() -> None:
    observed = [
        Observed("slow-eu-west-0", "slow", ART, ready=True),
        Observed("slow-eu-west-1", "slow", ART, ready=False),
        Observed("slow-eu-west-2", "slow", ART, ready=True),
    ]

    steps = plan_region("eu-west", {"slow": {ART: 2}}, observed, {})

    assert steps.stop == ["slow-eu-west-1"]
    assert steps.start == []


def test_scaling_down_ready_replicas_stops_the_surplus_only() -> None:
    observed = [Observed(f"slow-eu-west-{i}", "slow", ART, ready=True) for i in range(3)]

    steps = plan_region("eu-west", {"slow": {ART: 1}}, observed, {})

    assert len(steps.stop) == 2 and steps.start == []


def test_scaling_up_starts_every_missing_replica_at_once() -> None:
    observed = [Observed("slow-eu-west-0", "slow", ART, ready=True)]

    steps = plan_region("eu-west", {"slow": {ART: 3}}, observed, {})

    assert [d.replica_id for d in steps.start] == ["slow-eu-west-1", "slow-eu-west-2"]


def test_an_autoscaled_count_replaces_the_fixed_one_for_the_rollout_rules() -> None:
    deployment = {"name": "slow", "artifact": ART, "replicas": {"eu-west": 1}, "rollout": None}

    assert artifacts_for_region(with_counts(deployment, {"eu-west": 3}), "eu-west") == {ART: 3}
    assert artifacts_for_region(with_counts(deployment, {"eu-west": 0}), "eu-west") == {}
