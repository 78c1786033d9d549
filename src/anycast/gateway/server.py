"""The gateway's HTTP layer: one global endpoint in front of every region's replicas.

A call to ``POST /v1/deployments/{name}/{handler}`` goes through these steps: find the
caller's region, pick the nearest available replica, forward the body, and on a failure
that surely did not reach a handler, eject that replica and retry on another one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)

from anycast.core.config import ClusterConfig
from anycast.core.errors import InvalidInput, NotFound, PayloadTooLarge, Unavailable
from anycast.core.http import async_client, create_app
from anycast.core.names import check_handler, check_name
from anycast.gateway.routing import (
    Attempts,
    Outcome,
    ReplicaHealth,
    Route,
    RoutingTable,
    ejects,
    outcome_of_status,
    pick_replica,
    should_retry,
)
from anycast.region.follow import StateFollower

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 32 * 1024 * 1024
FORWARDED_REQUEST_HEADERS = ("content-type", "accept")
REPLICA_HEADERS = ("x-anycast-replica", "x-anycast-artifact")


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "anycast_gateway_requests",
            "Calls answered, by deployment, serving region and status",
            ["deployment", "region", "status"],
            registry=self.registry,
        )
        self.retries = Counter(
            "anycast_gateway_retries",
            "Calls retried on another replica",
            ["deployment"],
            registry=self.registry,
        )
        self.failovers = Counter(
            "anycast_gateway_failovers",
            "Retries that moved to another region",
            ["deployment", "from_region", "to_region"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "anycast_gateway_request_seconds",
            "Time to answer a call, including retries and simulated delay",
            ["deployment"],
            registry=self.registry,
        )


class Gateway:
    """Routing state and forwarding; the FastAPI app in :func:`create_gateway_app` wraps it."""

    def __init__(
        self,
        config: ClusterConfig,
        *,
        region: str | None = None,
        control_url: str | None = None,
        simulate_latency: bool | None = None,
        probe_interval: float = 0.5,
        probe_timeout: float = 0.4,
        call_timeout: float = 60.0,
    ) -> None:
        self.config = config
        self.region = config.region(region or config.gateway_region).name
        self.control_url = control_url or config.control_url
        self.simulate_latency = (
            config.simulate_latency if simulate_latency is None else simulate_latency
        )
        self.probe_interval = probe_interval
        self.probe_timeout = probe_timeout
        self.call_timeout = call_timeout
        self.table = RoutingTable(regions=RoutingTable.from_state({}, config.regions).regions)
        self.health = ReplicaHealth()
        self.metrics = GatewayMetrics()
        self.rng = random.Random()
        self.follower: StateFollower | None = None
        self._http: httpx.AsyncClient | None = None
        self._probe_http: httpx.AsyncClient | None = None
        self._probe_task: asyncio.Task[None] | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        from anycast.control import ControlClient

        self._http = async_client(timeout=self.call_timeout)
        # A dead replica must fail fast so the call is retried elsewhere in time.
        self._http.timeout = httpx.Timeout(self.call_timeout, connect=1.0, pool=10.0)
        self._probe_http = async_client(timeout=self.probe_timeout)
        loop = asyncio.get_running_loop()

        def on_state(state: dict[str, Any]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed while we long-polled
                loop.call_soon_threadsafe(self.apply_state, state)

        self.follower = StateFollower(
            ControlClient(self.control_url, timeout=15.0),
            wait=10.0,
            on_state=on_state,  # the table is swapped on the event loop thread
            name="gateway-follower",
        ).start()
        self._probe_task = asyncio.create_task(self._probe_forever())
        log.info(
            "gateway up in region %s, following %s (simulated latency %s)",
            self.region,
            self.control_url,
            "on" if self.simulate_latency else "off",
        )

    async def stop(self) -> None:
        if self.follower is not None:
            self.follower.stop()
        if self._probe_task is not None:
            self._probe_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe_task
        for http in (self._http, self._probe_http):
            if http is not None:
                await http.aclose()

    def apply_state(self, state: dict[str, Any]) -> None:
        """Swap in the routing table of a new control-plane state."""
        table = RoutingTable.from_state(state, self.config.regions)
        self.health.forget_except(r.replica_id for r in table.routes)
        self.table = table
        log.debug("routing table at revision %s: %d replicas", table.revision, len(table.routes))

    # -- active health checks -------------------------------------------------------------------

    async def _probe_forever(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.probe_all()
            except Exception:  # never let one bad round stop the probing
                log.exception("gateway: probe round failed")
            await asyncio.sleep(max(0.05, self.probe_interval - (time.monotonic() - started)))

    async def probe_all(self) -> None:
        routes = {r.replica_id: r for r in self.table.routes}
        results = await asyncio.gather(*(self._probe(r) for r in routes.values()))
        for route, (ready, definite) in zip(routes.values(), results, strict=True):
            was = self.health.probes.get(route.replica_id)
            self.health.record_probe(route.replica_id, ready, definite=definite)
            now = self.health.probes.get(route.replica_id)
            if was is not None and was != now:
                log.info(
                    "replica %s (%s) is %s",
                    route.replica_id,
                    route.region,
                    now.value if now else "?",
                )

    async def _probe(self, route: Route) -> tuple[bool, bool]:
        """(ready, definite): a refused connection or a 503 is definite, a timeout is not."""
        assert self._probe_http is not None
        try:
            response = await self._probe_http.get(f"{route.endpoint}/readyz")
        except httpx.TimeoutException:
            return False, False
        except httpx.HTTPError:
            return False, True
        return response.status_code == 200, True

    # -- calls ------------------------------------------------------------------------------------

    def caller_region(self, header: str | None) -> str:
        if not header:
            return self.region
        name = header.strip()
        if name not in self.table.regions:
            known = ", ".join(sorted(self.table.regions)) or "none yet"
            raise InvalidInput(
                f"unknown region {name!r} in X-Anycast-Region; known regions: {known}",
                code="unknown_region",
            )
        return name

    def check_deployment(self, name: str) -> None:
        check_name(name, "deployment name")
        if self.table.revision is None:
            raise Unavailable(
                f"the gateway has no routing state yet: control plane {self.control_url} "
                "has not answered; retry shortly"
            )
        if name not in self.table.deployments:
            known = ", ".join(sorted(self.table.deployments)) or "none"
            raise NotFound(
                f"no deployment named {name!r}; deployments: {known}", code="unknown_deployment"
            )

    async def call(self, deployment: str, handler: str, request: Request) -> Response:
        """Route one call; raises Anycast errors for the caller's mistakes and outages."""
        check_handler(handler)
        self.check_deployment(deployment)
        caller = self.caller_region(request.headers.get("x-anycast-region"))
        body = await self._read_body(request)
        headers = {k: v for k in FORWARDED_REQUEST_HEADERS if (v := request.headers.get(k))}

        started = time.monotonic()
        response, region = await self._route(deployment, caller, handler, body, headers)
        self.metrics.requests.labels(deployment, region or "none", str(response.status_code)).inc()
        self.metrics.latency.labels(deployment).observe(time.monotonic() - started)
        return response

    async def _read_body(self, request: Request) -> bytes:
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            raise PayloadTooLarge(
                f"request body is {len(body)} bytes; the gateway accepts at most {MAX_BODY_BYTES}"
            )
        return body

    async def _route(
        self, deployment: str, caller: str, handler: str, body: bytes, headers: dict[str, str]
    ) -> tuple[Response, str | None]:
        attempts = Attempts()
        delay_ms = 0.0
        last: Route | None = None
        while True:
            route = pick_replica(
                self.table, self.health, deployment, caller, time.monotonic(), attempts, self.rng
            )
            if route is None:
                return self._no_replica(deployment, attempts), None
            if last is not None:
                self._count_retry(deployment, last, route)

            if self.simulate_latency and route.region != caller:
                rtt = self.table.rtt_ms(caller, route.region)
                delay_ms += rtt
                await asyncio.sleep(rtt / 1000)

            outcome, replica_response = await self._forward(route, handler, body, headers)
            if ejects(outcome):
                self._eject(route, deployment, outcome)
            if replica_response is not None and not should_retry(outcome, attempts.count + 1):
                return self._relay(route, replica_response, delay_ms), route.region
            if outcome in (Outcome.TIMEOUT, Outcome.BROKEN):
                return self._broken(route, outcome), route.region

            attempts.failed(route)
            last = route
            if not should_retry(outcome, attempts.count):
                return self._no_replica(deployment, attempts), None

    async def _forward(
        self, route: Route, handler: str, body: bytes, headers: dict[str, str]
    ) -> tuple[Outcome, httpx.Response | None]:
        assert self._http is not None
        self.health.acquire(route.replica_id)
        try:
            request = self._http.build_request(
                "POST", f"{route.endpoint}/v1/{handler}", content=body, headers=headers
            )
            try:
                response = await self._http.send(request, stream=True)
            except (httpx.ConnectError, httpx.ConnectTimeout):
                return Outcome.CONNECT_FAILED, None
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError):
                return Outcome.DROPPED, None
            except httpx.TimeoutException:
                return Outcome.TIMEOUT, None
            try:
                await response.aread()
            except httpx.TimeoutException:
                return Outcome.TIMEOUT, None
            except httpx.HTTPError:
                return Outcome.BROKEN, None
            finally:
                await response.aclose()
            return outcome_of_status(response.status_code), response
        finally:
            self.health.release(route.replica_id)

    def _eject(self, route: Route, deployment: str, outcome: Outcome) -> None:
        self.health.eject(route.replica_id, time.monotonic())
        log.warning(
            "replica %s (%s) failed a call to %s (%s); ejected for %.1f s",
            route.replica_id,
            route.region,
            deployment,
            outcome.value,
            self.health.cooldown,
        )

    def _count_retry(self, deployment: str, failed: Route, next_route: Route) -> None:
        self.metrics.retries.labels(deployment).inc()
        if next_route.region != failed.region:
            self.metrics.failovers.labels(deployment, failed.region, next_route.region).inc()
            log.info(
                "call to %s fails over from %s to %s", deployment, failed.region, next_route.region
            )

    def _relay(self, route: Route, replica: httpx.Response, delay_ms: float) -> Response:
        headers = {
            "X-Anycast-Region": route.region,
            "X-Anycast-Replica": replica.headers.get("x-anycast-replica", route.replica_id),
            "X-Anycast-Artifact": replica.headers.get("x-anycast-artifact", route.artifact),
        }
        if delay_ms > 0:
            headers["X-Anycast-Simulated-Delay-Ms"] = f"{delay_ms:.1f}"
        return Response(
            content=replica.content,
            status_code=replica.status_code,
            headers=headers,
            media_type=replica.headers.get("content-type"),
        )

    def _broken(self, route: Route, outcome: Outcome) -> Response:
        if outcome is Outcome.TIMEOUT:
            status, code = 504, "replica_timeout"
            message = f"replica {route.replica_id} did not answer within {self.call_timeout:.0f} s"
        else:
            status, code = 502, "replica_broken"
            message = f"replica {route.replica_id} dropped the connection mid-response"
        return JSONResponse(
            {"error": {"code": code, "message": message}},
            status_code=status,
            headers={"X-Anycast-Region": route.region, "X-Anycast-Replica": route.replica_id},
        )

    def _no_replica(self, deployment: str, attempts: Attempts) -> Response:
        if attempts.count:
            message = (
                f"no replica of {deployment!r} could answer after {attempts.count} attempts; "
                "retry shortly"
            )
        else:
            message = f"no ready replica of {deployment!r} in any region; retry shortly"
        return JSONResponse(
            {"error": {"code": "unavailable", "message": message}},
            status_code=503,
            headers={"Retry-After": "1"},
        )

    # -- introspection ----------------------------------------------------------------------------

    def routes(self) -> dict[str, Any]:
        """The current routing table with each replica's health, for debugging."""
        table, now = self.table, time.monotonic()
        deployments: dict[str, Any] = {}
        for name, artifact in sorted(table.deployments.items()):
            regions: dict[str, list[dict[str, Any]]] = {}
            for region in table.region_order(self.region):
                rows = [self._route_row(r, now) for r in table.replicas_of(name, region)]
                if rows:
                    regions[region] = rows
            deployments[name] = {"artifact": artifact, "regions": regions}
        return {
            "revision": table.revision,
            "gateway_region": self.region,
            "control_plane": "connected" if self.follower and self.follower.connected else "down",
            "regions": [
                {"name": name, "rtt_ms": round(table.rtt_ms(self.region, name), 1)}
                for name in table.region_order(self.region)
                if name in table.regions
            ],
            "deployments": deployments,
        }

    def _route_row(self, route: Route, now: float) -> dict[str, Any]:
        probe = self.health.probes.get(route.replica_id)
        return {
            "id": route.replica_id,
            "endpoint": route.endpoint,
            "artifact": route.artifact,
            "state": route.state,
            "probe": probe.value if probe else "unknown",
            "ejected": self.health.is_ejected(route.replica_id, now),
            "available": self.health.available(route, now),
            "in_flight": self.health.in_flight.get(route.replica_id, 0),
        }


def create_gateway_app(gateway: Gateway) -> FastAPI:
    """The gateway's FastAPI app; starting it starts following the control plane."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()

    app = create_app("Anycast gateway", lifespan=lifespan)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "region": gateway.region, "revision": gateway.table.revision}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(gateway.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/routes")
    async def routes() -> dict[str, Any]:
        return gateway.routes()

    @app.post("/v1/deployments/{name}/{handler}")
    async def call(name: str, handler: str, request: Request) -> Response:
        return await gateway.call(name, handler, request)

    return app
