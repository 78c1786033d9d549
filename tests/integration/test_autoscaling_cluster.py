"""Autoscaling on a real cluster on 127.0.0.1: control plane, the eu-west agent, the gateway.

The tests run in order against one deployment of ``tests/services/slow_echo.py``: under
load eu-west scales up and back down without failing a call, then, with ``--min-replicas 0``,
it scales to zero when idle and a call arriving at zero is held until a replica is ready.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cluster import Cluster, Load, push, register, running, wait_for

pytestmark = pytest.mark.slow

SERVICE = Path(__file__).parent.parent / "services" / "slow_echo.py"
REGION = "eu-west"
# Short delays so each test takes seconds: up after 1 s of load, down after 3 s of less.
POLICY_FLAGS = (
    "--max-replicas",
    "3",
    "--target-in-flight",
    "2",
    "--scale-up-delay",
    "1s",
    "--scale-down-delay",
    "3s",
    "--autoscale-region",
    REGION,
)


def callers(cluster: Cluster, count: int) -> Load:
    """``count`` threads calling the slow handler through the gateway until stopped."""
    return Load(cluster.gateway, lambda http, _: nap(http), callers=count, timeout=40)


def nap(http: httpx.Client, seconds: float = 0.3) -> httpx.Response:
    headers = {"X-Anycast-Region": REGION}
    return http.post("/v1/deployments/slow/nap", json={"seconds": seconds}, headers=headers)


def anycast_cli(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    return cluster.cli(*args, timeout=120)


def scale(cluster: Cluster) -> dict[str, Any]:
    with cluster.control as control:
        row: dict[str, Any] = control.scale("slow")["regions"][REGION]
    return row


def agent_log(cluster: Cluster) -> str:
    return (cluster.home / "logs" / f"region-{REGION}.log").read_text(errors="replace")


def ready_replicas(cluster: Cluster) -> int:
    return int(scale(cluster)["ready"])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = Cluster.new(tmp_path_factory.mktemp("anycast-autoscale"))
    pushed = push(cluster.config, f"{SERVICE}:SlowEcho", "slow", cluster.home / "dist")

    with running(cluster, [REGION]):
        with cluster.control as control:
            register(control, pushed)
        yield cluster


def test_region_scales_up_under_load_and_back_down_without_failing_a_call(
    cluster: Cluster,
) -> None:
    deployed = anycast_cli(
        cluster,
        "deploy",
        "slow",
        "--artifact",
        "slow:1",
        "--replicas",
        "0",
        "--region",
        f"{REGION}=1",
        "--min-replicas",
        "1",
        *POLICY_FLAGS,
    )
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    wait_for("one ready replica", lambda: ready_replicas(cluster) == 1, timeout=60)

    with callers(cluster, 8) as heavy:
        wait_for("three ready replicas", lambda: ready_replicas(cluster) == 3, timeout=60)
    with callers(cluster, 1) as light:
        status = anycast_cli(cluster, "status")
        wait_for("back to one replica", lambda: scale(cluster)["observed"] == 1, timeout=60)
        time.sleep(1.5)  # calls keep going while the last removed replica drains

    assert heavy.failures == [], f"{len(heavy.failures)} of {len(heavy.results)} calls failed"
    assert light.failures == [], f"{len(light.failures)} of {len(light.results)} calls failed"
    assert len(heavy.results) > 20 and len(light.results) > 5
    assert status.returncode == 0, status.stderr
    assert "auto" in status.stdout and "1-3 replicas" in status.stdout
    assert scale(cluster)["desired"] == 1
    assert "scales from 1 to 3 replicas" in agent_log(cluster)


def test_idle_region_scales_to_zero_and_a_call_at_zero_is_answered_after_wake_up(
    cluster: Cluster,
) -> None:
    deployed = anycast_cli(
        cluster,
        "deploy",
        "slow",
        "--artifact",
        "slow:1",
        "--min-replicas",
        "0",
        "--idle-to-zero",
        "3s",
        *POLICY_FLAGS,
    )
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr

    wait_for("zero replicas", lambda: scale(cluster)["observed"] == 0, timeout=60)
    assert scale(cluster)["desired"] == 0
    routes = httpx.get(f"{cluster.gateway}/v1/routes", timeout=5).json()
    wait_for(
        "the gateway to see no replica",
        lambda: (
            not httpx.get(f"{cluster.gateway}/v1/routes", timeout=5).json()["deployments"]["slow"][
                "regions"
            ]
        ),
        timeout=30,
    )
    assert "slow" in routes["deployments"]

    with httpx.Client(base_url=cluster.gateway, timeout=60) as http:
        started = time.monotonic()
        woken = nap(http, seconds=0.0)
        waited = time.monotonic() - started
        after = nap(http, seconds=0.0)

    assert woken.status_code == 200, woken.text
    assert woken.json()["region"] == REGION
    assert waited > 0.3  # it was held while a replica started, not answered at once
    assert after.status_code == 200
    assert scale(cluster)["desired"] == 1
    assert "woken up: 0 -> 1" in agent_log(cluster)
