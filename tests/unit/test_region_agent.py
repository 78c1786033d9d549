"""The region agent's loop, one tick at a time, with an in-process engine and no control plane."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI, Response

from anycast.core.config import ClusterConfig
from anycast.core.http import LOOPBACK, free_port
from anycast.region.agent import RegionAgent
from anycast.region.engine import ReplicaHandle, ReplicaSpec, describe_exit, last_log_line

ART = "e" * 64
ART2 = "f" * 64


class ThreadEngine:
    """Runs each 'replica' as a tiny uvicorn server in a thread; tests set exit codes."""

    def __init__(self) -> None:
        self.servers: dict[int, uvicorn.Server] = {}
        self.exit_codes: dict[int, int] = {}
        self.started: list[ReplicaSpec] = []
        self._next = 1000

    def start(self, spec: ReplicaSpec) -> ReplicaHandle:
        app = FastAPI()

        @app.get("/readyz")
        def readyz() -> Response:
            return Response(status_code=200)

        server = uvicorn.Server(
            uvicorn.Config(app, host=LOOPBACK, port=spec.port, log_level="error")
        )
        threading.Thread(target=server.run, daemon=True).start()
        self._next += 1
        self.servers[self._next] = server
        self.started.append(spec)
        return ReplicaHandle(spec, self._next, time.monotonic())

    def stop(self, handle: ReplicaHandle, grace_seconds: float = 5.0) -> None:
        assert handle.pid is not None
        self.servers[handle.pid].should_exit = True
        self.exit_codes.setdefault(handle.pid, 0)

    def poll(self, handle: ReplicaHandle) -> int | None:
        assert handle.pid is not None
        return self.exit_codes.get(handle.pid)

    def crash(self, pid: int, code: int, log_line: str, spec: ReplicaSpec) -> None:
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        spec.log_path.write_text(f"booting\n{log_line}\n")
        self.servers[pid].should_exit = True
        self.exit_codes[pid] = code


def _state(**replicas: int) -> dict[str, Any]:
    return _state_for(ART, **replicas)


def _state_for(artifact: str, **replicas: int) -> dict[str, Any]:
    return {
        "revision": 1,
        "regions": [{"name": "eu-west", "latitude": 53.3, "longitude": -6.3}],
        "artifacts": [],
        "deployments": [
            {
                "name": "digits",
                "artifact": artifact,
                "replicas": {k.replace("_", "-"): v for k, v in replicas.items()},
            }
        ],
        "replicas": [],
    }


@pytest.fixture
def agent(tmp_path: Path) -> Any:
    config = ClusterConfig(home=tmp_path)
    for artifact in (ART, ART2):  # as if already pulled into the region's own directory
        unpacked = config.region_dir("eu-west") / "artifacts" / artifact
        unpacked.mkdir(parents=True)
        (unpacked / "manifest.json").write_text(json.dumps({"format": "anycast.artifact/v1"}))
    engine = ThreadEngine()
    dead_control = f"http://{LOOPBACK}:{free_port()}"
    agent = RegionAgent(config, "eu-west", dead_control, "http://127.0.0.1:1", engine)
    agent.control.timeout = 0.5
    yield agent, engine
    for server in engine.servers.values():
        server.should_exit = True


def _tick_until(agent: RegionAgent, predicate: Any, timeout: float = 10.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        agent.tick()
        rows = agent.snapshot()
        if predicate(rows):
            return rows
        assert time.monotonic() < deadline, f"agent never converged: {rows}"
        time.sleep(0.1)


def test_agent_starts_desired_replicas_and_they_become_ready(agent: Any) -> None:
    agent_, engine = agent
    agent_.follower.latest = _state(eu_west=2, us_east=1)

    rows = _tick_until(agent_, lambda rows: [r["state"] for r in rows] == ["ready", "ready"])

    assert [r["id"] for r in rows] == ["digits-eu-west-0", "digits-eu-west-1"]
    assert all(r["region"] == "eu-west" and r["artifact"] == ART for r in rows)
    assert all(r["endpoint"].startswith("http://127.0.0.1:") for r in rows)
    assert len(engine.started) == 2
    assert all(str(agent_.dir) in str(s.log_path) for s in engine.started)


def test_crashed_replica_is_restarted_with_backoff_and_its_error_recorded(agent: Any) -> None:
    agent_, engine = agent
    agent_.follower.latest = _state(eu_west=1)
    _tick_until(agent_, lambda rows: rows and rows[0]["state"] == "ready")
    spec = engine.started[0]
    first_port = spec.port

    engine.crash(max(engine.servers), 4, "ERROR setup() raised ValueError: bad weights", spec)
    agent_.tick()
    failed = agent_.snapshot()[0]

    assert failed["state"] == "failed"
    assert "exit code 4" in failed["last_error"] and "setup() failed" in failed["last_error"]
    assert "bad weights" in failed["last_error"]
    rows = _tick_until(agent_, lambda rows: rows[0]["state"] == "ready")
    assert rows[0]["restarts"] == 1
    assert len(engine.started) == 2
    assert engine.started[1].port == first_port  # same endpoint: the gateway finds it again


def test_scaling_down_stops_surplus_replicas(agent: Any) -> None:
    agent_, engine = agent
    agent_.follower.latest = _state(eu_west=2)
    _tick_until(agent_, lambda rows: len(rows) == 2)

    agent_.follower.latest = _state(eu_west=0)
    rows = _tick_until(agent_, lambda rows: rows == [])

    assert rows == []
    assert sorted(engine.exit_codes.values()) == [0, 0]


def test_new_artifact_replaces_replicas_one_at_a_time(agent: Any) -> None:
    agent_, _ = agent
    agent_.follower.latest = _state(eu_west=2)
    _tick_until(agent_, lambda rows: [r["state"] for r in rows] == ["ready", "ready"])

    agent_.follower.latest = _state_for(ART2, eu_west=2)
    agent_.tick()
    mid = [(r["artifact"], r["state"]) for r in agent_.snapshot()]
    rows = _tick_until(
        agent_, lambda rows: [(r["artifact"], r["state"]) for r in rows] == [(ART2, "ready")] * 2
    )

    assert sum(1 for artifact, state in mid if artifact == ART and state == "ready") >= 1
    assert len(rows) == 2


def test_exit_codes_are_explained() -> None:
    assert describe_exit(3).startswith("artifact failed verification")
    assert describe_exit(4) == "service setup() failed"
    assert describe_exit(-signal.SIGKILL) == "killed by SIGKILL"


def test_last_log_line_skips_blank_lines(tmp_path: Path) -> None:
    log = tmp_path / "r.log"
    log.write_text("one\ntwo\n\n  \n")

    assert last_log_line(log) == "two"
    assert last_log_line(tmp_path / "missing.log") == ""


def test_replacement_is_started_and_ready_before_the_old_replica_stops(agent: Any) -> None:
    agent_, engine = agent
    agent_.follower.latest = _state(eu_west=1)
    _tick_until(agent_, lambda rows: [r["state"] for r in rows] == ["ready"])

    agent_.follower.latest = _state_for(ART2, eu_west=1)
    agent_.tick()
    surge = [(r["id"], r["artifact"], r["state"]) for r in agent_.snapshot()]
    rows = _tick_until(
        agent_, lambda rows: [(r["artifact"], r["state"]) for r in rows] == [(ART2, "ready")]
    )

    assert surge[0] == ("digits-eu-west-0", ART, "ready")
    assert surge[1][:2] == ("digits-eu-west-1", ART2)
    assert rows[0]["id"] == "digits-eu-west-1"
    assert list(engine.exit_codes.values()) == [0]  # the old one stopped, never crashed


def test_replica_failing_again_and_again_is_a_crash_loop_with_its_reason(
    agent: Any, caplog: pytest.LogCaptureFixture
) -> None:
    agent_, engine = agent
    agent_.follower.latest = _state(eu_west=1)
    _tick_until(agent_, lambda rows: rows and rows[0]["state"] == "ready")
    caplog.set_level("WARNING", logger="anycast.region.agent")

    for starts in (1, 2):
        _tick_until(agent_, lambda rows, n=starts: len(engine.started) == n)
        engine.crash(
            max(engine.servers), 4, "ERROR setup() raised OSError: no GPU", engine.started[-1]
        )
        agent_.tick()
    looping = agent_.snapshot()[0]
    _tick_until(agent_, lambda rows: len(engine.started) == 3)
    restarted = agent_.snapshot()[0]

    assert looping["state"] == "crash-loop"
    assert "setup() failed" in looping["last_error"] and "no GPU" in looping["last_error"]
    assert (restarted["state"], restarted["restarts"]) == ("crash-loop", 2)
    restarts = [r for r in caplog.records if "restart 2" in r.getMessage()]
    assert restarts and restarts[0].levelname == "WARNING" and "no GPU" in restarts[0].getMessage()
    rows = _tick_until(agent_, lambda rows: rows[0]["state"] == "ready")
    assert rows[0]["restarts"] == 2


def test_shutdown_reports_replicas_stopping_before_it_stops_them(agent: Any) -> None:
    agent_, engine = agent
    agent_.follower.latest = _state(eu_west=2)
    _tick_until(agent_, lambda rows: [r["state"] for r in rows] == ["ready", "ready"])
    reports: list[tuple[list[str], int]] = []

    def report(region: str, rows: list[dict[str, Any]]) -> None:
        reports.append(([r["state"] for r in rows], len(engine.exit_codes)))

    agent_.control.report_replicas = report
    agent_.shutdown()

    assert reports[0] == (["stopping", "stopping"], 0)
    assert reports[-1] == ([], 2)
