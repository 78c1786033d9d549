"""The calls HAProxy carries, in the gateway's ``/metrics`` and ``/v1/routes``.

With the HAProxy data plane, most calls never reach the Python app, so its own counters miss
them. :class:`HaproxyStats` reads HAProxy's counters over the stats socket (``show info`` for
the worker's pid, ``show stat`` for the CSV of every backend and server) and
:class:`HaproxyCollector` turns them, on each scrape, into ``anycast_gateway_haproxy_*``
metrics with the Python data plane's labels (deployment, serving region, status).

What is counted is a region backend's answers minus those of its Python backup server: a call
HAProxy hands to the Python app is counted once, by Python, in ``anycast_gateway_requests``.
Each worker counts alone, from 0: a reading is kept per worker pid and the metrics are their
sum, so every counter only grows across reloads and restarts. A worker a reload replaced is
read through the master CLI (``@!PID show stat``) until it exits; the supervisor keeps it from
exiting before a reading shows it has no call left (see ``HaproxySupervisor``).
"""

from __future__ import annotations

import contextlib
import csv
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from anycast.gateway.haproxy import Plan

log = logging.getLogger(__name__)

STAT_COMMAND = "show info; show stat"
READ_TIMEOUT = 0.5  # seconds: a scrape never waits longer on a stuck stats socket
PYTHON_SERVER = "python"  # each region backend's backup server: the Python app
BACKEND_ROW = "BACKEND"
FRONTEND_ROW = "FRONTEND"
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx", "other")

Key = tuple[str, ...]  # (metric, label values...)
OldReader = Callable[[], tuple[set[int], dict[int, str]]]  # running pids, old pid -> show stat


@dataclass(frozen=True)
class Snapshot:
    """One reading of one HAProxy worker: its pid and its ``show stat`` rows."""

    pid: int
    rows: Mapping[tuple[str, str], Mapping[str, str]]  # (pxname, svname) -> field -> value

    def number(self, proxy: str, service: str, name: str) -> float:
        """A numeric field, 0 when the row or the value is missing (HAProxy leaves blanks)."""
        value = self.rows.get((proxy, service), {}).get(name, "")
        try:
            return float(value)
        except ValueError:
            return 0.0


def parse(text: str, pid: int | None = None) -> Snapshot:
    """``show info`` then ``show stat`` output (or ``show stat`` of worker ``pid``)."""
    if pid is None:
        pid = next((int(x[4:]) for x in text.splitlines() if x.startswith("Pid:")), None)
    start = text.find("# pxname,")
    if pid is None or start < 0:
        raise ValueError("not the output of 'show info; show stat'")
    lines = [line for line in text[start + 2 :].splitlines() if line.strip()]
    rows = {(row["pxname"], row["svname"]): row for row in csv.DictReader(lines)}
    return Snapshot(pid, rows)


def counters(snapshot: Snapshot, backends: Mapping[str, tuple[str, str]]) -> dict[Key, float]:
    """This worker's counts per series, for the region backends named in ``backends``."""
    out: dict[Key, float] = {}
    for backend, (deployment, region) in backends.items():
        if (backend, BACKEND_ROW) not in snapshot.rows:
            continue  # not in this worker's configuration
        for status in STATUS_CLASSES:
            answered = _carried(snapshot, backend, f"hrsp_{status}")
            out[("requests", deployment, region, status)] = answered
        # With "option redispatch 1" every retry goes to another server: wretr == wredis.
        out[("retries", deployment, region)] = snapshot.number(backend, BACKEND_ROW, "wretr")
    return out


def _carried(snapshot: Snapshot, backend: str, name: str) -> float:
    """A backend's count less its Python backup's, which Python counts itself."""
    total = snapshot.number(backend, BACKEND_ROW, name)
    return max(0.0, total - snapshot.number(backend, PYTHON_SERVER, name))


@dataclass
class Gauges:
    """What HAProxy is doing now, from the last reading."""

    in_flight: float = 0.0
    by_replica: dict[str, int] = field(default_factory=dict)  # replica id -> current sessions
    seconds: dict[tuple[str, str], float] = field(default_factory=dict)  # average total time


class HaproxyStats:
    """HAProxy's counters summed over its workers, old and new, and its current sessions.

    ``read`` answers :data:`STAT_COMMAND` from the current worker; ``read_old`` (optional)
    gives the pids of every running worker and the ``show stat`` of each old one, still
    finishing its calls after a reload. Without it, only the current worker is alive.
    """

    def __init__(self, read: Callable[[], str], read_old: OldReader | None = None) -> None:
        self.read = read
        self.read_old = read_old
        self.up = False
        self.old_workers = False  # the last reading found workers left over from a reload
        self.current_pid: int | None = None
        self.alive: set[int] = set()  # workers running at the last reading
        self.drained: set[int] = set()  # old workers read with stopped frontends, <= 1 session
        self.gauges = Gauges()
        self._lock = threading.Lock()
        self._reading = threading.Lock()  # one reading at a time: never one out of order
        self._backends: dict[str, tuple[str, str]] = {}  # every backend ever planned
        self._servers: dict[tuple[str, str], str] = {}  # (backend, server) -> replica id
        self._workers: dict[int, dict[Key, float]] = {}  # pid -> its last counts
        self._gone: set[int] = set()  # workers that exited: their counts are in _base
        self._base: dict[Key, float] = {}

    def follow(self, plan: Plan) -> None:
        """Learn the backends and servers of a plan HAProxy now runs."""
        with self._lock:
            for deployment in plan.deployments:
                for backend in deployment.backends:
                    self._backends[backend.name] = (backend.deployment, backend.region)
            self._servers = {
                (key.split("/", 1)[0], server.name): server.replica_id
                for key, server in plan.servers().items()
            }

    def refresh(self) -> bool:
        """Read HAProxy once; False (and ``up`` False) if its stats socket did not answer."""
        with self._reading:
            return self._refresh()

    def _refresh(self) -> bool:
        try:
            snapshot = parse(self.read())
        except (OSError, ValueError) as exc:
            log.debug("haproxy stats socket did not answer: %s", exc)
            self.up = False
            return False
        self.absorb(snapshot, current=True)
        try:
            alive, old = self.read_old() if self.read_old else (set(), {})
        except (OSError, ValueError) as exc:
            log.debug("haproxy master did not list its workers: %s", exc)
            return True
        for pid, text in old.items():
            with contextlib.suppress(ValueError):
                self.absorb_old(parse(text, pid))
        self.forget_all_but({snapshot.pid, *alive, *old})
        self.old_workers = bool(old)
        return True

    def absorb(self, snapshot: Snapshot, *, current: bool = False) -> None:
        """Take one worker's reading; ``current`` for the worker serving new calls."""
        with self._lock:
            if snapshot.pid in self._gone:
                return  # already summed up
            last = self._workers.setdefault(snapshot.pid, {})
            for key, value in counters(snapshot, self._backends).items():
                if value < last.get(key, 0.0):  # counters cleared in the same worker
                    self._base[key] = self._base.get(key, 0.0) + last[key]
                last[key] = value
            if current:
                self.up, self.gauges = True, self._gauges(snapshot)
                self.current_pid = snapshot.pid

    def absorb_old(self, snapshot: Snapshot) -> None:
        """Take the reading of a worker a reload replaced; note when it has no call left."""
        self.absorb(snapshot)
        frontends = [proxy for proxy, service in snapshot.rows if service == FRONTEND_ROW]
        stopped = all(snapshot.rows[(p, FRONTEND_ROW)].get("status") == "STOP" for p in frontends)
        sessions = sum(snapshot.number(p, FRONTEND_ROW, "scur") for p in frontends)
        if stopped and sessions <= 1:  # no new connection, at most the supervisor's idle one
            self.drained.add(snapshot.pid)

    def forget_all_but(self, alive: set[int]) -> None:
        """Workers not in ``alive`` have exited: keep their last counts as a base."""
        with self._lock:
            self.alive = set(alive)
            for pid in set(self._workers) - alive:
                for key, value in self._workers.pop(pid).items():
                    self._base[key] = self._base.get(key, 0.0) + value
                self._gone.add(pid)
                self.drained.discard(pid)

    def _gauges(self, snapshot: Snapshot) -> Gauges:
        gauges = Gauges()
        for (backend, server), replica in self._servers.items():
            sessions = int(snapshot.number(backend, server, "scur"))
            gauges.by_replica[replica] = gauges.by_replica.get(replica, 0) + sessions
            gauges.in_flight += sessions + snapshot.number(backend, server, "qcur")
        for backend, labels in self._backends.items():
            if (backend, BACKEND_ROW) in snapshot.rows:
                gauges.in_flight += snapshot.number(backend, BACKEND_ROW, "qcur")
                gauges.seconds[labels] = snapshot.number(backend, BACKEND_ROW, "ttime") / 1000
        return gauges

    def totals(self) -> dict[Key, float]:
        """Every series' count since the gateway started HAProxy."""
        with self._lock:
            out = dict(self._base)
            for counts in self._workers.values():
                for key, value in counts.items():
                    out[key] = out.get(key, 0.0) + value
            return out

    def add_in_flight(self, routes: dict[str, Any]) -> None:
        """Add HAProxy's current sessions to a ``/v1/routes`` body's in-flight counts."""
        gauges = self.gauges if self.up else Gauges()
        routes["calls_in_flight"] = routes.get("calls_in_flight", 0) + int(gauges.in_flight)
        for deployment in routes.get("deployments", {}).values():
            for rows in deployment.get("regions", {}).values():
                for row in rows:
                    row["in_flight"] = row.get("in_flight", 0) + gauges.by_replica.get(row["id"], 0)


class HaproxyCollector(Collector):
    """``anycast_gateway_haproxy_*`` metrics, read from HAProxy at each scrape."""

    def __init__(self, stats: HaproxyStats) -> None:
        self.stats = stats

    def describe(self) -> Iterable[Metric]:
        return list(_families({}, Gauges(), up=False))

    def collect(self) -> Iterator[Metric]:
        self.stats.refresh()
        stats = self.stats
        gauges = stats.gauges if stats.up else Gauges()
        yield from _families(stats.totals(), gauges, up=stats.up)


def _families(totals: Mapping[Key, float], gauges: Gauges, *, up: bool) -> Iterator[Metric]:
    requests = CounterMetricFamily(
        "anycast_gateway_haproxy_requests",
        "Calls HAProxy answered from a replica, by deployment, serving region and status class",
        labels=["deployment", "region", "status"],
    )
    retries = CounterMetricFamily(
        "anycast_gateway_haproxy_retries",
        "Tries HAProxy made again on another server (its wretr), by deployment and region",
        labels=["deployment", "region"],
    )
    by_name = {"requests": requests, "retries": retries}
    for key, value in sorted(totals.items()):
        by_name[key[0]].add_metric(list(key[1:]), value)
    yield from by_name.values()

    seconds = GaugeMetricFamily(
        "anycast_gateway_haproxy_response_seconds",
        "HAProxy's average time to answer a call over its last 1024 calls (its ttime)",
        labels=["deployment", "region"],
    )
    for labels, value in sorted(gauges.seconds.items()):
        seconds.add_metric(list(labels), value)
    yield seconds
    yield GaugeMetricFamily(
        "anycast_gateway_haproxy_calls_in_flight",
        "Calls HAProxy is carrying to replicas right now, queued ones included",
        value=gauges.in_flight,
    )
    yield GaugeMetricFamily(
        "anycast_gateway_haproxy_up",
        "1 if HAProxy's stats socket answered the last scrape, else 0",
        value=1.0 if up else 0.0,
    )
