"""`anycast backup` as an operator runs it: back up a live cluster, lose it, restore, serve.

Real processes on 127.0.0.1: LocalCluster (what `anycast up` runs) starts the control plane, a
region agent and the gateway; the backup commands run as the `anycast` CLI.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import httpx
import pytest
from cluster import deploy, push, wait_for, write_service

from anycast.control import ControlClient
from anycast.control.store import SQLiteStore
from anycast.core.config import ClusterConfig, RegionConfig, load_config
from anycast.core.http import free_port
from anycast.local import LocalCluster

pytestmark = pytest.mark.slow

SERVICE = """
from pydantic import BaseModel

import anycast


class EchoIn(BaseModel):
    text: str


class Echo(anycast.Service):
    @anycast.handler
    def echo(self, request: EchoIn) -> EchoIn:
        return request
"""


def anycast(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "ANYCAST_HOME"}
    argv = [sys.executable, "-m", "anycast", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result


def echo(config: ClusterConfig, text: str) -> httpx.Response:
    url = f"{config.gateway_url}/v1/deployments/echo/echo"
    return httpx.post(url, json={"text": text}, timeout=10)


def deploy_echo(config: ClusterConfig, work: Path) -> str:
    """Build, push and deploy the echo service with one replica per region, as the CLI does."""
    service = write_service(work, SERVICE)
    pushed = push(config, f"{service}:Echo", "echo", out_dir=work)
    with ControlClient(config.control_url) as control:
        deploy(control, pushed, {r.name: 1 for r in config.regions})
    return str(pushed["id"])


def state(config: ClusterConfig) -> dict[str, Any]:
    with ControlClient(config.control_url) as control:
        return control.state()


def test_backup_of_a_live_cluster_restores_into_a_fresh_home_and_serves(tmp_path: Path) -> None:
    lost = tmp_path / "lost-home"
    config = ClusterConfig(
        home=lost,
        control_port=free_port(),
        gateway_port=free_port(),
        agent_port_base=free_port(),
        regions=[RegionConfig(name="us-east", latitude=38.9, longitude=-77.4)],
    )
    fresh = tmp_path / "fresh-home"
    backup = tmp_path / "cluster.tar"
    try:
        LocalCluster(config).up()
        artifact_id = deploy_echo(config, tmp_path)
        wait_for("the deployment to serve", lambda: echo(config, "before").status_code == 200)
        before = state(config)

        created = ok(anycast("backup", "create", "--out", str(backup), "--home", str(lost)))
        assert "1 deployment(s), 1 artifact(s), 1 blob(s)" in created.stdout
    finally:
        LocalCluster(config).down()
    shutil.rmtree(lost)  # the whole cluster home is gone

    restored_config = config.model_copy(update={"home": fresh})
    try:
        restored = ok(anycast("backup", "restore", str(backup), "--home", str(fresh)))
        assert "1 deployment(s)" in restored.stdout
        assert load_config(fresh) == restored_config  # the backed-up cluster.yaml came back
        LocalCluster(restored_config).up()

        refused = anycast("backup", "restore", str(backup), "--force", "--home", str(fresh))
        assert refused.returncode == 1
        assert "is running" in refused.stderr and "anycast down" in refused.stderr
        assert "Traceback" not in refused.stderr

        # The agent pulls the artifact from the restored registry and the gateway serves it.
        wait_for("the restored deployment to serve", lambda: echo(config, "x").status_code == 200)
        answer = echo(config, "after")
        assert answer.json() == {"text": "after"}
        assert answer.headers["x-anycast-artifact"] == artifact_id
        after = state(config)
        assert after["deployments"] == before["deployments"]
        assert after["artifacts"] == before["artifacts"]
        assert after["revision"] > before["revision"]
    finally:
        LocalCluster(restored_config).down()


def test_a_corrupt_backup_is_refused_by_the_cli_with_a_clear_message(tmp_path: Path) -> None:
    home = tmp_path / "home"
    ClusterConfig(home=home, control_port=free_port()).save()
    SQLiteStore(home / "control" / "state.db").close()
    backup = tmp_path / "b.tar"
    ok(anycast("backup", "create", "--out", str(backup), "--home", str(home)))
    with tarfile.open(backup) as tar:
        member = tar.getmember("control/state.db")
    data = bytearray(backup.read_bytes())
    data[member.offset_data + 100] ^= 0xFF
    backup.write_bytes(bytes(data))
    target = tmp_path / "target"

    verified = anycast("backup", "verify", str(backup))
    restored = anycast("backup", "restore", str(backup), "--home", str(target))

    for result in (verified, restored):
        assert result.returncode == 1
        assert "control/state.db fails its SHA-256 check" in result.stderr
        assert "Traceback" not in result.stderr
    assert not (target / "control").exists()
