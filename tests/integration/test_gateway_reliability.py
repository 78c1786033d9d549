"""The gateway against real replica processes that misbehave while their /readyz is fine.

One cluster (control plane, agents for us-east and eu-west, the gateway) serves the service
in tests/services/faulty.py. Each test injects a fault into chosen replicas by pid and
checks what a caller sees: ejection, retries, the retry budget, in-flight counts, the
response cache, compression and, last, the gateway draining on SIGTERM.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
from cluster import RETRIED, Cluster, deploy, push, routes, running, write_service
from cluster import wait_for as _wait_for
from prometheus_client.parser import text_string_to_metric_families

from anycast.core.http import free_port

pytestmark = pytest.mark.slow

SERVICE = Path(__file__).parent.parent / "services" / "faulty.py"
REPLICAS = {"us-east": 3, "eu-west": 1}
GATEWAY_ARGS = (
    "--no-simulate-latency",
    "--try-timeout", "1",
    "--deadline", "10",
    "--eject-after", "3",
    "--eject-seconds", "8",
    "--grace", "15",
)  # fmt: skip


@dataclass(kw_only=True)
class FaultyCluster(Cluster):
    """Replicas of tests/services/faulty.py read the faults to inject from ``faults``."""

    faults: Path

    def __post_init__(self) -> None:
        self.env["ANYCAST_TEST_FAULTS"] = str(self.faults)

    def replicas(self, region: str | None = None) -> list[dict[str, Any]]:
        with self.control as control:
            return control.replicas(region=region, deployment="faulty")

    def fault(self, pid: int, *lines: str) -> None:
        (self.faults / str(pid)).write_text("\n".join(lines) + "\n")

    def clear_faults(self) -> None:
        for path in self.faults.iterdir():
            path.unlink()

    def calls(self, handler: str) -> Counter[int]:
        """How many calls of ``handler`` each replica pid received."""
        log = self.faults / "calls.log"
        lines = log.read_text().split("\n") if log.exists() else []
        return Counter(
            int(pid)
            for pid, _, name in (ln.partition(" ") for ln in lines if ln)
            if name == handler
        )

    def routes(self) -> dict[str, Any]:
        return routes(self)

    def rows(self) -> dict[str, dict[str, Any]]:
        regions = self.routes()["deployments"].get("faulty", {}).get("regions", {})
        return {row["id"]: row for rows in regions.values() for row in rows}


# The checks here read fields of routes and replica rows: a missing key means "not yet".
wait_for = partial(_wait_for, retry_on=(*RETRIED, KeyError))


def all_in_rotation(cluster: FaultyCluster) -> bool:
    rows = cluster.rows()
    return len(rows) == sum(REPLICAS.values()) and all(r["available"] for r in rows.values())


def all_ready(cluster: FaultyCluster) -> bool:
    rows = cluster.replicas()
    return len(rows) == sum(REPLICAS.values()) and all(r["state"] == "ready" for r in rows)


def post(http: httpx.Client, handler: str, text: str = "hi", **headers: str) -> httpx.Response:
    return http.post(f"/v1/deployments/faulty/{handler}", json={"text": text}, headers=headers)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultyCluster]:
    home = tmp_path_factory.mktemp("anycast-home")
    faults = home / "faults"
    faults.mkdir()
    cluster = FaultyCluster.new(home, faults=faults)
    service = write_service(home / "src", SERVICE.read_text())
    pushed = push(cluster.config, f"{service}:Faulty", "faulty", home / "dist")

    with running(cluster, REPLICAS, GATEWAY_ARGS):
        with cluster.control as control:
            deploy(control, pushed, REPLICAS)
        wait_for("every replica in rotation", lambda: all_in_rotation(cluster), timeout=90)
        yield cluster


@pytest.fixture
def healthy(cluster: FaultyCluster) -> FaultyCluster:
    """No faults, an empty call log, and every replica back in rotation."""
    cluster.clear_faults()
    wait_for("every replica in rotation", lambda: all_in_rotation(cluster), timeout=60)
    return cluster


def _victim(cluster: FaultyCluster, index: int) -> tuple[str, int]:
    """A us-east replica; each test picks another, so no replica is a repeat offender."""
    row = sorted(cluster.replicas("us-east"), key=lambda r: r["id"])[index]
    return row["id"], int(row["pid"])


def _until_ejected(
    cluster: FaultyCluster, victim: str, call: Callable[[int], httpx.Response], limit: int = 60
) -> list[httpx.Response]:
    """Make calls until the gateway shows ``victim`` ejected (or ``limit`` calls)."""
    answers = []
    for i in range(limit):
        answers.append(call(i))
        if cluster.rows()[victim]["ejected"]:
            break
    return answers


def test_a_deterministic_handler_is_answered_from_the_cache(healthy: FaultyCluster) -> None:
    with httpx.Client(base_url=healthy.gateway, timeout=15) as http:
        miss = post(http, "square", "ab")
        hit = post(http, "square", "ab")
        other = post(http, "square", "cd")
        plain = post(http, "work", "ab")
        metrics = http.get("/metrics").text

    assert miss.status_code == hit.status_code == 200
    assert miss.headers["x-anycast-cache"] == "miss" and hit.headers["x-anycast-cache"] == "hit"
    assert hit.content == miss.content and hit.json()["text"] == "abab"
    assert other.headers["x-anycast-cache"] == "miss" and other.json()["text"] == "cdcd"
    assert "x-anycast-cache" not in plain.headers
    assert sum(healthy.calls("square").values()) == 2  # the hit never reached a replica
    assert 'anycast_gateway_cache_hits_total{deployment="faulty"} 1.0' in metrics
    assert 'anycast_gateway_cache_misses_total{deployment="faulty"} 2.0' in metrics


def test_large_answers_are_gzipped_for_callers_that_accept_it(healthy: FaultyCluster) -> None:
    text = "digit " * 1000
    with httpx.Client(base_url=healthy.gateway, timeout=15) as http:
        zipped = http.post(
            "/v1/deployments/faulty/work",
            json={"text": text},
            headers={"Accept-Encoding": "gzip"},
        )
        plain = post(http, "work", text, **{"Accept-Encoding": "identity"})
        small = post(http, "work", "x", **{"Accept-Encoding": "gzip"})

    assert zipped.headers["content-encoding"] == "gzip" and zipped.json()["text"] == text
    assert int(zipped.headers["content-length"]) < len(plain.content) / 5
    assert "content-encoding" not in plain.headers and plain.json()["text"] == text
    assert "content-encoding" not in small.headers


def test_a_replica_answering_500_while_ready_is_ejected_and_others_serve(
    healthy: FaultyCluster,
) -> None:
    victim, pid = _victim(healthy, 0)
    healthy.fault(pid, "work=500")

    with httpx.Client(base_url=healthy.gateway, timeout=15) as http:
        first = _until_ejected(healthy, victim, lambda i: post(http, "work", str(i)))
        rows = healthy.rows()
        after = [post(http, "work", str(i)) for i in range(10)]  # within the 8 s ejection

    failed = [r for r in first if r.status_code != 200]
    assert 1 <= len(failed) <= 3  # --eject-after 3; a 500 answer is never retried
    assert all(r.status_code == 500 for r in failed)
    assert all(r.headers["x-anycast-replica"] == victim for r in failed)
    assert rows[victim]["probe"] == "up" and rows[victim]["ejected"]
    assert [r.status_code for r in after] == [200] * 10
    assert victim not in {r.headers["x-anycast-replica"] for r in after}


def test_a_hanging_replica_is_ejected_and_its_calls_succeed_elsewhere(
    healthy: FaultyCluster,
) -> None:
    victim, pid = _victim(healthy, 1)
    healthy.fault(pid, "work=hang")

    with httpx.Client(base_url=healthy.gateway, timeout=15) as http:
        answers = _until_ejected(healthy, victim, lambda i: post(http, "work", str(i)))
        rows = healthy.rows()

    assert [a.status_code for a in answers] == [200] * len(answers)
    assert [a.json()["text"] for a in answers] == [str(i) for i in range(len(answers))]
    assert victim not in {a.headers["x-anycast-replica"] for a in answers}
    assert 1 <= healthy.calls("work")[pid] <= 3  # per-try timeouts, then ejected
    assert rows[victim]["probe"] == "up" and rows[victim]["ejected"]


def test_a_non_idempotent_handler_is_not_retried(healthy: FaultyCluster) -> None:
    for replica in healthy.replicas():
        healthy.fault(int(replica["pid"]), "charge=hang")

    with httpx.Client(base_url=healthy.gateway, timeout=15) as http:
        answers = [
            post(http, "charge", str(i), **{"X-Anycast-Timeout-Ms": "500"}) for i in range(3)
        ]

    assert [a.status_code for a in answers] == [504] * 3
    assert {a.json()["error"]["code"] for a in answers} == {"deadline_exceeded"}
    wait_for("the calls to be logged", lambda: sum(healthy.calls("charge").values()) >= 3, 10)
    time.sleep(0.5)
    assert sum(healthy.calls("charge").values()) == 3  # one try per call, no retry


def test_in_flight_counts_return_to_zero_after_failures_kills_and_disconnects(
    healthy: FaultyCluster,
) -> None:
    _, hanging = _victim(healthy, 2)
    for replica in healthy.replicas():
        healthy.fault(int(replica["pid"]), "charge=hang")
    healthy.fault(hanging, "work=hang", "charge=hang")
    victims = [_victim(healthy, 0)[1], int(healthy.replicas("eu-west")[0]["pid"])]
    outcomes: Counter[str] = Counter()

    async def caller(http: httpx.AsyncClient, handler: str, until: float) -> None:
        while time.monotonic() < until:
            try:
                r = await http.post(f"/v1/deployments/faulty/{handler}", json={"text": "load"})
                outcomes[str(r.status_code)] += 1
            except httpx.HTTPError as exc:
                outcomes[type(exc).__name__] += 1

    async def chaos() -> None:
        await asyncio.sleep(1.0)
        for pid in victims:
            os.kill(pid, signal.SIGKILL)

    async def load() -> None:
        until = time.monotonic() + 4.0
        async with (
            httpx.AsyncClient(base_url=healthy.gateway, timeout=10) as patient,
            httpx.AsyncClient(base_url=healthy.gateway, timeout=0.3) as impatient,
        ):
            callers = [caller(patient, "work", until) for _ in range(4)]
            # charge hangs everywhere: these callers always hang up mid-call.
            callers += [caller(impatient, "charge", until) for _ in range(4)]
            await asyncio.gather(*callers, chaos())

    asyncio.run(load())

    def settled() -> bool:
        routes = healthy.routes()
        rows = healthy.rows()
        return routes["calls_in_flight"] == 0 and all(r["in_flight"] == 0 for r in rows.values())

    assert outcomes["ReadTimeout"] > 0  # some callers did hang up mid-call
    wait_for("every in-flight count back to zero", settled, timeout=30)
    assert healthy.routes()["calls_in_flight"] == 0
    assert all(row["in_flight"] == 0 for row in healthy.rows().values())
    metrics = httpx.get(f"{healthy.gateway}/metrics").text
    assert "anycast_gateway_calls_in_flight 0.0" in metrics


def counter(metrics: str, name: str, **labels: str) -> float:
    """The value of one labelled sample of a counter in Prometheus text (0 if absent)."""
    for family in text_string_to_metric_families(metrics):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


def test_the_retry_budget_caps_retries_when_every_replica_fails(healthy: FaultyCluster) -> None:
    us_east = {"deployment": "faulty", "region": "us-east"}
    before = httpx.get(f"{healthy.gateway}/metrics").text
    for replica in healthy.replicas():
        healthy.fault(int(replica["pid"]), "work=503")
    calls = 100

    async def burst() -> list[int]:
        async with httpx.AsyncClient(base_url=healthy.gateway, timeout=15) as http:
            limit = asyncio.Semaphore(8)

            async def one(i: int) -> int:
                async with limit:
                    r = await http.post("/v1/deployments/faulty/work", json={"text": str(i)})
                    return r.status_code

            return await asyncio.gather(*(one(i) for i in range(calls)))

    statuses = asyncio.run(burst())
    budget = healthy.routes()["retry_budget"]
    metrics = httpx.get(f"{healthy.gateway}/metrics").text

    assert set(statuses) == {503}
    # Without a budget every call would reach two replicas; with it, about 1.2 at most.
    assert sum(healthy.calls("work").values()) < 1.5 * calls
    assert budget["retries"] <= 10 + 0.2 * budget["calls"] + 3
    assert 'anycast_gateway_retries_denied_total{deployment="faulty"}' in metrics
    # All three us-east replicas failed, but the region's cap keeps at least one of them in
    # rotation, and the ejection counter and log say so instead of counting it ejected.
    ejected, capped = (
        counter(metrics, name, **us_east) - counter(before, name, **us_east)
        for name in (
            "anycast_gateway_ejections_total",
            "anycast_gateway_ejections_capped_total",
        )
    )
    assert capped >= 1 and ejected <= 2


def test_sigterm_drains_the_gateway_calls_in_flight_finish(cluster: FaultyCluster) -> None:
    cluster.clear_faults()
    wait_for("every replica ready", lambda: all_ready(cluster), timeout=60)
    # A second gateway, with a try timeout longer than the slow handler and none of the
    # first one's ejections.
    port = free_port()
    cluster.start("gateway-2", "gateway", "--port", str(port), "--try-timeout", "10")
    url = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=url, timeout=5) as http:
        wait_for("the second gateway", lambda: post(http, "work").status_code == 200)
    for replica in cluster.replicas():
        cluster.fault(int(replica["pid"]), "work=slow")
    answers: list[httpx.Response] = []

    def slow_call() -> None:
        with httpx.Client(base_url=url, timeout=30) as http:
            answers.append(post(http, "work", "in flight"))

    def in_flight() -> bool:
        return bool(httpx.get(f"{url}/v1/routes").json()["calls_in_flight"] == 1)

    thread = threading.Thread(target=slow_call)
    thread.start()
    wait_for("the call to be in flight", in_flight, timeout=10)
    gateway = cluster.processes["gateway-2"]
    gateway.send_signal(signal.SIGTERM)

    with httpx.Client(base_url=url, timeout=5) as http:
        wait_for("draining", lambda: http.get("/healthz").status_code == 503, timeout=5)
        health = http.get("/healthz")
        refused = post(http, "work", "new")
    thread.join(timeout=30)
    gateway.wait(timeout=20)

    assert health.json()["status"] == "draining"
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
    assert len(answers) == 1 and answers[0].status_code == 200
    assert answers[0].json()["text"] == "in flight"
    assert gateway.returncode == 0
