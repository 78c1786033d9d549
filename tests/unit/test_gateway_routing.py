"""The gateway's pure routing rules: region order, least load, ejection, retries."""

from __future__ import annotations

import random

from anycast.core.config import DEFAULT_REGIONS
from anycast.gateway.routing import (
    MAX_ATTEMPTS,
    Attempts,
    Outcome,
    ReplicaHealth,
    Route,
    RoutingTable,
    ejects,
    least_loaded,
    outcome_of_status,
    pick_replica,
    should_retry,
)

ART = "c" * 64


def _replica(rid: str, region: str, state: str = "ready", deployment: str = "digits") -> dict:
    return {
        "id": rid,
        "deployment": deployment,
        "artifact": ART,
        "region": region,
        "endpoint": f"http://127.0.0.1:1/{rid}",
        "state": state,
    }


def _table(*replicas: dict) -> RoutingTable:
    state = {
        "revision": 7,
        "regions": [],
        "deployments": [{"name": "digits", "artifact": ART, "replicas": {}}],
        "replicas": list(replicas),
    }
    return RoutingTable.from_state(state, DEFAULT_REGIONS)


def test_regions_are_ordered_own_first_then_by_round_trip() -> None:
    table = _table()

    assert table.region_order("us-east") == ["us-east", "eu-west", "ap-southeast"]
    assert table.region_order("ap-southeast") == ["ap-southeast", "eu-west", "us-east"]
    assert table.rtt_ms("us-east", "us-east") == 0.0
    assert 40 < table.rtt_ms("us-east", "eu-west") < table.rtt_ms("us-east", "ap-southeast")


def test_state_regions_override_configured_coordinates() -> None:
    state = {
        "revision": 1,
        "regions": [{"name": "us-east", "latitude": 1.3, "longitude": 103.9}],
        "deployments": [],
        "replicas": [],
    }
    table = RoutingTable.from_state(state, DEFAULT_REGIONS)

    assert table.region_order("ap-southeast")[:2] == ["ap-southeast", "us-east"]


def test_failed_and_stopping_replicas_are_not_routes() -> None:
    table = _table(
        _replica("a", "us-east", "failed"),
        _replica("b", "us-east", "stopping"),
        _replica("c", "us-east", "ready"),
        _replica("x", "us-east", "ready", deployment="gone"),
    )

    assert [r.replica_id for r in table.routes] == ["c"]


def test_least_loaded_replica_wins_and_ties_are_spread() -> None:
    routes = [Route(rid, "digits", "us-east", "http://h", ART, "ready") for rid in "abc"]
    rng = random.Random(1)

    assert least_loaded(routes, {"a": 2, "b": 0, "c": 1}, rng).replica_id == "b"
    picks = {least_loaded(routes, {"a": 1}, rng).replica_id for _ in range(50)}
    assert picks == {"b", "c"}


def test_call_goes_to_callers_region_when_it_has_a_replica() -> None:
    table = _table(_replica("eu", "eu-west"), _replica("us", "us-east"))

    for caller, expected in (("us-east", "us"), ("eu-west", "eu"), ("ap-southeast", "eu")):
        route = pick_replica(
            table, ReplicaHealth(), "digits", caller, 0.0, Attempts(), random.Random(0)
        )
        assert route is not None and route.replica_id == expected


def test_ejected_replica_is_skipped_until_its_cooldown_ends() -> None:
    table = _table(_replica("us-1", "us-east"), _replica("eu-1", "eu-west"))
    health = ReplicaHealth(cooldown=2.0)
    health.eject("us-1", now=100.0)

    def pick(now: float) -> str:
        route = pick_replica(table, health, "digits", "us-east", now, Attempts(), random.Random())
        assert route is not None
        return route.replica_id

    assert pick(100.5) == "eu-1"
    assert pick(102.1) == "us-1"


def test_probes_take_replicas_out_and_bring_them_back() -> None:
    route = Route("r", "digits", "us-east", "http://h", ART, "ready")
    health = ReplicaHealth(down_after=2)

    assert health.available(route, 0.0)  # never probed: trust the control plane
    health.record_probe("r", ready=False, definite=False)
    assert health.available(route, 0.0)  # one timeout is not enough
    health.record_probe("r", ready=False, definite=False)
    assert not health.available(route, 0.0)
    health.record_probe("r", ready=True)
    assert health.available(route, 0.0)
    health.record_probe("r", ready=False)  # refused connection: out at once
    assert not health.available(route, 0.0)


def test_starting_replica_is_used_once_its_probe_answers_ready() -> None:
    route = Route("r", "digits", "us-east", "http://h", ART, "starting")
    health = ReplicaHealth()

    assert not health.available(route, 0.0)
    health.record_probe("r", ready=True)
    assert health.available(route, 0.0)


def test_retries_never_reuse_a_replica_and_leave_a_region_after_two_failures() -> None:
    table = _table(
        _replica("us-1", "us-east"),
        _replica("us-2", "us-east"),
        _replica("us-3", "us-east"),
        _replica("eu-1", "eu-west"),
    )
    attempts, health, rng = Attempts(), ReplicaHealth(), random.Random(3)

    first = pick_replica(table, health, "digits", "us-east", 0.0, attempts, rng)
    assert first is not None and first.region == "us-east"
    attempts.failed(first)
    second = pick_replica(table, health, "digits", "us-east", 0.0, attempts, rng)
    assert second is not None and second.region == "us-east" and second != first
    attempts.failed(second)
    third = pick_replica(table, health, "digits", "us-east", 0.0, attempts, rng)
    assert third is not None and third.replica_id == "eu-1"


def test_no_replica_when_all_are_tried_or_unavailable() -> None:
    table = _table(_replica("us-1", "us-east"))
    attempts = Attempts()
    attempts.failed(table.routes[0])

    assert (
        pick_replica(table, ReplicaHealth(), "digits", "us-east", 0, attempts, random.Random())
        is None
    )
    assert (
        pick_replica(table, ReplicaHealth(), "other", "us-east", 0, Attempts(), random.Random())
        is None
    )


def test_retry_decisions() -> None:
    assert should_retry(Outcome.CONNECT_FAILED, 1)
    assert should_retry(Outcome.DROPPED, 2)
    assert should_retry(outcome_of_status(503), 1)
    assert should_retry(outcome_of_status(502), 1)
    assert not should_retry(Outcome.CONNECT_FAILED, MAX_ATTEMPTS)
    assert not should_retry(outcome_of_status(500), 1)
    assert not should_retry(outcome_of_status(400), 1)
    assert not should_retry(Outcome.TIMEOUT, 1)
    assert not should_retry(Outcome.BROKEN, 1)
    assert ejects(Outcome.DROPPED) and not ejects(Outcome.RESPONSE)


def test_health_forgets_departed_replicas_but_never_their_load() -> None:
    health = ReplicaHealth()
    health.record_probe("old", ready=True)
    health.eject("old", 0.0)
    health.acquire("old")

    health.forget_except(["new"])
    health.release("old")

    assert "old" not in health.probes and "old" not in health.ejected_until
    assert health.in_flight == {}
