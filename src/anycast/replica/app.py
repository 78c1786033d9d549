"""The replica's HTTP app: probes, metrics, and ``POST /v1/{handler}`` for each handler.

``setup()`` runs in a background thread from startup, so ``/healthz`` answers while the
model loads and ``/readyz`` says 503 (loading / failed, with the reason) until it is done.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio.to_thread
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.types import ASGIApp, Receive, Scope, Send

from anycast import __version__
from anycast.core.errors import AnycastError, ConfigError, NotFound, Unavailable
from anycast.core.http import create_app
from anycast.replica.inputs import MULTIPART_FILE_FIELD, payload_of, read_body, validate_input
from anycast.replica.metrics import ReplicaMetrics
from anycast.sdk import HandlerSpec, Service, handlers_of

log = logging.getLogger(__name__)

_HEADER_VALUE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")

SetupFailureHook = Callable[[str], None]


class ReplicaState:
    """loading -> ready, or loading -> failed (with a reason)."""

    def __init__(self) -> None:
        self.status = "loading"
        self.reason = ""
        self.since = time.monotonic()

    @property
    def ready(self) -> bool:
        return self.status == "ready"

    def describe(self) -> tuple[str, str]:
        """(error code, message) while not ready."""
        if self.status == "failed":
            return "setup_failed", f"setup() failed: {self.reason}"
        waited = time.monotonic() - self.since
        return "loading", f"setup() is still running ({waited:.1f} s so far); retry shortly"


class ReplicaRuntime:
    """One service instance and the state, metrics and identity of the replica serving it."""

    def __init__(
        self,
        service_cls: type[Service],
        files_dir: Path,
        *,
        replica_id: str,
        artifact_id: str,
        files: Mapping[str, Path] | None = None,
        on_setup_failure: SetupFailureHook | None = None,
    ) -> None:
        self.service_cls = service_cls
        self.files_dir = files_dir
        self.files = dict(files or {})
        self.replica_id = replica_id
        self.artifact_id = artifact_id
        self.specs = handlers_of(service_cls)
        self.state = ReplicaState()
        self.metrics = ReplicaMetrics()
        self.on_setup_failure = on_setup_failure
        self._methods: dict[str, Callable[[Any], Any]] = {}

    def run_setup(self) -> None:
        """Create the service and run its setup(); records ready or failed."""
        started = time.monotonic()
        try:
            service = self.service_cls(files_dir=self.files_dir, files=self.files)
            service.setup()
        except Exception as exc:
            reason = (
                exc.message if isinstance(exc, AnycastError) else f"{type(exc).__name__}: {exc}"
            )
            log.exception(
                "replica %s: setup() of %s raised", self.replica_id, self.service_cls.__name__
            )
            self.state.reason, self.state.status = reason, "failed"
            if self.on_setup_failure is not None:
                self.on_setup_failure(reason)
            return

        self._methods = {name: getattr(service, spec.method) for name, spec in self.specs.items()}
        self.state.status = "ready"
        self.metrics.ready.set(1)
        log.info(
            "replica %s ready in %.1f s: %s (artifact %s), handlers %s",
            self.replica_id,
            time.monotonic() - started,
            self.service_cls.__name__,
            self.artifact_id[:12],
            ", ".join(self.specs),
        )

    @asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        threading.Thread(target=self.run_setup, name="anycast-setup", daemon=True).start()
        yield

    def require_ready(self) -> None:
        if self.state.ready:
            return
        code, message = self.state.describe()
        raise Unavailable(f"replica {self.replica_id} is not ready: {message}", code=code)

    async def call(self, spec: HandlerSpec, request: Request) -> Response:
        """Serve one handler call, counting it in the metrics whatever its outcome."""
        started = time.perf_counter()
        status = 500
        self.metrics.in_flight.inc()
        try:
            response = await self._call(spec, request)
            status = response.status_code
            return response
        except AnycastError as exc:
            status = exc.status
            raise
        finally:
            self.metrics.in_flight.dec()
            seconds = time.perf_counter() - started
            self.metrics.observe(spec.name, status, seconds)
            log.debug(
                "replica %s: %s -> %d in %.1f ms", self.replica_id, spec.name, status, seconds * 1e3
            )

    async def _call(self, spec: HandlerSpec, request: Request) -> Response:
        self.require_ready()
        body = await read_body(request)
        payload = await payload_of(spec, request, body)
        argument = await anyio.to_thread.run_sync(validate_input, spec, payload)

        method = self._methods[spec.name]
        try:
            if spec.is_async:
                result = await method(argument)
            else:
                result = await anyio.to_thread.run_sync(method, argument)
        except AnycastError:
            raise
        except Exception as exc:
            log.exception("replica %s: handler %s raised", self.replica_id, spec.name)
            raise AnycastError(
                f"handler {spec.name} failed ({type(exc).__name__}); see the replica log",
                code="handler_error",
            ) from exc
        return JSONResponse(_output_json(spec, result))


def _output_json(spec: HandlerSpec, result: Any) -> Any:
    try:
        output = (
            result
            if isinstance(result, spec.output_model)
            else spec.output_model.model_validate(result)
        )
    except ValidationError as exc:
        log.error(
            "handler %s returned %r, not a %s: %s",
            spec.name,
            type(result),
            spec.output_model.__name__,
            exc,
        )
        raise AnycastError(
            f"handler {spec.name} returned something that is not a {spec.output_model.__name__}",
            code="bad_response",
        ) from exc
    return output.model_dump(mode="json")


class IdentityHeaders:
    """ASGI middleware: every HTTP response names the replica and artifact that served it."""

    def __init__(self, app: ASGIApp, replica_id: str, artifact_id: str) -> None:
        self.app = app
        self.headers = [
            (b"x-anycast-replica", replica_id.encode("latin-1")),
            (b"x-anycast-artifact", artifact_id.encode("latin-1")),
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_identity(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *self.headers]}
            await send(message)

        await self.app(scope, receive, send_with_identity)


def build_app(
    service_cls: type[Service],
    files_dir: Path,
    *,
    replica_id: str,
    artifact_id: str,
    files: Mapping[str, Path] | None = None,
    on_setup_failure: SetupFailureHook | None = None,
) -> FastAPI:
    """The replica's FastAPI app for ``service_cls``; setup() starts with the app.

    ``on_setup_failure(reason)`` is called (from the setup thread) if setup() raises.
    """
    for what, value in (("replica id", replica_id), ("artifact id", artifact_id)):
        if not _HEADER_VALUE.match(value):
            raise ConfigError(
                f"{what} must be 1-128 letters, digits, '.', '_', ':' or '-', got {value!r}"
            )
    if not handlers_of(service_cls):
        raise ConfigError(
            f"{service_cls.__name__} has no handlers; mark a method with @anycast.handler"
        )

    runtime = ReplicaRuntime(
        service_cls,
        Path(files_dir),
        replica_id=replica_id,
        artifact_id=artifact_id,
        files=files,
        on_setup_failure=on_setup_failure,
    )
    app = create_app(
        service_cls.__name__,
        version=__version__,
        description=f"Anycast replica {replica_id} serving artifact {artifact_id}.",
        lifespan=runtime.lifespan,
    )
    app.state.runtime = runtime
    app.add_middleware(IdentityHeaders, replica_id=replica_id, artifact_id=artifact_id)

    _add_probes(app, runtime)
    for spec in runtime.specs.values():
        _add_handler(app, runtime, spec)
    _add_unknown_handler(app, runtime)
    _document_input_models(app, runtime.specs)
    return app


def _add_probes(app: FastAPI, runtime: ReplicaRuntime) -> None:
    identity = {"replica": runtime.replica_id, "artifact": runtime.artifact_id}

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok", **identity}

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> JSONResponse:
        if runtime.state.ready:
            return JSONResponse({"status": "ready", **identity})
        code, message = runtime.state.describe()
        body = {
            "status": runtime.state.status,
            **identity,
            "error": {"code": code, "message": message},
        }
        return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(runtime.metrics.render(), media_type=runtime.metrics.content_type)


def _add_handler(app: FastAPI, runtime: ReplicaRuntime, spec: HandlerSpec) -> None:
    async def call_handler(request: Request) -> Response:
        return await runtime.call(spec, request)

    app.add_api_route(
        spec.path,
        call_handler,
        methods=["POST"],
        name=spec.name,
        summary=f"Call {spec.name}",
        description=_handler_description(spec),
        response_model=spec.output_model,
        responses=_ERROR_RESPONSES,
        openapi_extra={"requestBody": _request_body(spec)},
    )


def _add_unknown_handler(app: FastAPI, runtime: ReplicaRuntime) -> None:
    known = ", ".join(sorted(runtime.specs))

    @app.post("/v1/{name}", include_in_schema=False)
    async def unknown_handler(name: str) -> None:
        raise NotFound(
            f"no handler {name!r} in {runtime.service_cls.__name__}; handlers: {known}",
            code="unknown_handler",
        )


_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"description": 'Bad input: `{"error": {"code", "message"}}` says what is allowed.'},
    413: {"description": "Body or image too large."},
    415: {"description": "Unsupported content type."},
    503: {"description": "The replica is still loading (or failed to); retry after Retry-After."},
}


def _handler_description(spec: HandlerSpec) -> str:
    text = f"Takes a `{spec.input_model.__name__}` and returns a `{spec.output_model.__name__}`."
    if spec.image_field is not None:
        text += (
            f" The image can also be uploaded as multipart/form-data in an "
            f"`{MULTIPART_FILE_FIELD}` file field."
        )
    if not spec.idempotent:
        text += " Not idempotent: the gateway does not retry it."
    return text


def _request_body(spec: HandlerSpec) -> dict[str, Any]:
    json_schema = {"$ref": f"#/components/schemas/{spec.input_model.__name__}"}
    content: dict[str, Any] = {"application/json": {"schema": json_schema}}
    if spec.image_field is not None:
        upload = {"type": "string", "format": "binary"}
        content["multipart/form-data"] = {
            "schema": {
                "type": "object",
                "properties": {MULTIPART_FILE_FIELD: upload},
                "required": [MULTIPART_FILE_FIELD],
            }
        }
    return {"required": True, "content": content}


def _document_input_models(app: FastAPI, specs: Mapping[str, HandlerSpec]) -> None:
    """Add the request models to /openapi.json (the routes read their bodies themselves)."""
    default_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = default_openapi()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for spec in specs.values():
            model: type[BaseModel] = spec.input_model
            model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(model_schema.pop("$defs", {}))
            components.setdefault(model.__name__, model_schema)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
