"""Losing the control plane: serving goes on, agents come back by themselves, no write is lost.

Real processes on 127.0.0.1: `anycast up` (LocalCluster) starts the control plane, two region
agents and the gateway; the tests run in order against that cluster. The last test kills a
lone control plane with SIGKILL in the middle of a burst of concurrent writes.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cluster import (
    SERVICE,
    ControlProcess,
    available,
    deploy,
    load_during,
    push,
    register,
    routes,
    wait_for,
    write_service,
)

from anycast.control import ControlClient
from anycast.core.config import ClusterConfig, RegionConfig
from anycast.core.http import free_port
from anycast.local import LocalCluster

pytestmark = pytest.mark.slow


REGIONS = [
    RegionConfig(name="us-east", latitude=38.9, longitude=-77.4),
    RegionConfig(name="eu-west", latitude=53.3, longitude=-6.3),
]
REPLICAS = {"us-east": 1, "eu-west": 1}


def push_echo(config: ClusterConfig, work: Path) -> dict[str, Any]:
    """The echo service built and stored in the home's registry, as `anycast push` does."""
    service = write_service(work, SERVICE)
    return push(config, f"{service}:Echo", "echo", work / "dist")


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, free_ports: Callable[[int], int]
) -> Iterator[LocalCluster]:
    home = tmp_path_factory.mktemp("outage-home")
    config = ClusterConfig(
        home=home,
        control_port=free_port(),
        gateway_port=free_port(),
        agent_port_base=free_ports(len(REGIONS)),
        regions=REGIONS,
    )
    local = LocalCluster(config)
    pushed = push_echo(config, home / "src")
    try:
        local.up()
        with ControlClient(config.control_url) as control:
            deploy(control, pushed, REPLICAS)
        for region, count in REPLICAS.items():
            wait_for(f"{region} replicas", lambda r=region, c=count: available(local, r) == c)
        yield local
    finally:
        local.down()


async def _load(url: str, seconds: float, during: Callable[[], None]) -> list[tuple[Any, ...]]:
    """Four concurrent callers from both regions for ``seconds``; ``during`` runs 1 s in.

    Every call sends its own text, so an answer cannot come from a cache: it was served.
    """
    counter = itertools.count()
    regions = ("us-east", "eu-west")

    async def send(http: httpx.AsyncClient, caller: int) -> tuple[Any, ...]:
        text = f"call-{next(counter)}"
        headers = {"X-Anycast-Region": regions[caller % len(regions)]}
        try:
            r = await http.post("/v1/deployments/echo/echo", json={"text": text}, headers=headers)
            echoed = r.json().get("text") if r.status_code == 200 else r.text[:200]
            result = (r.status_code, echoed == text, r.headers.get("x-anycast-region"))
        except httpx.HTTPError as exc:
            result = (repr(exc), False, None)
        await asyncio.sleep(0.02)
        return result

    return await load_during(url, seconds, during, send, callers=4, timeout=15)


def _agent_replicas(cluster: LocalCluster, region: str) -> list[dict[str, Any]]:
    port = cluster.config.agent_port(region)
    rows: list[dict[str, Any]] = httpx.get(f"http://127.0.0.1:{port}/v1/replicas", timeout=5).json()
    return rows


def test_gateway_and_replicas_serve_every_call_while_the_control_plane_is_killed(
    cluster: LocalCluster,
) -> None:
    before = {r: _agent_replicas(cluster, r) for r in REPLICAS}
    control_pid = cluster.pid("control")
    assert control_pid is not None

    def kill_control() -> None:
        os.kill(control_pid, signal.SIGKILL)

    results = asyncio.run(_load(cluster.config.gateway_url, 8.0, kill_control))

    failures = [r for r in results if r[0] != 200 or not r[1]]
    assert failures == [], f"{len(failures)} of {len(results)} calls failed: {failures[:5]}"
    assert len(results) > 20
    assert Counter(r[2] for r in results).keys() == set(REPLICAS)
    assert cluster.pid("control") is None
    wait_for("the gateway to notice", lambda: routes(cluster)["control_plane"] == "down", 20)
    # The agents kept every replica as it was: same replicas, same processes, still ready.
    for region, rows in before.items():
        now = _agent_replicas(cluster, region)
        assert [(r["id"], r["pid"]) for r in now] == [(r["id"], r["pid"]) for r in rows]
        assert {r["state"] for r in now} == {"ready"}


def test_agents_reconnect_and_report_again_when_the_control_plane_returns(
    cluster: LocalCluster,
) -> None:
    assert cluster.pid("control") is None, "runs after the control plane was killed"
    restarted_at = time.time()

    cluster.up()  # starts only what is not running: the control plane, over the same store

    control = ControlClient(cluster.config.control_url)

    def reported_again() -> bool:
        regions = {r["name"]: r for r in control.regions()}
        fresh = all((regions[r]["last_seen"] or 0) > restarted_at for r in REPLICAS)
        ready = Counter(x["region"] for x in control.replicas() if x["state"] == "ready")
        return fresh and dict(ready) == REPLICAS

    wait_for("every agent to register and report again", reported_again, timeout=60)
    wait_for("the gateway to reconnect", lambda: routes(cluster)["control_plane"] == "connected")

    # They follow the new control plane's state too: a change made now is carried out.
    deployment = control.deployment("echo")
    control.put_deployment(
        "echo", deployment["artifact"], {**REPLICAS, "eu-west": 2}, revision=deployment["revision"]
    )
    wait_for("eu-west to scale to 2", lambda: available(cluster, "eu-west") == 2, timeout=60)
    control.close()


# -- kill -9 during a burst of writes ----------------------------------------------------------


def _writer(
    url: str,
    artifact: str,
    worker: int,
    acked: list[dict[str, Any]],
    refused: list[str],
    go_on: threading.Event,
) -> None:
    """PUT new deployments and regions until the control plane dies; keep every 200."""
    with httpx.Client(base_url=url, timeout=10) as http:
        for i in itertools.count():
            if not go_on.is_set():
                return
            if i % 2:
                # Only configured regions register: each worker re-registers its own one.
                path = f"/v1/regions/burst-{worker}"
                body: dict[str, Any] = {"latitude": worker, "longitude": 0}
                body["agent_url"] = f"http://127.0.0.1:{10000 + i % 50000}"
            else:
                path = f"/v1/deployments/w{worker}-{i}"
                body = {"artifact": artifact, "replicas": {"us-east": i % 3}, "revision": 0}
            try:
                response = http.put(path, json=body)
            except httpx.HTTPError:
                return  # killed: this write was never acknowledged
            if response.status_code != 200:
                refused.append(f"{path}: {response.status_code} {response.text[:200]}")
                continue
            acked.append({"path": path, **response.json()})


def test_kill_9_during_a_burst_of_writes_loses_no_acknowledged_write(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    bursts = [RegionConfig(name=f"burst-{w}", latitude=w, longitude=0) for w in range(8)]
    config = ClusterConfig(home=home)
    config = config.model_copy(update={"regions": [*config.regions, *bursts]})
    config.save()
    pushed = push_echo(config, tmp_path / "src")
    artifact = pushed["id"]
    control = ControlProcess(home).start()
    acked: list[dict[str, Any]] = []
    refused: list[str] = []
    go_on = threading.Event()
    go_on.set()
    try:
        with ControlClient(control.url) as client:
            register(client, pushed)
        writers = [
            threading.Thread(target=_writer, args=(control.url, artifact, w, acked, refused, go_on))
            for w in range(8)
        ]
        for thread in writers:
            thread.start()
        wait_for("200 acknowledged writes", lambda: len(acked) >= 200, timeout=120)

        control.stop(signal.SIGKILL)  # while eight writers are mid-request
        go_on.clear()
        for thread in writers:
            thread.join(timeout=30)
        control.start()

        with ControlClient(control.url) as client:
            deployments = {d["name"]: d for d in client.deployments()}
            regions = {r["name"]: r for r in client.regions()}
            state_revision = client.state()["revision"]
            after = client.put_deployment("after-restart", artifact, {})
    finally:
        go_on.clear()
        control.stop()

    assert refused == [], f"{len(refused)} writes were refused: {refused[:3]}"
    lost = []
    last_of_region = {w["path"]: w for w in acked if w["path"].startswith("/v1/regions/")}
    for write in acked:
        kind, _, name = write["path"].removeprefix("/v1/").partition("/")
        if kind == "regions" and write is not last_of_region[write["path"]]:
            continue  # overwritten by the same worker's next acknowledged write
        stored = (deployments if kind == "deployments" else regions).get(name)
        expected = {k: v for k, v in write.items() if k != "path"}
        # A region's write in flight at the kill may have landed after its last acknowledged one.
        newer = kind == "regions" and stored and stored["revision"] > expected["revision"]
        if stored != expected and not newer:
            lost.append((write["path"], expected, stored))
    assert lost == [], f"{len(lost)} of {len(acked)} acknowledged writes changed or vanished"
    highest = max(write["revision"] for write in acked)
    assert state_revision >= highest
    assert after["revision"] > state_revision  # no revision is ever handed out twice
