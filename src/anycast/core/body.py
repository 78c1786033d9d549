"""Reading a request body whole: a size limit, a timeout on a stalled body, hang-ups as errors.

The replica and the gateway both read bodies this way, so a caller that goes away part way
is one log line and a 499 (not a traceback), and one that goes silent part way gets a 408
after ``ANYCAST_BODY_TIMEOUT_S`` seconds instead of holding its connection forever.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable

from starlette.requests import ClientDisconnect, Request

from anycast.core.errors import BodyTimeout, ClientClosed, PayloadTooLarge

log = logging.getLogger(__name__)

BODY_TIMEOUT_ENV = "ANYCAST_BODY_TIMEOUT_S"
DEFAULT_BODY_TIMEOUT_S = 30.0


def body_timeout() -> float:
    """Seconds a body may stall between two chunks: ``$ANYCAST_BODY_TIMEOUT_S``, else 30."""
    raw = os.environ.get(BODY_TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_BODY_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if value > 0:
        return value
    log.warning(
        "%s must be a positive number of seconds, got %r; using %g",
        BODY_TIMEOUT_ENV,
        raw,
        DEFAULT_BODY_TIMEOUT_S,
    )
    return DEFAULT_BODY_TIMEOUT_S


async def read_body(
    request: Request, limit: int, too_large: Callable[[int], str], timeout: float | None = None
) -> bytes:
    """The whole body; 413 (``too_large(size)``) as soon as it is known to exceed ``limit``.

    Raises BodyTimeout if no byte arrives for ``timeout`` seconds (default
    :func:`body_timeout`) and ClientClosed if the caller hangs up before the body ends.
    """
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(too_large(int(declared)))
    timeout = body_timeout() if timeout is None else timeout

    # On the hot path of every replica and gateway call: the ASGI messages are read straight
    # from ``receive`` (no request stream under anyio cancel scopes), under one timer moved on
    # at every chunk (not a timeout scope per chunk); most bodies arrive in one message anyway.
    loop = asyncio.get_running_loop()
    receive = request.receive
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout) as timer:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ClientDisconnect()
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(too_large(size))
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return chunks[0] if len(chunks) == 1 else b"".join(chunks)
                timer.reschedule(loop.time() + timeout)
    except ClientDisconnect:
        log.info(
            "caller of %s closed the connection after %d of %s body bytes",
            request.url.path,
            size,
            declared or "?",
        )
        raise ClientClosed(f"the caller closed the connection after {size} body bytes") from None
    except TimeoutError:
        log.info("body of a call to %s stalled for %g s; answered 408", request.url.path, timeout)
        raise BodyTimeout(
            f"the request body stalled: no byte for {timeout:g} s after {size} of "
            f"{declared or 'unknown'} bytes; send the whole body without pausing"
        ) from None
