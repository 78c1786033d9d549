"""The gateway over real sockets: small replica servers run in threads, state is fed in."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request, Response
from servers import ThreadServer

from anycast.core.config import ClusterConfig
from anycast.core.http import LOOPBACK, free_port
from anycast.gateway import Gateway, create_gateway_app

ART = "d" * 64


def replica_app(replica_id: str, status: int = 200) -> FastAPI:
    """A stand-in replica: echoes the body, or answers ``status`` without a body."""
    app = FastAPI()

    @app.get("/readyz")
    async def readyz() -> Response:
        return Response(status_code=200)

    @app.post("/v1/{handler}")
    async def call(handler: str, request: Request) -> Response:
        if handler == "slow":
            await asyncio.sleep(0.3)
        body = await request.body()
        headers = {"X-Anycast-Replica": replica_id, "X-Anycast-Artifact": ART}
        if status != 200:
            return Response(status_code=status, headers=headers)
        if handler == "deadline":  # tells what time budget the gateway gave this try
            budget = request.headers.get("x-anycast-deadline-ms", "")
            return Response(content=budget, headers=headers, media_type="text/plain")
        media = request.headers.get("content-type")
        return Response(content=body, headers=headers, media_type=media)

    return app


class Dropper:
    """Accepts connections and closes them before sending a single byte."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind((LOOPBACK, 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.recv(65536)
            conn.close()


def _row(rid: str, region: str, port: int, state: str = "ready") -> dict[str, Any]:
    return {
        "id": rid,
        "deployment": "digits",
        "artifact": ART,
        "region": region,
        "endpoint": f"http://{LOOPBACK}:{port}",
        "state": state,
    }


def _state(*rows: dict[str, Any]) -> dict[str, Any]:
    return {
        "revision": 5,
        "regions": [],
        "artifacts": [],
        "deployments": [{"name": "digits", "artifact": ART, "replicas": {}}],
        "replicas": list(rows),
    }


@pytest.fixture
def replicas() -> Iterator[dict[str, ThreadServer]]:
    servers = {rid: ThreadServer(replica_app(rid)).start() for rid in ("us-1", "us-2", "eu-1")}
    yield servers
    for server in servers.values():
        if server.server is not None and not server.server.should_exit:
            server.stop()


def _gateway(tmp_path: Path, **kwargs: Any) -> tuple[Gateway, ThreadServer]:
    config = ClusterConfig(home=tmp_path)
    dead_control = f"http://{LOOPBACK}:{free_port()}"
    kwargs.setdefault("simulate_latency", True)
    kwargs.setdefault("probe_interval", 0.2)
    gateway = Gateway(config, control_url=dead_control, **kwargs)
    return gateway, ThreadServer(create_gateway_app(gateway)).start()


@pytest.fixture
def gateway(tmp_path: Path, replicas: dict[str, ThreadServer]) -> Iterator[tuple[Gateway, str]]:
    gw, server = _gateway(tmp_path)
    gw.apply_state(
        _state(
            _row("us-1", "us-east", replicas["us-1"].port),
            _row("us-2", "us-east", replicas["us-2"].port),
            _row("eu-1", "eu-west", replicas["eu-1"].port),
        )
    )
    yield gw, server.url
    server.stop()


def test_call_is_served_in_the_callers_region_with_its_headers(gateway: tuple) -> None:
    _, url = gateway
    with httpx.Client(base_url=url) as http:
        own = http.post("/v1/deployments/digits/predict", json={"x": [1, 2]})
        eu = http.post(
            "/v1/deployments/digits/predict", json={"x": 3}, headers={"X-Anycast-Region": "eu-west"}
        )
        asia = http.post(
            "/v1/deployments/digits/predict",
            content=b"raw",
            headers={"X-Anycast-Region": "ap-southeast", "content-type": "text/plain"},
        )

    assert own.status_code == 200 and own.json() == {"x": [1, 2]}
    assert own.headers["x-anycast-region"] == "us-east"
    assert own.headers["x-anycast-replica"] in {"us-1", "us-2"}
    assert own.headers["x-anycast-artifact"] == ART
    assert "x-anycast-simulated-delay-ms" not in own.headers
    assert eu.headers["x-anycast-replica"] == "eu-1"
    assert asia.headers["x-anycast-region"] == "eu-west"  # nearest region with a replica
    assert asia.content == b"raw" and asia.headers["content-type"].startswith("text/plain")
    assert float(asia.headers["x-anycast-simulated-delay-ms"]) > 50


def test_bad_calls_get_clear_4xx_errors(gateway: tuple) -> None:
    _, url = gateway
    with httpx.Client(base_url=url) as http:
        region = http.post("/v1/deployments/digits/predict", headers={"X-Anycast-Region": "mars"})
        missing = http.post("/v1/deployments/nope/predict")
        handler = http.post("/v1/deployments/digits/not-a-handler")
        name = http.post("/v1/deployments/Digits!/predict")

    assert region.status_code == 400
    assert "mars" in region.json()["error"]["message"]
    assert "eu-west" in region.json()["error"]["message"]
    assert missing.status_code == 404 and "digits" in missing.json()["error"]["message"]
    assert handler.status_code == 400 and "handler" in handler.json()["error"]["message"]
    assert name.status_code == 400


def test_calls_spread_over_the_least_loaded_replicas_and_counters_return_to_zero(
    gateway: tuple,
) -> None:
    gw, url = gateway

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            calls = [http.post("/v1/deployments/digits/slow", json={}) for _ in range(8)]
            return await asyncio.gather(*calls)

    responses = asyncio.run(burst())

    served = Counter(r.headers["x-anycast-replica"] for r in responses)
    assert all(r.status_code == 200 for r in responses)
    assert served == {"us-1": 4, "us-2": 4}
    rows = gw.routes()["deployments"]["digits"]["regions"]
    assert all(row["in_flight"] == 0 for rows_ in rows.values() for row in rows_)


def test_failing_replicas_are_retried_elsewhere_and_ejected(tmp_path: Path) -> None:
    unavailable = ThreadServer(replica_app("us-503", status=503)).start()
    dropper = Dropper()
    good = ThreadServer(replica_app("eu-ok")).start()
    gw, server = _gateway(tmp_path, simulate_latency=False)
    gw.apply_state(
        _state(
            _row("us-503", "us-east", unavailable.port),
            _row("us-drop", "us-east", dropper.port),
            _row("eu-ok", "eu-west", good.port),
        )
    )
    try:
        with httpx.Client(base_url=server.url) as http:
            answers = [http.post("/v1/deployments/digits/predict", json=i) for i in range(10)]
            routes = http.get("/v1/routes").json()
            metrics = http.get("/metrics").text
    finally:
        for s in (unavailable, good, server):
            s.stop()

    assert [a.status_code for a in answers] == [200] * 10
    assert {a.headers["x-anycast-replica"] for a in answers} == {"eu-ok"}
    assert [a.json() for a in answers] == list(range(10))
    rows = {r["id"]: r for r in routes["deployments"]["digits"]["regions"]["us-east"]}
    assert rows["us-503"]["ejected"] and rows["us-drop"]["ejected"]
    assert "anycast_gateway_retries_total" in metrics
    assert 'anycast_gateway_failovers_total{deployment="digits",from_region="us-east"' in metrics


def test_dead_replica_leaves_rotation_within_a_second_and_returns(
    gateway: tuple, replicas: dict[str, ThreadServer]
) -> None:
    _, url = gateway
    port = replicas["us-1"].port
    replicas["us-1"].stop()
    time.sleep(1.0)

    with httpx.Client(base_url=url) as http:
        served = {
            http.post("/v1/deployments/digits/p").headers["x-anycast-replica"] for _ in range(10)
        }
        assert served == {"us-2"}

        replicas["us-1"] = ThreadServer(replica_app("us-1"), port=port).start()
        time.sleep(1.0)
        served = {
            http.post("/v1/deployments/digits/p").headers["x-anycast-replica"] for _ in range(20)
        }
    assert served == {"us-1", "us-2"}


def test_no_ready_replica_anywhere_is_a_fast_503(tmp_path: Path) -> None:
    gw, server = _gateway(tmp_path)
    gw.apply_state(
        _state(_row("us-1", "us-east", free_port()), _row("eu-1", "eu-west", free_port()))
    )
    try:
        with httpx.Client(base_url=server.url) as http:
            time.sleep(0.5)  # the probes have found both replicas dead
            started = time.monotonic()
            answer = http.post("/v1/deployments/digits/predict", json={})
            elapsed = time.monotonic() - started
    finally:
        server.stop()

    assert answer.status_code == 503
    assert answer.headers["retry-after"] == "1"
    assert answer.json()["error"]["code"] == "unavailable"
    assert elapsed < 0.5


def test_gateway_without_any_state_answers_503_and_stays_healthy(tmp_path: Path) -> None:
    _, server = _gateway(tmp_path)
    try:
        with httpx.Client(base_url=server.url) as http:
            call = http.post("/v1/deployments/digits/predict", json={})
            health = http.get("/healthz")
    finally:
        server.stop()

    assert call.status_code == 503 and "control plane" in call.json()["error"]["message"]
    assert health.status_code == 200


def _with_handlers(state: dict[str, Any], **handlers: dict[str, bool]) -> dict[str, Any]:
    state["artifacts"] = [{"id": ART, "manifest": {"handlers": handlers}}]
    return state


def test_a_bad_timeout_header_is_a_clear_400(gateway: tuple) -> None:
    _, url = gateway
    with httpx.Client(base_url=url) as http:
        answers = [
            http.post("/v1/deployments/digits/p", headers={"X-Anycast-Timeout-Ms": value})
            for value in ("soon", "0", "-5", "1.5")
        ]
        fine = http.post("/v1/deployments/digits/p", headers={"X-Anycast-Timeout-Ms": "5000"})

    for answer in answers:
        assert answer.status_code == 400
        assert answer.json()["error"]["code"] == "invalid_timeout"
        assert "milliseconds" in answer.json()["error"]["message"]
    assert fine.status_code == 200


def test_a_dropped_connection_is_retried_only_for_idempotent_handlers(tmp_path: Path) -> None:
    dropper = Dropper()
    good = ThreadServer(replica_app("eu-ok")).start()
    # Probes every 30 s: the calls, not a probe, find the dropping replica.
    gw, server = _gateway(tmp_path, simulate_latency=False, probe_interval=30.0)
    state = _state(_row("us-drop", "us-east", dropper.port), _row("eu-ok", "eu-west", good.port))
    gw.apply_state(_with_handlers(state, charge={"idempotent": False}))
    try:
        with httpx.Client(base_url=server.url) as http:
            charge = http.post("/v1/deployments/digits/charge", json=1)
            gw.health.record_probe("us-drop", ready=True)  # back in rotation, on probation
            predict = http.post("/v1/deployments/digits/predict", json=2)
    finally:
        for s in (good, server):
            s.stop()

    assert charge.status_code == 502 and charge.json()["error"]["code"] == "replica_dropped"
    assert charge.headers["x-anycast-replica"] == "us-drop"
    assert predict.status_code == 200 and predict.headers["x-anycast-replica"] == "eu-ok"


def _wait_probed_up(http: httpx.Client, replica_ids: set[str], timeout: float = 10.0) -> None:
    """Until the gateway's own probes have found every one of ``replica_ids`` ready."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        regions = http.get("/v1/routes").json()["deployments"]["digits"]["regions"]
        up = {r["id"] for rows in regions.values() for r in rows if r["probe"] == "up"}
        if replica_ids <= up:
            return
        time.sleep(0.05)
    raise AssertionError(f"the gateway never probed {sorted(replica_ids)} up")


def test_a_500_is_relayed_not_retried_and_counts_return_to_zero(tmp_path: Path) -> None:
    broken = ThreadServer(replica_app("us-500", status=500)).start()
    good = ThreadServer(replica_app("eu-ok")).start()
    gw, server = _gateway(tmp_path, simulate_latency=False)
    gw.apply_state(
        _state(_row("us-500", "us-east", broken.port), _row("eu-ok", "eu-west", good.port))
    )
    try:
        with httpx.Client(base_url=server.url) as http:
            _wait_probed_up(http, {"us-500", "eu-ok"})
            answers = [http.post("/v1/deployments/digits/predict", json=i) for i in range(5)]
            routes = http.get("/v1/routes").json()
    finally:
        for s in (broken, good, server):
            s.stop()

    assert [a.status_code for a in answers] == [500, 500, 500, 200, 200]  # --eject-after 3
    assert [a.headers["x-anycast-replica"] for a in answers[3:]] == ["eu-ok", "eu-ok"]
    rows = {r["id"]: r for rs in routes["deployments"]["digits"]["regions"].values() for r in rs}
    assert rows["us-500"]["ejected"] and rows["us-500"]["probe"] == "up"
    assert routes["calls_in_flight"] == 0 and all(r["in_flight"] == 0 for r in rows.values())


def test_deterministic_handlers_are_cached_per_body(
    gateway: tuple, replicas: dict[str, ThreadServer]
) -> None:
    gw, url = gateway
    state = _state(*(_row(rid, "us-east", server.port) for rid, server in replicas.items()))
    gw.apply_state(_with_handlers(state, predict={"deterministic": True}))
    with httpx.Client(base_url=url) as http:
        first = http.post("/v1/deployments/digits/predict", json={"x": 1})
        again = http.post("/v1/deployments/digits/predict", json={"x": 1})
        other = http.post("/v1/deployments/digits/predict", json={"x": 2})
        plain = http.post("/v1/deployments/digits/echo", json={"x": 1})

    assert [r.headers["x-anycast-cache"] for r in (first, again, other)] == ["miss", "hit", "miss"]
    assert again.json() == {"x": 1} and other.json() == {"x": 2}
    assert "x-anycast-cache" not in plain.headers
    assert len(gw.cache) == 2


def test_gzip_only_when_accepted_and_large(gateway: tuple) -> None:
    _, url = gateway
    big = {"text": "seven " * 400}
    with httpx.Client(base_url=url) as http:
        zipped = http.post(
            "/v1/deployments/digits/p", json=big, headers={"Accept-Encoding": "gzip"}
        )
        plain = http.post(
            "/v1/deployments/digits/p", json=big, headers={"Accept-Encoding": "identity"}
        )
        small = http.post("/v1/deployments/digits/p", json={}, headers={"Accept-Encoding": "gzip"})

    assert zipped.headers["content-encoding"] == "gzip" and zipped.json() == big
    assert "content-encoding" not in plain.headers and plain.json() == big
    assert "content-encoding" not in small.headers


def test_a_draining_gateway_refuses_new_calls_and_says_so_on_healthz(gateway: tuple) -> None:
    gw, url = gateway
    gw.begin_drain(grace=5.0)
    with httpx.Client(base_url=url) as http:
        health = http.get("/healthz")
        answer = http.post("/v1/deployments/digits/predict", json={})

    assert health.status_code == 503 and health.json()["status"] == "draining"
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "draining"
    assert gw.drained(time.monotonic())  # nothing in flight: ready to exit


class Blackhole:
    """Accepts connections and never answers: a frozen replica."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind((LOOPBACK, 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                self.conns.append(self.sock.accept()[0])
            except OSError:
                return


def _probe_of(http: httpx.Client, replica_id: str) -> str:
    regions = http.get("/v1/routes").json()["deployments"]["digits"]["regions"]
    return next(r["probe"] for rows in regions.values() for r in rows if r["id"] == replica_id)


def test_a_frozen_replica_leaves_rotation_and_its_calls_are_retried(tmp_path: Path) -> None:
    frozen = Blackhole()
    good = ThreadServer(replica_app("us-ok")).start()
    gw, server = _gateway(tmp_path, simulate_latency=False, probe_interval=0.5, try_timeout=0.5)
    gw.apply_state(
        _state(_row("us-frozen", "us-east", frozen.port), _row("us-ok", "us-east", good.port))
    )
    try:
        with httpx.Client(base_url=server.url, timeout=10) as http:
            early = [http.post("/v1/deployments/digits/predict", json=i) for i in range(4)]
            deadline = time.monotonic() + 10  # two probe timeouts of 0.4 s, 0.5 s apart
            while _probe_of(http, "us-frozen") != "down" and time.monotonic() < deadline:
                time.sleep(0.1)
            routes = http.get("/v1/routes").json()
            late = [http.post("/v1/deployments/digits/predict", json=i) for i in range(10)]
    finally:
        for s in (good, server):
            s.stop()

    assert [a.status_code for a in early + late] == [200] * 14
    assert {a.headers["x-anycast-replica"] for a in early + late} == {"us-ok"}
    rows = {r["id"]: r for r in routes["deployments"]["digits"]["regions"]["us-east"]}
    assert rows["us-frozen"]["probe"] == "down" and not rows["us-frozen"]["available"]


def test_each_try_tells_the_replica_its_time_budget(tmp_path: Path) -> None:
    replica = ThreadServer(replica_app("us-1")).start()
    gw, server = _gateway(tmp_path, simulate_latency=False)
    gw.apply_state(_state(_row("us-1", "us-east", replica.port)))
    try:
        with httpx.Client(base_url=server.url) as http:
            asked = http.post(
                "/v1/deployments/digits/deadline", json={}, headers={"X-Anycast-Timeout-Ms": "1500"}
            )
            default = http.post("/v1/deployments/digits/deadline", json={})
    finally:
        for s in (replica, server):
            s.stop()

    assert asked.status_code == 200 and 1 <= int(asked.text) <= 1500
    assert default.status_code == 200 and 1500 < int(default.text) <= 60_000
