"""A real cluster on 127.0.0.1 for the integration tests, and what they do with it.

`Cluster` runs `anycast control`, `anycast region` and `anycast gateway` as processes over
one home, each with its log in ``home/logs``; `running` starts them in order, waits for
each, and stops them all when its block ends. `push`, `register` and `deploy` do what
`anycast build`, `anycast push` and `anycast deploy` do, and `Load` and `load_during` send
calls through the gateway while a test breaks something. `ControlProcess` and `Replica` run
a lone control plane or replica for the tests of one component.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Self, TypeVar

import httpx

from anycast.control import ControlClient
from anycast.core.config import ClusterConfig
from anycast.core.http import free_port
from anycast.registry import LocalStorage, Registry, build_artifact

# Answers with the region of the replica that served the call.
SERVICE = """
import os

from pydantic import BaseModel

import anycast


class EchoIn(BaseModel):
    text: str


class EchoOut(BaseModel):
    text: str
    region: str


class Echo(anycast.Service):
    def setup(self) -> None:
        self.region = os.environ.get("ANYCAST_REGION", "")

    @anycast.handler
    def echo(self, request: EchoIn) -> EchoOut:
        return EchoOut(text=request.text, region=self.region)
"""

# A `predict` handler that answers with its request.
TEXT_ECHO_SERVICE = """
from pydantic import BaseModel

import anycast


class Text(BaseModel):
    text: str


class Echo(anycast.Service):
    @anycast.handler
    def predict(self, request: Text) -> Text:
        return request
"""

RETRIED: tuple[type[Exception], ...] = (httpx.HTTPError, OSError)
CLI_COLUMNS = "250"  # wide enough that the status lines tests check are not wrapped

T = TypeVar("T")
C = TypeVar("C", bound="Cluster")


def wait_for(
    what: str,
    check: Callable[[], bool],
    timeout: float = 60,
    retry_on: tuple[type[Exception], ...] = RETRIED,
) -> None:
    """Poll ``check`` until it is true; a ``retry_on`` error counts as not yet."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except retry_on:
            pass
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(0.2)


@dataclass
class Cluster:
    """The processes of one cluster home, by role: control, region-<name>, gateway."""

    home: Path
    config: ClusterConfig
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    agent_ports: dict[str, int] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)  # added to every process's environment

    @classmethod
    def new(cls, home: Path, **fields: Any) -> Self:
        """A cluster over ``home``: its config saved with free ports, nothing started yet."""
        (home / "logs").mkdir()
        config = ClusterConfig(home=home, control_port=free_port(), gateway_port=free_port())
        config.save()
        return cls(home, config, **fields)

    @property
    def gateway(self) -> str:
        return self.config.gateway_url

    @property
    def control(self) -> ControlClient:
        return ControlClient(self.config.control_url, timeout=5)

    def start(self, role: str, *args: str) -> None:
        log = (self.home / "logs" / f"{role}.log").open("ab")
        argv = [sys.executable, "-m", "anycast", *args, "--home", str(self.home)]
        self.processes[role] = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **self.env},
        )

    def start_agent(self, region: str) -> None:
        port = self.agent_ports[region] = free_port()
        self.start(f"region-{region}", "region", "--name", region, "--port", str(port))

    def stop(self, role: str, timeout: float = 20) -> None:
        process = self.processes[role]
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    def stop_all(self) -> None:
        """Every process still running, the last started first: gateways before agents."""
        for role in reversed(self.processes):
            self.stop(role)

    def log(self, role: str) -> str:
        return (self.home / "logs" / f"{role}.log").read_text(errors="replace")[-3000:]

    def agents_registered(self, regions: Collection[str]) -> bool:
        with self.control as control:
            rows = control.regions()
        return set(regions) <= {row["name"] for row in rows if row.get("agent_url")}

    def cli(self, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
        """`anycast ARGS --home HOME` as a user runs it in a wide terminal."""
        argv = [sys.executable, "-m", "anycast", *args, "--home", str(self.home)]
        env = {**os.environ, "COLUMNS": CLI_COLUMNS}
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)


@contextmanager
def running(cluster: C, agents: Collection[str], gateway_args: Sequence[str] = ()) -> Iterator[C]:
    """The control plane, an agent for each region of ``agents`` and the gateway, started in
    that order and waited for; every process is stopped when the block ends."""
    cluster.start("control", "control", "--port", str(cluster.config.control_port))
    try:
        wait_for("the control plane", cluster.control.health, timeout=30)
        for region in agents:
            cluster.start_agent(region)
        gateway_port = str(cluster.config.gateway_port)
        cluster.start("gateway", "gateway", "--port", gateway_port, *gateway_args)
        wait_for("the gateway", lambda: httpx.get(f"{cluster.gateway}/healthz").is_success)
        wait_for("the region agents", lambda: cluster.agents_registered(agents))
        yield cluster
    finally:
        cluster.stop_all()


def write_service(folder: Path, source: str) -> Path:
    """``folder/service.py`` holding ``source``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "service.py"
    path.write_text(source)
    return path


def push(
    config: ClusterConfig, service: str, name: str, out_dir: Path, version: str = "1"
) -> dict[str, Any]:
    """`anycast build` of ``service`` (``path/to/file.py:Class``), then `anycast push` into the
    home's registry; returns the pushed artifact's id, name, version and manifest."""
    _, tar = build_artifact(service, name=name, version=version, out_dir=out_dir)
    pushed: dict[str, Any] = Registry(LocalStorage(config.registry_dir)).push(tar)
    return pushed


def register(control: ControlClient, *pushed: dict[str, Any]) -> None:
    """Tell the control plane about pushed artifacts, as `anycast push` does."""
    for artifact in pushed:
        control.register_artifact(
            artifact["id"], artifact["name"], artifact["version"], artifact["manifest"]
        )


def deploy(control: ControlClient, pushed: dict[str, Any], replicas: dict[str, int]) -> None:
    """Register ``pushed`` and deploy it under its own name with ``replicas`` per region."""
    register(control, pushed)
    control.put_deployment(pushed["name"], pushed["id"], replicas)


class ControlProcess:
    """`anycast control` on its own over one home, started and stopped as an operator would."""

    def __init__(self, home: Path, *args: str, start_timeout: float = 30) -> None:
        self.home = home
        self.args = args
        self.start_timeout = start_timeout
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = home / "control.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Self:
        """Start it (again, on the same port) and wait until it answers its health check."""
        argv = [sys.executable, "-m", "anycast", "control", "--port", str(self.port)]
        argv += ["--home", str(self.home), *self.args]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=log)
        deadline = time.monotonic() + self.start_timeout
        with ControlClient(self.url) as client:
            while not client.health():
                assert self.proc.poll() is None, self.log_path.read_text()
                limit = self.start_timeout
                assert time.monotonic() < deadline, f"control plane did not start in {limit:g} s"
                time.sleep(0.05)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Send ``sig`` unless it has exited; its exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=15)


READY_TIMEOUT = 90.0  # a replica imports torch; on a loaded machine that alone takes long


class Replica:
    """A replica subprocess (`python -m ARGS`), its URL and its log."""

    def __init__(
        self,
        args: list[str],
        port: int,
        log_path: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        with log_path.open("wb") as log_file:
            self.process = subprocess.Popen(
                [sys.executable, "-m", *args],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env={**os.environ, "ANYCAST_TORCH_THREADS": "1", **(env or {})},
                cwd=cwd,
            )

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"replica exited early:\n{self.log}"
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"replica not ready after {READY_TIMEOUT} s:\n{self.log}")

    def wait_exit(self, timeout: float = READY_TIMEOUT) -> int:
        return self.process.wait(timeout=timeout)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise


class HasConfig(Protocol):
    """A `Cluster` here, or the `LocalCluster` that `anycast up` runs."""

    @property
    def config(self) -> ClusterConfig: ...


def routes(cluster: HasConfig) -> dict[str, Any]:
    """The gateway's routing table, as `GET /v1/routes` shows it."""
    answer: dict[str, Any] = httpx.get(f"{cluster.config.gateway_url}/v1/routes", timeout=5).json()
    return answer


def available(cluster: HasConfig, region: str, deployment: str = "echo") -> int:
    """How many replicas of ``deployment`` in ``region`` the gateway routes calls to."""
    regions = routes(cluster)["deployments"].get(deployment, {}).get("regions", {})
    return sum(1 for row in regions.get(region, []) if row["available"])


class Load:
    """``callers`` threads sending calls through the gateway until the block ends.

    ``send(http, i)`` makes one call of caller ``i``; each call is recorded as its status
    (or the transport error) and the artifact that answered it.
    """

    def __init__(
        self,
        gateway: str,
        send: Callable[[httpx.Client, int], httpx.Response],
        callers: int,
        timeout: float,
        pause: float = 0.0,
    ) -> None:
        self.gateway = gateway
        self.results: list[tuple[int | str, str | None]] = []
        self._send = send
        self._timeout = timeout
        self._pause = pause
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._call, args=(i,), daemon=True) for i in range(callers)
        ]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def _call(self, caller: int) -> None:
        with httpx.Client(base_url=self.gateway, timeout=self._timeout) as http:
            while not self._stop.is_set():
                try:
                    r = self._send(http, caller)
                    self.results.append((r.status_code, r.headers.get("x-anycast-artifact")))
                except httpx.HTTPError as exc:
                    self.results.append((repr(exc), None))
                if self._pause:
                    time.sleep(self._pause)

    @property
    def failures(self) -> list[tuple[int | str, str | None]]:
        return [r for r in self.results if r[0] != 200]


async def load_during(
    url: str,
    seconds: float,
    during: Callable[[], None],
    send: Callable[[httpx.AsyncClient, int], Awaitable[T]],
    callers: int,
    timeout: float,
) -> list[T]:
    """``callers`` concurrent callers for ``seconds``, each making calls with ``send(http, i)``
    and keeping what it returns; ``during`` runs (in a thread) one second in."""
    results: list[T] = []
    deadline = time.monotonic() + seconds

    async def caller(http: httpx.AsyncClient, i: int) -> None:
        while time.monotonic() < deadline:
            results.append(await send(http, i))

    async def chaos() -> None:
        await asyncio.sleep(1.0)
        await asyncio.to_thread(during)

    async with httpx.AsyncClient(base_url=url, timeout=timeout) as http:
        await asyncio.gather(*(caller(http, i) for i in range(callers)), chaos())
    return results


@dataclass
class RegionKill:
    """Every replica of one deployment in one region, SIGKILLed at once when called."""

    victims: list[dict[str, Any]]
    killed_at: list[float] = field(default_factory=list)  # time.monotonic() of the kill

    @classmethod
    def of(cls, control: ControlClient, region: str, deployment: str) -> RegionKill:
        with control:
            victims = control.replicas(region=region, deployment=deployment)
        assert victims and all(v["pid"] for v in victims), f"no running replicas: {victims}"
        return cls(victims)

    def __call__(self) -> None:
        self.killed_at.append(time.monotonic())
        for victim in self.victims:
            os.killpg(victim["pid"], signal.SIGKILL)
