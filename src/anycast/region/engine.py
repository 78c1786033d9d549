"""How a region agent runs replicas: the engine interface and the local process engine.

An engine starts one replica from a :class:`ReplicaSpec`, tells whether it is still running
and stops it. The agent only talks to this interface, so replicas can later run elsewhere
(a Ray cluster, containers) without the agent changing.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from anycast.core.http import LOOPBACK

log = logging.getLogger(__name__)

# Exit codes of `python -m anycast.replica` and what they mean to an operator.
EXIT_MEANINGS = {
    0: "exited",
    1: "crashed",
    2: "bad command line",
    3: "artifact failed verification (tampered or corrupt)",
    4: "service setup() failed",
}


@dataclass(frozen=True)
class ReplicaSpec:
    """Everything needed to start one replica."""

    replica_id: str
    deployment: str
    artifact_id: str
    artifact_dir: Path
    port: int
    log_path: Path
    host: str = LOOPBACK
    env: dict[str, str] = field(default_factory=dict)

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"


@dataclass
class ReplicaHandle:
    """A started replica, as its engine knows it."""

    spec: ReplicaSpec
    pid: int | None
    started_at: float
    process: subprocess.Popen[bytes] | None = None


class ReplicaEngine(Protocol):
    """Starts, watches and stops replicas."""

    def start(self, spec: ReplicaSpec) -> ReplicaHandle: ...

    def stop(self, handle: ReplicaHandle, grace_seconds: float = 5.0) -> None: ...

    def poll(self, handle: ReplicaHandle) -> int | None:
        """The exit code once the replica ended, else None."""
        ...


def describe_exit(code: int) -> str:
    """Human meaning of a replica's exit code (negative: killed by a signal)."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"killed by {name}"
    return EXIT_MEANINGS.get(code, "crashed")


def last_log_line(path: Path, max_bytes: int = 8192) -> str:
    """The last non-empty line of a log file, or '' when there is none."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - max_bytes))
            tail = fh.read().decode(errors="replace")
    except OSError:
        return ""
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    return lines[-1][:500] if lines else ""


class ProcessEngine:
    """Runs each replica as ``python -m anycast.replica`` in its own process group."""

    def __init__(self, python: str = sys.executable) -> None:
        self.python = python

    def command(self, spec: ReplicaSpec) -> list[str]:
        return [
            self.python,
            "-m",
            "anycast.replica",
            "--artifact",
            str(spec.artifact_dir),
            "--port",
            str(spec.port),
            "--replica-id",
            spec.replica_id,
            "--artifact-id",
            spec.artifact_id,
        ]

    def start(self, spec: ReplicaSpec) -> ReplicaHandle:
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **spec.env}
        with spec.log_path.open("ab") as log_file:
            process = subprocess.Popen(
                self.command(spec),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        log.info(
            "replica %s started: pid %d, port %d, log %s",
            spec.replica_id,
            process.pid,
            spec.port,
            spec.log_path,
        )
        return ReplicaHandle(spec, process.pid, time.monotonic(), process)

    def poll(self, handle: ReplicaHandle) -> int | None:
        if handle.process is None:
            return None
        return handle.process.poll()

    def stop(self, handle: ReplicaHandle, grace_seconds: float = 5.0) -> None:
        """SIGTERM the replica's process group, SIGKILL it if still running after grace."""
        process = handle.process
        if process is None or process.poll() is not None:
            return
        _signal_group(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=grace_seconds)
        except subprocess.TimeoutExpired:
            log.warning(
                "replica %s did not stop within %.1f s; killing it",
                handle.spec.replica_id,
                grace_seconds,
            )
            _signal_group(process.pid, signal.SIGKILL)
            process.wait()
        log.info("replica %s stopped (exit %s)", handle.spec.replica_id, process.returncode)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        return
    except PermissionError:
        os.kill(pid, sig)
