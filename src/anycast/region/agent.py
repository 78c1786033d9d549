"""The region agent: makes the replicas running in one region match the desired state.

Every ``interval`` seconds the agent:

1. registers its region with the control plane (and refreshes it now and then),
2. watches its replicas: exit codes from the engine, readiness from ``/readyz``,
3. diffs the replicas every deployment wants in its region (per artifact, following the
   deployment's rollout) against what runs, pulls missing artifacts into its own region
   directory and starts or stops replicas; a replacement starts the new replica in an
   extra slot and stops the old one only once the new one is ready,
4. restarts crashed replicas after an exponential backoff (``crash-loop`` once they fail
   again and again),
5. reports the full observed set to the control plane.

For a deployment with an autoscaling policy in its region the agent itself decides the
count (:mod:`anycast.region.autoscale`) from the load its replicas' ``/metrics`` show,
keeps it locally and reports it with the replicas; ``POST /v1/deployments/{name}/wake``
(sent by the gateway for a call that finds no replica) brings a region at zero back to one.

A replica leaving rotation is reported ``stopping`` first and signalled ``drain_delay``
seconds later, so the gateway has stopped sending it calls; on SIGTERM the agent drains
every replica that way, then exits.

When the control plane is unreachable the agent keeps every replica as it is (and keeps
restarting crashed ones) and reconnects by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI

from anycast.control.scaling import clamp, policy_for, with_counts
from anycast.core.config import ClusterConfig
from anycast.core.errors import AnycastError, Conflict, NotFound
from anycast.core.http import LOOPBACK, client, create_app, free_port
from anycast.core.names import check_artifact_id, check_name
from anycast.region.autoscale import DeploymentScale, ReplicaCounters, parse_metrics
from anycast.region.engine import (
    ProcessEngine,
    ReplicaEngine,
    ReplicaHandle,
    ReplicaSpec,
    describe_exit,
    last_log_line,
)
from anycast.region.follow import StateFollower
from anycast.region.reconcile import (
    Backoff,
    Desired,
    Observed,
    banned_artifacts,
    plan_region,
    wanted_for_region,
)

log = logging.getLogger(__name__)

REGISTER_EVERY = 10.0  # seconds between registrations (the region's heartbeat)
REPORT_EVERY = 10.0  # seconds between reports when nothing changed
UNREADY_AFTER = 3  # failed probes in a row before a ready replica counts as not ready
CONTROL_RETRY = 2.0  # seconds to leave an unreachable control plane alone
CRASH_LOOP_AFTER = 2  # failures in a row (never staying ready) that make a crash loop


@dataclass
class ManagedReplica:
    """One replica slot this agent owns, across restarts."""

    want: Desired
    region: str
    state: str = "starting"
    handle: ReplicaHandle | None = None
    port: int | None = None
    restarts: int = 0
    starts: int = 0
    last_error: str | None = None
    backoff: Backoff = field(default_factory=Backoff)
    next_start: float = 0.0
    ready_since: float | None = None
    failed_probes: int = 0
    updated_at: float = field(default_factory=time.time)

    @property
    def replica_id(self) -> str:
        return self.want.replica_id

    @property
    def endpoint(self) -> str:
        """Where the replica listens, or listened last; '' before its first start."""
        return f"http://{LOOPBACK}:{self.port}" if self.port else ""

    def set_state(self, state: str) -> None:
        if state != self.state:
            self.state = state
            self.updated_at = time.time()

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.replica_id,
            "deployment": self.want.deployment,
            "artifact": self.want.artifact_id,
            "region": self.region,
            "endpoint": self.endpoint,
            "state": self.state,
            "pid": self.handle.pid if self.handle else None,
            "restarts": self.restarts,
            "last_error": self.last_error,
            "updated_at": self.updated_at,
        }


class RegionAgent:
    """Reconciles one region's replicas with the control plane's desired state."""

    def __init__(
        self,
        config: ClusterConfig,
        name: str,
        control_url: str,
        agent_url: str,
        engine: ReplicaEngine | None = None,
        *,
        interval: float = 0.5,
        stop_grace: float = 12.0,
        drain_delay: float = 1.0,
    ) -> None:
        from anycast.control import ControlClient

        self.config = config
        self.region = config.region(name)
        self.name = self.region.name
        self.dir = config.region_dir(name)
        self.agent_url = agent_url
        self.engine: ReplicaEngine = engine or ProcessEngine()
        self.interval = interval
        self.stop_grace = stop_grace
        self.drain_delay = drain_delay

        self.control = ControlClient(control_url, timeout=3.0)
        self.follower = StateFollower(
            ControlClient(control_url, timeout=15.0), wait=10.0, name=f"follow-{name}"
        )
        self.replicas: dict[str, ManagedReplica] = {}
        self._stopping: dict[int, tuple[ManagedReplica, Future[None]]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"agent-{name}", daemon=True)
        # Probes and stops get their own threads: a slow stop never delays noticing a crash.
        self._probes = ThreadPoolExecutor(max_workers=8, thread_name_prefix=f"probe-{name}")
        self._stops = ThreadPoolExecutor(max_workers=8, thread_name_prefix=f"stop-{name}")
        self._http = client(timeout=1.0)
        self._registered_at: float | None = None
        self._reported: str | None = None
        self._reported_at = 0.0
        self._control_retry_at = 0.0
        self.scales: dict[str, DeploymentScale] = {}  # autoscaled deployments, by name
        self._scale_lock = threading.Lock()
        self._kick = threading.Event()  # a wake-up: tick now rather than after the interval

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> RegionAgent:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._reap_orphans()
        self.follower.start()
        self._thread.start()
        log.info("region agent %s started in %s", self.name, self.dir)
        return self

    def shutdown(self) -> None:
        """Drain: report every replica stopping, stop each gracefully, report none left."""
        self._stop.set()
        self._kick.set()
        self.follower.stop()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        with self._lock:
            managed = list(self.replicas.values())
        log.info("region agent %s draining %d replicas", self.name, len(managed))
        for m in managed:
            self._retire(m)
        self._report(time.monotonic(), force=True)  # the gateway stops routing to them
        for _, future in list(self._stopping.values()):
            future.result()
        self._stopping.clear()
        self._stops.shutdown(wait=True)
        self._probes.shutdown(wait=True)
        self._report(time.monotonic(), force=True)
        self._http.close()
        log.info("region agent %s stopped", self.name)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # the loop must survive any single bad tick
                log.exception("region %s: reconcile tick failed", self.name)
            self._kick.wait(self.interval)
            self._kick.clear()

    def tick(self) -> None:
        """One pass: register, watch, reconcile, restart, report."""
        now = time.monotonic()
        self._register(now)
        self._watch(now)
        state = self.follower.latest
        if state is not None:
            self._reconcile(now, self._autoscale(now, state.get("deployments", [])))
        self._restart_failed(now)
        self._reap_stopped()
        self._report(now)

    def snapshot(self) -> list[dict[str, Any]]:
        """The observed replicas of this region, as reported to the control plane."""
        with self._lock:
            rows = [m.to_dict() for m in self.replicas.values()]
            live = {row["id"] for row in rows}
            for m, _ in self._stopping.values():
                if m.replica_id not in live:
                    rows.append(m.to_dict())
        return sorted(rows, key=lambda r: str(r["id"]))

    # -- talking to the control plane ---------------------------------------------------------

    def _register(self, now: float) -> None:
        state = self.follower.latest
        listed = state is not None and any(
            r.get("name") == self.name for r in state.get("regions", [])
        )
        fresh = self._registered_at is not None and now - self._registered_at < REGISTER_EVERY
        if (fresh and (listed or state is None)) or now < self._control_retry_at:
            return
        try:
            self.control.register_region(
                self.name, self.region.latitude, self.region.longitude, self.agent_url
            )
        except (AnycastError, httpx.HTTPError, OSError) as exc:
            log.debug("region %s: cannot register yet: %s", self.name, exc)
            self._registered_at = None
            self._control_retry_at = now + CONTROL_RETRY
            return
        if self._registered_at is None:
            log.info("region %s registered with the control plane", self.name)
        self._registered_at = now

    def _report(self, now: float, force: bool = False) -> None:
        rows = self.snapshot()
        scaling = self.scaling_snapshot(now)
        key = json.dumps(
            [
                [{k: v for k, v in r.items() if k != "updated_at"} for r in rows],
                [(s["deployment"], s["desired"]) for s in scaling],
            ]
        )
        stale = now - self._reported_at > REPORT_EVERY
        if not force and (now < self._control_retry_at or (key == self._reported and not stale)):
            return
        try:
            if scaling:
                self.control.report_replicas(self.name, rows, scaling)
            else:  # no autoscaled deployment here: the report is replicas only
                self.control.report_replicas(self.name, rows)
        except (AnycastError, httpx.HTTPError, OSError) as exc:
            log.debug("region %s: cannot report replicas: %s", self.name, exc)
            self._reported = None
            self._control_retry_at = now + CONTROL_RETRY
            return
        self._reported, self._reported_at = key, now

    # -- watching replicas ----------------------------------------------------------------------

    def _watch(self, now: float) -> None:
        live = []
        for m in list(self.replicas.values()):
            if m.handle is None:
                continue
            code = self.engine.poll(m.handle)
            if code is None:
                live.append(m)
            else:
                self._on_exit(m, code, now)
        for m, ready in zip(live, self._probes.map(self._probe, live), strict=True):
            self._on_probe(m, ready, now)

    def _probe(self, m: ManagedReplica) -> bool:
        try:
            return self._http.get(f"{m.endpoint}/readyz").status_code == 200
        except httpx.HTTPError:
            return False

    def _on_probe(self, m: ManagedReplica, ready: bool, now: float) -> None:
        if ready:
            m.failed_probes = 0
            if m.state != "ready":
                log.info("replica %s is ready at %s", m.replica_id, m.endpoint)
                m.ready_since = now
                m.set_state("ready")
            m.backoff.record_ready(now - (m.ready_since or now))
            return
        m.failed_probes += 1
        if m.state == "ready" and m.failed_probes >= UNREADY_AFTER:
            log.warning("replica %s stopped answering /readyz", m.replica_id)
            m.ready_since = None
            m.set_state("starting")

    def _on_exit(self, m: ManagedReplica, code: int, now: float) -> None:
        assert m.handle is not None
        spec = m.handle.spec
        line = last_log_line(spec.log_path)
        m.last_error = f"exit code {code}: {describe_exit(code)}" + (
            f"; last log line: {line}" if line else ""
        )
        if m.ready_since is None:
            m.port = None  # never became ready: maybe the port was taken, pick another
        m.handle, m.ready_since = None, None
        delay = self._record_failure(m, now)
        self._pid_file(m.replica_id).unlink(missing_ok=True)
        log.warning(
            "replica %s %s (%s); restarting in %.1f s", m.replica_id, m.state, m.last_error, delay
        )
        if code == 3:
            # The unpacked copy failed verification: drop it so the next start pulls again.
            shutil.rmtree(spec.artifact_dir, ignore_errors=True)

    # -- autoscaling ------------------------------------------------------------------------------

    def _autoscale(self, now: float, deployments: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``deployments`` as this region runs them: autoscaled counts instead of fixed ones."""
        policies: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
        fixed = []
        for deployment in deployments:
            name = deployment.get("name")
            policy = policy_for(deployment, self.name) if isinstance(name, str) else None
            if policy is None:
                fixed.append(deployment)
            else:
                policies[str(name)] = (deployment, policy)
        samples = self._sample_load(set(policies))

        scaled = []
        with self._scale_lock:
            for gone in set(self.scales) - set(policies):
                del self.scales[gone]
            for name, (deployment, policy) in policies.items():
                scale = self._scale_of(deployment, policy, now)
                scale.observe(policy, samples.get(name, {}), now)
                before = scale.desired
                if scale.step(policy, now) != before:
                    log.info(
                        "deployment %s in %s scales from %d to %d replicas (load %.1f in flight)",
                        name,
                        self.name,
                        before,
                        scale.desired,
                        scale.load,
                    )
                counts = {**(deployment.get("replicas") or {}), self.name: scale.desired}
                scaled.append(with_counts(deployment, counts))
        return fixed + scaled

    def _scale_of(
        self, deployment: dict[str, Any], policy: dict[str, Any], now: float
    ) -> DeploymentScale:
        """The deployment's scale state; a new one starts from the last reported count."""
        name = str(deployment["name"])
        scale = self.scales.get(name)
        if scale is not None:
            return scale
        start = int((deployment.get("replicas") or {}).get(self.name, 0))
        for row in (self.follower.latest or {}).get("autoscaling", []):
            if row.get("region") == self.name and row.get("deployment") == name:
                start = int(row.get("desired", start))
        scale = self.scales[name] = DeploymentScale(desired=clamp(start, policy), last_active=now)
        return scale

    def _sample_load(self, deployments: set[str]) -> dict[str, dict[str, ReplicaCounters]]:
        """The ``/metrics`` counters of every ready replica of ``deployments``, by deployment."""
        ready = [
            m
            for m in list(self.replicas.values())
            if m.want.deployment in deployments and m.state == "ready"
        ]
        samples: dict[str, dict[str, ReplicaCounters]] = {}
        for m, counters in zip(ready, self._probes.map(self._metrics, ready), strict=True):
            if counters is not None:
                samples.setdefault(m.want.deployment, {})[m.replica_id] = counters
        return samples

    def _metrics(self, m: ManagedReplica) -> ReplicaCounters | None:
        try:
            response = self._http.get(f"{m.endpoint}/metrics")
        except httpx.HTTPError:
            return None
        if response.status_code != 200:
            return None
        return parse_metrics(response.text, time.monotonic())

    def wake(self, name: str) -> dict[str, Any]:
        """A call waits for ``name``: make sure at least one replica runs here."""
        check_name(name, "deployment name")
        state = self.follower.latest or {}
        found = [d for d in state.get("deployments", []) if d.get("name") == name]
        if not found:
            raise NotFound(f"no deployment named {name!r} in the state region {self.name} follows")
        policy = policy_for(found[0], self.name)
        if policy is None or int(policy["max_replicas"]) < 1:
            raise Conflict(
                f"deployment {name!r} does not autoscale in region {self.name}, so it cannot be "
                f"woken here; give it a policy with `anycast deploy {name} --max-replicas N`",
                code="not_autoscaled",
            )
        now = time.monotonic()
        with self._scale_lock:
            scale = self._scale_of(found[0], policy, now)
            before = scale.desired
            desired = scale.wake(policy, now)
        if desired != before:
            log.info("deployment %s in %s woken up: %d -> %d", name, self.name, before, desired)
            self._kick.set()
        return {"deployment": name, "region": self.name, "desired": desired}

    def scaling_snapshot(self, now: float | None = None) -> list[dict[str, Any]]:
        """Each autoscaled deployment's count here, its load and how long it has been idle."""
        now = time.monotonic() if now is None else now
        with self._scale_lock:
            return [
                {
                    "deployment": name,
                    "desired": scale.desired,
                    "in_flight": round(scale.load, 2),
                    "idle_seconds": round(max(0.0, now - scale.last_active), 1),
                }
                for name, scale in sorted(self.scales.items())
            ]

    # -- changing replicas ----------------------------------------------------------------------

    def _record_failure(self, m: ManagedReplica, now: float) -> float:
        """Schedule the next start after the backoff; a repeated failure is a crash loop."""
        delay = m.backoff.record_failure()
        m.next_start = now + delay
        m.set_state("crash-loop" if m.backoff.failures >= CRASH_LOOP_AFTER else "failed")
        return delay

    def _reconcile(self, now: float, deployments: list[dict[str, Any]]) -> None:
        observed = [
            Observed(rid, m.want.deployment, m.want.artifact_id, m.state == "ready")
            for rid, m in self.replicas.items()
        ]
        with self._lock:
            taken = {m.replica_id for m, _ in self._stopping.values()}
        steps = plan_region(
            self.name,
            wanted_for_region(deployments, self.name),
            observed,
            banned_artifacts(deployments),
            taken,
        )
        for rid in steps.stop:
            m = self.replicas[rid]
            log.info(
                "replica %s (artifact %s) is no longer wanted; stopping it",
                rid,
                m.want.artifact_id[:12],
            )
            self._retire(m)
        for want in steps.start:
            log.info(
                "replica %s of %s starts on artifact %s",
                want.replica_id,
                want.deployment,
                want.artifact_id[:12],
            )
            self._launch(self._adopt(want), now)

    def _adopt(self, want: Desired) -> ManagedReplica:
        m = ManagedReplica(want, self.name)
        with self._lock:
            self.replicas[want.replica_id] = m
        return m

    def _restart_failed(self, now: float) -> None:
        for m in list(self.replicas.values()):
            if m.handle is None and now >= m.next_start:
                if m.starts:
                    m.restarts += 1
                    log.warning(
                        "replica %s: restart %d (%s) after: %s",
                        m.replica_id,
                        m.restarts,
                        m.state,
                        m.last_error,
                    )
                self._launch(m, now)

    def _launch(self, m: ManagedReplica, now: float) -> None:
        try:
            artifact_dir = self._artifact(m.want.artifact_id)
        except (AnycastError, OSError) as exc:
            message = exc.message if isinstance(exc, AnycastError) else str(exc)
            self._fail_to_start(m, now, f"cannot pull artifact {m.want.artifact_id}: {message}")
            return
        m.port = m.port or free_port()
        spec = ReplicaSpec(
            replica_id=m.replica_id,
            deployment=m.want.deployment,
            artifact_id=m.want.artifact_id,
            artifact_dir=artifact_dir,
            port=m.port,
            log_path=self.dir / "logs" / f"{m.replica_id}.log",
            env={"ANYCAST_REGION": self.name},
        )
        try:
            handle = self.engine.start(spec)
        except OSError as exc:
            self._fail_to_start(m, now, f"cannot start the replica process: {exc}")
            return
        m.handle, m.failed_probes = handle, 0
        m.starts += 1
        # A crash loop stays one until the replica gets ready: no flapping back to starting.
        if m.state != "crash-loop":
            m.set_state("starting")
        if handle.pid is not None:
            self._pid_file(m.replica_id).write_text(f"{handle.pid}\n")

    def _fail_to_start(self, m: ManagedReplica, now: float, error: str) -> None:
        m.last_error = error
        delay = self._record_failure(m, now)
        log.warning("replica %s: %s; retrying in %.1f s", m.replica_id, error, delay)

    def _retire(self, m: ManagedReplica) -> None:
        """Take ``m`` out of the desired set and stop its process in the background."""
        with self._lock:
            if self.replicas.get(m.replica_id) is m:
                del self.replicas[m.replica_id]
            if m.handle is None:
                return
            # Only a ready replica gets calls, so only it waits for the gateway to notice.
            delay = self.drain_delay if m.state == "ready" else 0.0
            m.set_state("stopping")
            future = self._stops.submit(self._stop_replica, m, m.handle, delay)
            self._stopping[id(m)] = (m, future)

    def _stop_replica(self, m: ManagedReplica, handle: ReplicaHandle, delay: float) -> None:
        time.sleep(delay)
        self.engine.stop(handle, self.stop_grace)
        self._pid_file(m.replica_id).unlink(missing_ok=True)

    def _reap_stopped(self) -> None:
        with self._lock:
            done = [key for key, (_, future) in self._stopping.items() if future.done()]
            for key in done:
                del self._stopping[key]

    def _artifact(self, artifact_id: str) -> Path:
        """The unpacked artifact in this region's directory, pulled on first use."""
        from anycast.registry import LocalStorage, Registry

        check_artifact_id(artifact_id)
        target = self.dir / "artifacts" / artifact_id
        if (target / "manifest.json").is_file():
            return target
        log.info("region %s: pulling artifact %s", self.name, artifact_id[:12])
        registry = Registry(LocalStorage(self.config.registry_dir))
        return Path(registry.pull(artifact_id, self.dir / "artifacts"))

    # -- replicas left behind by an earlier agent ------------------------------------------------

    def _pid_file(self, replica_id: str) -> Path:
        path = self.dir / "run" / f"{replica_id}.pid"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def _reap_orphans(self) -> None:
        """Stop replicas an earlier agent of this region started and did not stop."""
        run_dir = self.dir / "run"
        for pid_file in sorted(run_dir.glob("*.pid")) if run_dir.is_dir() else []:
            try:
                pid = int(pid_file.read_text().strip())
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            except (OSError, ValueError):
                pid_file.unlink(missing_ok=True)
                continue
            if "anycast.replica" in cmdline and str(self.dir) in cmdline:
                log.info("region %s: stopping orphan replica pid %d", self.name, pid)
                _terminate_group(pid, self.stop_grace)
            pid_file.unlink(missing_ok=True)


def _terminate_group(pid: int, grace: float) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists():
            return
        time.sleep(0.1)
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return


def create_agent_app(agent: RegionAgent) -> FastAPI:
    """The agent's own HTTP API (health, observed replicas); serving it runs the agent.

    The agent starts with the server and, on SIGTERM, stops its replicas before the server
    exits (uvicorn re-raises the signal afterwards, so nothing may run after ``serve``).
    """

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        agent.start()
        try:
            yield
        finally:
            await asyncio.to_thread(agent.shutdown)

    app = create_app(f"Anycast region agent {agent.name}", lifespan=lifespan)

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {
            "status": "ok",
            "region": agent.name,
            "control_plane": "connected" if agent.follower.connected else "unreachable",
        }

    @app.get("/v1/replicas")
    def replicas() -> list[dict[str, Any]]:
        return agent.snapshot()

    @app.get("/v1/autoscaling")
    def autoscaling() -> list[dict[str, Any]]:
        return agent.scaling_snapshot()

    @app.post("/v1/deployments/{name}/wake")
    def wake(name: str) -> dict[str, Any]:
        return agent.wake(name)

    return app
