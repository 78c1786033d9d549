"""The gateway's forward client: one call to one replica over pooled keep-alive connections.

This is the hot path of every routed call, so it uses aiohttp's client (a C response parser
and a per-replica pool whose cost does not grow with the number of open connections)
rather than the httpx client the gateway uses for probes and the control plane. Each
failure is reported as the :class:`~anycast.gateway.routing.Outcome` that routing needs:
whether anything reached the replica and whether a response byte came back decides
retries and ejections.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp
from yarl import URL

from anycast.gateway.routing import Outcome

CONNECT_TIMEOUT = 1.0  # a dead replica must fail fast so the call is retried elsewhere in time
KEEPALIVE_SECONDS = 15.0  # below the replicas' 30 s, so the gateway closes idle ones first
MAX_URLS = 4096  # cached parsed URLs (replica endpoint x handler) before starting over


@dataclass(frozen=True)
class Answer:
    """A replica's whole response."""

    status: int
    body: bytes
    headers: Mapping[str, str]  # case-insensitive


class Forwarder:
    """POSTs calls to replicas; :meth:`start` and :meth:`close` on the gateway's event loop."""

    def __init__(self, max_connections: int = 512) -> None:
        self.max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        self._urls: dict[str, URL] = {}
        self._connect_timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT)

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=self.max_connections, limit_per_host=0, keepalive_timeout=KEEPALIVE_SECONDS
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            # No made-up content type for a call without one, no client name.
            skip_auto_headers=("Content-Type", "User-Agent"),
            timeout=self._connect_timeout,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def post(
        self, url: str, body: bytes, headers: Mapping[str, str], timeout: float
    ) -> Answer | Outcome:
        """The replica's answer, or how the try failed; all of it within ``timeout`` seconds.

        A connection that cannot be made is CONNECT_FAILED (within at most
        :data:`CONNECT_TIMEOUT`); one lost before the status line is DROPPED; no status
        line in time is TIMEOUT; a body cut off or late is BROKEN.
        """
        assert self._session is not None, "Forwarder.start() was not awaited"
        response: aiohttp.ClientResponse | None = None
        whole = False
        try:
            async with asyncio.timeout(timeout):
                try:
                    response = await self._session.post(
                        self._url(url), data=body, headers=headers, timeout=self._timeout(timeout)
                    )
                except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError):
                    return Outcome.CONNECT_FAILED
                except aiohttp.ServerTimeoutError:
                    return Outcome.TIMEOUT
                except (aiohttp.ClientError, OSError):
                    return Outcome.DROPPED
                try:
                    content = await response.read()
                except (aiohttp.ClientError, OSError):
                    return Outcome.BROKEN
                whole = True
                return Answer(response.status, content, response.headers)
        except TimeoutError:
            return Outcome.TIMEOUT if response is None else Outcome.BROKEN
        finally:
            if response is not None and whole:
                response.release()  # back to the pool
            elif response is not None:
                response.close()  # never reuse a connection left mid-response

    def _url(self, url: str) -> URL:
        parsed = self._urls.get(url)
        if parsed is None:
            if len(self._urls) >= MAX_URLS:
                self._urls.clear()
            parsed = self._urls[url] = URL(url)
        return parsed

    def _timeout(self, timeout: float) -> aiohttp.ClientTimeout:
        if timeout >= CONNECT_TIMEOUT:
            return self._connect_timeout
        return aiohttp.ClientTimeout(total=None, sock_connect=timeout)
