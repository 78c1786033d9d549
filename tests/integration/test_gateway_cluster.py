"""A real cluster on 127.0.0.1: control plane, three region agents, the gateway, replicas.

The tests run in order against one cluster: routing, losing a whole region under load,
then losing the control plane.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from anycast.control import ControlClient
from anycast.core.config import ClusterConfig
from anycast.core.http import free_port
from anycast.registry import LocalStorage, Registry, build_artifact

pytestmark = pytest.mark.slow

SERVICE = """
import os

from pydantic import BaseModel

import anycast


class EchoIn(BaseModel):
    text: str


class EchoOut(BaseModel):
    text: str
    region: str


class Echo(anycast.Service):
    def setup(self) -> None:
        self.region = os.environ.get("ANYCAST_REGION", "")

    @anycast.handler
    def echo(self, request: EchoIn) -> EchoOut:
        return EchoOut(text=request.text, region=self.region)
"""

REPLICAS = {"us-east": 2, "eu-west": 1, "ap-southeast": 0}


@dataclass
class Cluster:
    home: Path
    config: ClusterConfig
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    agent_ports: dict[str, int] = field(default_factory=dict)

    @property
    def gateway(self) -> str:
        return self.config.gateway_url

    @property
    def control(self) -> ControlClient:
        return ControlClient(self.config.control_url, timeout=5)

    def start(self, role: str, *args: str) -> None:
        log = (self.home / "logs" / f"{role}.log").open("ab")
        argv = [sys.executable, "-m", "anycast", *args, "--home", str(self.home)]
        self.processes[role] = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def stop(self, role: str, timeout: float = 20) -> None:
        process = self.processes[role]
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    def log(self, role: str) -> str:
        return (self.home / "logs" / f"{role}.log").read_text(errors="replace")[-3000:]


def wait_for(what: str, check: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except (httpx.HTTPError, OSError):
            pass
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(0.2)


def available(cluster: Cluster, region: str) -> int:
    routes = httpx.get(f"{cluster.gateway}/v1/routes", timeout=2).json()
    rows = routes["deployments"].get("echo", {}).get("regions", {}).get(region, [])
    return sum(1 for row in rows if row["available"])


def call(http: httpx.Client, text: str = "hi", region: str | None = None) -> httpx.Response:
    headers = {"X-Anycast-Region": region} if region else {}
    return http.post("/v1/deployments/echo/echo", json={"text": text}, headers=headers)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    home = tmp_path_factory.mktemp("anycast-home")
    (home / "logs").mkdir()
    config = ClusterConfig(home=home, control_port=free_port(), gateway_port=free_port())
    config.save()
    cluster = Cluster(home, config)

    service_dir = home / "src"
    service_dir.mkdir()
    (service_dir / "service.py").write_text(SERVICE)
    artifact_id, tar = build_artifact(
        f"{service_dir / 'service.py'}:Echo", name="echo", version="1", out_dir=home / "dist"
    )
    pushed = Registry(LocalStorage(config.registry_dir)).push(tar)

    cluster.start("control", "control", "--port", str(config.control_port))
    try:
        wait_for("the control plane", cluster.control.health, timeout=30)
        for region in REPLICAS:
            port = cluster.agent_ports[region] = free_port()
            cluster.start(f"region-{region}", "region", "--name", region, "--port", str(port))
        cluster.start("gateway", "gateway", "--port", str(config.gateway_port))
        wait_for("the gateway", lambda: httpx.get(f"{cluster.gateway}/healthz").is_success)

        with cluster.control as control:
            control.register_artifact(artifact_id, "echo", "1", pushed["manifest"])
            wait_for(
                "all regions",
                lambda: (
                    len(control.regions()) == 3
                    and all(r.get("agent_url") for r in control.regions())
                ),
            )
            control.put_deployment("echo", artifact_id, REPLICAS)
        for region, count in REPLICAS.items():
            wait_for(f"{region} replicas", lambda r=region, c=count: available(cluster, r) == c)
        yield cluster
    finally:
        for role in ("gateway", *(f"region-{r}" for r in REPLICAS), "control"):
            if role in cluster.processes:
                cluster.stop(role)


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
    results: list[Any] = []
    deadline = time.monotonic() + seconds

    async def caller(http: httpx.AsyncClient) -> None:
        while time.monotonic() < deadline:
            try:
                r = await http.post("/v1/deployments/echo/echo", json={"text": "load"})
                results.append((time.monotonic(), r.status_code, r.headers.get("x-anycast-region")))
            except httpx.HTTPError as exc:
                results.append((time.monotonic(), repr(exc), None))

    async def chaos() -> None:
        await asyncio.sleep(1.0)
        await asyncio.to_thread(during)

    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        await asyncio.gather(*(caller(http) for _ in range(8)), chaos())
    return results


def test_killing_every_replica_of_a_region_under_load_fails_no_call(cluster: Cluster) -> None:
    with cluster.control as control:
        victims = control.replicas(region="us-east", deployment="echo")
    assert len(victims) == 2 and all(v["pid"] for v in victims)
    killed_at: list[float] = []

    def kill_region() -> None:
        killed_at.append(time.monotonic())
        for victim in victims:
            os.killpg(victim["pid"], signal.SIGKILL)

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
