"""The gateway holds calls for a deployment scaled to zero: real sockets, a stand-in agent."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from servers import ThreadServer
from test_gateway_server import ART, _gateway, _row, replica_app

from anycast.gateway import Gateway

POLICY = {
    "min_replicas": 0,
    "max_replicas": 2,
    "target_in_flight": 4.0,
    "scale_up_delay": 1.0,
    "scale_down_delay": 5.0,
    "idle_to_zero": 30.0,
}


def agent_app(wakes: list[str], on_wake: Callable[[], None]) -> FastAPI:
    """A stand-in region agent that counts wake-ups and runs ``on_wake`` on the first."""
    app = FastAPI()

    @app.post("/v1/deployments/{name}/wake")
    def wake(name: str) -> dict[str, Any]:
        wakes.append(name)
        if len(wakes) == 1:
            on_wake()
        return {"deployment": name, "region": "eu-west", "desired": 1}

    return app


def state(agent_url: str, *replicas: dict[str, Any], policy: bool = True) -> dict[str, Any]:
    deployment: dict[str, Any] = {"name": "digits", "artifact": ART, "replicas": {}}
    if policy:
        deployment["autoscaling"] = {"eu-west": POLICY}
    return {
        "revision": 9,
        "regions": [
            {
                "name": "eu-west",
                "latitude": 53.3,
                "longitude": -6.3,
                "agent_url": agent_url,
                "last_seen": time.time(),
            }
        ],
        "artifacts": [],
        "deployments": [deployment],
        "replicas": list(replicas),
        "autoscaling": [],
    }


@pytest.fixture
def replica() -> Iterator[ThreadServer]:
    server = ThreadServer(replica_app("eu-1")).start()
    yield server
    server.stop()


def _call(url: str) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    with httpx.Client(base_url=url, timeout=30) as http:
        response = http.post(
            "/v1/deployments/digits/predict", json={"x": 1}, headers={"X-Anycast-Region": "eu-west"}
        )
    return response, time.monotonic() - started


def test_call_at_zero_is_held_until_the_woken_replica_is_ready(
    tmp_path: Path, replica: ThreadServer
) -> None:
    gateway: Gateway
    wakes: list[str] = []

    def start_replica() -> None:  # what the agent does: a replica appears a moment later
        rows = (_row("eu-1", "eu-west", replica.port, state="starting"),)
        threading.Timer(0.5, lambda: gateway.apply_state(state(agent.url, *rows))).start()

    agent = ThreadServer(agent_app(wakes, start_replica)).start()
    gateway, server = _gateway(tmp_path, hold_seconds=20)
    gateway.apply_state(state(agent.url))

    response, waited = _call(server.url)

    assert response.status_code == 200, response.text
    assert response.headers["x-anycast-replica"] == "eu-1"
    assert wakes and set(wakes) == {"digits"}
    assert waited >= 0.5
    server.stop()
    agent.stop()


def test_call_held_too_long_gets_503_with_retry_after(tmp_path: Path) -> None:
    wakes: list[str] = []
    agent = ThreadServer(agent_app(wakes, lambda: None)).start()
    gateway, server = _gateway(tmp_path, hold_seconds=1.5)
    gateway.apply_state(state(agent.url))

    response, waited = _call(server.url)

    assert response.status_code == 503
    assert response.json()["error"]["code"] == "waking_up"
    assert "held" in response.json()["error"]["message"]
    assert response.headers["retry-after"] == "5"
    assert waited >= 1.5
    assert len(wakes) >= 2  # sent again while the call waited, so the agent stays awake
    server.stop()
    agent.stop()


def test_deployment_without_a_policy_is_not_held(tmp_path: Path) -> None:
    wakes: list[str] = []
    agent = ThreadServer(agent_app(wakes, lambda: None)).start()
    gateway, server = _gateway(tmp_path, hold_seconds=20)
    gateway.apply_state(state(agent.url, policy=False))

    response, waited = _call(server.url)

    assert response.status_code == 503
    assert response.json()["error"]["code"] == "unavailable"
    assert wakes == [] and waited < 10
    server.stop()
    agent.stop()


def test_negative_hold_is_refused(tmp_path: Path) -> None:
    from anycast.core.config import ClusterConfig
    from anycast.core.errors import ConfigError

    with pytest.raises(ConfigError, match="--hold-seconds must be from 0"):
        Gateway(ClusterConfig(home=tmp_path), hold_seconds=-1)
