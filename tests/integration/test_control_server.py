"""The control plane as users run it: a real `anycast control` process on a free port."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cluster import ControlProcess

from anycast.control.client import ControlClient
from anycast.core.errors import Conflict, InvalidInput, NotFound, Unavailable
from anycast.core.http import free_port
from anycast.registry import LocalStorage, Registry, build_artifact

REGIONS = ["ap-southeast", "eu-west", "us-east"]


def control_process(home: Path) -> ControlProcess:
    """`anycast control` over the database ``home/control/state.db``."""
    return ControlProcess(home, "--db", str(home / "control" / "state.db"), start_timeout=20)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlProcess]:
    control = control_process(tmp_path_factory.mktemp("control")).start()
    yield control
    control.stop()


@pytest.fixture(scope="module")
def client(server: ControlProcess) -> Iterator[ControlClient]:
    with ControlClient(server.url) as c:
        yield c


@pytest.fixture(scope="module")
def artifact(server: ControlProcess, tmp_path_factory: pytest.TempPathFactory) -> str:
    """An artifact built and pushed with the CLI, which registers it with the control plane."""
    work = tmp_path_factory.mktemp("artifact")
    (work / "service.py").write_text("class Echo:\n    pass\n")
    artifact_id, tar = build_artifact(
        f"{work / 'service.py'}:Echo", name="echo", version="1", out_dir=work / "dist"
    )
    args = [sys.executable, "-m", "anycast.cli.main", "push", str(tar)]
    args += ["--registry", str(work / "registry"), "--control", server.url]
    done = subprocess.run(args, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert artifact_id in done.stdout
    return artifact_id


def test_health_and_metrics(server: ControlProcess, client: ControlClient) -> None:
    assert client.health()
    metrics = httpx.get(f"{server.url}/metrics").text
    assert "anycast_control_store_revision" in metrics


def test_cluster_regions_are_seeded(client: ControlClient) -> None:
    assert [r["name"] for r in client.regions()] == REGIONS


def test_agent_registration_updates_url_and_last_seen(client: ControlClient) -> None:
    before = time.time()
    client.register_region("eu-west", 53.3, -6.3, "http://127.0.0.1:7101")

    region = next(r for r in client.regions() if r["name"] == "eu-west")
    assert region["agent_url"] == "http://127.0.0.1:7101"
    assert region["last_seen"] >= before - 1


def test_pushed_artifact_is_registered(client: ControlClient, artifact: str) -> None:
    registered = client.artifact(artifact)

    assert (registered["name"], registered["version"]) == ("echo", "1")
    assert registered["manifest"]["service"] == "service.py:Echo"
    assert artifact in [a["id"] for a in client.artifacts()]
    assert client.artifact(artifact[:10])["id"] == artifact


def test_registering_same_artifact_again_is_a_no_op(client: ControlClient, artifact: str) -> None:
    existing = client.artifact(artifact)
    again = client.register_artifact(artifact, "echo", "1", existing["manifest"])

    assert again["revision"] == existing["revision"]


def test_deployment_lifecycle(client: ControlClient, artifact: str) -> None:
    created = client.put_deployment("life", artifact, {"us-east": 2, "eu-west": 0})

    assert created["artifact"] == artifact
    assert created["replicas"] == {"us-east": 2, "eu-west": 0}
    assert created["created_at"] <= created["updated_at"]
    updated = client.put_deployment("life", "echo:1", {"us-east": 3}, revision=created["revision"])
    assert updated["revision"] > created["revision"]
    assert client.deployment("life")["replicas"] == {"us-east": 3}
    assert "life" in [d["name"] for d in client.deployments()]

    client.delete_deployment("life")
    with pytest.raises(NotFound):
        client.deployment("life")


def test_stale_revision_is_a_409_with_the_current_revision(
    client: ControlClient, artifact: str
) -> None:
    first = client.put_deployment("cas", artifact, {"us-east": 1}, revision=0)
    second = client.put_deployment("cas", artifact, {"us-east": 2}, revision=first["revision"])

    with pytest.raises(Conflict) as caught:
        client.put_deployment("cas", artifact, {"us-east": 5}, revision=first["revision"])
    assert caught.value.details["revision"] == second["revision"]
    with pytest.raises(Conflict):
        client.put_deployment("cas", artifact, {"us-east": 5}, revision=0)
    assert client.deployment("cas")["replicas"] == {"us-east": 2}


def _replica(rid: str, region: str, deployment: str, artifact: str) -> dict[str, Any]:
    return {
        "id": rid,
        "deployment": deployment,
        "artifact": artifact,
        "region": region,
        "endpoint": "http://127.0.0.1:9999",
        "state": "ready",
        "pid": 123,
        "restarts": 0,
        "last_error": None,
        "updated_at": time.time(),
    }


def test_rollout_promote_and_rollback_over_http(
    client: ControlClient, artifact: str, tmp_path: Path
) -> None:
    (tmp_path / "service.py").write_text("class Echo:\n    VERSION = 2\n")
    _, tar = build_artifact(
        f"{tmp_path / 'service.py'}:Echo", name="echo", version="2", out_dir=tmp_path / "dist"
    )
    pushed = Registry(LocalStorage(tmp_path / "registry")).push(tar)
    second = client.register_artifact(pushed["id"], "echo", "2", pushed["manifest"])["id"]
    client.put_deployment("undo", artifact, {"us-east": 1})

    rolling = client.put_deployment("undo", second, {"us-east": 1})
    with pytest.raises(Conflict, match="no canary to promote"):
        client.promote("undo")
    rolled = client.rollback("undo")

    assert (rolling["rollout"]["state"], rolling["rollout"]["current"]) == ("rolling", "us-east")
    assert client.deployment("undo")["rollout"]["state"] == "rolled-back"
    assert (rolled["artifact"], rolled["rolled_back"]) == (artifact, [second])
    with pytest.raises(Conflict, match="--allow-rolled-back") as caught:
        client.put_deployment("undo", second, {"us-east": 1})
    assert caught.value.code == "rolled_back_artifact"
    again = client.put_deployment("undo", second, {"us-east": 1}, allow_rolled_back=True)
    assert again["rolled_back"] == [] and again["artifact"] == second


def test_replica_reports_replace_the_region_set(client: ControlClient, artifact: str) -> None:
    client.report_replicas("us-east", [_replica("r1", "us-east", "rep", artifact)])
    client.report_replicas("ap-southeast", [_replica("r2", "ap-southeast", "rep", artifact)])
    client.report_replicas(
        "us-east",
        [_replica("r3", "us-east", "rep", artifact), _replica("r4", "us-east", "other", artifact)],
    )

    assert sorted(r["id"] for r in client.replicas()) == ["r2", "r3", "r4"]
    assert [r["id"] for r in client.replicas(region="us-east", deployment="rep")] == ["r3"]
    assert sorted(r["id"] for r in client.state()["replicas"]) == ["r2", "r3", "r4"]


def test_state_long_poll_wakes_on_a_change(client: ControlClient, artifact: str) -> None:
    now = client.state()["revision"]
    writer = threading.Timer(0.3, lambda: client.put_deployment("poll", artifact, {}))
    writer.start()
    started = time.monotonic()

    state = client.state(after=now, wait=20)

    assert state["revision"] > now
    assert time.monotonic() - started < 5
    assert "poll" in [d["name"] for d in state["deployments"]]
    writer.join()


def test_state_long_poll_times_out_unchanged(client: ControlClient) -> None:
    now = client.state()["revision"]
    started = time.monotonic()

    state = client.state(after=now, wait=0.5)

    assert state["revision"] == now
    assert 0.4 <= time.monotonic() - started < 5
    assert set(state) == {
        "revision",
        "regions",
        "artifacts",
        "deployments",
        "replicas",
        "autoscaling",
    }


BAD_REQUESTS = [
    ("PUT", "/v1/deployments/Bad%20Name", {"artifact": "echo:1"}, 400, "deployment name must"),
    ("PUT", "/v1/deployments/a..b", {"artifact": "echo:1"}, 400, "deployment name must"),
    ("PUT", "/v1/deployments/x%01y", {"artifact": "echo:1"}, 400, "deployment name must"),
    ("PUT", "/v1/deployments/a%2Fb", {"artifact": "echo:1"}, 400, "a deployment name is"),
    ("GET", "/v1/deployments/UPPER", None, 400, "deployment name must"),
    (
        "PUT",
        "/v1/deployments/d",
        {"artifact": "echo:1", "replicas": {"us-east": 500}},
        400,
        "replicas must be between 0 and 64, got 500",
    ),
    (
        "PUT",
        "/v1/deployments/d",
        {"artifact": "echo:1", "replicas": {"us-east": -1}},
        400,
        "replicas must be between 0 and 64, got -1",
    ),
    (
        "PUT",
        "/v1/deployments/d",
        {"artifact": "echo:1", "replicas": {"us-east": "2"}},
        400,
        "integer from 0 to 64",
    ),
    (
        "PUT",
        "/v1/deployments/d",
        {"artifact": "echo:1", "replicas": {"us-east": True}},
        400,
        "integer from 0 to 64",
    ),
    (
        "PUT",
        "/v1/deployments/d",
        {"artifact": "echo:1", "replicas": {"mars": 1}},
        400,
        "unknown region 'mars' in replicas; known regions: ap-southeast, eu-west, us-east",
    ),
    ("PUT", "/v1/deployments/d", {"artifact": "echo:9", "replicas": {}}, 400, "anycast push"),
    ("PUT", "/v1/deployments/d", {"artifact": "ab" * 32, "replicas": {}}, 400, "anycast push"),
    ("PUT", "/v1/deployments/d", {"artifact": "xyz"}, 400, "name:version"),
    ("PUT", "/v1/deployments/d", {"artifact": "echo:1", "replica": {}}, 400, "replica"),
    ("PUT", "/v1/deployments/d", {"artifact": "echo:1", "revision": -3}, 400, "revision"),
    ("PUT", "/v1/deployments/d", {"replicas": {}}, 400, "artifact"),
    ("PUT", "/v1/deployments/d", b"{not json", 400, "not valid JSON"),
    ("PUT", "/v1/deployments/d", [1, 2], 400, ""),
    ("GET", "/v1/deployments/never-made", None, 404, "never-made"),
    (
        "PUT",
        "/v1/deployments/d",
        {"artifact": "echo:1", "canary_percent": 150},
        400,
        "canary must be a share from 1% to 99%",
    ),
    ("PUT", "/v1/deployments/d", {"artifact": "echo:1", "canary_percent": "x"}, 400, "canary"),
    ("POST", "/v1/deployments/never-made/promote", None, 404, "never-made"),
    ("POST", "/v1/deployments/never-made/rollback", {}, 404, "never-made"),
    ("POST", "/v1/deployments/Bad%20Name/rollback", None, 400, "deployment name must"),
    ("POST", "/v1/deployments/d/rollback", {"revision": -1}, 400, "revision"),
    ("POST", "/v1/deployments/d/rollback", {"to": "x"}, 400, "to"),
    ("DELETE", "/v1/deployments/never-made", None, 404, "never-made"),
    ("GET", "/v1/state?after=-1", None, 400, "after"),
    ("GET", "/v1/state?wait=soon", None, 400, "wait"),
    ("PUT", "/v1/regions/us-east", {"latitude": 100, "longitude": 0}, 400, "latitude"),
    (
        "PUT",
        "/v1/regions/us-east",
        {"latitude": 1, "longitude": 2, "agent_url": "ftp://x"},
        400,
        "http://",
    ),
    ("PUT", "/v1/regions/No_Good", {"latitude": 1, "longitude": 2}, 400, "region name must"),
    ("PUT", "/v1/regions/nowhere/replicas", {"replicas": []}, 404, "unknown region 'nowhere'"),
    ("PUT", "/v1/regions/us-east/replicas", {"replicas": [{"id": "r"}]}, 400, "state"),
    (
        "POST",
        "/v1/artifacts",
        {"id": "nothex", "name": "x", "version": "1", "manifest": {}},
        400,
        "64 lowercase hex",
    ),
    (
        "POST",
        "/v1/artifacts",
        {"id": "0" * 64, "name": "x", "version": "1", "manifest": {}},
        422,
        "format",
    ),
    ("GET", "/v1/artifacts/" + "0" * 64, None, 404, "anycast push"),
    ("GET", "/v1/artifacts/abc", None, 400, "at least 8"),
    ("GET", "/v1/nothing-here", None, 404, "no route"),
]


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "message"),
    BAD_REQUESTS,
    ids=[f"{m} {p[:40]} {s}" for m, p, _, s, _ in BAD_REQUESTS],
)
def test_bad_input_is_a_clear_4xx_and_the_server_stays_up(
    server: ControlProcess,
    client: ControlClient,
    artifact: str,
    method: str,
    path: str,
    body: Any,
    status: int,
    message: str,
) -> None:
    kwargs: dict[str, Any] = {"json": body}
    if isinstance(body, bytes):
        kwargs = {"content": body, "headers": {"content-type": "application/json"}}
    response = httpx.request(method, server.url + path, timeout=10, **kwargs)

    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] and message in error["message"]
    assert "Traceback" not in response.text
    assert client.health()


def test_replica_state_error_lists_allowed_states(client: ControlClient, artifact: str) -> None:
    bad = _replica("r9", "us-east", "rep", artifact) | {"state": "dancing"}

    with pytest.raises(InvalidInput, match="'starting', 'ready', 'failed' or 'stopping'"):
        client.report_replicas("us-east", [bad])


def test_client_reports_an_unreachable_control_plane() -> None:
    with ControlClient(f"http://127.0.0.1:{free_port()}", timeout=2) as offline:
        assert not offline.health()
        with pytest.raises(Unavailable, match="unreachable"):
            offline.deployments()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_no_deployment_is_lost_across_a_restart(
    tmp_path: Path, artifact: str, server: ControlProcess, sig: int
) -> None:
    manifest = ControlClient(server.url).artifact(artifact)["manifest"]
    control = control_process(tmp_path).start()
    with ControlClient(control.url) as c:
        c.register_artifact(artifact, "echo", "1", manifest)
        written = [c.put_deployment(f"d{i}", artifact, {"us-east": i}) for i in range(10)]

    control.stop(sig)
    control.start()

    with ControlClient(control.url) as c:
        survived = {d["name"]: d for d in c.deployments()}
        assert [survived[d["name"]] for d in written] == written
        assert c.state()["revision"] >= written[-1]["revision"]
        assert c.put_deployment("after", artifact, {})["revision"] > written[-1]["revision"]
    assert control.stop() in (0, -signal.SIGTERM)
