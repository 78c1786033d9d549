"""The process engine: own process group, log file, SIGTERM then SIGKILL."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from anycast.region.engine import ProcessEngine, ReplicaSpec, describe_exit

STUBBORN = """
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: print("ignoring SIGTERM", flush=True))
print("up", flush=True)
time.sleep(60)
"""


class ScriptEngine(ProcessEngine):
    """The real engine, running a script of the test's instead of the replica runtime."""

    def __init__(self, script: str) -> None:
        super().__init__()
        self.script = script

    def command(self, spec: ReplicaSpec) -> list[str]:
        return [sys.executable, "-c", self.script]


def _spec(tmp_path: Path) -> ReplicaSpec:
    return ReplicaSpec("d-r-0", "d", "a" * 64, tmp_path, 1, tmp_path / "logs" / "d-r-0.log")


def _wait_for_log(path: Path, text: str) -> None:
    deadline = time.monotonic() + 10
    while text not in (path.read_text() if path.exists() else ""):
        assert time.monotonic() < deadline, f"{text!r} never appeared in {path}"
        time.sleep(0.05)


def test_replica_command_runs_the_replica_runtime(tmp_path: Path) -> None:
    argv = ProcessEngine().command(_spec(tmp_path))

    assert argv[:3] == [sys.executable, "-m", "anycast.replica"]
    assert argv[argv.index("--replica-id") + 1] == "d-r-0"
    assert argv[argv.index("--artifact") + 1] == str(tmp_path)


def test_replica_runs_in_its_own_process_group_and_logs_to_its_file(tmp_path: Path) -> None:
    engine = ScriptEngine("print('hello from the replica', flush=True)")
    handle = engine.start(_spec(tmp_path))

    assert handle.pid is not None and os.getpgid(handle.pid) == handle.pid
    handle.process.wait(timeout=10)  # type: ignore[union-attr]
    assert engine.poll(handle) == 0
    assert "hello from the replica" in _spec(tmp_path).log_path.read_text()


def test_stop_escalates_to_sigkill_after_the_grace_period(tmp_path: Path) -> None:
    engine = ScriptEngine(STUBBORN)
    handle = engine.start(_spec(tmp_path))
    _wait_for_log(_spec(tmp_path).log_path, "up")

    started = time.monotonic()
    engine.stop(handle, grace_seconds=0.5)

    code = engine.poll(handle)
    assert code is not None and describe_exit(code) == "killed by SIGKILL"
    assert 0.4 < time.monotonic() - started < 5
    assert "ignoring SIGTERM" in _spec(tmp_path).log_path.read_text()
