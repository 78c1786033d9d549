"""A lean HTTP/1.1 keep-alive pool for the gateway's forwarded calls.

Per replica (host, port) a stack of idle connections, each an asyncio protocol feeding
httptools' response parser: taking a connection and giving it back are O(1), whatever the
number of open connections, and a call costs one write and the reads of its answer.

Limitation: plain HTTP only (replicas listen on their region's private network), and a
response without Content-Length or chunked framing (ended by closing) counts as broken.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

import httptools

from anycast.gateway.routing import Outcome

CONNECT_TIMEOUT = 1.0  # a dead replica must fail fast so the call is retried elsewhere in time
IDLE_SECONDS = 4.0  # below uvicorn's default keep-alive of 5 s: never reuse what a server closes
MAX_IDLE_PER_REPLICA = 256
MAX_BUSY = 512  # calls in flight at once over all replicas; more wait (within their timeout)


@dataclass(frozen=True)
class Answer:
    """A replica's whole response."""

    status: int
    body: bytes
    headers: Mapping[str, str]  # names lowercased


@dataclass(frozen=True)
class _Target:
    host: str
    port: int
    path: bytes
    host_header: bytes


class _Lost(Exception):
    """The connection closed, or the answer was not HTTP, before the answer was whole."""


class _Connection(asyncio.Protocol):
    """One keep-alive connection; one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self.answered = False  # the status line and headers of the current answer came back
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[None] | None = None
        self._headers: dict[str, str] = {}
        self._chunks: list[bytes] = []
        self._status = 0
        self._keep_alive = False

    async def exchange(self, request: list[bytes]) -> Answer:
        """Send one request and wait for its whole answer; raises _Lost."""
        assert self.transport is not None
        self.answered, self._headers, self._chunks = False, {}, []
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.writelines(request)
        await self._waiter
        body = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        return Answer(self._status, body, self._headers)

    @property
    def reusable(self) -> bool:
        return self._keep_alive and not self.closed

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass of it

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self._fail()
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail()

    # -- httptools callbacks -------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self._status = self._parser.get_status_code()
        self.answered = True

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)

    def on_message_complete(self) -> None:
        self._keep_alive = self._parser.should_keep_alive()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _fail(self) -> None:
        self._keep_alive = False
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(_Lost())


class ConnectionPool:
    """POSTs calls to replicas over reused connections; used on one event loop."""

    def __init__(
        self, max_idle_per_replica: int = MAX_IDLE_PER_REPLICA, max_busy: int = MAX_BUSY
    ) -> None:
        self.max_idle = max_idle_per_replica
        self._slots = asyncio.Semaphore(max_busy)
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self._targets: dict[str, _Target] = {}

    async def start(self) -> None:
        """Nothing to set up: connections are opened as calls need them."""

    async def close(self) -> None:
        for stack in self._idle.values():
            for conn in stack:
                conn.close()
        self._idle.clear()

    async def post(
        self, url: str, body: bytes, headers: Mapping[str, str], timeout: float
    ) -> Answer | Outcome:
        """The replica's answer, or how the try failed; all of it within ``timeout`` seconds.

        A connection that cannot be made is CONNECT_FAILED (within at most
        :data:`CONNECT_TIMEOUT`); one lost before the status line is DROPPED; no status
        line in time is TIMEOUT; a body cut off or late is BROKEN.
        """
        target = self._target(url)
        conn: _Connection | None = None
        try:
            async with asyncio.timeout(timeout), self._slots:
                conn = await self._take(target, timeout)
                if conn is None:
                    return Outcome.CONNECT_FAILED
                answer = await conn.exchange(_request(target, body, headers))
        except TimeoutError:
            if conn is None:
                return Outcome.TIMEOUT
            conn.close()
            return Outcome.BROKEN if conn.answered else Outcome.TIMEOUT
        except _Lost:
            assert conn is not None
            conn.close()
            return Outcome.BROKEN if conn.answered else Outcome.DROPPED
        except BaseException:  # cancelled: the connection is mid-request, never reuse it
            if conn is not None:
                conn.close()
            raise
        self._give_back(target, conn)
        return answer

    async def _take(self, target: _Target, timeout: float) -> _Connection | None:
        """An idle connection that is still open, else a new one; None if none can be made."""
        stack = self._idle.get((target.host, target.port))
        now = time.monotonic()
        while stack:
            conn = stack.pop()
            if not conn.closed and now - conn.idle_since < IDLE_SECONDS:
                return conn
            conn.close()
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(min(timeout, CONNECT_TIMEOUT)):
                _, conn = await loop.create_connection(_Connection, target.host, target.port)
        except (OSError, TimeoutError):
            return None
        return conn

    def _give_back(self, target: _Target, conn: _Connection) -> None:
        if not conn.reusable:
            conn.close()
            return
        stack = self._idle.setdefault((target.host, target.port), [])
        if len(stack) >= self.max_idle:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        stack.append(conn)

    def _target(self, url: str) -> _Target:
        target = self._targets.get(url)
        if target is None:
            if len(self._targets) >= 4096:
                self._targets.clear()
            parts = urlsplit(url)
            host, port = parts.hostname or "127.0.0.1", parts.port or 80
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            netloc = host if port == 80 else f"{host}:{port}"
            target = _Target(host, port, path.encode(), netloc.encode())
            self._targets[url] = target
        return target


def _request(target: _Target, body: bytes, headers: Mapping[str, str]) -> list[bytes]:
    """Request line, headers and body; values come from a parsed request, so hold no CR/LF."""
    lines = [b"POST ", target.path, b" HTTP/1.1\r\nhost: ", target.host_header]
    lines.append(b"\r\ncontent-length: %d\r\n" % len(body))
    for name, value in headers.items():
        lines.append(f"{name}: {value}\r\n".encode("latin-1"))
    lines.append(b"\r\n")
    head = b"".join(lines)
    if len(body) < 65536:
        return [head + body]
    return [head, body]
