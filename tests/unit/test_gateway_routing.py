"""The gateway's pure routing rules: region order, least load, ejection, retries."""

from __future__ import annotations

import random

from anycast.core.config import DEFAULT_REGIONS
from anycast.gateway.routing import (
    MAX_ATTEMPTS,
    Attempts,
    HandlerPolicy,
    Outcome,
    ReplicaHealth,
    RetryBudget,
    Route,
    RoutingTable,
    ejects,
    learn,
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
    assert not should_retry(Outcome.TIMEOUT, 1, idempotent=False)
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


def _routes(*ids: str, region: str = "us-east") -> list[Route]:
    return [Route(rid, "digits", region, f"http://h/{rid}", ART, "ready") for rid in ids]


def _in_rotation(health: ReplicaHealth, routes: list[Route], now: float) -> list[str]:
    return [r.replica_id for r in health.rotation(routes, now)]


def test_consecutive_errors_eject_a_replica_whose_probe_still_answers() -> None:
    routes = _routes("a", "b", "c", "d")
    health = ReplicaHealth(eject_after=3)
    health.record_probe("a", ready=True)

    for outcome in (Outcome.SERVER_ERROR, Outcome.TIMEOUT):
        assert learn(health, "a", outcome, 10.0) is None
    assert "a" in _in_rotation(health, routes, 10.0)
    assert learn(health, "a", Outcome.SERVER_ERROR, 10.0) == 2.0

    assert _in_rotation(health, routes, 10.5) == ["b", "c", "d"]
    assert _in_rotation(health, routes, 12.1) == ["a", "b", "c", "d"]


def test_a_success_resets_the_consecutive_error_count() -> None:
    health = ReplicaHealth(eject_after=3)
    for _ in range(5):
        learn(health, "a", Outcome.SERVER_ERROR, 0.0)
        learn(health, "a", Outcome.SERVER_ERROR, 0.0)
        learn(health, "a", Outcome.RESPONSE, 0.0)

    assert not health.is_ejected("a", 0.0)


def test_unavailable_and_connection_failures_eject_at_once() -> None:
    routes = _routes("a", "b", "c", "d")
    health = ReplicaHealth(eject_after=5)

    assert learn(health, "a", Outcome.UNAVAILABLE, 0.0) is not None
    assert learn(health, "b", Outcome.CONNECT_FAILED, 0.0) is not None

    assert _in_rotation(health, routes, 0.1) == ["c", "d"]


def test_repeat_offenders_wait_longer_and_are_forgiven_after_a_quiet_spell() -> None:
    health = ReplicaHealth(cooldown=2.0, eject_after=1, max_cooldown=10.0, forgive_after=60.0)
    cooldowns = []
    now = 0.0
    for _ in range(5):
        cooldown = learn(health, "a", Outcome.SERVER_ERROR, now)
        assert cooldown is not None
        cooldowns.append(cooldown)
        now += cooldown + 0.1  # fails again right after being re-admitted

    assert cooldowns == [2.0, 4.0, 8.0, 10.0, 10.0]
    assert learn(health, "a", Outcome.SERVER_ERROR, now + 61) == 2.0


def test_a_readmitted_replica_is_on_probation_until_it_succeeds() -> None:
    health = ReplicaHealth(eject_after=3)
    for _ in range(3):
        learn(health, "a", Outcome.SERVER_ERROR, 0.0)
    assert health.is_ejected("a", 1.0)

    assert learn(health, "a", Outcome.TIMEOUT, 3.0) == 4.0  # one error after re-admission

    learn(health, "a", Outcome.RESPONSE, 8.0)
    assert learn(health, "a", Outcome.SERVER_ERROR, 8.0) is None  # cleared by a success


def test_errors_of_calls_already_in_flight_do_not_extend_an_ejection() -> None:
    health = ReplicaHealth(eject_after=1)
    learn(health, "a", Outcome.SERVER_ERROR, 0.0)
    for _ in range(10):
        assert learn(health, "a", Outcome.SERVER_ERROR, 0.5) is None

    assert not health.is_ejected("a", 2.1)
    assert health.ejections["a"] == 1


def test_at_most_half_a_regions_replicas_are_ejected_and_the_least_bad_stay() -> None:
    routes = _routes("a", "b", "c", "d")
    health = ReplicaHealth(eject_after=1, max_ejected_share=0.5)
    learn(health, "a", Outcome.SERVER_ERROR, 0.0)
    learn(health, "a", Outcome.SERVER_ERROR, 0.0)  # while ejected: counts, a is worst
    for rid in ("b", "c", "d"):
        learn(health, rid, Outcome.SERVER_ERROR, 0.0)

    kept_out = health.kept_ejected(routes, 0.5)
    assert len(kept_out) == 2 and "a" in kept_out
    assert len(_in_rotation(health, routes, 0.5)) == 2


def test_the_ejection_cap_never_empties_a_region_of_two() -> None:
    routes = _routes("a", "b")
    health = ReplicaHealth(eject_after=1)
    learn(health, "a", Outcome.TIMEOUT, 0.0)
    learn(health, "b", Outcome.TIMEOUT, 0.0)

    assert len(_in_rotation(health, routes, 0.5)) == 1


def test_a_lone_replica_can_be_ejected_so_calls_fail_over() -> None:
    table = _table(_replica("us-1", "us-east"), _replica("eu-1", "eu-west"))
    health = ReplicaHealth(eject_after=1)
    learn(health, "us-1", Outcome.SERVER_ERROR, 0.0)

    route = pick_replica(table, health, "digits", "us-east", 0.5, Attempts(), random.Random())
    assert route is not None and route.replica_id == "eu-1"


def test_replicas_marked_down_do_not_count_towards_the_cap() -> None:
    routes = _routes("a", "b", "c", "d")
    health = ReplicaHealth(eject_after=1)
    health.record_probe("c", ready=False)
    health.record_probe("d", ready=False)
    learn(health, "a", Outcome.SERVER_ERROR, 0.0)
    learn(health, "b", Outcome.SERVER_ERROR, 0.0)

    assert len(_in_rotation(health, routes, 0.5)) == 1  # of a and b, one stays


def test_a_refused_connection_ejects_until_a_probe_finds_the_replica_ready() -> None:
    routes = _routes("a", "b")
    health = ReplicaHealth(cooldown=30.0)
    health.record_connection_failure("a", 0.0)

    assert _in_rotation(health, routes, 1.0) == ["b"]
    assert health.kept_ejected(routes, 1.0) == {"a"}
    health.record_probe("a", ready=True, now=1.0)
    assert _in_rotation(health, routes, 1.0) == ["a", "b"]
    assert learn(health, "a", Outcome.SERVER_ERROR, 1.5) is not None  # on probation


def test_timeouts_and_drops_are_retried_only_for_idempotent_handlers() -> None:
    for outcome in (Outcome.TIMEOUT, Outcome.DROPPED, Outcome.UNAVAILABLE):
        assert should_retry(outcome, 1, idempotent=True)
        assert not should_retry(outcome, 1, idempotent=False)
    assert should_retry(Outcome.CONNECT_FAILED, 1, idempotent=False)  # never sent
    for outcome in (Outcome.SERVER_ERROR, Outcome.BROKEN, Outcome.RESPONSE):
        assert not should_retry(outcome, 1, idempotent=True)


def test_retry_budget_allows_a_minimum_then_a_share_of_calls() -> None:
    budget = RetryBudget(ratio=0.2, min_retries=3, window=10.0)
    retries = 0
    for i in range(100):
        now = 100.0 + i * 0.05  # 100 calls in 5 s, every one wanting a retry
        budget.record_call(now)
        if budget.allows(now):
            budget.record_retry(now)
            retries += 1

    assert retries == 3 + 20
    assert budget.totals(104.99) == (100, 23)


def test_retry_budget_forgets_calls_outside_its_window() -> None:
    budget = RetryBudget(ratio=0.2, min_retries=1, window=10.0)
    budget.record_call(0.0)
    budget.record_retry(0.0)
    budget.record_retry(0.0)
    assert not budget.allows(0.5)  # 2 retries >= 1 + 0.2 * 1 call

    assert budget.allows(10.5)
    assert budget.totals(10.5) == (0, 0)


def test_handler_policies_come_from_the_artifact_manifest() -> None:
    state = {
        "revision": 3,
        "regions": [],
        "artifacts": [
            {
                "id": ART,
                "manifest": {
                    "handlers": {
                        "predict": {"idempotent": True, "deterministic": True},
                        "charge": {"idempotent": False, "deterministic": False},
                    }
                },
            },
        ],
        "deployments": [
            {"name": "digits", "artifact": ART},
            {"name": "legacy", "artifact": "e" * 64},
        ],
        "replicas": [],
    }
    table = RoutingTable.from_state(state, DEFAULT_REGIONS)

    assert table.policy("digits", "predict") == HandlerPolicy(idempotent=True, deterministic=True)
    assert table.policy("digits", "charge") == HandlerPolicy(idempotent=False)
    assert table.policy("legacy", "predict") == HandlerPolicy(idempotent=True)  # no manifest
    assert table.policy("digits", "other") == HandlerPolicy(idempotent=True)


def test_refused_probes_of_a_starting_replica_are_no_offence() -> None:
    starting = Route("new", "digits", "us-east", "http://h/new", ART, "starting")
    serving = Route("old", "digits", "us-east", "http://h/old", ART, "ready")
    health = ReplicaHealth()
    for second in range(20):
        health.record_unreachable(starting, float(second))
    health.record_probe("new", ready=True, now=20.0)

    assert health.available(starting, 20.0) and health.ejections["new"] == 0
    assert health.record_unreachable(serving, 20.0) is not None  # was serving: ejected
    assert not health.available(serving, 20.5)
