"""Desired-vs-observed decisions and restart backoff of the region agent."""

from __future__ import annotations

from anycast.region.reconcile import (
    Backoff,
    desired_for_region,
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
