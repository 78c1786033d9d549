"""The gateway with the HAProxy data plane, on a real two-region cluster on 127.0.0.1.

HAProxy carries the calls; the Python gateway steers it and answers everything else. The
tests run in order against one cluster: routing, Python-only paths, following a replica
that comes and goes (each a reload under load), then losing a region under load. The last
test runs the supervisor and a real HAProxy alone, without a cluster.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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

from anycast.core.config import RegionConfig
from anycast.core.http import free_port
from anycast.gateway.haproxy import HaproxySupervisor, Settings, haproxy_paths
from anycast.gateway.haproxy_metrics import HaproxyCollector
from anycast.gateway.routing import ReplicaHealth, RoutingTable

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("haproxy") is None, reason="needs Debian's haproxy"),
]

REGIONS = [
    RegionConfig(name="us-east", latitude=38.9, longitude=-77.4),
    RegionConfig(name="eu-west", latitude=53.3, longitude=-6.3),
    RegionConfig(name="ap-southeast", latitude=1.35, longitude=103.8),  # no agent, no replica
]
REPLICAS = {"us-east": 2, "eu-west": 1}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = Cluster.new(tmp_path_factory.mktemp("anycast-haproxy"))
    # Without simulated latency: with it on, HAProxy leaves cross-region calls to Python.
    update = {"regions": REGIONS, "simulate_latency": False}
    cluster.config = cluster.config.model_copy(update=update)
    cluster.config.save()
    service = write_service(cluster.home / "src", SERVICE)
    pushed = push(cluster.config, f"{service}:Echo", "echo", cluster.home / "dist")

    with running(cluster, REPLICAS, ["--data-plane", "haproxy"]):
        with cluster.control as control:
            deploy(control, pushed, REPLICAS)
        for region, count in REPLICAS.items():
            wait_for(f"{region} replicas", lambda r=region, c=count: available(cluster, r) == c)
        yield cluster


def echo(http: httpx.Client, text: str, region: str | None = None) -> httpx.Response:
    headers = {"X-Anycast-Region": region} if region else {}
    return http.post("/v1/deployments/echo/echo", json={"text": text}, headers=headers)


def python_calls(cluster: Cluster) -> float:
    """Calls the Python app answered itself, from its /metrics."""
    text = httpx.get(f"{cluster.gateway}/metrics", timeout=5).text
    rows = [line for line in text.splitlines() if line.startswith("anycast_gateway_requests_total")]
    return sum(float(line.rsplit(" ", 1)[1]) for line in rows if 'deployment="echo"' in line)


def test_calls_go_through_haproxy_to_the_callers_nearest_region(cluster: Cluster) -> None:
    wait_for("haproxy to route echo", lambda: python_calls(cluster) == 0 and _served(cluster))
    run_dir = cluster.home.resolve() / "run" / f"haproxy-{cluster.config.gateway_port}"
    assert (run_dir / "haproxy.cfg").exists() and (run_dir / "master.sock").exists()
    before = python_calls(cluster)
    with httpx.Client(base_url=cluster.gateway, timeout=10) as http:
        own = [echo(http, f"a{i}") for i in range(10)]
        eu = echo(http, "b", "eu-west")
        asia = echo(http, "c", "ap-southeast")

    assert [r.status_code for r in own] == [200] * 10, own[0].text
    assert own[0].json() == {"text": "a0", "region": "us-east"}
    assert {r.headers["x-anycast-replica"] for r in own} == {"echo-us-east-0", "echo-us-east-1"}
    assert own[0].headers["x-anycast-region"] == "us-east"
    assert eu.json() == {"text": "b", "region": "eu-west"}
    assert eu.headers["x-anycast-replica"] == "echo-eu-west-0"
    assert asia.headers["x-anycast-region"] == "eu-west"  # nearest region with replicas
    assert python_calls(cluster) == before  # HAProxy carried every one of them


def _served(cluster: Cluster) -> bool:
    with httpx.Client(base_url=cluster.gateway, timeout=10) as http:
        return echo(http, "warm").status_code == 200


def test_python_answers_what_haproxy_does_not_route(cluster: Cluster) -> None:
    with httpx.Client(base_url=cluster.gateway, timeout=10) as http:
        health = http.get("/healthz")
        unknown = http.post("/v1/deployments/nope/echo", json={"text": "x"})
        region = echo(http, "x", "mars")
        handler = http.post("/v1/deployments/echo/no-such!", json={"text": "x"})
        timeout = http.post(
            "/v1/deployments/echo/echo", json={"text": "x"}, headers={"X-Anycast-Timeout-Ms": "0"}
        )
        bad_body = http.post("/v1/deployments/echo/echo", json={"words": "x"})
        with_deadline = http.post(
            "/v1/deployments/echo/echo",
            json={"text": "t"},
            headers={"X-Anycast-Timeout-Ms": "5000"},
        )

    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert health.json()["data_plane"] == "haproxy" and health.json()["haproxy"]["up"] is True
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "unknown_deployment"
    assert "echo" in unknown.json()["error"]["message"]
    assert region.status_code == 400 and region.json()["error"]["code"] == "unknown_region"
    assert handler.status_code == 400 and "handler" in handler.json()["error"]["message"]
    assert timeout.status_code == 400 and timeout.json()["error"]["code"] == "invalid_timeout"
    # The replica's own 4xx comes back unchanged, through HAProxy.
    assert 400 <= bad_body.status_code < 500, bad_body.text
    assert "error" in bad_body.json() and bad_body.headers["x-anycast-region"] == "us-east"
    assert with_deadline.status_code == 200 and with_deadline.json()["text"] == "t"


def haproxy_calls(cluster: Cluster, region: str, status: str = "2xx") -> float:
    """Calls HAProxy answered for echo from ``region``, from the gateway's /metrics."""
    text = httpx.get(f"{cluster.gateway}/metrics", timeout=5).text
    labels = f'deployment="echo",region="{region}",status="{status}"'
    rows = [line for line in text.splitlines() if line.startswith("anycast_gateway_haproxy_")]
    assert "anycast_gateway_haproxy_up 1.0" in rows
    wanted = f"anycast_gateway_haproxy_requests_total{{{labels}}}"
    return sum(float(line.rsplit(" ", 1)[1]) for line in rows if line.startswith(wanted))


def test_calls_haproxy_carries_show_in_the_gateways_metrics(cluster: Cluster) -> None:
    before_us, before_eu = haproxy_calls(cluster, "us-east"), haproxy_calls(cluster, "eu-west")
    python_before = python_calls(cluster)
    with httpx.Client(base_url=cluster.gateway, timeout=10) as http:
        own = [echo(http, f"m{i}") for i in range(20)]
        eu = [echo(http, f"e{i}", "eu-west") for i in range(5)]

    assert [r.status_code for r in own + eu] == [200] * 25
    assert haproxy_calls(cluster, "us-east") == before_us + 20
    assert haproxy_calls(cluster, "eu-west") == before_eu + 5
    assert python_calls(cluster) == python_before  # counted once: by HAProxy, not Python too


Row = tuple[float, Any, str | None, str | None]  # time, status or error, region, replica


def _load(url: str, seconds: float, during: Callable[[], None], region: str | None) -> list[Row]:
    """Eight concurrent callers for ``seconds``; ``during`` runs one second in."""
    headers = {"X-Anycast-Region": region} if region else {}

    async def send(http: httpx.AsyncClient, _: int) -> Row:
        try:
            r = await http.post("/v1/deployments/echo/echo", json={"text": "x"}, headers=headers)
        except httpx.HTTPError as exc:
            return (time.monotonic(), repr(exc), None, None)
        replica = r.headers.get("x-anycast-replica")
        return (time.monotonic(), r.status_code, r.headers.get("x-anycast-region"), replica)

    return asyncio.run(load_during(url, seconds, during, send, callers=8, timeout=10))


def _scale(cluster: Cluster, eu_west: int) -> None:
    """Scale eu-west, and return once the gateway's table (so HAProxy's) holds that many."""
    with cluster.control as control:
        artifact = control.deployment("echo")["artifact"]
        control.put_deployment("echo", artifact, {"us-east": 2, "eu-west": eu_west})
    wait_for("the new table", lambda: len(_rows(cluster, "eu-west")) == eu_west, timeout=20)
    time.sleep(0.5)  # HAProxy reloads within a fraction of a second


def _rows(cluster: Cluster, region: str) -> list[dict[str, Any]]:
    routes = httpx.get(f"{cluster.gateway}/v1/routes", timeout=5).json()
    rows: list[dict[str, Any]] = routes["deployments"]["echo"]["regions"].get(region, [])
    return rows


def _replicas_serving(cluster: Cluster, region: str) -> set[str]:
    with httpx.Client(base_url=cluster.gateway, timeout=10) as http:
        return {echo(http, str(i), region).headers["x-anycast-replica"] for i in range(12)}


def test_haproxy_follows_a_new_and_a_removed_replica_without_failing_a_call(
    cluster: Cluster,
) -> None:
    results = _load(cluster.gateway, 3.0, lambda: _scale(cluster, 2), "eu-west")

    failures = [r for r in results if r[1] != 200]
    assert failures == [], f"{len(failures)} of {len(results)} calls failed: {failures[:5]}"
    wait_for("the new replica", lambda: available(cluster, "eu-west") == 2, timeout=40)
    new = {"echo-eu-west-0", "echo-eu-west-1"}
    wait_for("HAProxy to use it", lambda: _replicas_serving(cluster, "eu-west") == new, 10)

    results = _load(cluster.gateway, 3.0, lambda: _scale(cluster, 1), "eu-west")

    failures = [r for r in results if r[1] != 200]
    assert failures == [], f"{len(failures)} of {len(results)} calls failed: {failures[:5]}"
    assert _replicas_serving(cluster, "eu-west") == {"echo-eu-west-0"}


def test_killing_every_replica_of_a_region_under_load(cluster: Cluster) -> None:
    kill_region = RegionKill.of(cluster.control, "us-east", "echo")
    assert len(kill_region.victims) == 2
    killed_at = kill_region.killed_at

    results = _load(cluster.gateway, 4.0, kill_region, None)

    failures = [r for r in results if r[1] != 200]
    print(f"killed us-east under load: {len(failures)} of {len(results)} calls failed")
    # Calls in flight on a killed replica are retried (the handler is idempotent): on the
    # region's other replica, the Python backup, then the next region's backend. Only a call
    # whose answer the replica had begun to write when it was killed can fail (HAProxy, like
    # the Python gateway, never retries a response under way): rare, and only at the kill.
    assert len(failures) <= max(2, len(results) // 100), f"{failures[:5]}"
    assert all(r[0] < killed_at[0] + 1.0 for r in failures), f"late failures: {failures[:5]}"
    after = Counter(r[2] for r in results if r[0] > killed_at[0] + 0.5)
    assert after["eu-west"] > 0 and after["us-east"] == 0


@dataclass
class FakeGateway:
    """What the supervisor reads of a gateway: its table, health view and drain state."""

    table: RoutingTable
    health: ReplicaHealth = field(default_factory=ReplicaHealth)
    draining: bool = False


def _table(*replica_ids: str) -> RoutingTable:
    replicas = [
        {
            "id": rid,
            "deployment": "echo",
            "region": "us-east",
            "state": "ready",
            "endpoint": f"http://127.0.0.1:{free_port()}",
        }
        for rid in replica_ids
    ]
    state = {
        "revision": 1,
        "deployments": [{"name": "echo", "artifact": "a"}],
        "replicas": replicas,
    }
    return RoutingTable.from_state(state, REGIONS)


def test_supervisor_reloads_on_new_replicas_drains_to_python_and_stops(tmp_path: Path) -> None:
    gateway = FakeGateway(_table("echo-us-east-0"))
    settings = Settings(
        public_port=free_port(),
        python_port=free_port(),
        socket_path=str(tmp_path / "s.sock"),
        gateway_region="us-east",
    )
    supervisor = HaproxySupervisor(gateway, settings, tmp_path, interval=0.05)  # type: ignore[arg-type]

    async def scenario() -> list[str]:
        await supervisor.start()
        seen = [supervisor.runtime(["show servers state echo.us-east"])]
        gateway.table = _table("echo-us-east-0", "echo-us-east-1")
        await asyncio.sleep(1.5)  # at most one reload a second
        seen.append(supervisor.runtime(["show servers state echo.us-east"]))
        gateway.draining = True
        await asyncio.sleep(1.5)
        seen.append(supervisor.runtime(["show backend"]))
        await supervisor.stop(grace=5)
        return seen

    first, second, draining = asyncio.run(scenario())

    assert "echo-us-east-0" in first and "echo-us-east-1" not in first
    assert "echo-us-east-1" in second and supervisor.reloads >= 1
    assert "echo.us-east" not in draining and "python" in draining
    assert supervisor.process is not None and supervisor.process.poll() is not None


class _Replica(BaseHTTPRequestHandler):
    """Answers every call and probe with 200; ``slow`` calls after 1.5 s."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self._answer()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path.endswith("/slow"):
            time.sleep(1.5)
        self._answer()

    def _answer(self) -> None:
        body = b'{"text": "x"}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def _replica_table(ports: list[int]) -> RoutingTable:
    replicas = [
        {
            "id": f"echo-us-east-{n}",
            "deployment": "echo",
            "region": "us-east",
            "state": "ready",
            "endpoint": f"http://127.0.0.1:{port}",
        }
        for n, port in enumerate(ports)
    ]
    state = {
        "revision": 1,
        "deployments": [{"name": "echo", "artifact": "a"}],
        "replicas": replicas,
    }
    return RoutingTable.from_state(state, REGIONS)


def _replicas(n: int) -> list[ThreadingHTTPServer]:
    servers = [ThreadingHTTPServer(("127.0.0.1", 0), _Replica) for _ in range(n)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    return servers


def _supervisor(tmp_path: Path, gateway: FakeGateway) -> HaproxySupervisor:
    settings = Settings(
        public_port=free_port(),
        python_port=free_port(),  # nothing there: a call HAProxy did not carry fails
        socket_path=str(tmp_path / "s.sock"),
        gateway_region="us-east",
    )
    return HaproxySupervisor(gateway, settings, tmp_path, interval=0.05)  # type: ignore[arg-type]


async def _first_call_served(http: httpx.AsyncClient) -> None:
    for _ in range(100):  # until HAProxy's first checks pass
        if (await http.post("/v1/deployments/echo/echo", json={})).status_code == 200:
            return
        await asyncio.sleep(0.1)


def test_a_call_haproxy_is_carrying_shows_in_flight_on_its_replica(tmp_path: Path) -> None:
    servers = _replicas(1)
    supervisor = _supervisor(tmp_path, FakeGateway(_replica_table([servers[0].server_address[1]])))
    rows = [{"id": "echo-us-east-0", "in_flight": 0}]
    routes: dict[str, Any] = {"deployments": {"echo": {"regions": {"us-east": rows}}}}

    async def scenario() -> int:
        await supervisor.start()
        url = f"http://127.0.0.1:{supervisor.settings.public_port}"
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            await _first_call_served(http)
            slow = asyncio.create_task(http.post("/v1/deployments/echo/slow", json={}))
            await asyncio.sleep(0.5)
            await asyncio.to_thread(supervisor.stats.refresh)
            supervisor.stats.add_in_flight(routes)
            status = (await slow).status_code
        await supervisor.stop(grace=5)
        return status

    try:
        assert asyncio.run(scenario()) == 200
    finally:
        servers[0].shutdown()

    assert rows[0]["in_flight"] == 1
    assert routes["calls_in_flight"] == 1


def test_haproxy_call_counts_keep_growing_across_a_reload(tmp_path: Path) -> None:
    servers = _replicas(2)
    ports = [s.server_address[1] for s in servers]
    gateway = FakeGateway(_replica_table(ports[:1]))
    supervisor = _supervisor(tmp_path, gateway)
    settings = supervisor.settings
    collector = HaproxyCollector(supervisor.stats)

    def carried() -> float:
        return sum(
            s.value
            for family in collector.collect()
            for s in family.samples
            if s.name == "anycast_gateway_haproxy_requests_total" and s.labels["status"] == "2xx"
        )

    async def calls(http: httpx.AsyncClient, n: int) -> list[int]:
        return [
            (await http.post("/v1/deployments/echo/echo", json={})).status_code for _ in range(n)
        ]

    async def scenario() -> list[float]:
        await supervisor.start()
        seen = []
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{settings.public_port}") as http:
            await _first_call_served(http)
            seen.append(await asyncio.to_thread(carried))
            assert await calls(http, 5) == [200] * 5
            seen.append(await asyncio.to_thread(carried))
            gateway.table = _replica_table(ports)
            for _ in range(100):  # until the reload
                if supervisor.reloads:
                    break
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.5)  # the new worker's checks
            assert await calls(http, 3) == [200] * 3
            seen.append(await asyncio.to_thread(carried))
        await supervisor.stop(grace=5)
        return seen

    try:
        first, after_five, after_reload = asyncio.run(scenario())
    finally:
        for server in servers:
            server.shutdown()

    assert supervisor.reloads >= 1
    assert after_five == first + 5
    assert after_reload == after_five + 3  # the new worker started at 0; nothing lost


Answer = tuple[int, dict[str, str], bytes]


def _raw(port: int, *parts: bytes, pause: float = 0.0) -> Answer:
    """Send ``parts`` on one connection, ``pause`` s apart; the status, headers and body."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        for n, part in enumerate(parts):
            if n and pause:
                time.sleep(pause)
            sock.sendall(part)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (x.split(":", 1) for x in lines)}
    return int(status_line.split()[1]), headers, body


def _call(
    target: str = "/v1/deployments/echo/echo", version: str = "1.1", extra: str = ""
) -> bytes:
    return (
        f"POST {target} HTTP/{version}\r\nHost: 127.0.0.1\r\nConnection: close\r\n{extra}"
        "Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
    ).encode()


def _error(answer: Answer) -> tuple[int, str, str]:
    status, headers, body = answer
    assert headers["content-type"] == "application/json", body[:200]
    error = json.loads(body)["error"]
    return status, error["code"], error["message"]


def test_haproxy_answers_bad_requests_and_stalled_bodies_in_json_and_clears_its_files(
    tmp_path: Path,
) -> None:
    servers = _replicas(1)
    public = free_port()
    run_dir, socket_dir = haproxy_paths(tmp_path / "home", public)
    run_dir.mkdir(parents=True)
    (run_dir / "haproxy.cfg.new").write_text("left by a killed gateway")
    settings = Settings(
        public_port=public,
        python_port=free_port(),
        socket_path=str(socket_dir / "stats.sock"),
        gateway_region="us-east",
        body_timeout=1.0,
    )
    gateway = FakeGateway(_replica_table([servers[0].server_address[1]]))
    supervisor = HaproxySupervisor(gateway, settings, run_dir, interval=0.05)  # type: ignore[arg-type]
    big = "x" * 20_000

    async def scenario() -> dict[str, Any]:
        await supervisor.start()
        files = {p.name for folder in {run_dir, socket_dir} for p in folder.iterdir()}
        seen: dict[str, Any] = {"files": files}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{public}", timeout=10) as http:
            await _first_call_served(http)

        def send(*parts: bytes, pause: float = 0.0) -> Answer:
            return _raw(public, *parts, pause=pause)

        requests = {
            "garbage": (b"HELLO THERE\r\n\r\n",),
            "no_python": (b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",),
            "two_lengths": (_call(extra="Content-Length: 3\r\n"),),
            "bad_length": (_call().replace(b"Content-Length: 2", b"Content-Length: abc"),),
            "version": (_call(version="9.9"),),
            "other_host": (_call("http://other.example/v1/deployments/echo/echo"),),
            "same_host": (_call("http://127.0.0.1/v1/deployments/echo/echo"),),
            "long_query": (_call(f"/v1/deployments/echo/echo?q={big}"),),
            "long_header": (_call(extra=f"X-Big: {big}\r\n"),),
            "slow_answer": (_call("/v1/deployments/echo/slow"),),  # 1.5 s > the 1 s stall limit
            "stalled": (_call().removesuffix(b"}"),),  # "{" of 2 bytes, then silence
            "dribbled": (_call().removesuffix(b"{}"), b"{", b"}"),  # 1.2 s, no pause over 1 s
        }
        for name, parts in requests.items():
            pause = 0.6 if name == "dribbled" else 0.0
            seen[name] = await asyncio.to_thread(send, *parts, pause=pause)
        await supervisor.stop(grace=5)
        return seen

    try:
        seen = asyncio.run(scenario())
    finally:
        servers[0].shutdown()

    assert {"haproxy.cfg", "master.sock", "stats.sock", "haproxy.pid"} <= set(seen["files"])
    assert "haproxy.cfg.new" not in seen["files"]  # stale files cleared at start
    # Refused by HAProxy's HTTP/1 parser, before a request exists: 400 as in Python (whose
    # uvicorn answers text), but HAProxy 2.6 sends its built-in page there, not an errorfile.
    for name in ("garbage", "two_lengths", "bad_length", "other_host"):
        assert seen[name][0] == 400 and seen[name][1]["connection"] == "close", name
    # Errors of a parsed request are the JSON error pages, as the Python gateway's.
    status, code, message = _error(seen["no_python"])  # nothing on the Python app's port
    assert (status, code) == (503, "unavailable") and seen["no_python"][1]["retry-after"] == "1"
    assert _error(seen["version"]) == (
        400,
        "unsupported_http_version",
        "HTTP/9.9 is not supported: send HTTP/1.1 or HTTP/1.0",
    )
    for name in ("same_host", "long_query", "long_header", "slow_answer", "dribbled"):
        assert seen[name][0] == 200, (name, seen[name])
    status, code, message = _error(seen["stalled"])
    assert (status, code) == (408, "body_timeout") and "no byte for 1 s" in message
    assert not run_dir.exists() and not socket_dir.exists()  # removed at stop


def test_a_haproxy_left_by_a_killed_gateway_is_ended_at_the_next_start(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    gateway = FakeGateway(_table("echo-us-east-0"))
    killed = HaproxySupervisor(gateway, _supervisor(tmp_path, gateway).settings, run_dir)  # type: ignore[arg-type]
    again = HaproxySupervisor(gateway, killed.settings, run_dir)  # type: ignore[arg-type]

    async def scenario() -> bool:
        await killed.start()
        assert killed.process is not None and killed._task is not None
        killed._task.cancel()  # its gateway is gone: nobody stops this HAProxy
        await again.start()  # same home and port
        served = _port_answers(again.settings.public_port)
        await again.stop(grace=5)
        return served

    served = asyncio.run(scenario())

    assert served
    assert killed.process is not None and killed.process.poll() is not None
    assert not run_dir.exists()


def _port_answers(port: int) -> bool:
    status, _, _ = _raw(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    return status == 503  # HAProxy's own answer: nothing on the Python app's port
