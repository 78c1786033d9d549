"""The replica's HTTP app: probes, metrics, and ``POST /v1/{handler}`` for each handler.

``setup()`` runs in a background thread from startup, so ``/healthz`` answers while the
model loads and ``/readyz`` says 503 (loading / failed, with the reason) until it is done.
Batched handlers go through a :class:`~anycast.replica.batching.Batcher`; sync handlers run
in threads of their own (``ANYCAST_HANDLER_THREADS``, default 1) under
``torch.inference_mode()`` when torch is loaded. Once draining
(SIGTERM, see :mod:`anycast.replica.drain`) ``/readyz`` and new calls answer 503.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar, cast

import anyio.to_thread
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, TypeAdapter, ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from anycast import __version__
from anycast.core.body import body_timeout
from anycast.core.errors import AnycastError, ConfigError, InvalidInput, NotFound, Unavailable
from anycast.core.http import create_app
from anycast.replica.batching import Batcher
from anycast.replica.drain import Drainer
from anycast.replica.inputs import (
    MULTIPART_FILE_FIELD,
    Payload,
    payload_of,
    read_body,
    validate_input,
    validate_rows,
)
from anycast.replica.metrics import ReplicaMetrics
from anycast.sdk import HandlerSpec, Service, handlers_of

log = logging.getLogger(__name__)

T = TypeVar("T")

_HEADER_VALUE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
DEADLINE_HEADER = "X-Anycast-Deadline-Ms"
TIMEOUT_HEADER = "X-Anycast-Timeout-Ms"  # what gateway callers send; same meaning here
MAX_DEADLINE_MS = 600_000
_BUDGET_HEADERS = {name.lower().encode(): name for name in (DEADLINE_HEADER, TIMEOUT_HEADER)}
CLIENT_GONE = 499  # nginx's "client closed request": the status nobody receives
INLINE_VALIDATION_BYTES = 32 * 1024  # bodies up to this are validated on the event loop
HANDLER_THREADS_ENV = "ANYCAST_HANDLER_THREADS"
MAX_HANDLER_THREADS = 64

SetupFailureHook = Callable[[str], None]
ErrorRenderer = Callable[[Request, Exception], Awaitable[Response]]
Headers = list[tuple[bytes, bytes]]


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
        drain_seconds: float | None = None,
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
        self.drain_seconds = drain_seconds
        self.draining = False
        self.active = 0  # handler calls received and not yet answered
        self.last_call_at = time.monotonic()  # when the latest handler call arrived
        self.batchers: dict[str, Batcher] = {}
        self.methods: dict[str, Callable[[Any], Any]] = {}
        self.identity_headers: Headers = [
            (b"x-anycast-replica", replica_id.encode("latin-1")),
            (b"x-anycast-artifact", artifact_id.encode("latin-1")),
        ]
        self.body_timeout = body_timeout()  # read once, not per call
        self.handler_threads = handler_threads()
        self.metrics.in_flight.set_function(self.holding)
        self._model_threads: dict[str, ThreadPoolExecutor] = {}

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

        self.methods = {name: getattr(service, spec.method) for name, spec in self.specs.items()}
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
        self.batchers = {
            name: self._batcher(spec) for name, spec in self.specs.items() if spec.batched
        }
        for name, spec in self.specs.items():
            if not (spec.batched or spec.is_async):
                self._model_threads[name] = ThreadPoolExecutor(
                    self.handler_threads, thread_name_prefix=f"anycast-handler-{name}"
                )
        drainer = Drainer(self, self.drain_seconds) if self.drain_seconds is not None else None
        if drainer is not None and not drainer.install():
            log.warning("replica %s: no SIGTERM handler to drain in front of", self.replica_id)
        threading.Thread(target=self.run_setup, name="anycast-setup", daemon=True).start()
        try:
            yield
        finally:
            if drainer is not None:
                drainer.uninstall()
            for batcher in self.batchers.values():
                await batcher.close()
            for thread in self._model_threads.values():
                thread.shutdown(wait=False)
            self._model_threads.clear()

    def _batcher(self, spec: HandlerSpec) -> Batcher:
        # The model calls of one batched handler run one after another in a thread of its
        # own: no thread pool to pick from, and torch sees the same thread every time.
        thread = ThreadPoolExecutor(1, thread_name_prefix=f"anycast-batch-{spec.name}")
        self._model_threads[spec.name] = thread

        async def run(rows: list[Any]) -> list[Any]:
            method = self.methods[spec.name]
            if spec.is_async:
                return list(await method(rows))
            loop = asyncio.get_running_loop()
            return list(await loop.run_in_executor(thread, _run_sync, method, rows))

        return Batcher(
            spec.name,
            run,
            max_batch_size=spec.max_batch_size or 1,
            max_wait_ms=spec.max_wait_ms,
            adaptive=spec.adaptive,
            isolate_failures=spec.idempotent,  # isolating runs some rows twice
            metrics=self.metrics,
        )

    def begin_drain(self, grace_seconds: float) -> None:
        """Leave rotation (``/readyz`` answers 503) while still serving calls that arrive."""
        self.draining = True
        self.metrics.draining.set(1)
        log.info(
            "replica %s draining: out of rotation, %d calls held, stopping within %.1f s",
            self.replica_id,
            self.active,
            grace_seconds,
        )

    def holding(self) -> int:
        """Calls received and not yet answered (waiting for a batch or running)."""
        return self.active

    def idle_seconds(self) -> float:
        """Seconds since the latest handler call arrived."""
        return time.monotonic() - self.last_call_at

    def require_ready(self) -> None:
        if self.state.ready:
            return
        code, message = self.state.describe()
        raise Unavailable(f"replica {self.replica_id} is not ready: {message}", code=code)

    def handler_thread(self, spec: HandlerSpec) -> ThreadPoolExecutor:
        """The threads a sync handler's calls run in; 503 before the replica serves."""
        thread = self._model_threads.get(spec.name)
        if thread is None:
            raise Unavailable(f"replica {self.replica_id} is not serving yet", code="loading")
        return thread

    def handler_error(self, spec: HandlerSpec, exc: Exception) -> AnycastError:
        log.error("replica %s: handler %s raised", self.replica_id, spec.name, exc_info=exc)
        return AnycastError(
            f"handler {spec.name} failed ({type(exc).__name__}); see the replica log",
            code="handler_error",
        )


def handler_threads(environ: Mapping[str, str] = os.environ) -> int:
    """Threads per sync handler, from env ANYCAST_HANDLER_THREADS (default 1)."""
    raw = environ.get(HANDLER_THREADS_ENV, "1")
    text = raw.strip()
    if not (text.isdigit() and 1 <= int(text) <= MAX_HANDLER_THREADS):
        raise ConfigError(
            f"{HANDLER_THREADS_ENV} must be a whole number from 1 to {MAX_HANDLER_THREADS}, "
            f"got {raw!r}"
        )
    return int(text)


def _run_sync(method: Callable[[Any], T], argument: Any) -> T:
    """Run a sync handler; under torch.inference_mode (no autograd records) if torch is used."""
    torch = sys.modules.get("torch")
    if torch is None:
        return method(argument)
    with torch.inference_mode():
        return method(argument)


def _deadline(spec: HandlerSpec, request: Request) -> float | None:
    """Monotonic time by which a batched call must be answered: the tightest of the handler's
    ``timeout_ms`` and the caller's ``X-Anycast-Deadline-Ms`` / ``X-Anycast-Timeout-Ms``."""
    budgets = [spec.timeout_ms] if spec.timeout_ms is not None else []
    for name, value in request.scope["headers"]:  # one pass; most calls send neither header
        header = _BUDGET_HEADERS.get(name)
        if header is None:
            continue
        raw = value.decode("latin-1")
        text = raw.strip()
        if not (text.isdigit() and 1 <= int(text) <= MAX_DEADLINE_MS):
            raise InvalidInput(
                f"{header} must be a whole number of milliseconds from 1 to "
                f"{MAX_DEADLINE_MS}, got {raw!r}",
                code="invalid_deadline",
            )
        budgets.append(int(text))
    return time.monotonic() + min(budgets) / 1000 if budgets else None


class HandlerEndpoint:
    """``POST /v1/<name>`` of one handler, as a bare ASGI app.

    It is the app of the handler's documented route, in place of FastAPI's request handling
    (dependencies, body parsing, response validation), and :class:`HandlerFastPath` calls it
    directly in a replica process. What does not change from call to call (metric
    children, response headers, encoders) is made once, here. A call takes at most one
    thread hop: a sync handler validates, runs and encodes in its handler thread; a batched
    call validates a small body on the event loop (cheaper than a hop) and its model call
    runs in the handler's own model thread.
    """

    def __init__(
        self, runtime: ReplicaRuntime, spec: HandlerSpec, handlers: Mapping[Any, Any]
    ) -> None:
        self.runtime = runtime
        self.spec = spec
        # The app's own error handlers (anycast.core.http), both async: JSON error bodies.
        self.render_error = cast(ErrorRenderer, handlers[AnycastError])
        self.render_bug = cast(ErrorRenderer, handlers[Exception])
        self.latency = runtime.metrics.latency.labels(spec.name)
        self.counts: dict[int, Any] = {}  # status -> its requests_total child
        self.headers: Headers = [(b"content-type", b"application/json")]
        self.direct_headers = [*self.headers, *runtime.identity_headers]
        self.one: TypeAdapter[Any] = TypeAdapter(spec.output_model)
        self.many = _list_adapter(spec.output_model)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """As the app of the documented route (IdentityHeaders adds the replica's headers)."""
        await self.serve(scope, receive, send, direct=False)

    async def serve(self, scope: Scope, receive: Receive, send: Send, *, direct: bool) -> None:
        """Answer one call, counting it in the metrics whatever its outcome; ``direct``: called
        by :class:`HandlerFastPath`, past IdentityHeaders, so the answer names the replica."""
        started = time.perf_counter()
        request = Request(scope, receive)
        runtime = self.runtime
        runtime.active += 1
        runtime.last_call_at = time.monotonic()
        try:
            status, body = await self.answer(request)
        except Exception as exc:  # answered as the app's error handlers answer it
            status = exc.status if isinstance(exc, AnycastError) else 500
            render = self.render_error if isinstance(exc, AnycastError) else self.render_bug
            response = await render(request, exc)
            identity = self.runtime.identity_headers if direct else []
            await response(scope, receive, _adding(send, identity))
            return
        except BaseException:
            status = 500
            raise
        else:
            headers = [
                *(self.direct_headers if direct else self.headers),
                (b"content-length", str(len(body)).encode()),
            ]
            start = {"type": "http.response.start", "status": status, "headers": headers}
            await send(start)
            await send({"type": "http.response.body", "body": body})
        finally:
            runtime.active -= 1
            self.observe(status, time.perf_counter() - started)

    def observe(self, status: int, seconds: float) -> None:
        counter = self.counts.get(status)
        if counter is None:
            counter = self.counts[status] = self.runtime.metrics.requests.labels(
                self.spec.name, str(status)
            )
        counter.inc()
        self.latency.observe(seconds)
        log.debug(
            "replica %s: %s -> %d in %.1f ms",
            self.runtime.replica_id,
            self.spec.name,
            status,
            seconds * 1e3,
        )

    async def answer(self, request: Request) -> tuple[int, bytes]:
        """(status, JSON body) of one call; raises AnycastError for the error answers."""
        spec = self.spec
        self.runtime.require_ready()
        deadline = _deadline(spec, request) if spec.batched else None
        body = await read_body(request, timeout=self.runtime.body_timeout)
        payload = await payload_of(spec, request, body)
        if spec.batched:
            return await self.batched(request, payload, deadline)
        if spec.is_async:
            return 200, await self.run_async(payload)
        thread = self.runtime.handler_thread(spec)
        return 200, await asyncio.get_running_loop().run_in_executor(thread, self.run_sync, payload)

    def run_sync(self, payload: Payload) -> bytes:
        """Validate, run and encode one call of a sync handler (in its handler thread)."""
        argument = validate_input(self.spec, payload)
        try:
            result = _run_sync(self.runtime.methods[self.spec.name], argument)
        except AnycastError:
            raise
        except Exception as exc:
            raise self.runtime.handler_error(self.spec, exc) from exc
        return self.encode_one(result)

    async def run_async(self, payload: Payload) -> bytes:
        argument = await _off_loop_if_large(payload, validate_input, self.spec, payload)
        try:
            result = await self.runtime.methods[self.spec.name](argument)
        except AnycastError:
            raise
        except Exception as exc:
            raise self.runtime.handler_error(self.spec, exc) from exc
        return self.encode_one(result)

    async def batched(
        self, request: Request, payload: Payload, deadline: float | None
    ) -> tuple[int, bytes]:
        """Validate this call's rows, queue them for a batch, answer with their results."""
        spec = self.spec
        rows, many = await _off_loop_if_large(payload, validate_rows, spec, payload)
        batcher = self.runtime.batchers.get(spec.name)
        if batcher is None:
            raise Unavailable(
                f"replica {self.runtime.replica_id} is not serving yet", code="loading"
            )
        try:
            results = await _unless_disconnected(request, batcher.enqueue(rows, deadline))
        except AnycastError:
            raise
        except Exception as exc:
            raise self.runtime.handler_error(spec, exc) from exc
        if results is None:
            log.debug("replica %s: caller of %s hung up", self.runtime.replica_id, spec.name)
            return CLIENT_GONE, b""
        if many:
            return 200, self.many.dump_json([self.output(result) for result in results])
        return 200, self.encode_one(results[0])

    def encode_one(self, result: Any) -> bytes:
        return self.one.dump_json(self.output(result))

    def output(self, result: Any) -> BaseModel:
        """The handler's result as its output model, or AnycastError (500) if it is not one."""
        model = self.spec.output_model
        if isinstance(result, model):
            return result
        try:
            return model.model_validate(result)
        except ValidationError as exc:
            log.error(
                "handler %s returned %r, not a %s: %s",
                self.spec.name,
                type(result),
                model.__name__,
                exc,
            )
            raise AnycastError(
                f"handler {self.spec.name} returned something that is not a {model.__name__}",
                code="bad_response",
            ) from exc


def _list_adapter(model: type[BaseModel]) -> TypeAdapter[list[Any]]:
    return TypeAdapter(list[model])  # type: ignore[valid-type]


async def _off_loop_if_large(payload: Payload, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` on the event loop for a small body (a thread hop costs more than
    validating it), in a worker thread for a large one."""
    # Limitation: a small PNG of many pixels (up to the 4096x4096 limit) decodes on the loop.
    if isinstance(payload, bytes) and len(payload) <= INLINE_VALIDATION_BYTES:
        return fn(*args)
    return await anyio.to_thread.run_sync(fn, *args)


async def _unless_disconnected(request: Request, future: asyncio.Future[T]) -> T | None:
    """The result of ``future``, or None (and ``future`` cancelled) if the caller hangs up."""
    watcher = asyncio.ensure_future(_cancel_on_disconnect(request, future))
    try:
        return await future
    except asyncio.CancelledError:
        if watcher.done() and not watcher.cancelled():
            return None  # the watcher saw the caller go and withdrew the call
        raise
    finally:
        watcher.cancel()


async def _cancel_on_disconnect(request: Request, future: asyncio.Future[Any]) -> None:
    await _disconnect(request)
    future.cancel()


async def _disconnect(request: Request) -> None:
    """Returns when the caller disconnects (the body was read, so nothing else can arrive)."""
    try:
        while (await request.receive())["type"] != "http.disconnect":
            pass
    except Exception:  # a server that cannot tell: never report a disconnect then
        log.debug("cannot watch for a disconnect", exc_info=True)
        await asyncio.Event().wait()


def _adding(send: Send, headers: Headers) -> Send:
    """``send`` with ``headers`` added to the response start."""
    if not headers:
        return send

    async def send_with(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), *headers]}
        await send(message)

    return send_with


class IdentityHeaders:
    """ASGI middleware: every HTTP response names the replica and artifact that served it."""

    def __init__(self, app: ASGIApp, identity: Headers) -> None:
        self.app = app
        self.identity = identity

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.app(scope, receive, _adding(send, self.identity))


class HandlerFastPath:
    """The replica app as its server runs it: handler calls (``POST /v1/<name>``) go straight
    to their :class:`HandlerEndpoint`, past FastAPI's app, middleware and router (a few
    percent of a call's CPU); everything else (probes, metrics, docs, lifespan) to the app."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.endpoints: Mapping[str, HandlerEndpoint] = app.state.endpoints

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            endpoint = self.endpoints.get(scope["path"])
            if endpoint is not None:
                await endpoint.serve(scope, receive, send, direct=True)
                return
        await self.app(scope, receive, send)


def build_app(
    service_cls: type[Service],
    files_dir: Path,
    *,
    replica_id: str,
    artifact_id: str,
    files: Mapping[str, Path] | None = None,
    on_setup_failure: SetupFailureHook | None = None,
    drain_seconds: float | None = None,
) -> FastAPI:
    """The replica's FastAPI app for ``service_cls``; setup() starts with the app.

    ``on_setup_failure(reason)`` is called (from the setup thread) if setup() raises.
    With ``drain_seconds``, SIGTERM drains the replica first (only where the app runs in
    the main thread under a server that handles SIGTERM, as :func:`anycast.core.http.serve`).
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
        drain_seconds=drain_seconds,
    )
    app = create_app(
        service_cls.__name__,
        version=__version__,
        description=f"Anycast replica {replica_id} serving artifact {artifact_id}.",
        lifespan=runtime.lifespan,
    )
    app.state.runtime = runtime
    endpoints = {
        spec.path: HandlerEndpoint(runtime, spec, app.exception_handlers)
        for spec in runtime.specs.values()
    }
    app.state.endpoints = endpoints
    app.add_middleware(IdentityHeaders, identity=runtime.identity_headers)

    _add_probes(app, runtime)
    for endpoint in endpoints.values():
        _add_handler(app, endpoint)
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
        if runtime.draining:
            status = "draining"
            code = "draining"
            message = f"draining before it stops; {runtime.holding()} calls still being served"
        elif runtime.state.ready:
            return JSONResponse({"status": "ready", **identity})
        else:
            status = runtime.state.status
            code, message = runtime.state.describe()
        body = {"status": status, **identity, "error": {"code": code, "message": message}}
        return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(runtime.metrics.render(), media_type=runtime.metrics.content_type)


def _add_handler(app: FastAPI, endpoint: HandlerEndpoint) -> None:
    """The handler's documented route; its calls are served by ``endpoint`` as they come."""
    spec = endpoint.spec

    async def documented(request: Request) -> Response:  # never called: see route.app below
        raise NotFound(f"no route POST {request.url.path}")

    app.add_api_route(
        spec.path,
        documented,
        methods=["POST"],
        name=spec.name,
        summary=f"Call {spec.name}",
        description=_handler_description(spec),
        response_model=spec.output_model,
        responses=_ERROR_RESPONSES,
        openapi_extra={"requestBody": _request_body(spec), "x-anycast": _options(spec)},
    )
    route = app.router.routes[-1]
    assert isinstance(route, APIRoute) and route.path == spec.path
    route.app = endpoint  # FastAPI's request handling replaced by the endpoint's own


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
    503: {
        "description": (
            "The replica is loading, failed to, is draining, or (batched handlers) cannot meet "
            "the call's deadline; retry after Retry-After, or on another replica."
        )
    },
}


def _options(spec: HandlerSpec) -> dict[str, Any]:
    """The handler's options, for the gateway and other tools reading /openapi.json."""
    options: dict[str, Any] = {
        "idempotent": spec.idempotent,
        "deterministic": spec.deterministic,
    }
    if spec.batched:
        options["max_batch_size"] = spec.max_batch_size
        options["max_wait_ms"] = "auto" if spec.adaptive else spec.max_wait_ms
    if spec.timeout_ms is not None:
        options["timeout_ms"] = spec.timeout_ms
    return options


def _handler_description(spec: HandlerSpec) -> str:
    text = f"Takes a `{spec.input_model.__name__}` and returns a `{spec.output_model.__name__}`."
    if spec.image_field is not None:
        text += (
            f" The image can also be uploaded as multipart/form-data in an "
            f"`{MULTIPART_FILE_FIELD}` file field."
        )
    if spec.batched:
        text += (
            f" Batched: the body may also be a JSON array of 1 to {spec.max_batch_size} "
            f"`{spec.input_model.__name__}` objects, answered by an array of as many "
            f"`{spec.output_model.__name__}` in the same order. Concurrent calls share model "
            f"calls; a call may say how long it can wait with the `{DEADLINE_HEADER}` header "
            "and gets 503 when it cannot be served in time."
        )
    if not spec.idempotent:
        text += " Not idempotent: the gateway does not retry it."
    return text


def _request_body(spec: HandlerSpec) -> dict[str, Any]:
    json_schema: dict[str, Any] = {"$ref": f"#/components/schemas/{spec.input_model.__name__}"}
    if spec.batched:
        rows = {"type": "array", "items": json_schema, "minItems": 1}
        json_schema = {"oneOf": [json_schema, {**rows, "maxItems": spec.max_batch_size}]}
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
