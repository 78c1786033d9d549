"""Holding calls for a deployment scaled to zero while the nearest region wakes it up.

A call that finds no replica in rotation anywhere is held, rather than answered 503, when
a region could start one: its agent is alive, the deployment autoscales there and it has
been scaled to zero (or a replica of it is starting already). The gateway asks that
region's agent, nearest to the caller first, with ``POST {agent_url}/v1/deployments/{name}/wake``
(again every second while calls wait, so the agent's idle clock does not run out), and
forwards the call once a replica is in rotation. A wait that outlasts ``hold_seconds``
(or the call's deadline) is answered 503 ``waking_up`` with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import httpx
from fastapi.responses import JSONResponse

from anycast.control.scaling import effective_counts, policy_for, reports_by_region
from anycast.core.errors import ConfigError
from anycast.core.http import async_client

log = logging.getLogger(__name__)

WAKE_EVERY = 1.0  # seconds between wake-ups sent for one deployment while calls wait
AGENT_FRESH = 60.0  # an agent not seen for longer is not asked to wake anything
WAKE_TIMEOUT = 2.0  # seconds an agent gets to answer a wake-up
POLL_SECONDS = 0.05  # how often a held call looks for a replica in rotation
RETRY_AFTER_SECONDS = 5
MAX_HOLD_SECONDS = 600.0


def wake_targets(
    state: Mapping[str, Any], deployment: str, order: Iterable[str], now: float
) -> list[tuple[str, str]]:
    """(region, agent url) of regions that may start ``deployment`` now, in ``order``.

    A region qualifies when its agent was seen within :data:`AGENT_FRESH` seconds (unix
    ``now``), the deployment autoscales there up to at least one replica, and the region
    wants none of it (scaled to zero) or already starts one.
    """
    found = [d for d in state.get("deployments", []) if d.get("name") == deployment]
    if not found:
        return []
    counts = effective_counts(found[0], reports_by_region(state.get("autoscaling", [])))
    starting = {
        r.get("region")
        for r in state.get("replicas", [])
        if r.get("deployment") == deployment and r.get("state") == "starting"
    }
    regions = {r.get("name"): r for r in state.get("regions", [])}
    targets = []
    for name in order:
        region, policy = regions.get(name) or {}, policy_for(found[0], name)
        seen, url = region.get("last_seen"), region.get("agent_url")
        if policy is None or int(policy["max_replicas"]) < 1 or not url or not seen:
            continue
        if now - float(seen) > AGENT_FRESH:
            continue
        if counts.get(name, 0) == 0 or name in starting:
            targets.append((name, str(url).rstrip("/")))
    return targets


class Waker:
    """Holds calls and sends wake-ups; one per gateway, used on its event loop."""

    def __init__(self, hold_seconds: float = 30.0) -> None:
        if not 0 <= hold_seconds <= MAX_HOLD_SECONDS:
            raise ConfigError(
                f"--hold-seconds must be from 0 (no holding) to {MAX_HOLD_SECONDS:g}, "
                f"got {hold_seconds}"
            )
        self.hold_seconds = hold_seconds
        self.state: Mapping[str, Any] = {}
        self.held = 0  # calls waiting right now
        self._woken_at: dict[str, float] = {}
        self._http: httpx.AsyncClient | None = None

    def apply_state(self, state: Mapping[str, Any]) -> None:
        self.state = state

    def targets(self, deployment: str, order: Iterable[str]) -> list[tuple[str, str]]:
        if self.hold_seconds <= 0:
            return []
        return wake_targets(self.state, deployment, order, time.time())

    async def hold(
        self, deployment: str, order: list[str], until: float, ready: Callable[[], bool]
    ) -> bool:
        """Wake ``deployment`` and wait until ``ready()`` or monotonic ``until``; True if ready."""
        self.held += 1
        try:
            while time.monotonic() < until:
                if ready():
                    return True
                await self._wake(deployment, order)
                await asyncio.sleep(POLL_SECONDS)
            return ready()
        finally:
            self.held -= 1

    async def _wake(self, deployment: str, order: list[str]) -> None:
        """Ask the nearest region able to start ``deployment``, at most once a second."""
        now = time.monotonic()
        if now - self._woken_at.get(deployment, -WAKE_EVERY) < WAKE_EVERY:
            return
        self._woken_at[deployment] = now
        if self._http is None:
            self._http = async_client(timeout=WAKE_TIMEOUT)
        for region, url in self.targets(deployment, order):
            try:
                response = await self._http.post(f"{url}/v1/deployments/{deployment}/wake")
            except httpx.HTTPError as exc:
                log.warning("cannot wake %s in %s at %s: %s", deployment, region, url, exc)
                continue
            if response.status_code == 200:
                log.debug("woke %s in %s: %s", deployment, region, response.text)
                return
            log.warning("region %s refused to wake %s: %s", region, deployment, response.text)

    def timed_out(self, deployment: str, waited: float) -> JSONResponse:
        message = (
            f"no replica of {deployment!r} got ready in the {waited:.0f} s this call was held "
            "while its region woke up; retry shortly"
        )
        return JSONResponse(
            {"error": {"code": "waking_up", "message": message}},
            status_code=503,
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        )

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None
