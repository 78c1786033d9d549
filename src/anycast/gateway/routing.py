"""Routing decisions of the gateway, free of HTTP: which region, which replica, retry or not.

The HTTP layer (:mod:`anycast.gateway.server`) asks these classes and functions what to do;
everything here takes the current time as an argument so it is unit-tested without sleeping.
"""

from __future__ import annotations

import enum
import math
import random
from collections import Counter, deque
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
class HandlerPolicy:
    """What a service declares about a handler (the artifact manifest's ``handlers``).

    An artifact without that entry (built before it existed) gets the defaults: idempotent,
    so its calls may be retried, and not deterministic, so they are never cached.
    """

    idempotent: bool = True
    deterministic: bool = False


DEFAULT_POLICY = HandlerPolicy()


def handler_policies(manifest: object) -> dict[str, HandlerPolicy]:
    """``manifest["handlers"]`` as policies; anything malformed is left at the defaults."""
    handlers = manifest.get("handlers") if isinstance(manifest, Mapping) else None
    if not isinstance(handlers, Mapping):
        return {}
    return {
        str(name): HandlerPolicy(
            idempotent=spec.get("idempotent") is not False,
            deterministic=spec.get("deterministic") is True,
        )
        for name, spec in handlers.items()
        if isinstance(spec, Mapping)
    }


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
    handlers: dict[str, dict[str, HandlerPolicy]] = field(default_factory=dict)  # by artifact
    # A new state replaces the table rather than changing it, so orders are computed once.
    _orders: dict[str, list[str]] = field(default_factory=dict, repr=False, compare=False)
    _replicas: dict[tuple[str, str], list[Route]] = field(
        default_factory=dict, repr=False, compare=False
    )

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
        handlers = {
            str(a["id"]): handler_policies(a.get("manifest"))
            for a in state.get("artifacts", [])
            if isinstance(a, Mapping) and "id" in a
        }
        return cls(regions, deployments, routes, int(state.get("revision", 0)), handlers)

    def rtt_ms(self, a: str, b: str) -> float:
        if a == b:
            return 0.0
        ra, rb = self.regions.get(a), self.regions.get(b)
        if ra is None or rb is None:
            return math.inf
        return estimated_rtt_ms(ra.latitude, ra.longitude, rb.latitude, rb.longitude)

    def region_order(self, caller: str) -> list[str]:
        """Every region with replicas or coordinates, nearest to ``caller`` first."""
        order = self._orders.get(caller)
        if order is None:
            names = set(self.regions) | {r.region for r in self.routes}
            order = self._orders[caller] = order_regions(caller, names, self.rtt_ms)
        return list(order)

    def replicas_of(self, deployment: str, region: str) -> list[Route]:
        if not self._replicas and self.routes:
            for route in self.routes:
                self._replicas.setdefault((route.deployment, route.region), []).append(route)
        return list(self._replicas.get((deployment, region), ()))

    def policy(self, deployment: str, handler: str) -> HandlerPolicy:
        """The declared policy of a deployment's handler; defaults when it is not known."""
        artifact = self.deployments.get(deployment, "")
        return self.handlers.get(artifact, {}).get(handler, DEFAULT_POLICY)


def order_regions(caller: str, names: Iterable[str], rtt_ms: Any) -> list[str]:
    """``caller`` first, then the others by estimated round trip (ties by name)."""
    others = sorted((n for n in set(names) if n != caller), key=lambda n: (rtt_ms(caller, n), n))
    return [caller, *others]


class Probe(enum.Enum):
    UNKNOWN = "unknown"
    UP = "up"
    DOWN = "down"


class ReplicaHealth:
    """What the gateway has learned about each replica: load, probes, outlier ejections.

    Two signals take a replica out of rotation. Active probes of ``/readyz`` mark it down
    until a probe answers ready again; a refused or dropped connection (of a probe or a call)
    also ejects it, until a probe finds it ready again.
    Outlier detection on the request path ejects a replica whose ``/readyz`` still answers
    but whose calls fail: after ``eject_after`` consecutive errors (5xx answers, per-try
    timeouts, broken responses), or at once when it answers 502/503 or drops a connection.
    An ejection lasts ``cooldown`` seconds, doubled for each repeat within ``forgive_after``
    seconds of the last re-admission, up to ``max_cooldown``. A re-admitted replica is on
    probation: its next error ejects it again, its next success clears its record.

    At most ``max_ejected_share`` of a region's probe-healthy replicas (and at least one)
    stay ejected at once; beyond that the least-bad are kept in rotation, so an overload
    that makes every replica slow never empties a region by ejection alone.
    """

    def __init__(
        self,
        cooldown: float = 2.0,
        down_after: int = 2,
        *,
        eject_after: int = 3,
        max_cooldown: float = 30.0,
        forgive_after: float = 60.0,
        max_ejected_share: float = 0.5,
    ) -> None:
        self.cooldown = cooldown
        self.down_after = down_after
        self.eject_after = eject_after
        self.max_cooldown = max_cooldown
        self.forgive_after = forgive_after
        self.max_ejected_share = max_ejected_share
        self.in_flight: Counter[str] = Counter()
        self.probes: dict[str, Probe] = {}
        self.ejected_until: dict[str, float] = {}
        self.errors: Counter[str] = Counter()  # consecutive errors on the request path
        self.ejections: Counter[str] = Counter()  # ejections since last forgiven
        self._misses: Counter[str] = Counter()
        self._probation: set[str] = set()
        self._unreachable: set[str] = set()  # ejected for a failed connection

    # -- per replica ---------------------------------------------------------------------------

    def passes_probe(self, route: Route) -> bool:
        """Up by its last probe, or never probed and ready by the control plane."""
        probe = self.probes.get(route.replica_id, Probe.UNKNOWN)
        if probe is Probe.UNKNOWN:
            return route.state == "ready"
        return probe is Probe.UP

    def is_ejected(self, replica_id: str, now: float) -> bool:
        return self.ejected_until.get(replica_id, -math.inf) > now

    def available(self, route: Route, now: float) -> bool:
        """Passes its probe and is not ejected (ignoring the region's ejection cap)."""
        return self.passes_probe(route) and not self.is_ejected(route.replica_id, now)

    def eject(self, replica_id: str, now: float) -> float:
        """Take a replica out of rotation; returns the cool-down in seconds."""
        last_end = self.ejected_until.get(replica_id, -math.inf)
        if now - last_end > self.forgive_after:
            self.ejections.pop(replica_id, None)
        self.ejections[replica_id] += 1
        seconds = min(self.max_cooldown, self.cooldown * 2 ** (self.ejections[replica_id] - 1))
        self.ejected_until[replica_id] = now + seconds
        self.errors.pop(replica_id, None)
        self._probation.add(replica_id)
        return seconds

    def record_success(self, replica_id: str) -> None:
        self.errors.pop(replica_id, None)
        self._probation.discard(replica_id)

    def record_error(self, replica_id: str, now: float, *, at_once: bool = False) -> float | None:
        """Count a failed call; returns the cool-down when this error ejects the replica.

        Errors of calls that end while the replica is already ejected only count: they were
        in flight before the ejection and say nothing new.
        """
        if self.is_ejected(replica_id, now):
            self.errors[replica_id] += 1
            return None
        self.errors[replica_id] += 1
        on_probation = replica_id in self._probation
        if at_once or on_probation or self.errors[replica_id] >= self.eject_after:
            return self.eject(replica_id, now)
        return None

    def record_connection_failure(self, replica_id: str, now: float) -> float | None:
        """A refused or dropped connection (a call's or a probe's): down and ejected at once.

        Unlike other ejections, this one ends as soon as a probe finds the replica ready
        again (a restarted process), on probation like any re-admitted replica.
        """
        self.probes[replica_id] = Probe.DOWN
        self._unreachable.add(replica_id)
        return self.record_error(replica_id, now, at_once=True)

    def record_unreachable(self, route: Route, now: float) -> float | None:
        """A probe could not connect: down, and ejected if it was serving until now.

        A replica still starting (or already down) is only marked down, so the refused
        probes of a process that is booting never count against it as offences.
        """
        if not self.passes_probe(route):
            self.record_probe(route.replica_id, ready=False)
            return None
        return self.record_connection_failure(route.replica_id, now)

    def record_probe(
        self, replica_id: str, ready: bool, *, definite: bool = True, now: float = 0.0
    ) -> None:
        """A probe result; an indefinite miss (a timeout) counts only after ``down_after``."""
        if ready:
            self._misses.pop(replica_id, None)
            self.probes[replica_id] = Probe.UP
            if replica_id in self._unreachable:
                self._unreachable.discard(replica_id)
                self.ejected_until[replica_id] = min(now, self.ejected_until[replica_id])
            return
        self._misses[replica_id] += 1
        if definite or self._misses[replica_id] >= self.down_after:
            self.probes[replica_id] = Probe.DOWN

    # -- per region -----------------------------------------------------------------------------

    def kept_ejected(self, routes: Sequence[Route], now: float) -> set[str]:
        """Replica ids of ``routes`` (one region's) that stay out by ejection, cap applied.

        The cap counts only replicas that pass their probe: those marked down are out anyway.
        """
        if not any(self.is_ejected(r.replica_id, now) for r in routes):
            return set()  # the usual case, checked once per call
        healthy = [r for r in routes if self.passes_probe(r)]
        down = {
            r.replica_id
            for r in routes
            if not self.passes_probe(r) and self.is_ejected(r.replica_id, now)
        }
        ejected = [r.replica_id for r in healthy if self.is_ejected(r.replica_id, now)]
        allowed = max(1, math.floor(len(healthy) * self.max_ejected_share))
        worst_first = sorted(ejected, key=self._badness, reverse=True)
        return down | set(worst_first[:allowed])

    def _badness(self, replica_id: str) -> tuple[int, int, float, str]:
        return (
            self.ejections[replica_id],
            self.errors[replica_id],
            self.ejected_until.get(replica_id, 0.0),
            replica_id,
        )

    def rotation(self, routes: Sequence[Route], now: float) -> list[Route]:
        """The routes of one region that may take calls now."""
        out = self.kept_ejected(routes, now)
        return [r for r in routes if self.passes_probe(r) and r.replica_id not in out]

    # -- load -------------------------------------------------------------------------------------

    def acquire(self, replica_id: str) -> None:
        self.in_flight[replica_id] += 1

    def release(self, replica_id: str) -> None:
        self.in_flight[replica_id] -= 1
        if self.in_flight[replica_id] <= 0:
            del self.in_flight[replica_id]

    def forget_except(self, replica_ids: Iterable[str]) -> None:
        """Drop what is known of replicas that left the table (never their load)."""
        keep = set(replica_ids)
        for data in (self.probes, self.ejected_until, self._misses, self.errors, self.ejections):
            for rid in [rid for rid in data if rid not in keep]:
                del data[rid]
        self._probation &= keep
        self._unreachable &= keep


class RetryBudget:
    """Retries allowed over a sliding window: ``ratio`` of the calls plus ``min_retries``.

    When every replica fails, retries would multiply the load on a fleet that is already
    struggling; the budget caps them at about ``ratio`` extra calls, while the minimum lets
    a quiet gateway still retry its few calls. Counts are kept in one-second buckets.
    """

    def __init__(self, ratio: float = 0.2, min_retries: int = 10, window: float = 10.0) -> None:
        self.ratio = ratio
        self.min_retries = min_retries
        self.window = window
        self._buckets: deque[list[int]] = deque()  # [second, calls, retries]

    def _bucket(self, now: float) -> list[int]:
        second = math.floor(now)
        while self._buckets and self._buckets[0][0] <= second - self.window:
            self._buckets.popleft()
        if not self._buckets or self._buckets[-1][0] != second:
            self._buckets.append([second, 0, 0])
        return self._buckets[-1]

    def totals(self, now: float) -> tuple[int, int]:
        """(calls, retries) in the window ending at ``now``."""
        self._bucket(now)
        return sum(b[1] for b in self._buckets), sum(b[2] for b in self._buckets)

    def record_call(self, now: float) -> None:
        self._bucket(now)[1] += 1

    def allows(self, now: float) -> bool:
        calls, retries = self.totals(now)
        return retries < self.min_retries + self.ratio * calls

    def record_retry(self, now: float) -> None:
        self._bucket(now)[2] += 1


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
            for r in health.rotation(table.replicas_of(deployment, region), now)
            if r.replica_id not in attempts.tried
        ]
        if candidates:
            return least_loaded(candidates, health.in_flight, rng)
    return None


class Outcome(enum.Enum):
    """How one forwarded call ended, as far as health and retrying are concerned."""

    RESPONSE = "response"  # the replica answered with a status below 500
    SERVER_ERROR = "server_error"  # the replica answered 500, 504 or another 5xx
    UNAVAILABLE = "unavailable"  # the replica answered 502 or 503: it did not serve the call
    CONNECT_FAILED = "connect_failed"  # no connection: nothing reached the replica
    DROPPED = "dropped"  # connection lost before any response byte
    TIMEOUT = "timeout"  # no response byte within the per-try timeout
    BROKEN = "broken"  # connection lost or timed out in the middle of the response


# Failures before the replica's first response byte: another replica may take the call.
BEFORE_FIRST_BYTE = frozenset(
    {Outcome.UNAVAILABLE, Outcome.CONNECT_FAILED, Outcome.DROPPED, Outcome.TIMEOUT}
)
# The request surely never reached a handler: retried even for non-idempotent handlers.
NEVER_SENT = frozenset({Outcome.CONNECT_FAILED})
# What takes a replica out of rotation at once, rather than after consecutive errors.
EJECTS_AT_ONCE = frozenset({Outcome.UNAVAILABLE, Outcome.CONNECT_FAILED, Outcome.DROPPED})
ERRORS = frozenset(Outcome) - {Outcome.RESPONSE}


def outcome_of_status(status: int) -> Outcome:
    if status in (502, 503):
        return Outcome.UNAVAILABLE
    return Outcome.SERVER_ERROR if status >= 500 else Outcome.RESPONSE


def should_retry(outcome: Outcome, attempts_made: int, *, idempotent: bool = True) -> bool:
    """Retry on another replica when no response byte came back, within MAX_ATTEMPTS.

    Limitation: a call cut off before its answer may have run the handler already, so only
    idempotent handlers are retried then; a non-idempotent call is retried only when its
    connection was refused. A response that started (a 500, a broken body) is never retried.
    """
    if attempts_made >= MAX_ATTEMPTS:
        return False
    return outcome in (BEFORE_FIRST_BYTE if idempotent else NEVER_SENT)


def ejects(outcome: Outcome) -> bool:
    """Whether this outcome takes the replica out of rotation at once."""
    return outcome in EJECTS_AT_ONCE


def learn(health: ReplicaHealth, replica_id: str, outcome: Outcome, now: float) -> float | None:
    """Feed one call's outcome to outlier detection; returns a cool-down if it ejected."""
    if outcome is Outcome.RESPONSE:
        health.record_success(replica_id)
        return None
    if outcome in (Outcome.CONNECT_FAILED, Outcome.DROPPED):
        return health.record_connection_failure(replica_id, now)
    return health.record_error(replica_id, now, at_once=ejects(outcome))
