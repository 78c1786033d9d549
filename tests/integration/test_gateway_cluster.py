"""A real cluster on 127.0.0.1: control plane, three region agents, the gateway, replicas.

The tests run in order against one cluster: routing, losing a whole region under load,
then losing the control plane.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cluster import (
    SERVICE,
    Cluster,
    RegionKill,
    available,
    deploy,
    load_during,
    push,
    running,
    wait_for,
    write_service,
)

# Other cluster tests import these from here.
__all__ = ["REPLICAS", "SERVICE", "Cluster", "available", "call", "wait_for"]

pytestmark = pytest.mark.slow

REPLICAS = {"us-east": 2, "eu-west": 1, "ap-southeast": 0}


def call(http: httpx.Client, text: str = "hi", region: str | None = None) -> httpx.Response:
    headers = {"X-Anycast-Region": region} if region else {}
    return http.post("/v1/deployments/echo/echo", json={"text": text}, headers=headers)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = Cluster.new(tmp_path_factory.mktemp("anycast-home"))
    service = write_service(cluster.home / "src", SERVICE)
    pushed = push(cluster.config, f"{service}:Echo", "echo", cluster.home / "dist")

    with running(cluster, REPLICAS):
        with cluster.control as control:
            deploy(control, pushed, REPLICAS)
        for region, count in REPLICAS.items():
            wait_for(f"{region} replicas", lambda r=region, c=count: available(cluster, r) == c)
        yield cluster


def test_calls_are_served_by_the_callers_region(cluster: Cluster) -> None:
    with httpx.Client(base_url=cluster.gateway, timeout=10) as http:
        own = call(http, "a")
        eu = call(http, "b", "eu-west")
        asia = call(http, "c", "ap-southeast")

    assert own.status_code == 200, own.text
    assert own.json() == {"text": "a", "region": "us-east"}
    assert own.headers["x-anycast-region"] == "us-east"
    assert own.headers["x-anycast-replica"].startswith("echo-us-east-")
    assert eu.json()["region"] == "eu-west" and eu.headers["x-anycast-replica"] == "echo-eu-west-0"
    assert asia.headers["x-anycast-region"] == "eu-west"  # nearest region with replicas
    assert float(asia.headers["x-anycast-simulated-delay-ms"]) > 100


async def _load(url: str, seconds: float, during: Callable[[], None]) -> list[Any]:
    """Eight concurrent callers for ``seconds``; ``during`` runs one second in."""

    async def send(http: httpx.AsyncClient, _: int) -> tuple[Any, ...]:
        try:
            r = await http.post("/v1/deployments/echo/echo", json={"text": "load"})
            return (time.monotonic(), r.status_code, r.headers.get("x-anycast-region"))
        except httpx.HTTPError as exc:
            return (time.monotonic(), repr(exc), None)

    return await load_during(url, seconds, during, send, callers=8, timeout=10)


def test_killing_every_replica_of_a_region_under_load_fails_no_call(cluster: Cluster) -> None:
    kill_region = RegionKill.of(cluster.control, "us-east", "echo")
    assert len(kill_region.victims) == 2
    killed_at = kill_region.killed_at

    results = asyncio.run(_load(cluster.gateway, 4.0, kill_region))

    failures = [r for r in results if r[1] != 200]
    assert failures == [], f"{len(failures)} of {len(results)} calls failed: {failures[:5]}"
    after = Counter(region for t, _, region in results if t > killed_at[0] + 0.5)
    assert after["eu-west"] > 0 and after["us-east"] == 0

    # The agent restarts the killed replicas and the gateway sends us-east calls home again.
    def restarted() -> bool:
        with cluster.control as control:
            rows = control.replicas(region="us-east", deployment="echo")
        return len(rows) == 2 and all(r["state"] == "ready" and r["restarts"] >= 1 for r in rows)

    wait_for("us-east replicas to be restarted", restarted, timeout=40)
    wait_for("us-east back in rotation", lambda: available(cluster, "us-east") == 2, timeout=10)
    with httpx.Client(base_url=cluster.gateway, timeout=10) as http:
        assert call(http).headers["x-anycast-region"] == "us-east"
    with cluster.control as control:
        errors = [r["last_error"] for r in control.replicas(region="us-east")]
    assert all("SIGKILL" in (e or "") for e in errors)


def test_gateway_and_replicas_keep_serving_without_the_control_plane(cluster: Cluster) -> None:
    cluster.stop("control")

    with httpx.Client(base_url=cluster.gateway, timeout=10) as http:
        answers = [
            call(http, str(i), region) for i in range(10) for region in ("us-east", "eu-west")
        ]
        routes = http.get("/v1/routes").json()

    assert [a.status_code for a in answers] == [200] * 20
    assert {a.json()["region"] for a in answers} == {"us-east", "eu-west"}
    assert routes["revision"] is not None
    wait_for(
        "the gateway to notice",
        lambda: httpx.get(f"{cluster.gateway}/v1/routes").json()["control_plane"] == "down",
        timeout=20,
    )


def test_stopping_an_agent_stops_its_replicas(cluster: Cluster) -> None:
    port = cluster.agent_ports["us-east"]
    rows = httpx.get(f"http://127.0.0.1:{port}/v1/replicas", timeout=5).json()
    pids = [row["pid"] for row in rows]
    assert len(pids) == 2 and all(pids)

    cluster.stop("region-us-east")

    assert cluster.processes["region-us-east"].returncode is not None
    for pid in pids:
        wait_for(f"replica pid {pid} to exit", lambda p=pid: not Path(f"/proc/{p}").exists(), 5)


def test_agent_for_an_unknown_region_says_which_exist(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "anycast", "region", "--name", "mars", "--home", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert result.returncode == 2
    assert "mars" in result.stderr and "us-east" in result.stderr
