"""Rolling updates, canaries and rollbacks as the control plane stores them (SQLite, no server)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from anycast.control.plane import ControlPlane
from anycast.control.store import SQLiteStore
from anycast.core.config import RegionConfig
from anycast.core.errors import Conflict, InvalidInput
from anycast.registry.artifact import manifest_id

REGIONS = [
    RegionConfig(name="eu-west", latitude=53.3, longitude=-6.3),
    RegionConfig(name="us-east", latitude=38.9, longitude=-77.0),
]
COUNTS = {"eu-west": 1, "us-east": 2}


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[ControlPlane]:
    store = SQLiteStore(tmp_path / "state.db")
    plane = ControlPlane(store)
    plane.seed_regions(REGIONS)
    yield plane
    store.close()


def _artifact(plane: ControlPlane, version: str) -> str:
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


def _report(plane: ControlPlane, region: str, artifact: str, n: int) -> None:
    plane.report_replicas(
        region,
        [
            {
                "id": f"echo-{region}-{i}",
                "deployment": "echo",
                "artifact": artifact,
                "region": region,
                "endpoint": f"http://127.0.0.1:{9000 + i}",
                "state": "ready",
                "pid": 100 + i,
                "restarts": 0,
                "last_error": None,
                "updated_at": time.time(),
            }
            for i in range(n)
        ],
    )


def _rollout(plane: ControlPlane) -> dict[str, Any]:
    rollout: dict[str, Any] = plane.deployment("echo")["rollout"]
    return rollout


def test_first_deploy_has_no_rollout_and_starts_the_history(plane: ControlPlane) -> None:
    a = _artifact(plane, "1")

    created = plane.put_deployment("echo", a, COUNTS)

    assert created["rollout"] is None
    assert [h["artifact"] for h in created["history"]] == [a]
    assert created["rolled_back"] == []


def test_new_artifact_rolls_out_region_by_region_as_replicas_get_ready(
    plane: ControlPlane,
) -> None:
    a, b = _artifact(plane, "1"), _artifact(plane, "2")
    plane.put_deployment("echo", a, COUNTS)

    started = plane.put_deployment("echo", b, COUNTS)["rollout"]
    _report(plane, "eu-west", b, 1)
    second = _rollout(plane)
    _report(plane, "us-east", b, 1)
    still = _rollout(plane)
    _report(plane, "us-east", b, 2)
    done = _rollout(plane)

    assert (started["state"], started["from"], started["to"]) == ("rolling", a, b)
    assert (started["done"], started["current"]) == ([], "eu-west")
    assert (second["done"], second["current"]) == (["eu-west"], "us-east")
    assert still["current"] == "us-east"
    assert (done["state"], done["done"], done["current"]) == (
        "complete",
        ["eu-west", "us-east"],
        None,
    )
    assert plane.deployment("echo")["artifact"] == b


def test_another_artifact_during_a_rollout_is_refused(plane: ControlPlane) -> None:
    a, b, c = (_artifact(plane, v) for v in "123")
    plane.put_deployment("echo", a, COUNTS)
    plane.put_deployment("echo", b, COUNTS)

    with pytest.raises(Conflict, match="rollback") as caught:
        plane.put_deployment("echo", c, COUNTS)
    assert caught.value.code == "rollout_in_progress"
    assert plane.put_deployment("echo", b, {"eu-west": 3})["replicas"] == {"eu-west": 3}


def test_canary_waits_for_promote_then_rolls_out(plane: ControlPlane) -> None:
    a, b = _artifact(plane, "1"), _artifact(plane, "2")
    plane.put_deployment("echo", a, COUNTS)

    canary = plane.put_deployment("echo", b, COUNTS, canary_percent=10)["rollout"]
    _report(plane, "eu-west", b, 1)
    unchanged = _rollout(plane)
    promoted = plane.promote("echo")["rollout"]

    assert (canary["state"], canary["canary_percent"]) == ("canary", 10)
    assert unchanged["state"] == "canary"
    assert (promoted["state"], promoted["done"], promoted["current"]) == (
        "rolling",
        ["eu-west"],
        "us-east",
    )
    with pytest.raises(Conflict, match="no canary"):
        plane.promote("echo")


@pytest.mark.parametrize("percent", [0, 100, -5])
def test_canary_share_must_be_between_1_and_99_percent(plane: ControlPlane, percent: int) -> None:
    a, b = _artifact(plane, "1"), _artifact(plane, "2")
    plane.put_deployment("echo", a, COUNTS)

    with pytest.raises(InvalidInput, match="from 1% to 99%"):
        plane.put_deployment("echo", b, COUNTS, canary_percent=percent)


def test_canary_needs_an_existing_deployment_and_another_artifact(plane: ControlPlane) -> None:
    a = _artifact(plane, "1")

    with pytest.raises(InvalidInput, match="does not exist yet"):
        plane.put_deployment("echo", a, COUNTS, canary_percent=10)
    plane.put_deployment("echo", a, COUNTS)
    with pytest.raises(InvalidInput, match="different artifact"):
        plane.put_deployment("echo", a, COUNTS, canary_percent=10)


def test_rollback_returns_to_the_previous_artifact_and_bars_the_bad_one(
    plane: ControlPlane,
) -> None:
    a, b = _artifact(plane, "1"), _artifact(plane, "2")
    plane.put_deployment("echo", a, COUNTS)
    plane.put_deployment("echo", b, COUNTS)
    for region, n in COUNTS.items():
        _report(plane, region, b, n)

    rolled = plane.rollback("echo")

    assert rolled["artifact"] == a
    assert rolled["rolled_back"] == [b]
    assert (rolled["rollout"]["state"], rolled["rollout"]["from"]) == ("rolled-back", b)
    with pytest.raises(Conflict, match="--allow-rolled-back") as caught:
        plane.put_deployment("echo", b, COUNTS)
    assert caught.value.code == "rolled_back_artifact"
    with pytest.raises(Conflict, match="no earlier artifact"):
        plane.rollback("echo")


def test_rollback_of_a_canary_goes_back_to_the_old_artifact(plane: ControlPlane) -> None:
    a, b = _artifact(plane, "1"), _artifact(plane, "2")
    plane.put_deployment("echo", a, COUNTS)
    plane.put_deployment("echo", b, COUNTS, canary_percent=50)

    rolled = plane.rollback("echo")

    assert (rolled["artifact"], rolled["rolled_back"]) == (a, [b])
    assert rolled["rollout"]["interrupted"] == "canary"


def test_rolled_back_artifact_can_be_deployed_again_with_the_flag(plane: ControlPlane) -> None:
    a, b = _artifact(plane, "1"), _artifact(plane, "2")
    plane.put_deployment("echo", a, COUNTS)
    plane.put_deployment("echo", b, COUNTS)
    plane.rollback("echo")

    again = plane.put_deployment("echo", b, COUNTS, allow_rolled_back=True)

    assert again["artifact"] == b and again["rolled_back"] == []
    assert again["rollout"]["state"] == "rolling"
    assert [h["artifact"] for h in again["history"]] == [a, b, a, b]


def test_rollback_and_promote_are_compare_and_set(plane: ControlPlane) -> None:
    a, b = _artifact(plane, "1"), _artifact(plane, "2")
    first = plane.put_deployment("echo", a, COUNTS)
    plane.put_deployment("echo", b, COUNTS, canary_percent=10)

    with pytest.raises(Conflict):
        plane.promote("echo", revision=first["revision"])
    with pytest.raises(Conflict):
        plane.rollback("echo", revision=first["revision"])
    assert _rollout(plane)["state"] == "canary"
