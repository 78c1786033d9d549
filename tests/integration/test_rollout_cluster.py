"""Rollouts on a real cluster on 127.0.0.1: control plane, two region agents, the gateway.

The tests run in order against one deployment: a rolling update under load, a rollback, a
canary and its promotion, a crash-looping artifact, then an agent draining on SIGTERM.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from cluster import Cluster, Load, push, register, running, wait_for, write_service

pytestmark = pytest.mark.slow

SERVICE = """
from pydantic import BaseModel

import anycast

VERSION = {version!r}


class EchoIn(BaseModel):
    text: str


class EchoOut(BaseModel):
    text: str
    version: str


class Echo(anycast.Service):
    def setup(self) -> None:
        if VERSION == "broken":
            raise RuntimeError("weights file model.bin is missing")

    @anycast.handler
    def echo(self, request: EchoIn) -> EchoOut:
        return EchoOut(text=request.text, version=VERSION)
"""

REPLICAS = {"eu-west": 1, "us-east": 2, "ap-southeast": 0}
AGENTS = ("eu-west", "us-east")
CALLERS = ("eu-west", "us-east")


def callers(cluster: Cluster, regions: tuple[str, ...] = CALLERS) -> Load:
    """Four callers, spread over ``regions``, calling through the gateway until stopped."""
    return Load(
        cluster.gateway,
        lambda http, i: call(http, regions[i % len(regions)]),
        callers=4,
        timeout=20,
        pause=0.02,
    )


def call(http: httpx.Client, region: str) -> httpx.Response:
    headers = {"X-Anycast-Region": region}
    return http.post("/v1/deployments/echo/echo", json={"text": "hi"}, headers=headers)


def artifacts_served(cluster: Cluster, calls: int = 30) -> Counter[str]:
    served: Counter[str] = Counter()
    with httpx.Client(base_url=cluster.gateway, timeout=20) as http:
        for i in range(calls):
            response = call(http, CALLERS[i % len(CALLERS)])
            assert response.status_code == 200, response.text
            served[response.headers["x-anycast-artifact"]] += 1
    return served


def anycast_cli(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    return cluster.cli(*args, timeout=180)


def settled_on(cluster: Cluster, artifact: str) -> bool:
    """Every wanted replica is ready on ``artifact`` and no other artifact is left."""
    with cluster.control as control:
        rows = control.replicas(deployment="echo")
        rollout = control.deployment("echo")["rollout"] or {}
    ready = Counter(r["region"] for r in rows if r["state"] == "ready")
    return (
        rollout.get("state") != "rolling"
        and all(r["artifact"] == artifact for r in rows)
        and all(ready[region] == n for region, n in REPLICAS.items())
    )


@dataclass
class RolloutCluster(Cluster):
    pushed: list[dict[str, Any]] = field(default_factory=list)


@pytest.fixture(scope="module")
def artifacts(cluster: RolloutCluster) -> dict[str, str]:
    return {p["version"]: p["id"] for p in cluster.pushed}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RolloutCluster]:
    cluster = RolloutCluster.new(tmp_path_factory.mktemp("anycast-rollout"))
    cluster.pushed = _push_artifacts(cluster)

    with running(cluster, AGENTS):
        with cluster.control as control:
            register(control, *cluster.pushed)
            control.put_deployment("echo", "echo:1", REPLICAS)
        first = cluster.pushed[0]["id"]
        wait_for("echo:1 replicas", lambda: settled_on(cluster, first), timeout=120)
        yield cluster


def _push_artifacts(cluster: Cluster) -> list[dict[str, Any]]:
    pushed = []
    for version in ("1", "2", "3", "broken"):
        service = write_service(cluster.home / "src" / version, SERVICE.format(version=version))
        out_dir = cluster.home / "dist"
        pushed.append(push(cluster.config, f"{service}:Echo", "echo", out_dir, version=version))
    return pushed


class Watcher:
    """Samples the control plane's view during a rollout: rollout state and replica rows."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.samples: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Watcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        with self.cluster.control as control:
            while not self._stop.is_set():
                try:
                    state = control.state()
                except Exception:
                    continue
                echo = [d for d in state["deployments"] if d["name"] == "echo"]
                if echo:
                    self.samples.append((echo[0], state["replicas"]))
                self._stop.wait(0.1)


def test_rolling_update_under_load_fails_no_call_and_ends_on_the_new_artifact(
    cluster: Cluster, artifacts: dict[str, str]
) -> None:
    old, new = artifacts["1"], artifacts["2"]

    with callers(cluster) as load, Watcher(cluster) as watcher:
        time.sleep(1.0)
        done = anycast_cli(cluster, "deploy", "echo", "--artifact", "echo:2")
        time.sleep(1.0)

    assert done.returncode == 0, done.stdout + done.stderr
    assert "every replica is ready" in done.stdout
    assert load.failures == [], f"{len(load.failures)} of {len(load.results)} calls failed"
    assert {artifact for _, artifact in load.results} == {old, new}
    assert artifacts_served(cluster) == {new: 30}
    final = cluster.control.deployment("echo")
    assert final["rollout"]["state"] == "complete"
    assert final["rollout"]["done"] == ["eu-west", "us-east"]
    assert [h["artifact"] for h in final["history"]] == [old, new]
    # Region by region: us-east ran no new replica before eu-west was done.
    assert watcher.samples
    for deployment, replicas in watcher.samples:
        done_regions = (deployment.get("rollout") or {}).get("done", [])
        us_new = [r for r in replicas if r["region"] == "us-east" and r["artifact"] == new]
        assert not us_new or "eu-west" in done_regions


def test_rollback_returns_to_the_old_artifact_and_the_new_one_never_serves_again(
    cluster: Cluster, artifacts: dict[str, str]
) -> None:
    old, bad = artifacts["1"], artifacts["2"]

    with callers(cluster) as load:
        done = anycast_cli(cluster, "rollback", "echo")
        time.sleep(1.5)  # the gateway drops the stopped replicas

    assert done.returncode == 0, done.stdout + done.stderr
    assert load.failures == [], f"{len(load.failures)} of {len(load.results)} calls failed"
    wait_for("only echo:1 replicas", lambda: settled_on(cluster, old), timeout=60)
    assert artifacts_served(cluster) == {old: 30}
    deployment = cluster.control.deployment("echo")
    assert deployment["artifact"] == old and deployment["rolled_back"] == [bad]

    again = anycast_cli(cluster, "deploy", "echo", "--artifact", "echo:2", "--no-wait")
    assert again.returncode == 1
    assert "rolled back" in again.stderr and "--allow-rolled-back" in again.stderr
    assert artifacts_served(cluster) == {old: 30}


def test_canary_serves_both_artifacts_until_promoted(
    cluster: Cluster, artifacts: dict[str, str]
) -> None:
    old, canary = artifacts["1"], artifacts["3"]

    started = anycast_cli(cluster, "deploy", "echo", "--artifact", "echo:3", "--canary", "10%")

    assert started.returncode == 0, started.stdout + started.stderr
    split = {("eu-west", canary): 1, ("us-east", canary): 1, ("us-east", old): 1}

    def by_region() -> Counter[tuple[str, str]]:
        rows = cluster.control.replicas(deployment="echo")
        return Counter((r["region"], r["artifact"]) for r in rows)

    wait_for("the canary split", lambda: by_region() == split, timeout=30)
    with httpx.Client(base_url=cluster.gateway, timeout=20) as http:
        served = Counter(call(http, "us-east").headers["x-anycast-artifact"] for _ in range(40))
    assert set(served) == {old, canary}
    status = anycast_cli(cluster, "status")
    assert "canary 10%" in status.stdout

    promoted = anycast_cli(cluster, "deploy", "echo", "--promote")

    assert promoted.returncode == 0, promoted.stdout + promoted.stderr
    wait_for("only echo:3 replicas", lambda: settled_on(cluster, canary), timeout=60)
    assert artifacts_served(cluster) == {canary: 30}


def test_crash_looping_artifact_is_reported_and_old_replicas_keep_serving(
    cluster: Cluster, artifacts: dict[str, str]
) -> None:
    good, broken = artifacts["3"], artifacts["broken"]

    done = anycast_cli(cluster, "deploy", "echo", "--artifact", "echo:broken", "--timeout", "90")

    assert done.returncode == 1
    assert "crash loop" in done.stderr and "model.bin is missing" in done.stderr
    looping = [r for r in cluster.control.replicas(deployment="echo") if r["artifact"] == broken]
    assert [r["region"] for r in looping] == ["eu-west"]  # the rollout never left eu-west
    assert looping[0]["state"] == "crash-loop" and looping[0]["restarts"] >= 1
    assert "setup() failed" in looping[0]["last_error"]
    assert "model.bin is missing" in looping[0]["last_error"]
    status = anycast_cli(cluster, "status", "--json")
    assert '"crash-loop"' in status.stdout
    table = anycast_cli(cluster, "status").stdout
    assert "crash-loop" in table and "model.bin is missing" in table
    assert "rolling from" in table and "now eu-west" in table
    assert artifacts_served(cluster) == {good: 30}
    assert "restart" in cluster.log("region-eu-west") and "WARNING" in cluster.log("region-eu-west")

    undone = anycast_cli(cluster, "rollback", "echo")

    assert undone.returncode == 0, undone.stdout + undone.stderr
    wait_for("only echo:3 replicas", lambda: settled_on(cluster, good), timeout=60)


def test_agent_drains_its_replicas_on_sigterm(cluster: Cluster) -> None:
    port = cluster.agent_ports["eu-west"]
    pids = [r["pid"] for r in httpx.get(f"http://127.0.0.1:{port}/v1/replicas").json()]

    with callers(cluster, regions=("eu-west",)) as load, Watcher(cluster) as watcher:
        time.sleep(1.0)
        cluster.stop("region-eu-west")
        time.sleep(1.0)

    assert cluster.processes["region-eu-west"].returncode is not None
    assert load.failures == [], f"{len(load.failures)} of {len(load.results)} calls failed"
    states = {r["state"] for _, rows in watcher.samples for r in rows if r["region"] == "eu-west"}
    assert "stopping" in states
    assert cluster.control.replicas(region="eu-west") == []
    for pid in pids:
        wait_for(f"replica pid {pid} to exit", lambda p=pid: not Path(f"/proc/{p}").exists(), 10)
