"""The gateway's HTTP layer: one global endpoint in front of every region's replicas.

A call to ``POST /v1/deployments/{name}/{handler}`` goes through these steps: find the
caller's region and deadline, answer from the cache if the handler is deterministic, pick
the nearest replica in rotation, forward the body, and on a failure before the replica's
first response byte retry on another replica, within the deadline and the retry budget.
Every outcome feeds outlier detection (:mod:`anycast.gateway.routing`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import random
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import FrameType
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.middleware.gzip import GZipMiddleware
from starlette.types import Receive, Scope, Send

from anycast.core.body import body_timeout, read_body
from anycast.core.config import ClusterConfig
from anycast.core.errors import AnycastError, ConfigError, InvalidInput, NotFound, Unavailable
from anycast.core.http import (
    LOOPBACK,
    anycast_error_response,
    async_client,
    error_response,
    fast_io,
    free_port,
    install_error_handlers,
)
from anycast.core.names import HANDLER_RULE, NAME_RULE, check_handler, check_name
from anycast.gateway.cache import Reply, ResponseCache, cache_key
from anycast.gateway.haproxy import (
    HaproxySupervisor,
    check_data_plane,
    haproxy_binary,
    haproxy_paths,
)
from anycast.gateway.haproxy import Settings as HaproxySettings
from anycast.gateway.haproxy_metrics import HaproxyCollector
from anycast.gateway.pool import ConnectionPool
from anycast.gateway.routing import (
    Attempts,
    HandlerPolicy,
    Outcome,
    ReplicaHealth,
    RetryBudget,
    Route,
    RoutingTable,
    learn,
    outcome_of_status,
    pick_replica,
    should_retry,
)
from anycast.gateway.wake import Waker
from anycast.region.follow import StateFollower

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 32 * 1024 * 1024
FORWARDED_REQUEST_HEADERS = ("content-type", "accept")
TIMEOUT_HEADER = "x-anycast-timeout-ms"
DEADLINE_HEADER = "x-anycast-deadline-ms"  # sent to the replica: this try's time budget
MAX_TRY_BUDGET_MS = 600_000  # the longest deadline a replica accepts
GZIP_MIN_BYTES = 512
_WHOLE_MS = re.compile(r"[0-9]{1,9}")
_CALL_PATH = re.compile(r"/v1/deployments/([^/]+)/([^/]+)")  # as FastAPI's {name}/{handler}
_CALL_PATH_HEADER = b"x-anycast-call-path"


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
        self.retries_denied = Counter(
            "anycast_gateway_retries_denied",
            "Retries not made because the retry budget was spent",
            ["deployment"],
            registry=self.registry,
        )
        self.failovers = Counter(
            "anycast_gateway_failovers",
            "Retries that moved to another region",
            ["deployment", "from_region", "to_region"],
            registry=self.registry,
        )
        self.ejections = Counter(
            "anycast_gateway_ejections",
            "Replicas taken out of rotation by outlier detection",
            ["deployment", "region"],
            registry=self.registry,
        )
        self.ejections_capped = Counter(
            "anycast_gateway_ejections_capped",
            "Ejections that left the replica in rotation: at most half of a region's "
            "replicas that pass their probe are kept out at once",
            ["deployment", "region"],
            registry=self.registry,
        )
        self.cache_hits = Counter(
            "anycast_gateway_cache_hits",
            "Calls of deterministic handlers answered from the response cache",
            ["deployment"],
            registry=self.registry,
        )
        self.cache_misses = Counter(
            "anycast_gateway_cache_misses",
            "Calls of deterministic handlers not found in the response cache",
            ["deployment"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "anycast_gateway_calls_in_flight",
            "Calls being answered right now",
            registry=self.registry,
        )
        self.latency = Histogram(
            "anycast_gateway_request_seconds",
            "Time to answer a call, including retries and simulated delay",
            ["deployment"],
            registry=self.registry,
        )
        self._answered: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def answered(self, deployment: str, region: str, status: int, seconds: float) -> None:
        """Count one answered call and its latency (label children are looked up once)."""
        key = (deployment, region, status)
        children = self._answered.get(key)
        if children is None:
            if len(self._answered) >= 4096:
                self._answered.clear()
            request = self.requests.labels(deployment, region, str(status))
            children = self._answered[key] = (request, self.latency.labels(deployment))
        children[0].inc()
        children[1].observe(seconds)


class ProbeResult(enum.Enum):
    READY = "ready"
    NOT_READY = "not_ready"  # answered, but not 200
    TIMEOUT = "timeout"
    UNREACHABLE = "unreachable"  # refused or dropped connection


@dataclass
class Call:
    """One caller's call as it is routed."""

    deployment: str
    handler: str
    caller: str
    body: bytes
    headers: dict[str, str]
    policy: HandlerPolicy
    deadline: float  # monotonic time by which the call must be answered
    deadline_s: float  # the deadline's length, for messages
    delay_ms: float = 0.0  # simulated cross-region delay added so far


@dataclass(frozen=True)
class Try:
    """One forward to one replica and how it ended."""

    route: Route
    outcome: Outcome
    reply: Reply | None = None
    cut_by_deadline: bool = False  # its timeout was the rest of the call's deadline


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
        try_timeout: float = 20.0,
        deadline: float = 60.0,
        eject_after: int = 3,
        eject_seconds: float = 2.0,
        retry_ratio: float = 0.2,
        min_retries: int = 10,
        cache_entries: int = 1024,
        cache_bytes: int = 64 * 1024 * 1024,
        hold_seconds: float = 30.0,
    ) -> None:
        _check_positive("--try-timeout", try_timeout)
        _check_positive("--deadline", deadline)
        _check_positive("--eject-seconds", eject_seconds)
        if eject_after < 1:
            raise ConfigError(f"--eject-after must be at least 1, got {eject_after}")
        if cache_entries < 0 or cache_bytes < 0:
            raise ConfigError(
                f"--cache-entries and --cache-mb must be 0 (no cache) or more, got "
                f"{cache_entries} entries and {cache_bytes} bytes"
            )
        self.config = config
        self.region = config.region(region or config.gateway_region).name
        self.control_url = control_url or config.control_url
        self.simulate_latency = (
            config.simulate_latency if simulate_latency is None else simulate_latency
        )
        self.probe_interval = probe_interval
        self.probe_timeout = probe_timeout
        self.try_timeout = try_timeout
        self.deadline = deadline
        self.table = RoutingTable(regions=RoutingTable.from_state({}, config.regions).regions)
        self.health = ReplicaHealth(cooldown=eject_seconds, eject_after=eject_after)
        self.budget = RetryBudget(ratio=retry_ratio, min_retries=min_retries)
        self.cache = ResponseCache(max_entries=cache_entries, max_bytes=cache_bytes)
        self.waker = Waker(hold_seconds)  # holds calls for a deployment scaled to zero
        self.body_timeout = body_timeout()  # read once: $ANYCAST_BODY_TIMEOUT_S
        self.metrics = GatewayMetrics()
        self.metrics.in_flight.set_function(lambda: self.calls_in_flight)
        self.rng = random.Random()
        self.calls_in_flight = 0
        self.draining_since: float | None = None
        self.drain_grace = 0.0
        self.follower: StateFollower | None = None
        self.forwarder = ConnectionPool()  # keep-alive connections to replicas for every call
        self._probe_http: httpx.AsyncClient | None = None
        self._probe_task: asyncio.Task[None] | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        from anycast.control import ControlClient

        await self.forwarder.start()
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
        await self.forwarder.close()
        if self._probe_http is not None:
            await self._probe_http.aclose()
        await self.waker.close()

    def apply_state(self, state: dict[str, Any]) -> None:
        """Swap in the routing table of a new control-plane state."""
        table = RoutingTable.from_state(state, self.config.regions)
        self.health.forget_except(r.replica_id for r in table.routes)
        self.table = table
        self.waker.apply_state(state)
        log.debug("routing table at revision %s: %d replicas", table.revision, len(table.routes))

    @property
    def draining(self) -> bool:
        return self.draining_since is not None

    def begin_drain(self, grace: float) -> None:
        """Refuse new calls from now on; calls in flight get ``grace`` seconds to finish."""
        if self.draining:
            return
        self.draining_since, self.drain_grace = time.monotonic(), grace
        log.info(
            "gateway draining: %d calls in flight, waiting up to %.0f s",
            self.calls_in_flight,
            grace,
        )

    def drained(self, now: float) -> bool:
        """Draining, and every call has finished or the grace period is over."""
        if self.draining_since is None:
            return False
        if self.calls_in_flight == 0:
            return True
        if now - self.draining_since < self.drain_grace:
            return False
        log.warning("gateway drain grace over with %d calls in flight", self.calls_in_flight)
        return True

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
        now = time.monotonic()
        for route, result in zip(routes.values(), results, strict=True):
            was = self.health.probes.get(route.replica_id)
            self._record_probe(route, result, now)
            state = self.health.probes.get(route.replica_id)
            if was is not None and was != state:
                log.info(
                    "replica %s (%s) is %s",
                    route.replica_id,
                    route.region,
                    state.value if state else "?",
                )

    def _record_probe(self, route: Route, result: ProbeResult, now: float) -> None:
        if result is ProbeResult.UNREACHABLE:
            if self.health.record_unreachable(route, now) is not None:
                self.metrics.ejections.labels(route.deployment, route.region).inc()
            return
        ready = result is ProbeResult.READY
        definite = result is not ProbeResult.TIMEOUT
        self.health.record_probe(route.replica_id, ready, definite=definite, now=now)

    async def _probe(self, route: Route) -> ProbeResult:
        """A refused or dropped connection is unreachable; a non-200 answer is not ready."""
        assert self._probe_http is not None
        try:
            response = await self._probe_http.get(f"{route.endpoint}/readyz")
        except httpx.TimeoutException:
            return ProbeResult.TIMEOUT
        except httpx.HTTPError:
            return ProbeResult.UNREACHABLE
        return ProbeResult.READY if response.status_code == 200 else ProbeResult.NOT_READY

    # -- calls ------------------------------------------------------------------------------------

    def caller_region(self, header: str | None) -> str:
        if not header:
            return self.region
        name = header.strip()
        if name not in self.table.regions:
            known = ", ".join(sorted(self.table.regions)) or "none yet"
            raise InvalidInput(
                f"unknown region {_readable(name)!r} in X-Anycast-Region; known regions: {known}",
                code="unknown_region",
            )
        return name

    def call_deadline(self, header: str | None) -> float:
        """Seconds the call may take: the gateway's deadline, or a shorter one asked for."""
        if header is None:
            return self.deadline
        text = header.strip()
        if not _WHOLE_MS.fullmatch(text) or int(text) < 1:
            raise InvalidInput(
                f"X-Anycast-Timeout-Ms must be a whole number of milliseconds of at least 1, "
                f"got {_readable(header)!r}; a value above the gateway's --deadline of "
                f"{self.deadline * 1000:.0f} ms is capped at it",
                code="invalid_timeout",
            )
        return min(self.deadline, int(text) / 1000)

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
        if self.draining:
            return _draining_response()
        self.calls_in_flight += 1  # the in-flight gauge reads it when scraped
        try:
            return await self._call(deployment, handler, request)
        finally:
            self.calls_in_flight -= 1

    async def _call(self, deployment: str, handler: str, request: Request) -> Response:
        check_handler(handler)
        self.check_deployment(deployment)
        caller = self.caller_region(request.headers.get("x-anycast-region"))
        seconds = self.call_deadline(request.headers.get(TIMEOUT_HEADER))
        started = time.monotonic()
        body = await self._read_body(request)
        headers = {k: v for k in FORWARDED_REQUEST_HEADERS if (v := request.headers.get(k))}
        headers["accept-encoding"] = "identity"  # the gateway compresses for its callers
        policy = self.table.policy(deployment, handler)
        call = Call(deployment, handler, caller, body, headers, policy, started + seconds, seconds)

        response, region = await self._answer(call)
        seconds_taken = time.monotonic() - started
        self.metrics.answered(deployment, region or "none", response.status_code, seconds_taken)
        return response

    async def _read_body(self, request: Request) -> bytes:
        """The body; 413 if too large, 408 if it stalls, ClientClosed if the caller hangs up."""
        return await read_body(request, MAX_BODY_BYTES, _too_large, self.body_timeout)

    async def _answer(self, call: Call) -> tuple[Response, str | None]:
        """The cached reply of a deterministic handler, else a routed one."""
        artifact = self.table.deployments.get(call.deployment, "")
        key = None
        if call.policy.deterministic and self.cache.enabled:
            content_type = call.headers.get("content-type", "")
            key = cache_key(artifact, call.handler, content_type, call.body)
            cached = self.cache.get(key)
            if cached is not None:
                self.metrics.cache_hits.labels(call.deployment).inc()
                return self._relay(cached, call, cache="hit"), cached.region
            self.metrics.cache_misses.labels(call.deployment).inc()

        self.budget.record_call(time.monotonic())
        answer = await self._route(call)
        if not isinstance(answer, Reply):
            return answer, None
        if key is not None and answer.artifact == artifact:
            self.cache.put(key, answer)
        return self._relay(answer, call, cache="miss" if key else None), answer.region

    async def _route(self, call: Call) -> Reply | Response:
        attempts = Attempts()
        last: Try | None = None
        held = False
        while True:
            route = pick_replica(
                self.table,
                self.health,
                call.deployment,
                call.caller,
                time.monotonic(),
                attempts,
                self.rng,
            )
            if route is None and last is None and not held:
                held = True
                timed_out = await self._hold(call)
                if timed_out is None:
                    continue  # a replica got ready meanwhile, or no region could wake one
                return timed_out
            if route is None:
                return self._give_up(call, attempts, last)
            if last is not None:
                self._count_retry(call.deployment, last.route, route)

            await self._simulate_delay(call, route)
            remaining = call.deadline - time.monotonic()
            if remaining <= 0:
                return self._give_up(call, attempts, last)
            attempt = await self._forward(route, call, min(self.try_timeout, remaining))
            if remaining < self.try_timeout and attempt.outcome is Outcome.TIMEOUT:
                attempt = dataclasses.replace(attempt, cut_by_deadline=True)
            self._learn(call, attempt)
            if attempt.reply is not None and attempt.outcome is not Outcome.UNAVAILABLE:
                return attempt.reply

            attempts.failed(route)
            last = attempt
            if not self._may_retry(call, attempt, attempts):
                return self._give_up(call, attempts, last)

    async def _hold(self, call: Call) -> Response | None:
        """Hold a call no replica can take while a region scaled to zero wakes up.

        None once a replica is in rotation (or when no region can wake one); the 503
        ``waking_up`` answer if none got ready in time.
        """
        order = self.table.region_order(call.caller)
        if not self.waker.targets(call.deployment, order):
            return None
        started = time.monotonic()
        until = min(call.deadline, started + self.waker.hold_seconds)

        def ready() -> bool:
            now = time.monotonic()
            args = (self.table, self.health, call.deployment, call.caller, now, Attempts())
            return pick_replica(*args, self.rng) is not None

        log.info("call to %s held while its region wakes up", call.deployment)
        if await self.waker.hold(call.deployment, order, until, ready):
            return None
        return self.waker.timed_out(call.deployment, time.monotonic() - started)

    async def _simulate_delay(self, call: Call, route: Route) -> None:
        if not self.simulate_latency or route.region == call.caller:
            return
        rtt = self.table.rtt_ms(call.caller, route.region)
        call.delay_ms += rtt
        await asyncio.sleep(rtt / 1000)

    async def _forward(self, route: Route, call: Call, timeout: float) -> Try:
        """One try on one replica; its in-flight count is released whatever happens."""
        url = f"{route.endpoint}/v1/{call.handler}"
        # The replica learns how long this try may take, so a batched handler sheds a call it
        # cannot answer in time instead of working on an answer nobody waits for.
        budget_ms = min(MAX_TRY_BUDGET_MS, max(1, int(timeout * 1000)))
        headers = {**call.headers, DEADLINE_HEADER: str(budget_ms)}
        self.health.acquire(route.replica_id)
        try:
            answer = await self.forwarder.post(url, call.body, headers, timeout)
        finally:
            self.health.release(route.replica_id)
        if isinstance(answer, Outcome):
            return Try(route, answer)
        reply = Reply(
            status=answer.status,
            body=answer.body,
            media_type=answer.headers.get("content-type"),
            replica=answer.headers.get("x-anycast-replica", route.replica_id),
            artifact=answer.headers.get("x-anycast-artifact", route.artifact),
            region=route.region,
        )
        return Try(route, outcome_of_status(answer.status), reply)

    def _learn(self, call: Call, attempt: Try) -> None:
        route, now = attempt.route, time.monotonic()
        cooldown = learn(self.health, route.replica_id, attempt.outcome, now)
        if cooldown is None:
            return
        region = self.table.replicas_of(call.deployment, route.region)
        if not region or route.replica_id in self.health.kept_ejected(region, now):
            self.metrics.ejections.labels(call.deployment, route.region).inc()
            log.warning(
                "replica %s (%s) of %s ejected for %.1f s after %s",
                route.replica_id,
                route.region,
                call.deployment,
                cooldown,
                attempt.outcome.value,
            )
            return
        # The region's cap keeps it in rotation for now: say so, rather than "ejected".
        self.metrics.ejections_capped.labels(call.deployment, route.region).inc()
        log.warning(
            "replica %s (%s) of %s failed (%s) but stays in rotation: at most half of the "
            "region's replicas are kept out at once, and the others are out or worse",
            route.replica_id,
            route.region,
            call.deployment,
            attempt.outcome.value,
        )

    def _may_retry(self, call: Call, attempt: Try, attempts: Attempts) -> bool:
        idempotent = call.policy.idempotent
        if not should_retry(attempt.outcome, attempts.count, idempotent=idempotent):
            return False
        now = time.monotonic()
        if now >= call.deadline:
            return False
        if not self.budget.allows(now):
            self.metrics.retries_denied.labels(call.deployment).inc()
            log.debug("retry budget spent: call to %s not retried", call.deployment)
            return False
        return True

    def _count_retry(self, deployment: str, failed: Route, next_route: Route) -> None:
        self.budget.record_retry(time.monotonic())
        self.metrics.retries.labels(deployment).inc()
        if next_route.region != failed.region:
            self.metrics.failovers.labels(deployment, failed.region, next_route.region).inc()
            log.info(
                "call to %s fails over from %s to %s", deployment, failed.region, next_route.region
            )

    def _relay(self, reply: Reply, call: Call, cache: str | None = None) -> Response:
        headers = {
            "X-Anycast-Region": reply.region,
            "X-Anycast-Replica": reply.replica,
            "X-Anycast-Artifact": reply.artifact,
        }
        if call.delay_ms > 0:
            headers["X-Anycast-Simulated-Delay-Ms"] = f"{call.delay_ms:.1f}"
        if cache is not None:
            headers["X-Anycast-Cache"] = cache
        return Response(
            content=reply.body,
            status_code=reply.status,
            headers=headers,
            media_type=reply.media_type,
        )

    def _give_up(self, call: Call, attempts: Attempts, last: Try | None) -> Reply | Response:
        """The answer when no (further) try is made: the last reply, or a gateway error."""
        if last is None:
            return _error(503, "unavailable", self._no_replica_message(call, attempts))
        if last.reply is not None:
            return last.reply  # a 502/503 of the replica itself
        route, outcome = last.route, last.outcome
        headers = {"X-Anycast-Region": route.region, "X-Anycast-Replica": route.replica_id}
        if last.cut_by_deadline or time.monotonic() >= call.deadline:
            message = (
                f"the call's deadline of {call.deadline_s * 1000:.0f} ms passed after "
                f"{_attempts(attempts.count)} (set X-Anycast-Timeout-Ms or the gateway's "
                "--deadline)"
            )
            return _error(504, "deadline_exceeded", message, headers)
        if outcome is Outcome.TIMEOUT:
            message = (
                f"replica {route.replica_id} did not answer within the per-try timeout of "
                f"{min(self.try_timeout, call.deadline_s):.1f} s"
            )
            return _error(504, "replica_timeout", message, headers)
        if outcome is Outcome.BROKEN:
            message = f"replica {route.replica_id} dropped the connection mid-response"
            return _error(502, "replica_broken", message, headers)
        if outcome is Outcome.DROPPED:
            message = f"replica {route.replica_id} closed the connection before answering"
            return _error(502, "replica_dropped", message, headers)
        return _error(503, "unavailable", self._no_replica_message(call, attempts))

    def _no_replica_message(self, call: Call, attempts: Attempts) -> str:
        if attempts.count:
            return (
                f"no replica of {call.deployment!r} could answer after "
                f"{_attempts(attempts.count)}; retry shortly"
            )
        return f"no ready replica of {call.deployment!r} in any region; retry shortly"

    # -- introspection ----------------------------------------------------------------------------

    def routes(self) -> dict[str, Any]:
        """The current routing table with each replica's health, for debugging."""
        table, now = self.table, time.monotonic()
        deployments: dict[str, Any] = {}
        for name, artifact in sorted(table.deployments.items()):
            regions: dict[str, list[dict[str, Any]]] = {}
            for region in table.region_order(self.region):
                replicas = table.replicas_of(name, region)
                out = self.health.kept_ejected(replicas, now)
                rows = [self._route_row(r, now, r.replica_id in out) for r in replicas]
                if rows:
                    regions[region] = rows
            deployments[name] = {"artifact": artifact, "regions": regions}
        calls, retries = self.budget.totals(now)
        return {
            "revision": table.revision,
            "gateway_region": self.region,
            "control_plane": "connected" if self.follower and self.follower.connected else "down",
            "draining": self.draining,
            "calls_in_flight": self.calls_in_flight,
            "retry_budget": {"calls": calls, "retries": retries},
            "cache": {"entries": len(self.cache), "bytes": self.cache.bytes},
            "regions": [
                {"name": name, "rtt_ms": round(table.rtt_ms(self.region, name), 1)}
                for name in table.region_order(self.region)
                if name in table.regions
            ],
            "deployments": deployments,
        }

    def _route_row(self, route: Route, now: float, ejected: bool) -> dict[str, Any]:
        rid = route.replica_id
        probe = self.health.probes.get(rid)
        return {
            "id": rid,
            "endpoint": route.endpoint,
            "artifact": route.artifact,
            "state": route.state,
            "probe": probe.value if probe else "unknown",
            "ejected": ejected,
            "available": self.health.passes_probe(route) and not ejected,
            "errors": self.health.errors.get(rid, 0),
            "ejections": self.health.ejections.get(rid, 0),
            "in_flight": self.health.in_flight.get(rid, 0),
        }


def _too_large(size: int) -> str:
    return f"request body is {size} bytes or more; the gateway accepts at most {MAX_BODY_BYTES}"


def _attempts(count: int) -> str:
    return f"{count} attempt" if count == 1 else f"{count} attempts"


def _readable(header: str) -> str:
    """A header value as the caller wrote it: its raw bytes (which the server decoded as
    Latin-1) read as UTF-8, anything undecodable replaced."""
    try:
        return header.encode("latin-1").decode("utf-8", "replace")
    except UnicodeEncodeError:  # not a server-decoded header: already text
        return header


def _check_positive(flag: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{flag} must be a positive number of seconds, got {value}")


def _error(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    headers = dict(headers or {})
    if status == 503:
        headers["Retry-After"] = "1"
    return JSONResponse(
        {"error": {"code": code, "message": message}}, status_code=status, headers=headers
    )


def _draining_response() -> JSONResponse:
    message = "this gateway is shutting down and takes no new calls; retry on another gateway"
    return _error(503, "draining", message, {"Connection": "close"})


class GatewayApp(FastAPI):
    """The gateway's FastAPI app, except that calls skip FastAPI's routing and middleware.

    ``POST /v1/deployments/NAME/HANDLER`` is nearly all of a gateway's traffic, so it goes
    straight to :meth:`Gateway.call`, gzipped only when the caller accepts gzip. Every other
    request (health, metrics, routes, malformed call paths) goes through FastAPI as usual.
    Limitation: middleware added to this app does not see calls; wrap ``_serve_call`` instead.
    """

    def __init__(self, gateway: Gateway, *, behind_haproxy: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.gateway = gateway
        self.behind_haproxy = behind_haproxy  # trust HAProxy's X-Anycast-Call-Path
        self._gzipped_call = GZipMiddleware(
            self._serve_call, minimum_size=GZIP_MIN_BYTES, compresslevel=5
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = _call_path(scope, self.behind_haproxy)
        if match is None:
            await super().__call__(scope, receive, send)
            return
        scope["app"] = self
        scope["path_params"] = {"name": match[1], "handler": match[2]}
        if _accepts_gzip(scope):
            await self._gzipped_call(scope, receive, send)
        else:
            await self._serve_call(scope, receive, send)

    async def _serve_call(self, scope: Scope, receive: Receive, send: Send) -> None:
        params = scope["path_params"]
        request = Request(scope, receive)
        response: Response
        try:
            response = await self.gateway.call(params["name"], params["handler"], request)
        except AnycastError as exc:
            response = anycast_error_response(exc)
        except Exception:  # as FastAPI's last-resort handler: logged, never shown to a caller
            log.exception("unhandled error on POST %s", scope["path"])
            response = error_response(500, "internal", "internal error; see the server log")
        await response(scope, receive, send)


def _call_path(scope: Scope, behind_haproxy: bool = False) -> re.Match[str] | None:
    if scope["type"] != "http" or scope["method"] != "POST" or scope.get("root_path"):
        return None
    match = _CALL_PATH.fullmatch(scope["path"])
    if match is not None or not behind_haproxy:
        return match
    # A call HAProxy retried on this app as its backup server: its path was rewritten for a
    # replica; HAProxy keeps the original (callers' own copies of the header are dropped).
    original = next((v for k, v in scope["headers"] if k == _CALL_PATH_HEADER), None)
    return None if original is None else _CALL_PATH.fullmatch(original.decode("latin-1"))


def _accepts_gzip(scope: Scope) -> bool:
    return any(k == b"accept-encoding" and b"gzip" in v for k, v in scope["headers"])


def create_gateway_app(gateway: Gateway, data_plane: HaproxySupervisor | None = None) -> FastAPI:
    """The gateway's FastAPI app; starting it starts following the control plane.

    With ``data_plane``, starting the app also starts HAProxy in front of it, and stopping
    the app soft-stops HAProxy (calls in flight finish).
    """

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await gateway.start()
        try:
            if data_plane is not None:
                await data_plane.start()
            yield
        finally:
            if data_plane is not None:
                await data_plane.stop(max(1.0, gateway.drain_grace))
            await gateway.stop()

    behind = data_plane is not None
    if data_plane is not None:  # the calls HAProxy carries, read from it at each scrape
        gateway.metrics.registry.register(HaproxyCollector(data_plane.stats))
    app = GatewayApp(gateway, behind_haproxy=behind, title="Anycast gateway", lifespan=lifespan)
    install_error_handlers(app)
    app.add_middleware(GZipMiddleware, minimum_size=GZIP_MIN_BYTES, compresslevel=5)

    @app.get("/healthz")
    async def healthz() -> Response:
        revision = gateway.table.revision
        body: dict[str, Any] = {"status": "ok", "region": gateway.region, "revision": revision}
        body["data_plane"] = "python" if data_plane is None else "haproxy"
        if data_plane is not None:  # whether HAProxy runs (it carried this request, mostly)
            body["haproxy"] = data_plane.health()
        if gateway.draining:
            body["status"] = "draining"
            return JSONResponse(body, status_code=503, headers={"Connection": "close"})
        return JSONResponse(body)

    @app.get("/metrics")
    async def metrics() -> Response:
        if data_plane is None:
            body = generate_latest(gateway.metrics.registry)
        else:  # a scrape reads HAProxy's stats socket: off the event loop
            body = await asyncio.to_thread(generate_latest, gateway.metrics.registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/routes")
    async def routes() -> dict[str, Any]:
        body = gateway.routes()
        if data_plane is not None:  # calls HAProxy carries count as in flight too
            await asyncio.to_thread(data_plane.stats.refresh)
            data_plane.stats.add_in_flight(body)
        return body

    @app.post("/v1/deployments/{name}/{handler}")
    async def call(name: str, handler: str, request: Request) -> Response:
        return await gateway.call(name, handler, request)

    @app.post("/v1/deployments/{path:path}")
    async def bad_call_path(path: str) -> Response:
        """An empty deployment name, or a name or handler holding '/', reaches no route above."""
        raise InvalidInput(
            f"/v1/deployments/{path} is not a call: calls go to /v1/deployments/NAME/HANDLER, "
            f"where NAME is {NAME_RULE} and HANDLER is {HANDLER_RULE}",
            code="invalid_name",
        )

    return app


class DrainingServer(uvicorn.Server):
    """uvicorn, except that the first SIGTERM/SIGINT drains the gateway before stopping.

    While draining, ``/healthz`` answers 503 and new calls are refused with 503, so a load
    balancer moves callers elsewhere; calls in flight get ``grace`` seconds to finish, then
    the server stops as usual. A second signal stops it at once.
    """

    def __init__(self, config: uvicorn.Config, gateway: Gateway, grace: float) -> None:
        super().__init__(config)
        self.gateway = gateway
        self.grace = grace

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.gateway.draining:
            super().handle_exit(sig, frame)
            return
        self.gateway.begin_drain(self.grace)

    async def on_tick(self, counter: int) -> bool:
        if self.gateway.drained(time.monotonic()):
            self.should_exit = True
        return await super().on_tick(counter)


def serve_gateway(
    gateway: Gateway,
    host: str = LOOPBACK,
    port: int = 0,
    *,
    grace: float = 10.0,
    data_plane: str = "python",
) -> None:
    """Run the gateway until SIGTERM/SIGINT, then drain it for up to ``grace`` seconds.

    ``data_plane="haproxy"`` puts HAProxy on ``host:port`` (see :mod:`anycast.gateway.haproxy`)
    and this app on an internal loopback port behind it.
    """
    supervisor = None
    if check_data_plane(data_plane) == "haproxy":
        supervisor = haproxy_supervisor(gateway, host, port or free_port(host))
        port = supervisor.settings.python_port
    config = uvicorn.Config(
        create_gateway_app(gateway, supervisor),
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,
        timeout_keep_alive=30,
        proxy_headers=False,  # the gateway never looks at the caller's address
        **fast_io(),  # type: ignore[arg-type]
    )
    try:
        DrainingServer(config, gateway, grace).run()
    finally:
        if supervisor is not None:
            supervisor.remove_files()


def haproxy_supervisor(gateway: Gateway, host: str, public_port: int) -> HaproxySupervisor:
    """HAProxy on ``host:public_port`` in front of this gateway's app on a loopback port."""
    binary = haproxy_binary()  # before anything starts: say how to install it
    run_dir, socket_dir = haproxy_paths(gateway.config.home, public_port)
    settings = HaproxySettings(
        public_port=public_port,
        python_port=free_port(),
        socket_path=str(socket_dir / "stats.sock"),
        body_timeout=gateway.body_timeout,
        gateway_region=gateway.region,
        try_timeout=gateway.try_timeout,
        deadline=gateway.deadline,
        hold_seconds=gateway.waker.hold_seconds,
        simulate_latency=gateway.simulate_latency,
        host=host,
        max_body_bytes=MAX_BODY_BYTES,
    )
    return HaproxySupervisor(gateway, settings, run_dir, binary=binary)
