"""The control plane's HTTP API (see docs/architecture.md, "Control plane API")."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Literal

import anyio
from fastapi import FastAPI, Query, Request, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict, Field, field_validator

from anycast.control.plane import DEPLOYMENTS, KEEP, MAX_REPLICAS, REGIONS, ControlPlane
from anycast.control.store import Store
from anycast.core.config import RegionConfig
from anycast.core.errors import InvalidInput
from anycast.core.http import create_app
from anycast.core.names import NAME_RULE

log = logging.getLogger(__name__)

MAX_WAIT_SECONDS = 30.0
# Long-polls sleep in slices so a stopping server never waits long on a parked thread.
WAIT_SLICE_SECONDS = 1.0
MAX_LONG_POLLS = 200
MAX_REPORTED_REPLICAS = 4096
# Free-form JSON in a body (a manifest, autoscaling policies) nests at most this deep, so the
# state every gateway and agent reads always encodes: far more than any real manifest needs.
MAX_BODY_DEPTH = 32

# The same states as plane.REPLICA_STATES.
ReplicaState = Literal["crash-loop", "starting", "ready", "failed", "stopping"]


class RegionBody(BaseModel):
    latitude: float = Field(ge=-90, le=90)
    longitude: float = Field(ge=-180, le=180)
    agent_url: str | None = None

    @field_validator("agent_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("agent_url must start with http:// or https://")
        return value


def _depth(value: Any) -> int:
    """How deeply JSON arrays and objects nest in ``value`` (0 for a scalar); no recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, level + 1)
            stack.extend((child, level + 1) for child in item)
    return deepest


def _shallow(value: Any) -> Any:
    if value is not None and _depth(value) > MAX_BODY_DEPTH:
        raise ValueError(f"nests arrays or objects more than {MAX_BODY_DEPTH} levels deep")
    return value


class ArtifactBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    name: str
    version: str
    manifest: dict[str, Any]

    @field_validator("manifest")
    @classmethod
    def _shallow_manifest(cls, value: dict[str, Any]) -> dict[str, Any]:
        return _shallow(value)


class DeploymentBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    artifact: str
    replicas: dict[str, Any] = Field(default_factory=dict)
    revision: int | None = Field(default=None, ge=0)
    # A share of every region's replicas, in percent, that runs the new artifact first.
    canary_percent: int | None = None
    allow_rolled_back: bool = False
    # {"*" or region: policy}; left out keeps the current policies, {} or null removes them.
    autoscaling: dict[str, Any] | None = None

    @field_validator("replicas", "autoscaling")
    @classmethod
    def _shallow_fields(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return _shallow(value)


class RevisionBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    revision: int | None = Field(default=None, ge=0)


class ReplicaBody(BaseModel):
    id: str = Field(min_length=1, max_length=200)
    deployment: str
    artifact: str
    region: str
    endpoint: str
    state: ReplicaState
    pid: int | None = None
    restarts: int = Field(default=0, ge=0)
    last_error: str | None = None
    updated_at: float | None = None


class ScaleBody(BaseModel):
    """An agent's count for one deployment it autoscales in its region."""

    deployment: str
    desired: int = Field(ge=0, le=MAX_REPLICAS)
    in_flight: float = Field(default=0.0, ge=0)
    idle_seconds: float | None = Field(default=None, ge=0)


class ReplicaReport(BaseModel):
    replicas: list[ReplicaBody] = Field(max_length=MAX_REPORTED_REPLICAS)
    autoscaling: list[ScaleBody] = Field(default_factory=list, max_length=MAX_REPORTED_REPLICAS)


def _metrics(app: FastAPI, plane: ControlPlane) -> Callable[[], bytes]:
    registry = CollectorRegistry()
    requests = Counter(
        "anycast_control_requests",
        "HTTP requests answered by the control plane",
        ["method", "route", "status"],
        registry=registry,
    )
    revision = Gauge("anycast_control_store_revision", "Store revision", registry=registry)
    objects = Gauge(
        "anycast_control_objects", "Objects in the store by kind", ["kind"], registry=registry
    )

    @app.middleware("http")
    async def _count(request: Request, call_next: Callable[..., Awaitable[Response]]) -> Any:
        response = await call_next(request)
        route = getattr(request.scope.get("route"), "path", "unmatched")
        requests.labels(request.method, route, str(response.status_code)).inc()
        return response

    def render() -> bytes:
        revision.set(plane.store.revision())
        for kind in (REGIONS, DEPLOYMENTS):
            objects.labels(kind).set(len(plane.store.list(kind)))
        return generate_latest(registry)

    return render


def build_app(store: Store, regions: Iterable[RegionConfig] = ()) -> FastAPI:
    """The control-plane app over ``store``; ``regions`` are seeded from the cluster config."""
    plane = ControlPlane(store)
    plane.seed_regions(regions)
    app = create_app("Anycast control plane")
    app.state.plane = plane
    render_metrics = _metrics(app, plane)
    long_polls = anyio.CapacityLimiter(MAX_LONG_POLLS)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(render_metrics(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/state")
    async def state(after: int = Query(0, ge=0), wait: float = Query(0.0, ge=0)) -> dict[str, Any]:
        deadline = time.monotonic() + min(wait, MAX_WAIT_SECONDS)
        while (remaining := deadline - time.monotonic()) > 0:
            slice_seconds = min(remaining, WAIT_SLICE_SECONDS)
            current = await anyio.to_thread.run_sync(
                store.wait, after, slice_seconds, limiter=long_polls
            )
            if current > after:
                break
        return await anyio.to_thread.run_sync(plane.state)

    @app.put("/v1/regions/{name}")
    def put_region(name: str, body: RegionBody) -> dict[str, Any]:
        return plane.register_region(name, body.latitude, body.longitude, body.agent_url)

    @app.get("/v1/regions")
    def get_regions() -> list[dict[str, Any]]:
        return plane.regions()

    @app.put("/v1/regions/{name}/replicas")
    def put_replicas(name: str, body: ReplicaReport) -> dict[str, Any]:
        replicas = [r.model_dump() for r in body.replicas]
        plane.report_replicas(name, replicas, [s.model_dump() for s in body.autoscaling])
        return {"region": name, "replicas": len(replicas)}

    @app.post("/v1/artifacts")
    def post_artifact(body: ArtifactBody) -> dict[str, Any]:
        return plane.register_artifact(body.id, body.name, body.version, body.manifest)

    @app.get("/v1/artifacts")
    def get_artifacts() -> list[dict[str, Any]]:
        return plane.artifacts()

    @app.get("/v1/artifacts/{ref}")
    def get_artifact(ref: str) -> dict[str, Any]:
        return plane.artifact(ref)

    @app.put("/v1/deployments/{name}")
    def put_deployment(name: str, body: DeploymentBody) -> dict[str, Any]:
        return plane.put_deployment(
            name,
            body.artifact,
            body.replicas,
            body.revision,
            canary_percent=body.canary_percent,
            allow_rolled_back=body.allow_rolled_back,
            autoscaling=(body.autoscaling or {})
            if "autoscaling" in body.model_fields_set
            else KEEP,
        )

    @app.post("/v1/deployments/{name}/promote")
    def promote(name: str, body: RevisionBody | None = None) -> dict[str, Any]:
        return plane.promote(name, body.revision if body else None)

    @app.post("/v1/deployments/{name}/rollback")
    def rollback(name: str, body: RevisionBody | None = None) -> dict[str, Any]:
        return plane.rollback(name, body.revision if body else None)

    @app.get("/v1/deployments")
    def get_deployments() -> list[dict[str, Any]]:
        return plane.deployments()

    @app.get("/v1/deployments/{name}")
    def get_deployment(name: str) -> dict[str, Any]:
        return plane.deployment(name)

    @app.get("/v1/deployments/{name}/scale")
    def get_scale(name: str) -> dict[str, Any]:
        return plane.scale(name)

    @app.delete("/v1/deployments/{name}")
    def delete_deployment(name: str, revision: int | None = Query(None, ge=0)) -> dict[str, Any]:
        return plane.delete_deployment(name, revision)

    @app.get("/v1/replicas")
    def get_replicas(region: str | None = None, deployment: str | None = None) -> list[Any]:
        return plane.replicas(region, deployment)

    @app.api_route("/v1/deployments/{path:path}", methods=["GET", "PUT", "POST", "DELETE"])
    def bad_deployment_path(path: str) -> None:
        """An empty deployment name, or one holding '/', reaches no route above."""
        raise InvalidInput(
            f"/v1/deployments/{path} names no deployment: a deployment name is {NAME_RULE} "
            "(paths are /v1/deployments/NAME, NAME/scale, NAME/promote and NAME/rollback)",
            code="invalid_name",
        )

    return app
