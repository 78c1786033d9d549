"""Autoscaling decisions of a region agent: how many replicas a deployment wants here now.

The agent measures its replicas' load every tick and asks :func:`decide` for the count;
nothing here reads a clock, a process or the network, so every rule is unit-tested with
``now`` given. The rules, for a policy of ``min``..``max`` replicas and a target of
``target_in_flight`` calls in flight per replica:

- Each sample recommends ``ceil(load / target)`` replicas, kept within ``max(min, 1)``..``max``.
- Scale up once every recommendation of the last ``scale_up_delay`` seconds asked for more
  than the current count, to the smallest of them; scale down once every recommendation of
  the last ``scale_down_delay`` seconds asked for fewer, to the largest of them (the
  stabilisation windows: a short burst or a short lull changes nothing).
- With ``min`` 0, a deployment without a call for ``idle_to_zero`` seconds goes to 0; only
  a wake-up (a call held at the gateway) brings it back, to one replica.
"""

from __future__ import annotations

import math
import re
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from anycast.control.scaling import clamp

# Recommendations are kept this much longer than the longest window they serve.
HISTORY_MARGIN = 5.0
MAX_HISTORY = 4096


@dataclass(frozen=True)
class Recommendation:
    at: float  # agent monotonic seconds
    replicas: int


def recommend(policy: Mapping[str, Any], load: float) -> int:
    """Replicas for ``load`` calls in flight: ``ceil(load / target)`` within the policy."""
    floor = max(int(policy["min_replicas"]), 1)
    wanted = math.ceil(max(0.0, load) / float(policy["target_in_flight"]) - 1e-9)
    return max(floor, min(int(policy["max_replicas"]), wanted))


def _window(history: Sequence[Recommendation], now: float, seconds: float) -> list[int] | None:
    """Recommendations in force during the last ``seconds``; None when history is shorter.

    The last recommendation made at or before the window's start counts too: it was in
    force when the window began.
    """
    start = now - seconds
    earlier = [r for r in history if r.at <= start]
    if not earlier:
        return None
    return [earlier[-1].replicas, *(r.replicas for r in history if start < r.at <= now)]


def decide(
    policy: Mapping[str, Any],
    current: int,
    history: Sequence[Recommendation],
    last_active: float,
    now: float,
) -> int:
    """The count to run from now: ``current`` changed as the policy's rules say.

    ``history`` holds the recommendations so far, oldest first; ``last_active`` is when a
    call was last seen (or the deployment was woken).
    """
    if current <= 0 and int(policy["min_replicas"]) == 0:
        return 0  # at zero nothing is measured: only a wake-up starts a replica
    if int(policy["min_replicas"]) == 0 and now - last_active >= float(policy["idle_to_zero"]):
        return 0
    bounded = clamp(current, policy)
    if bounded != current or not history:
        return bounded  # a changed policy applies at once
    up = _window(history, now, float(policy["scale_up_delay"]))
    if up is not None and min(up) > current:
        return min(up)
    down = _window(history, now, float(policy["scale_down_delay"]))
    if down is not None and max(down) < current:
        return max(down)
    return current


@dataclass
class ReplicaCounters:
    """The counters of one replica's ``/metrics`` at one moment."""

    at: float
    requests: float  # calls answered so far
    busy_seconds: float  # their summed duration
    in_flight: float  # calls being served right now


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def parse_metrics(text: str, at: float) -> ReplicaCounters:
    """Calls answered so far, their summed time and the calls in flight, from Prometheus text."""
    sums = {"anycast_requests_total": 0.0, "anycast_request_seconds_sum": 0.0}
    in_flight = 0.0
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if not match:
            continue
        name, value = match.group(1), _float(match.group(3))
        if name in sums:
            sums[name] += value
        elif name == "anycast_in_flight":
            in_flight = value
    return ReplicaCounters(
        at, sums["anycast_requests_total"], sums["anycast_request_seconds_sum"], in_flight
    )


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        return 0.0
    return value if math.isfinite(value) else 0.0


def replica_load(before: ReplicaCounters | None, after: ReplicaCounters) -> tuple[float, bool]:
    """(calls in flight on average since ``before``, whether a call was seen) for one replica.

    The average is the time spent in calls that finished over the time elapsed (Little's
    law), so calls shorter than the sampling interval count. A replica seen for the first
    time, or that restarted (counters went down), is measured by its gauge alone.
    """
    active = after.in_flight > 0
    if before is None or after.requests < before.requests or after.at <= before.at:
        return after.in_flight, active
    average = (after.busy_seconds - before.busy_seconds) / (after.at - before.at)
    return average, active or after.requests > before.requests


def deployment_load(
    before: Mapping[str, ReplicaCounters], after: Mapping[str, ReplicaCounters]
) -> tuple[float, bool]:
    """(calls in flight over a deployment's replicas, whether a call was seen).

    The larger of the replicas' averages summed and their gauges summed: averages see
    short calls the gauges miss, gauges see long calls that have not finished yet. (Taking
    the larger per replica would count a call twice once it moved between replicas.)
    """
    averages, active = 0.0, False
    for rid, counters in after.items():
        average, seen = replica_load(before.get(rid), counters)
        averages, active = averages + average, active or seen
    return max(averages, sum(c.in_flight for c in after.values())), active


@dataclass
class DeploymentScale:
    """One deployment's autoscaling state in this region, kept by the agent across ticks."""

    desired: int
    last_active: float
    history: deque[Recommendation] = field(default_factory=lambda: deque(maxlen=MAX_HISTORY))
    load: float = 0.0
    counters: dict[str, ReplicaCounters] = field(default_factory=dict)

    def observe(
        self, policy: Mapping[str, Any], samples: Mapping[str, ReplicaCounters], now: float
    ) -> None:
        """Take this tick's ``/metrics`` samples of the deployment's ready replicas."""
        load, active = deployment_load(self.counters, samples)
        self.counters = dict(samples)
        self.load = load
        if active:
            self.last_active = now
        if self.desired > 0 and samples:
            self.history.append(Recommendation(now, recommend(policy, load)))
        keep = max(float(policy["scale_up_delay"]), float(policy["scale_down_delay"]))
        while len(self.history) > 1 and self.history[1].at < now - keep - HISTORY_MARGIN:
            self.history.popleft()

    def step(self, policy: Mapping[str, Any], now: float) -> int:
        """Apply :func:`decide`; a change starts the windows afresh from the new count."""
        new = decide(policy, self.desired, list(self.history), self.last_active, now)
        if new != self.desired:
            self.history.clear()
            self.desired = new
        return new

    def wake(self, policy: Mapping[str, Any], now: float) -> int:
        """A call waits for this deployment: at least one replica, and the idle clock restarts."""
        self.last_active = now
        if self.desired < 1 <= int(policy["max_replicas"]):
            self.desired = 1
            self.history.clear()
        return self.desired
