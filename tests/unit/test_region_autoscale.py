"""How a region agent carries out an autoscaled count: which replicas start and which stop."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_region_agent import ThreadEngine, _tick_until

from anycast.control.rollout import artifacts_for_region
from anycast.control.scaling import with_counts
from anycast.core.config import ClusterConfig
from anycast.core.errors import Conflict, NotFound
from anycast.core.http import LOOPBACK, free_port
from anycast.region.agent import RegionAgent
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


POLICY = {
    "min_replicas": 0,
    "max_replicas": 2,
    "target_in_flight": 2.0,
    "scale_up_delay": 1.0,
    "scale_down_delay": 5.0,
    "idle_to_zero": 2.0,
}


def _state(autoscaling: dict[str, Any] | None) -> dict[str, Any]:
    deployment: dict[str, Any] = {"name": "digits", "artifact": ART, "replicas": {"eu-west": 1}}
    if autoscaling is not None:
        deployment["autoscaling"] = autoscaling
    return {
        "revision": 1,
        "regions": [{"name": "eu-west", "latitude": 53.3, "longitude": -6.3}],
        "artifacts": [],
        "deployments": [deployment],
        "replicas": [],
    }


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[tuple[RegionAgent, ThreadEngine]]:
    config = ClusterConfig(home=tmp_path)
    unpacked = config.region_dir("eu-west") / "artifacts" / ART
    unpacked.mkdir(parents=True)
    (unpacked / "manifest.json").write_text(json.dumps({"format": "anycast.artifact/v1"}))
    engine = ThreadEngine()
    dead_control = f"http://{LOOPBACK}:{free_port()}"
    agent = RegionAgent(config, "eu-west", dead_control, "http://127.0.0.1:1", engine)
    agent.control.timeout = 0.5
    yield agent, engine
    for server in engine.servers.values():
        server.should_exit = True


def test_idle_region_goes_to_zero_and_a_wake_up_brings_one_replica_back(agent: Any) -> None:
    agent_, engine = agent
    agent_.follower.latest = _state({"eu-west": POLICY})
    _tick_until(agent_, lambda rows: [r["state"] for r in rows] == ["ready"])

    _tick_until(agent_, lambda rows: rows == [])  # no call for idle_to_zero (2 s)
    assert agent_.scaling_snapshot()[0]["desired"] == 0

    woken = agent_.wake("digits")

    assert woken == {"deployment": "digits", "region": "eu-west", "desired": 1}
    rows = _tick_until(agent_, lambda rows: [r["state"] for r in rows] == ["ready"])
    assert rows[0]["id"] == "digits-eu-west-0"
    assert agent_.scaling_snapshot()[0]["desired"] == 1
    assert len(engine.started) == 2


def test_wake_of_an_unknown_or_fixed_deployment_is_refused(agent: Any) -> None:
    agent_, _ = agent
    agent_.follower.latest = _state(None)

    with pytest.raises(NotFound, match="no deployment named 'other'"):
        agent_.wake("other")
    with pytest.raises(Conflict, match="does not autoscale in region eu-west") as refused:
        agent_.wake("digits")
    assert refused.value.code == "not_autoscaled"
    assert agent_.scaling_snapshot() == []
