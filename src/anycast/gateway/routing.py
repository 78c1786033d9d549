"""Routing decisions of the gateway, free of HTTP: which region, which replica, retry or not.

The HTTP layer (:mod:`anycast.gateway.server`) asks these classes and functions what to do;
everything here takes the current time as an argument so it is unit-tested without sleeping.
"""

from __future__ import annotations

import enum
import math
import random
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from anycast.core.config import RegionConfig
from anycast.core.geo import estimated_rtt_ms

# A call tries at most this many replicas: the first choice and up to two retries, each on
# a replica not tried yet. After two failures in one region the third try goes to the
# next-nearest region, so losing every replica of a region at once fails no call.
MAX_ATTEMPTS = 3
MAX_FAILURES_PER_REGION = 2

ROUTABLE_STATES = frozenset({"ready", "starting"})


@dataclass(frozen=True)
class Region:
    name: str
    latitude: float
    longitude: float


@dataclass(frozen=True)
class Route:
    """One replica the gateway may send calls to."""

    replica_id: str
    deployment: str
    region: str
    endpoint: str
    artifact: str
    state: str


@dataclass
class RoutingTable:
    """Regions, deployments and their replicas, from one control-plane state."""

    regions: dict[str, Region] = field(default_factory=dict)
    deployments: dict[str, str] = field(default_factory=dict)  # name -> artifact id
    routes: list[Route] = field(default_factory=list)
    revision: int | None = None  # None: no state received yet

    @classmethod
    def from_state(
        cls, state: Mapping[str, Any], known_regions: Iterable[RegionConfig] = ()
    ) -> RoutingTable:
        """Build the table; ``known_regions`` (from the cluster config) fill in coordinates."""
        regions = {r.name: Region(r.name, r.latitude, r.longitude) for r in known_regions}
        for row in state.get("regions", []):
            try:
                regions[row["name"]] = Region(
                    row["name"], float(row["latitude"]), float(row["longitude"])
                )
            except (KeyError, TypeError, ValueError):
                continue
        deployments = {
            str(d["name"]): str(d.get("artifact", ""))
            for d in state.get("deployments", [])
            if isinstance(d, Mapping) and "name" in d
        }
        routes = [
            Route(
                replica_id=str(r["id"]),
                deployment=str(r["deployment"]),
                region=str(r["region"]),
                endpoint=str(r["endpoint"]).rstrip("/"),
                artifact=str(r.get("artifact", "")),
                state=str(r.get("state", "")),
            )
            for r in state.get("replicas", [])
            if isinstance(r, Mapping)
            and r.get("endpoint")
            and r.get("state") in ROUTABLE_STATES
            and r.get("deployment") in deployments
        ]
        return cls(regions, deployments, routes, int(state.get("revision", 0)))

    def rtt_ms(self, a: str, b: str) -> float:
        if a == b:
            return 0.0
        ra, rb = self.regions.get(a), self.regions.get(b)
        if ra is None or rb is None:
            return math.inf
        return estimated_rtt_ms(ra.latitude, ra.longitude, rb.latitude, rb.longitude)

    def region_order(self, caller: str) -> list[str]:
        """Every region with replicas or coordinates, nearest to ``caller`` first."""
        names = set(self.regions) | {r.region for r in self.routes}
        return order_regions(caller, names, self.rtt_ms)

    def replicas_of(self, deployment: str, region: str) -> list[Route]:
        return [r for r in self.routes if r.deployment == deployment and r.region == region]


def order_regions(caller: str, names: Iterable[str], rtt_ms: Any) -> list[str]:
    """``caller`` first, then the others by estimated round trip (ties by name)."""
    others = sorted((n for n in set(names) if n != caller), key=lambda n: (rtt_ms(caller, n), n))
    return [caller, *others]


class Probe(enum.Enum):
    UNKNOWN = "unknown"
    UP = "up"
    DOWN = "down"


class ReplicaHealth:
    """What the gateway has learned about each replica: load, probes, ejections.

    A replica is available when it is not ejected and either its last probe answered ready,
    or it was never probed and the control plane says it is ready.
    """

    def __init__(self, cooldown: float = 2.0, down_after: int = 2) -> None:
        self.cooldown = cooldown
        self.down_after = down_after
        self.in_flight: Counter[str] = Counter()
        self.probes: dict[str, Probe] = {}
        self.ejected_until: dict[str, float] = {}
        self._misses: Counter[str] = Counter()

    def available(self, route: Route, now: float) -> bool:
        if self.ejected_until.get(route.replica_id, 0.0) > now:
            return False
        probe = self.probes.get(route.replica_id, Probe.UNKNOWN)
        if probe is Probe.UNKNOWN:
            return route.state == "ready"
        return probe is Probe.UP

    def eject(self, replica_id: str, now: float) -> None:
        """Take a replica out of rotation for ``cooldown`` seconds after a failed call."""
        self.ejected_until[replica_id] = now + self.cooldown

    def is_ejected(self, replica_id: str, now: float) -> bool:
        return self.ejected_until.get(replica_id, 0.0) > now

    def record_probe(self, replica_id: str, ready: bool, *, definite: bool = True) -> None:
        """A probe result; an indefinite miss (a timeout) counts only after ``down_after``."""
        if ready:
            self._misses.pop(replica_id, None)
            self.probes[replica_id] = Probe.UP
            return
        self._misses[replica_id] += 1
        if definite or self._misses[replica_id] >= self.down_after:
            self.probes[replica_id] = Probe.DOWN

    def acquire(self, replica_id: str) -> None:
        self.in_flight[replica_id] += 1

    def release(self, replica_id: str) -> None:
        self.in_flight[replica_id] -= 1
        if self.in_flight[replica_id] <= 0:
            del self.in_flight[replica_id]

    def forget_except(self, replica_ids: Iterable[str]) -> None:
        """Drop probe and ejection data of replicas that left the table (never load)."""
        keep = set(replica_ids)
        for data in (self.probes, self.ejected_until, self._misses):
            for rid in [rid for rid in data if rid not in keep]:
                del data[rid]


def least_loaded(
    candidates: Sequence[Route], in_flight: Mapping[str, int], rng: random.Random
) -> Route:
    """The candidate with the fewest calls in flight; ties broken at random."""
    fewest = min(in_flight.get(r.replica_id, 0) for r in candidates)
    return rng.choice([r for r in candidates if in_flight.get(r.replica_id, 0) == fewest])


@dataclass
class Attempts:
    """The replicas one call has tried so far and where they failed."""

    tried: set[str] = field(default_factory=set)
    failures_by_region: Counter[str] = field(default_factory=Counter)

    def failed(self, route: Route) -> None:
        self.tried.add(route.replica_id)
        self.failures_by_region[route.region] += 1

    @property
    def count(self) -> int:
        return len(self.tried)


def pick_replica(
    table: RoutingTable,
    health: ReplicaHealth,
    deployment: str,
    caller: str,
    now: float,
    attempts: Attempts,
    rng: random.Random,
) -> Route | None:
    """The replica to try next: nearest region with an available, untried replica."""
    for region in table.region_order(caller):
        if attempts.failures_by_region[region] >= MAX_FAILURES_PER_REGION:
            continue
        candidates = [
            r
            for r in table.replicas_of(deployment, region)
            if r.replica_id not in attempts.tried and health.available(r, now)
        ]
        if candidates:
            return least_loaded(candidates, health.in_flight, rng)
    return None


class Outcome(enum.Enum):
    """How one forwarded call ended, as far as retrying is concerned."""

    RESPONSE = "response"  # the replica answered (any status but 502/503)
    UNAVAILABLE = "unavailable"  # the replica answered 502 or 503
    CONNECT_FAILED = "connect_failed"  # no connection: nothing reached the replica
    DROPPED = "dropped"  # connection lost before any response byte
    TIMEOUT = "timeout"  # the replica took too long to answer
    BROKEN = "broken"  # connection lost in the middle of the response


RETRYABLE = frozenset({Outcome.UNAVAILABLE, Outcome.CONNECT_FAILED, Outcome.DROPPED})


def outcome_of_status(status: int) -> Outcome:
    return Outcome.UNAVAILABLE if status in (502, 503) else Outcome.RESPONSE


def should_retry(outcome: Outcome, attempts_made: int) -> bool:
    """Retry on another replica when the replica surely did not answer, within the budget.

    Limitation: a connection dropped before the response may have run the handler already,
    so handlers are treated as idempotent; a timeout is never retried for that reason.
    """
    return outcome in RETRYABLE and attempts_made < MAX_ATTEMPTS


def ejects(outcome: Outcome) -> bool:
    """Whether this outcome takes the replica out of rotation for a cool-down."""
    return outcome in RETRYABLE
