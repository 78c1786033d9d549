"""Autoscaling policies as the control plane takes, stores and reports them (SQLite, no server)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from anycast.cli.cluster import merge_autoscaling, parse_duration, rollout_settled
from anycast.control.api import build_app
from anycast.control.plane import KEEP, ControlPlane
from anycast.control.scaling import effective_counts, policy_for, reports_by_region
from anycast.control.store import SQLiteStore
from anycast.core.config import RegionConfig
from anycast.core.errors import InvalidInput
from anycast.gateway.wake import wake_targets
from anycast.registry.artifact import manifest_id

REGIONS = [
    RegionConfig(name="eu-west", latitude=53.3, longitude=-6.3),
    RegionConfig(name="us-east", latitude=38.9, longitude=-77.0),
]
POLICY = {
    "min_replicas": 0,
    "max_replicas": 4,
    "target_in_flight": 4,
    "scale_up_delay": 2,
    "scale_down_delay": 30,
    "idle_to_zero": 60,
}


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[ControlPlane]:
    store = SQLiteStore(tmp_path / "state.db")
    plane = ControlPlane(store)
    plane.seed_regions(REGIONS)
    yield plane
    store.close()


def _artifact(plane: ControlPlane, version: str = "1") -> str:
    manifest = {
        "format": "anycast.artifact/v1",
        "name": "echo",
        "version": version,
        "service": "service.py:Echo",
        "files": {"service.py": version * 64},
        "framework": {},
    }
    artifact_id = manifest_id(manifest)
    plane.register_artifact(artifact_id, "echo", version, manifest)
    return artifact_id


def _replica(region: str, i: int, artifact: str, state: str = "ready") -> dict[str, Any]:
    return {
        "id": f"echo-{region}-{i}",
        "deployment": "echo",
        "artifact": artifact,
        "region": region,
        "endpoint": f"http://127.0.0.1:{9000 + i}",
        "state": state,
        "pid": 100 + i,
        "restarts": 0,
        "last_error": None,
        "updated_at": time.time(),
    }


def test_policy_is_stored_with_defaults_filled_in_and_kept_by_later_deploys(
    plane: ControlPlane,
) -> None:
    artifact = _artifact(plane)

    created = plane.put_deployment(
        "echo", artifact, {"eu-west": 1}, autoscaling={"*": {"max_replicas": 3}}
    )
    again = plane.put_deployment("echo", artifact, {"eu-west": 2}, revision=created["revision"])

    assert created["autoscaling"]["*"] == {
        "min_replicas": 1,
        "max_replicas": 3,
        "target_in_flight": 4.0,
        "scale_up_delay": 5.0,
        "scale_down_delay": 60.0,
        "idle_to_zero": 300.0,
    }
    assert again["autoscaling"] == created["autoscaling"]
    removed = plane.put_deployment("echo", artifact, {"eu-west": 2}, autoscaling={})
    assert removed["autoscaling"] == {}


def test_a_region_policy_overrides_the_one_for_every_region(plane: ControlPlane) -> None:
    both = {"*": POLICY, "us-east": {**POLICY, "min_replicas": 2}}
    stored = plane.put_deployment("echo", _artifact(plane), {}, autoscaling=both)

    assert policy_for(stored, "eu-west")["min_replicas"] == 0  # type: ignore[index]
    assert policy_for(stored, "us-east")["min_replicas"] == 2  # type: ignore[index]


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        ({**POLICY, "min_replicas": 5}, "min_replicas 5 is more than max_replicas 4"),
        ({**POLICY, "max_replicas": 65}, "max_replicas must be an integer from 1 to 64"),
        ({**POLICY, "max_replicas": 0}, "set --max-replicas"),
        ({**POLICY, "target_in_flight": 0}, "target_in_flight must be a number more than 0"),
        ({**POLICY, "scale_up_delay": -1}, "set --scale-up-delay"),
        ({**POLICY, "idle_to_zero": "1m"}, "idle_to_zero must be a number"),
        ({"min_replicas": 0}, "needs max_replicas (set --max-replicas)"),
        ({**POLICY, "cooldown": 3}, "unknown autoscaling field 'cooldown'"),
    ],
)
def test_bad_policies_are_refused_with_the_rule_and_the_flag(
    plane: ControlPlane, policy: dict[str, Any], message: str
) -> None:
    artifact = _artifact(plane)
    with pytest.raises(InvalidInput, match=message.replace("(", r"\(").replace(")", r"\)")):
        plane.put_deployment("echo", artifact, {}, autoscaling={"*": policy})


def test_unknown_region_in_autoscaling_is_refused(plane: ControlPlane) -> None:
    with pytest.raises(InvalidInput, match="unknown region 'mars' in autoscaling"):
        plane.put_deployment("echo", _artifact(plane), {}, autoscaling={"mars": POLICY})


def test_api_answers_400_for_a_bad_policy_and_keeps_it_when_left_out(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "state.db")
    app = build_app(store, REGIONS)
    artifact = _artifact(app.state.plane)
    with TestClient(app) as http:
        bad = http.put(
            "/v1/deployments/echo",
            json={"artifact": artifact, "autoscaling": {"*": {**POLICY, "min_replicas": 9}}},
        )
        made = http.put(
            "/v1/deployments/echo", json={"artifact": artifact, "autoscaling": {"*": POLICY}}
        )
        kept = http.put(
            "/v1/deployments/echo", json={"artifact": artifact, "replicas": {"eu-west": 1}}
        )
        scale = http.get("/v1/deployments/echo/scale")

    assert bad.status_code == 400
    assert "min_replicas 9 is more than max_replicas 4" in bad.json()["error"]["message"]
    assert made.status_code == 200 and kept.json()["autoscaling"]["*"]["max_replicas"] == 4
    assert scale.json()["regions"]["eu-west"]["desired"] == 1
    store.close()


def test_reported_counts_win_and_show_as_desired_vs_observed(plane: ControlPlane) -> None:
    artifact = _artifact(plane)
    plane.put_deployment(
        "echo", artifact, {"eu-west": 1, "us-east": 2}, autoscaling={"eu-west": POLICY}
    )

    plane.report_replicas(
        "eu-west",
        [_replica("eu-west", 0, artifact), _replica("eu-west", 1, artifact, "starting")],
        [{"deployment": "echo", "desired": 3, "in_flight": 9.5, "idle_seconds": 0.0}],
    )

    scale = plane.scale("echo")["regions"]
    assert scale["eu-west"]["desired"] == 3 and scale["eu-west"]["ready"] == 1
    assert scale["eu-west"]["observed"] == 2 and scale["eu-west"]["in_flight"] == 9.5
    assert scale["us-east"]["policy"] is None and scale["us-east"]["desired"] == 2
    state = plane.state()
    assert state["autoscaling"] == [
        {
            "deployment": "echo",
            "region": "eu-west",
            "desired": 3,
            "in_flight": 9.5,
            "idle_seconds": 0.0,
        }
    ]
    deployment = plane.deployment("echo")
    assert effective_counts(deployment, reports_by_region(state["autoscaling"])) == {
        "eu-west": 3,
        "us-east": 2,
    }


def test_rollout_is_done_in_an_autoscaled_region_at_its_agents_count(plane: ControlPlane) -> None:
    old, new = _artifact(plane, "1"), _artifact(plane, "2")
    plane.put_deployment("echo", old, {"eu-west": 1}, autoscaling={"eu-west": POLICY})
    scaled = [{"deployment": "echo", "desired": 2, "in_flight": 5.0}]
    plane.report_replicas("eu-west", [_replica("eu-west", i, old) for i in range(2)], scaled)

    plane.put_deployment("echo", new, {"eu-west": 1})
    plane.report_replicas("eu-west", [_replica("eu-west", 2, new)], scaled)
    assert plane.deployment("echo")["rollout"]["state"] == "rolling"  # 1 of 2 ready

    plane.report_replicas("eu-west", [_replica("eu-west", i, new) for i in (2, 3)], scaled)
    assert plane.deployment("echo")["rollout"]["state"] == "complete"


def test_scaled_to_zero_region_counts_as_rolled_out(plane: ControlPlane) -> None:
    old, new = _artifact(plane, "1"), _artifact(plane, "2")
    plane.put_deployment("echo", old, {"eu-west": 1}, autoscaling={"*": POLICY})
    plane.report_replicas("eu-west", [], [{"deployment": "echo", "desired": 0}])

    moved = plane.put_deployment("echo", new, {"eu-west": 1})

    assert moved["rollout"]["state"] == "complete"
    assert rollout_settled(moved, [], {"eu-west": 0})
    assert not rollout_settled(moved, [], None)  # by the fixed count one replica is missing


def test_keep_leaves_an_existing_policy(plane: ControlPlane) -> None:
    artifact = _artifact(plane)
    plane.put_deployment("echo", artifact, {}, autoscaling={"*": POLICY})
    assert plane.put_deployment("echo", artifact, {}, autoscaling=KEEP)["autoscaling"]


def test_gateway_wakes_the_nearest_live_region_that_is_at_zero() -> None:
    now = time.time()
    deployment = {"name": "echo", "replicas": {}, "autoscaling": {"*": POLICY}}
    state = {
        "deployments": [deployment],
        "regions": [
            {"name": "eu-west", "agent_url": "http://127.0.0.1:1", "last_seen": now},
            {"name": "us-east", "agent_url": "http://127.0.0.1:2", "last_seen": now},
            {"name": "ap-southeast", "agent_url": None, "last_seen": None},
        ],
        "replicas": [],
        "autoscaling": [{"deployment": "echo", "region": "eu-west", "desired": 1}],
    }
    order = ["eu-west", "us-east", "ap-southeast"]

    assert wake_targets(state, "echo", order, now) == [("us-east", "http://127.0.0.1:2")]
    starting = {**state, "replicas": [_replica("eu-west", 0, "a" * 64, "starting")]}
    assert [r for r, _ in wake_targets(starting, "echo", order, now)] == ["eu-west", "us-east"]
    assert wake_targets(state, "echo", order, now + 3600) == []  # agents not seen for an hour
    fixed = {**state, "deployments": [{"name": "echo", "replicas": {"eu-west": 0}}]}
    assert wake_targets(fixed, "echo", order, now) == []


def test_cli_durations_and_policy_scopes() -> None:
    assert parse_duration("2s", "--scale-up-delay") == 2.0
    assert parse_duration("500ms", "--scale-up-delay") == 0.5
    assert parse_duration("1.5m", "--idle-to-zero") == 90.0
    assert parse_duration("30", "--idle-to-zero") == 30.0
    with pytest.raises(InvalidInput, match="--idle-to-zero takes a duration such as 2s"):
        parse_duration("soon", "--idle-to-zero")
    policy = {"max_replicas": 2}
    assert merge_autoscaling({"eu-west": POLICY}, policy, []) == {"*": policy}
    assert merge_autoscaling({"eu-west": POLICY}, policy, ["us-east"]) == {
        "eu-west": POLICY,
        "us-east": policy,
    }
