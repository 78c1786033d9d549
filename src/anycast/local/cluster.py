"""Start, inspect and stop a whole Anycast cluster as background processes on this machine.

``up`` starts the control plane, one agent per region and the gateway, each with its log
under ``<home>/logs`` and its pid file under ``<home>/run``; ``down`` stops exactly the
processes those pid files name, and any replica their agents left behind.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from anycast.core.config import ClusterConfig
from anycast.core.errors import ConfigError, Unavailable
from anycast.core.http import port_in_use

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Role:
    """One process of the local cluster."""

    name: str
    argv: list[str]
    health_url: str
    port: int
    flag: str  # the `anycast up` option that moves it to another port


@dataclass(frozen=True)
class ProcessInfo:
    role: str
    pid: int | None
    alive: bool
    log: Path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        status = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return status != "Z"


def _listens(pid: int, port: int) -> bool:
    """Whether process ``pid`` holds the socket listening on TCP ``port`` (Linux /proc)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            listening = fields[3] == "0A"
            if listening and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return True  # cannot tell (not Linux, or not ours to inspect): trust the answer
    for fd in fds:
        try:
            if os.readlink(fd) in inodes:
                return True
        except OSError:
            continue
    # A gateway with the HAProxy data plane listens through its HAProxy child processes.
    return any(_listens(child, port) for child in _children(pid))


def _children(pid: int) -> list[int]:
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError, ValueError):
            children += [int(c) for c in task.read_text().split()]
    return children


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


class LocalCluster:
    """The processes of one cluster home, started and stopped together."""

    def __init__(self, config: ClusterConfig) -> None:
        self.config = config.model_copy(update={"home": config.home.resolve()})
        self.home = self.config.home
        self.run_dir = self.home / "run"
        self.log_dir = self.home / "logs"

    # -- what runs ------------------------------------------------------------------------

    def roles(self) -> list[Role]:
        cfg = self.config
        base = [sys.executable, "-m", "anycast"]
        home = ["--home", str(self.home)]
        roles = [
            Role(
                "control",
                [*base, "control", *home, "--port", str(cfg.control_port)],
                f"{cfg.control_url}/healthz",
                cfg.control_port,
                "--control-port",
            )
        ]
        for region in cfg.regions:
            port = cfg.agent_port(region.name)
            argv = [*base, "region", "--name", region.name, *home, "--port", str(port)]
            health = f"http://{cfg.host}:{port}/healthz"
            roles.append(Role(f"region-{region.name}", argv, health, port, "--agent-port-base"))
        roles.append(
            Role(
                "gateway",
                [*base, "gateway", *home, "--port", str(cfg.gateway_port)],
                f"{cfg.gateway_url}/healthz",
                cfg.gateway_port,
                "--gateway-port",
            )
        )
        return roles

    def pid_file(self, role: str) -> Path:
        return self.run_dir / f"{role}.pid"

    def pid(self, role: str) -> int | None:
        try:
            pid = int(self.pid_file(role).read_text().strip())
        except (OSError, ValueError):
            return None
        if not _pid_alive(pid) or "anycast" not in _cmdline(pid):
            return None
        return pid

    def processes(self) -> list[ProcessInfo]:
        infos = []
        for role in self.roles():
            pid = self.pid(role.name)
            infos.append(
                ProcessInfo(role.name, pid, pid is not None, self.log_dir / f"{role.name}.log")
            )
        return infos

    def is_up(self) -> bool:
        return all(p.alive for p in self.processes())

    # -- up -------------------------------------------------------------------------------

    def up(self, timeout: float = 60.0) -> list[ProcessInfo]:
        """Start every role that is not running yet and wait until each answers /healthz.

        Nothing starts if the port of a role to start is taken by another process.
        """
        missing = [role for role in self.roles() if self.pid(role.name) is None]
        self._check_ports_free(missing)
        self.config.save()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for role in missing:
            self._start(role)
            if role.name == "control":
                self._wait_healthy([role], timeout)
        self._wait_healthy(self.roles(), timeout)
        return self.processes()

    def _check_ports_free(self, roles: list[Role]) -> None:
        for role in roles:
            if port_in_use(role.port, self.config.host):
                raise ConfigError(
                    f"port {role.port} ({role.name}) is already in use by another process; "
                    f"stop it or pass {role.flag}",
                    code="port_in_use",
                )

    def _start(self, role: Role) -> None:
        log_path = self.log_dir / f"{role.name}.log"
        env = {**os.environ, "ANYCAST_HOME": str(self.home)}
        with log_path.open("ab") as log_file:
            proc = subprocess.Popen(
                role.argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        self.pid_file(role.name).write_text(f"{proc.pid}\n")
        log.info("started %s (pid %d), log %s", role.name, proc.pid, log_path)

    def _wait_healthy(self, roles: list[Role], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pending = list(roles)
        with httpx.Client(timeout=2.0) as http:
            while pending:
                role = pending[0]
                pid = self.pid(role.name)
                if pid is None:
                    raise Unavailable(self._died_message(role.name))
                try:
                    # Another process on the port may answer too: the answer must be our pid's.
                    if http.get(role.health_url).status_code == 200 and _listens(pid, role.port):
                        pending.pop(0)
                        continue
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise Unavailable(
                        f"{role.name} did not answer {role.health_url} within {timeout:.0f} s; "
                        f"see {self.log_dir / (role.name + '.log')}"
                    )
                time.sleep(0.1)

    def _died_message(self, role: str) -> str:
        log_path = self.log_dir / f"{role}.log"
        try:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
        except OSError:
            tail = []
        detail = "\n  ".join(tail) or "(no output)"
        return f"{role} exited during start-up; last lines of {log_path}:\n  {detail}"

    # -- down -----------------------------------------------------------------------------

    def down(self, grace: float = 15.0) -> list[str]:
        """Stop the gateway, then the region agents (which stop their replicas), then control."""
        stopped = []
        order = sorted(self.roles(), key=lambda r: {"gateway": 0, "control": 2}.get(r.name, 1))
        for role in order:
            pid = self.pid(role.name)
            if pid is not None:
                _terminate(pid, grace)
                stopped.append(role.name)
            self.pid_file(role.name).unlink(missing_ok=True)
        stopped.extend(self._stop_orphan_replicas(grace))
        return stopped

    def _stop_orphan_replicas(self, grace: float) -> list[str]:
        """Replicas whose agent died without stopping them still run from our region dirs."""
        marker = str(self.home / "regions")
        stopped = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            cmd = _cmdline(int(entry.name))
            if "anycast" in cmd and "replica" in cmd and marker in cmd:
                _terminate(int(entry.name), grace)
                stopped.append(f"replica (pid {entry.name})")
        return stopped


def _terminate(pid: int, grace: float) -> None:
    """SIGTERM, wait up to ``grace`` seconds, then SIGKILL the process group."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not _pid_alive(pid):
            return
        time.sleep(0.1)
    log.warning("pid %d did not stop within %.0f s; killing it", pid, grace)
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
