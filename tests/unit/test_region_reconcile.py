"""Desired-vs-observed decisions and restart backoff of the region agent."""

from __future__ import annotations

from anycast.region.reconcile import (
    Backoff,
    Desired,
    desired_for_region,
    plan,
    rolling_replacements,
)

A1 = "a" * 64
A2 = "b" * 64


def _deployment(name: str, artifact: str, **replicas: int) -> dict[str, object]:
    return {"name": name, "artifact": artifact, "replicas": replicas, "revision": 3}


def test_desired_replicas_have_stable_ids_per_region() -> None:
    deployments = [_deployment("digits", A1, **{"eu-west": 2, "us-east": 1})]

    first = desired_for_region(deployments, "eu-west")
    again = desired_for_region(list(reversed(deployments)), "eu-west")

    assert [d.replica_id for d in first] == ["digits-eu-west-0", "digits-eu-west-1"]
    assert first == again
    assert all(d.artifact_id == A1 and d.deployment == "digits" for d in first)


def test_region_not_named_in_a_deployment_wants_nothing() -> None:
    assert desired_for_region([_deployment("digits", A1, **{"us-east": 3})], "eu-west") == []


def test_plan_starts_missing_and_stops_surplus_replicas() -> None:
    desired = [Desired("d-r-0", "d", A1), Desired("d-r-1", "d", A1)]
    observed = {"d-r-0": A1, "d-r-2": A1, "old-r-0": A1}

    changes = plan(desired, observed)

    assert [d.replica_id for d in changes.start] == ["d-r-1"]
    assert changes.stop == ["d-r-2", "old-r-0"]
    assert changes.replace == []


def test_plan_replaces_replicas_running_another_artifact() -> None:
    desired = [Desired("d-r-0", "d", A2)]

    changes = plan(desired, {"d-r-0": A1})

    assert changes.replace == desired
    assert not changes.start and not changes.stop


def test_plan_is_empty_when_observed_matches_desired() -> None:
    assert plan([Desired("d-r-0", "d", A1)], {"d-r-0": A1}).empty


def test_rolling_update_replaces_one_replica_while_others_serve() -> None:
    wants = [Desired(f"d-r-{i}", "d", A2) for i in range(3)]

    assert rolling_replacements(wants, ready={"d": 3}, unready={}) == wants[:1]
    assert rolling_replacements(wants, ready={"d": 2}, unready={"d": 1}) == []


def test_rolling_update_replaces_everything_when_nothing_is_ready() -> None:
    wants = [Desired(f"d-r-{i}", "d", A2) for i in range(2)]

    assert rolling_replacements(wants, ready={}, unready={"d": 2}) == wants


def test_backoff_doubles_from_half_a_second_up_to_thirty() -> None:
    backoff = Backoff()

    delays = [backoff.record_failure() for _ in range(9)]

    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]


def test_backoff_resets_only_after_staying_ready_long_enough() -> None:
    backoff = Backoff(reset_after=10.0)
    for _ in range(4):
        backoff.record_failure()

    backoff.record_ready(ready_for=3.0)
    assert backoff.delay() == 4.0

    backoff.record_ready(ready_for=10.0)
    assert backoff.delay() == 0.0
    assert backoff.record_failure() == 0.5
