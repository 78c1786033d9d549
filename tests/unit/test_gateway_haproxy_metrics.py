"""HAProxy's own counters as the gateway's metrics, from ``show info; show stat`` output.

The files in ``haproxy_stats/`` are real answers of HAProxy 2.6 running a configuration
rendered by :func:`anycast.gateway.haproxy.render` for deployment ``echo``: replicas
``echo-us-east-0`` (and, after a reload, ``echo-us-east-1``) and ``echo-eu-west-0``.
"""

from __future__ import annotations

import csv
import io
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from anycast.core.config import DEFAULT_REGIONS
from anycast.core.http import free_port
from anycast.gateway.haproxy import HaproxySupervisor, Settings, plan_of, workers_of
from anycast.gateway.haproxy_metrics import HaproxyCollector, HaproxyStats, parse
from anycast.gateway.routing import ReplicaHealth, RoutingTable
from anycast.gateway.server import GatewayMetrics

CAPTURED = Path(__file__).parent / "haproxy_stats"


def captured(name: str) -> str:
    return (CAPTURED / name).read_text()


def table(*replica_ids: str) -> RoutingTable:
    replicas = [
        {
            "id": rid,
            "deployment": "echo",
            "region": rid.removeprefix("echo-").rsplit("-", 1)[0],
            "state": "ready",
            "endpoint": f"http://127.0.0.1:{9000 + n}",
        }
        for n, rid in enumerate(replica_ids)
    ]
    state = {
        "revision": 1,
        "deployments": [{"name": "echo", "artifact": "a"}],
        "replicas": replicas,
    }
    return RoutingTable.from_state(state, DEFAULT_REGIONS)


def settings(socket_path: str = "/tmp/none.sock") -> Settings:
    return Settings(
        public_port=free_port(),
        python_port=free_port(),
        socket_path=socket_path,
        gateway_region="us-east",
    )


FIRST = table("echo-us-east-0", "echo-eu-west-0")  # the plan before the reload
SECOND = table("echo-us-east-0", "echo-us-east-1", "echo-eu-west-0")


class Readings:
    """Hands the stats reader one captured answer after another, then the last again."""

    def __init__(self, *texts: str) -> None:
        self.texts = list(texts)

    def __call__(self) -> str:
        return self.texts.pop(0) if len(self.texts) > 1 else self.texts[0]


def stats_of(*texts: str, routing: RoutingTable = FIRST) -> HaproxyStats:
    stats = HaproxyStats(Readings(*texts))
    stats.follow(plan_of(routing, settings()))
    return stats


def scrape(stats: HaproxyStats) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """What /metrics shows: the Python metrics and HAProxy's, as one exposition text."""
    metrics = GatewayMetrics()
    metrics.registry.register(HaproxyCollector(stats))
    text = generate_latest(metrics.registry).decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def requests(
    shown: dict[tuple[str, frozenset[tuple[str, str]]], float], region: str, status: str
) -> float:
    labels = frozenset({"deployment": "echo", "region": region, "status": status}.items())
    return shown.get(("anycast_gateway_haproxy_requests_total", labels), 0.0)


def test_calls_haproxy_answered_show_by_deployment_serving_region_and_status_class() -> None:
    shown = scrape(stats_of(captured("before_reload.txt")))

    assert requests(shown, "us-east", "2xx") == 8
    assert requests(shown, "eu-west", "4xx") == 3  # the replica's own 404s, passed through
    assert requests(shown, "eu-west", "2xx") == 0
    assert shown[("anycast_gateway_haproxy_up", frozenset())] == 1
    assert shown[("anycast_gateway_haproxy_calls_in_flight", frozenset())] == 0


def test_a_call_in_flight_at_haproxy_shows_in_metrics_and_in_its_replicas_route_row() -> None:
    stats = stats_of(captured("busy.txt"))
    stats.refresh()
    body: dict[str, Any] = {
        "calls_in_flight": 0,
        "deployments": {
            "echo": {
                "regions": {
                    "us-east": [{"id": "echo-us-east-0", "in_flight": 0}],
                    "eu-west": [{"id": "echo-eu-west-0", "in_flight": 0}],
                }
            }
        },
    }

    stats.add_in_flight(body)

    regions = body["deployments"]["echo"]["regions"]
    assert regions["us-east"][0]["in_flight"] == 1  # one slow call was being answered
    assert regions["eu-west"][0]["in_flight"] == 0
    assert body["calls_in_flight"] == 1
    stats.read = Readings(captured("busy.txt"))
    assert scrape(stats)[("anycast_gateway_haproxy_calls_in_flight", frozenset())] == 1


def test_counts_keep_growing_across_a_reload_and_ignore_the_old_worker() -> None:
    before, after = captured("before_reload.txt"), captured("after_reload.txt")
    assert parse(before).pid != parse(after).pid  # the reload started a new worker
    stats = stats_of(before)
    assert requests(scrape(stats), "us-east", "2xx") == 8

    stats.follow(plan_of(SECOND, settings()))
    stats.read = Readings(after, before, after)  # the old worker answers once more, late

    assert requests(scrape(stats), "us-east", "2xx") == 12  # 8 before the reload, 4 after
    assert requests(scrape(stats), "us-east", "2xx") == 12
    assert requests(scrape(stats), "us-east", "2xx") == 12
    assert requests(scrape(stats), "eu-west", "4xx") == 3  # kept though the new worker has 0


def test_calls_an_old_worker_answers_after_a_reload_are_counted_until_it_exits() -> None:
    before, after = captured("before_reload.txt"), captured("after_reload.txt")
    old, new = parse(before).pid, parse(after).pid
    late = _with_fields(before, "echo.us-east", "BACKEND", hrsp_2xx="9")  # one more, on it
    late_stat = late[late.index("# pxname,") :]  # what the master's "@!PID show stat" gives
    masters = [({old}, {}), ({new, old}, {old: late_stat}), ({new}, {})]  # then it exits
    stats = HaproxyStats(
        Readings(before, after), lambda: masters.pop(0) if masters else ({new}, {})
    )
    stats.follow(plan_of(SECOND, settings()))
    assert requests(scrape(stats), "us-east", "2xx") == 8

    assert requests(scrape(stats), "us-east", "2xx") == 13  # 9 on the old worker, 4 on the new
    assert stats.old_workers
    assert requests(scrape(stats), "us-east", "2xx") == 13
    assert not stats.old_workers
    stats.absorb(parse(late))  # a late answer from the exited worker changes nothing
    assert requests(scrape(stats), "us-east", "2xx") == 13


def test_an_old_worker_is_done_once_read_stopped_with_only_the_held_connection() -> None:
    before = captured("before_reload.txt")
    stats = stats_of(before)
    busy = _with_fields(before, "anycast", "FRONTEND", status="STOP", scur="2")
    done = _with_fields(before, "anycast", "FRONTEND", status="STOP", scur="1")

    stats.absorb_old(parse(before))  # still listening: a call may come yet
    stats.absorb_old(parse(busy))  # stopped, but a call is still being answered
    assert stats.drained == set()
    stats.absorb_old(parse(done))
    assert stats.drained == {parse(before).pid}


def test_the_masters_process_list_gives_the_current_and_the_old_workers() -> None:
    assert workers_of(captured("show_proc.txt")) == ({3148}, {3141})


def test_counters_cleared_in_the_same_worker_do_not_go_backwards() -> None:
    before = captured("before_reload.txt")
    cleared = _with_fields(before, "echo.us-east", "BACKEND", hrsp_2xx="1")
    stats = stats_of(before, cleared)

    first, second = (requests(scrape(stats), "us-east", "2xx") for _ in range(2))

    assert (first, second) == (8, 9)


def test_a_call_retried_on_another_server_counts_once_and_its_tries_as_retries() -> None:
    stats = stats_of(captured("retried_503.txt"), routing=table("echo-us-east-0", "echo-us-east-1"))

    shown = scrape(stats)

    assert requests(shown, "us-east", "2xx") == 6
    assert requests(shown, "us-east", "5xx") == 2  # each call once, not each 503 tried again
    labels = frozenset({"deployment": "echo", "region": "us-east"}.items())
    assert shown[("anycast_gateway_haproxy_retries_total", labels)] == 11


def test_calls_the_python_backup_answered_are_left_to_pythons_own_counters() -> None:
    # The capture of before_reload.txt, as if 3 more calls had ended on the Python backup.
    text = _with_fields(captured("before_reload.txt"), "echo.us-east", "python", hrsp_2xx="3")
    text = _with_fields(text, "echo.us-east", "BACKEND", hrsp_2xx="11")

    assert requests(scrape(stats_of(text)), "us-east", "2xx") == 8


def test_calls_sent_to_python_while_every_replica_is_down_are_not_haproxys() -> None:
    stats = stats_of(
        captured("replicas_down.txt"), routing=table("echo-us-east-0", "echo-us-east-1")
    )

    assert requests(scrape(stats), "us-east", "2xx") == 0


def _with_fields(text: str, proxy: str, service: str, **values: str) -> str:
    """``text`` with some fields of one ``show stat`` row changed."""
    start = text.index("# pxname,")
    header = text[start + 2 :].splitlines()[0].split(",")
    out = []
    for line in text[start:].splitlines():
        if line.startswith(f"{proxy},{service},"):
            row = dict(zip(header, next(csv.reader(io.StringIO(line))), strict=False))
            row.update(values)
            line = ",".join(row.get(name, "") for name in header)
        out.append(line)
    return text[:start] + "\n".join(out) + "\n"


@dataclass
class FakeGateway:
    table: RoutingTable
    health: ReplicaHealth = field(default_factory=ReplicaHealth)
    draining: bool = False


def test_a_dead_stats_socket_keeps_metrics_working_and_shows_haproxy_down(tmp_path: Path) -> None:
    gone = settings(str(tmp_path / "gone.sock"))
    supervisor = HaproxySupervisor(FakeGateway(FIRST), gone, tmp_path)  # type: ignore[arg-type]

    shown = scrape(supervisor.stats)

    assert shown[("anycast_gateway_haproxy_up", frozenset())] == 0
    assert shown[("anycast_gateway_haproxy_calls_in_flight", frozenset())] == 0
    assert ("anycast_gateway_calls_in_flight", frozenset()) in shown  # Python's, as ever


@pytest.fixture
def mute_socket(tmp_path: Path) -> Iterator[str]:
    """A unix socket that takes connections and never answers."""
    path = str(tmp_path / "mute.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield path
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


def test_a_stats_socket_that_never_answers_does_not_hang_a_scrape(
    tmp_path: Path, mute_socket: str
) -> None:
    supervisor = HaproxySupervisor(FakeGateway(FIRST), settings(mute_socket), tmp_path)  # type: ignore[arg-type]
    stats = supervisor.stats
    stats.follow(plan_of(FIRST, supervisor.settings))
    stats.read, readings = Readings(captured("before_reload.txt")), stats.read
    assert requests(scrape(stats), "us-east", "2xx") == 8
    stats.read = readings  # from now on the real, mute socket

    shown = scrape(stats)

    assert shown[("anycast_gateway_haproxy_up", frozenset())] == 0
    assert requests(shown, "us-east", "2xx") == 8  # the counts stay, they never drop
