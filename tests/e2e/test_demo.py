"""The README flow: `anycast demo`, then status, predict and down, as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REGIONS = {"us-east", "eu-west", "ap-southeast"}


def anycast(
    *args: str, timeout: float = 60, env: dict | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "anycast", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def _replica_pids(home: Path) -> list[int]:
    marker = str(home / "regions")
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if "anycast" in cmd and marker in cmd:
                pids.append(int(entry.name))
    return pids


@pytest.mark.slow
def test_demo_serves_every_region_and_survives_losing_one(tmp_path: Path, port_block: int) -> None:
    home = tmp_path / "home"
    ports = [
        "--control-port",
        str(port_block),
        "--gateway-port",
        str(port_block + 1),
        "--agent-port-base",
        str(port_block + 2),
    ]
    env = {**os.environ, "ANYCAST_HOME": str(home)}
    try:
        demo = anycast(
            "demo",
            "--json",
            "--epochs",
            "3",
            *ports,
            timeout=600,
            env=env,
        )
        assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
        summary = json.loads(demo.stdout.strip().splitlines()[-1])

        assert summary["accuracy"] > 0.9
        assert summary["requests"] == 2000
        assert summary["failed"] == 0
        assert set(summary["served_by_region"]) == REGIONS
        assert summary["failover_replicas_killed"] >= 2
        assert summary["failover_failed"] == 0
        assert summary["failover_requests"] == 2000
        assert summary["p50_ms"] <= summary["p99_ms"]

        status = anycast("status", "--json", env=env)
        assert status.returncode == 0, status.stderr
        state = json.loads(status.stdout)
        assert [d["name"] for d in state["deployments"]] == ["digits"]

        sample = home / "work" / "digit.png"
        predict = anycast("predict", str(sample), "--from", "ap-southeast", env=env)
        assert predict.returncode == 0, predict.stderr
        assert "digit" in predict.stdout and "ap-southeast" in predict.stdout
    finally:
        down = anycast("down", env=env, timeout=120)
    assert down.returncode == 0, down.stderr
    assert "stopped gateway" in " ".join(down.stdout.split())
    assert _replica_pids(home) == []
