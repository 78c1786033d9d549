"""Rollout decisions without processes: which artifact runs where, and how an agent replaces."""

from __future__ import annotations

from typing import Any

from anycast.control.rollout import advance, artifacts_for_region, canary_count
from anycast.region.reconcile import Desired, Observed, plan_region

A = "a" * 64
B = "b" * 64


def _deployment(rollout: dict[str, Any] | None = None, **replicas: int) -> dict[str, Any]:
    counts = {k.replace("_", "-"): v for k, v in replicas.items()}
    return {"name": "d", "artifact": B, "replicas": counts, "rollout": rollout}


def _rolling(done: list[str], current: str | None, percent: int | None = None) -> dict[str, Any]:
    return {
        "state": "rolling",
        "from": A,
        "to": B,
        "done": done,
        "current": current,
        "canary_percent": percent,
    }


def _ready(region: str, artifact: str, n: int) -> list[dict[str, Any]]:
    return [
        {"id": f"d-{region}-{i}", "deployment": "d", "artifact": artifact, "state": "ready"}
        for i in range(n)
    ]


def test_canary_is_the_share_rounded_up_and_at_least_one_replica() -> None:
    assert [canary_count(n, 10) for n in (0, 1, 2, 10, 11)] == [0, 1, 1, 1, 2]
    assert canary_count(3, 50) == 2
    assert canary_count(4, 99) == 4


def test_without_a_rollout_every_replica_runs_the_artifact() -> None:
    deployment = _deployment(eu_west=2, us_east=0)

    assert artifacts_for_region(deployment, "eu-west") == {B: 2}
    assert artifacts_for_region(deployment, "us-east") == {}


def test_rolling_update_reaches_regions_one_at_a_time() -> None:
    deployment = _deployment(
        _rolling(["ap-southeast"], "eu-west"), ap_southeast=1, eu_west=2, us_east=3
    )

    assert artifacts_for_region(deployment, "ap-southeast") == {B: 1}
    assert artifacts_for_region(deployment, "eu-west") == {B: 2}
    assert artifacts_for_region(deployment, "us-east") == {A: 3}


def test_canary_splits_every_region_between_new_and_old() -> None:
    canary = {"state": "canary", "from": A, "to": B, "canary_percent": 10}
    deployment = _deployment(canary, eu_west=1, us_east=4)

    assert artifacts_for_region(deployment, "eu-west") == {B: 1}
    assert artifacts_for_region(deployment, "us-east") == {B: 1, A: 3}


def test_promoted_canary_keeps_its_split_until_the_rollout_reaches_a_region() -> None:
    deployment = _deployment(_rolling([], "eu-west", percent=10), eu_west=2, us_east=4)

    assert artifacts_for_region(deployment, "eu-west") == {B: 2}
    assert artifacts_for_region(deployment, "us-east") == {B: 1, A: 3}


def test_rolled_back_deployment_runs_only_its_artifact() -> None:
    rolled_back = {"state": "rolled-back", "from": A, "to": B}

    assert artifacts_for_region(_deployment(rolled_back, eu_west=2), "eu-west") == {B: 2}


def test_rollout_moves_on_only_when_the_current_region_is_ready() -> None:
    deployment = _deployment(eu_west=2, us_east=1, ap_southeast=0)
    rollout = _rolling([], None)
    observed = {"eu-west": _ready("eu-west", B, 1) + _ready("eu-west", A, 2)}

    waiting = advance(rollout, deployment, observed)
    observed["eu-west"] = _ready("eu-west", B, 2)
    moved = advance(waiting, deployment, observed)
    observed["us-east"] = _ready("us-east", B, 1)
    finished = advance(moved, deployment, observed)

    assert (waiting["state"], waiting["done"], waiting["current"]) == ("rolling", [], "eu-west")
    assert (moved["done"], moved["current"]) == (["eu-west"], "us-east")
    assert moved["regions"] == ["eu-west", "us-east"]
    assert (finished["state"], finished["done"], finished["current"]) == (
        "complete",
        ["eu-west", "us-east"],
        None,
    )


def test_rollout_counts_only_ready_replicas_of_the_new_artifact() -> None:
    deployment = _deployment(eu_west=2)
    starting = _ready("eu-west", B, 2)
    starting[1]["state"] = "starting"

    assert advance(_rolling([], None), deployment, {"eu-west": starting})["current"] == "eu-west"


def _observed(*rows: tuple[str, str, bool]) -> list[Observed]:
    return [Observed(rid, "d", artifact, ready) for rid, artifact, ready in rows]


def test_replacement_starts_a_new_replica_in_an_extra_slot_before_stopping_an_old_one() -> None:
    running = _observed(("d-r-0", A, True), ("d-r-1", A, True))

    steps = plan_region("r", {"d": {B: 2}}, running, {})

    assert steps.start == [Desired("d-r-2", "d", B)]
    assert steps.stop == []


def test_old_replica_stops_once_its_replacement_is_ready() -> None:
    starting = _observed(("d-r-0", A, True), ("d-r-1", A, True), ("d-r-2", B, False))
    ready = _observed(("d-r-0", A, True), ("d-r-1", A, True), ("d-r-2", B, True))

    waiting = plan_region("r", {"d": {B: 2}}, starting, {})
    moving = plan_region("r", {"d": {B: 2}}, ready, {})

    assert waiting.empty
    assert moving.stop == ["d-r-0"]
    assert moving.start == [Desired("d-r-3", "d", B)]


def test_new_ids_skip_replicas_that_are_still_stopping() -> None:
    running = _observed(("d-r-1", B, True), ("d-r-2", A, True))

    steps = plan_region("r", {"d": {B: 2}}, running, {}, taken={"d-r-0"})

    assert steps.start == [Desired("d-r-3", "d", B)]


def test_a_crash_looping_new_artifact_never_takes_the_old_replicas_down() -> None:
    running = _observed(("d-r-0", A, True), ("d-r-1", B, False))

    assert plan_region("r", {"d": {B: 1}}, running, {}).empty


def test_canary_replaces_only_its_share() -> None:
    running = _observed(("d-r-0", A, True), ("d-r-1", A, True), ("d-r-2", B, True))

    steps = plan_region("r", {"d": {B: 1, A: 2}}, running, {})

    assert steps.empty


def test_nothing_ready_replaces_everything_at_once() -> None:
    running = _observed(("d-r-0", A, False), ("d-r-1", A, False))

    steps = plan_region("r", {"d": {B: 2}}, running, {})

    assert [d.artifact_id for d in steps.start] == [B, B]
    assert steps.stop == ["d-r-0", "d-r-1"]


def test_rolled_back_replicas_stop_at_once_when_a_good_one_serves() -> None:
    running = _observed(("d-r-0", A, True), ("d-r-1", B, True))

    steps = plan_region("r", {"d": {A: 2}}, running, {"d": [B]})

    assert steps.stop == ["d-r-1"]
    assert steps.start == [Desired("d-r-2", "d", A)]


def test_rolled_back_replicas_serve_until_the_first_replacement_is_ready() -> None:
    running = _observed(("d-r-0", B, True), ("d-r-1", B, True))
    replaced = [*running, *_observed(("d-r-2", A, True), ("d-r-3", A, False))]

    first = plan_region("r", {"d": {A: 2}}, running, {"d": [B]})
    then = plan_region("r", {"d": {A: 2}}, replaced, {"d": [B]})

    assert [d.artifact_id for d in first.start] == [A, A] and first.stop == []
    assert then.stop == ["d-r-0", "d-r-1"] and then.start == []


def test_scaling_down_and_deleting_stop_surplus_replicas() -> None:
    running = _observed(("d-r-0", A, True), ("d-r-1", A, True))
    others = [Observed("gone-r-0", "gone", A, True)]

    steps = plan_region("r", {"d": {A: 1}}, running + others, {})

    assert steps.stop == ["d-r-1", "gone-r-0"]
    assert steps.start == []
