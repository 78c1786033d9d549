"""The one place where Anycast's HTTP servers and clients are made.

Every role builds its FastAPI app with :func:`create_app` and runs it with :func:`serve`;
every call between roles goes through :func:`client` / :func:`async_client`. Transport
security and credentials are added here, once, for all of them.
"""

from __future__ import annotations

import errno
import importlib.util
import logging
import socket
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from anycast.core.errors import AnycastError, from_response

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


def error_response(status: int, code: str, message: str, **headers: str) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": code, "message": message}}, status_code=status, headers=headers
    )


def _describe_validation(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        if err.get("type") == "json_invalid":
            reason = (err.get("ctx") or {}).get("error", "decode error")
            parts.append(f"request body is not valid JSON: {reason}")
            continue
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "request body is invalid"


def _method_not_allowed(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """405 naming the methods the path takes, in the message and the Allow header."""
    allow = (exc.headers or {}).get("Allow", "")
    methods = ", ".join(m for m in allow.split(", ") if m != "HEAD") or allow
    message = f"{request.method} is not allowed on {request.url.path}"
    if methods:
        message += f"; it takes {methods}"
    headers = {"Allow": allow} if allow else {}
    return error_response(405, "method_not_allowed", message, **headers)


# FastAPI answers a bare "There was an error parsing the body" for JSON that nests too deeply.
_TOO_DEEP_FOR_PARSER = (
    "request body is not valid JSON for this server: its arrays or objects nest too deeply "
    "to parse; send a flatter document"
)


def anycast_error_response(exc: AnycastError) -> JSONResponse:
    """The JSON error body (and headers) a caller gets for one of our exceptions."""
    headers = {"Retry-After": "1"} if exc.status == 503 else {}
    if exc.status == 408:  # the rest of a stalled body is not waited for
        headers["Connection"] = "close"
    return JSONResponse(exc.to_dict(), status_code=exc.status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Answer every failure as a JSON error body; never leak a traceback to a caller."""

    @app.exception_handler(AnycastError)
    async def _anycast_error(request: Request, exc: AnycastError) -> JSONResponse:
        return anycast_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, "invalid_input", _describe_validation(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 405:
            return _method_not_allowed(request, exc)
        if exc.status_code == 400 and isinstance(exc.__cause__, RecursionError):
            return error_response(400, "invalid_input", _TOO_DEEP_FOR_PARSER)
        code = {404: "not_found"}.get(exc.status_code, "http_error")
        message = str(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        return error_response(exc.status_code, code, message)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal", "internal error; see the server log")


def create_app(title: str, **kwargs: Any) -> FastAPI:
    app = FastAPI(title=title, **kwargs)
    install_error_handlers(app)
    return app


def fast_io() -> dict[str, str]:
    """uvicorn's ``loop`` and ``http``: uvloop and httptools (C parsers) when installed."""
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    return {"loop": loop, "http": http}


def serve(app: Any, host: str = LOOPBACK, port: int = 0, *, graceful_seconds: float = 10) -> None:
    """Run ``app`` until SIGINT/SIGTERM; in-flight requests get ``graceful_seconds`` to end."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=int(graceful_seconds),
        timeout_keep_alive=30,
        **fast_io(),  # type: ignore[arg-type]
    )
    uvicorn.Server(config).run()


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that was free a moment ago (for tests and for new replicas)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_in_use(port: int, host: str = LOOPBACK) -> bool:
    """Whether another process already listens on ``host:port`` (bound as uvicorn binds)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def client(base_url: str = "", timeout: float = 10.0, **kwargs: Any) -> httpx.Client:
    return httpx.Client(base_url=base_url, timeout=timeout, **kwargs)


def async_client(
    base_url: str = "", timeout: float = 10.0, max_connections: int = 256, **kwargs: Any
) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=64)
    return httpx.AsyncClient(base_url=base_url, timeout=timeout, limits=limits, **kwargs)


def check(response: httpx.Response) -> Any:
    """Return the JSON body of a 2xx response, else raise the error the server sent."""
    try:
        body = response.json() if response.content else None
    except ValueError:
        body = response.text
    if response.is_success:
        return body
    raise from_response(response.status_code, body)
