"""The gateway's keep-alive pool against raw socket servers that answer, misbehave or vanish."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from anycast.core.http import LOOPBACK, free_port
from anycast.gateway.pool import Answer, ConnectionPool
from anycast.gateway.routing import Outcome

OK = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nx-anycast-replica: r1\r\n"
    b"content-length: 2\r\n\r\nok"
)
CHUNKED = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
CLOSE = b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok"


class RawServer:
    """Accepts connections; ``handle(conn, requests_read)`` answers each request it reads."""

    def __init__(self, handle: Callable[[socket.socket, int], bool]) -> None:
        self.handle = handle
        self.connections = 0
        self.sock = socket.socket()
        self.sock.bind((LOOPBACK, 0))
        self.sock.listen(64)
        self.url = f"http://{LOOPBACK}:{self.sock.getsockname()[1]}/v1/predict"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            served = 0
            while conn.recv(65536):
                served += 1
                if not self.handle(conn, served):
                    return

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def servers() -> Iterator[list[RawServer]]:
    made: list[RawServer] = []
    yield made
    for server in made:
        server.close()


def serve(servers: list[RawServer], handle: Callable[[socket.socket, int], bool]) -> RawServer:
    servers.append(RawServer(handle))
    return servers[-1]


def answer_with(reply: bytes) -> Callable[[socket.socket, int], bool]:
    def handle(conn: socket.socket, served: int) -> bool:
        conn.sendall(reply)
        return True

    return handle


async def _posts(url: str, count: int, timeout: float = 5.0) -> list[Answer | Outcome]:
    pool = ConnectionPool()
    await pool.start()
    try:
        headers = {"content-type": "application/json"}
        return [await pool.post(url, b"{}", headers, timeout) for _ in range(count)]
    finally:
        await pool.close()


def posts(url: str, count: int = 1, timeout: float = 5.0) -> list[Answer | Outcome]:
    return asyncio.run(_posts(url, count, timeout))


def test_sequential_calls_share_one_connection_and_get_whole_answers(
    servers: list[RawServer],
) -> None:
    server = serve(servers, answer_with(OK))

    answers = posts(server.url, 5)

    assert all(isinstance(a, Answer) and a.status == 200 and a.body == b"ok" for a in answers)
    first = answers[0]
    assert isinstance(first, Answer)
    assert first.headers["x-anycast-replica"] == "r1"
    assert first.headers["content-type"] == "text/plain"
    assert server.connections == 1


def test_chunked_answers_are_joined(servers: list[RawServer]) -> None:
    server = serve(servers, answer_with(CHUNKED))

    answers = posts(server.url, 2)

    assert [a.body for a in answers if isinstance(a, Answer)] == [b"abcde", b"abcde"]


def test_a_replica_closing_after_each_answer_gets_a_new_connection_per_call(
    servers: list[RawServer],
) -> None:
    def close_after(conn: socket.socket, served: int) -> bool:
        conn.sendall(CLOSE)
        return False

    server = serve(servers, close_after)

    answers = posts(server.url, 3)

    assert all(isinstance(a, Answer) and a.body == b"ok" for a in answers)
    assert server.connections == 3


def test_a_connection_the_replica_closed_while_idle_is_not_reused(
    servers: list[RawServer],
) -> None:
    def one_per_connection(conn: socket.socket, served: int) -> bool:
        conn.sendall(OK)
        return False  # keep-alive promised, yet closed at once (an idle timeout)

    server = serve(servers, one_per_connection)

    async def spaced() -> list[Answer | Outcome]:
        pool = ConnectionPool()
        out = []
        for _ in range(3):
            out.append(await pool.post(server.url, b"{}", {}, 5.0))
            await asyncio.sleep(0.2)  # the close reaches the pool
        await pool.close()
        return out

    answers = asyncio.run(spaced())

    assert all(isinstance(a, Answer) and a.status == 200 for a in answers)


def test_failures_are_told_apart(servers: list[RawServer]) -> None:
    def drop(conn: socket.socket, served: int) -> bool:
        return False

    def cut_body(conn: socket.socket, served: int) -> bool:
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial")
        return False

    def stall_body(conn: socket.socket, served: int) -> bool:
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial")
        time.sleep(3)
        return False

    def silent(conn: socket.socket, served: int) -> bool:
        time.sleep(3)
        return False

    def garbage(conn: socket.socket, served: int) -> bool:
        conn.sendall(b"this is not http\r\n\r\n")
        return True

    refused = f"http://{LOOPBACK}:{free_port()}/v1/predict"

    assert posts(refused) == [Outcome.CONNECT_FAILED]
    assert posts(serve(servers, drop).url) == [Outcome.DROPPED]
    assert posts(serve(servers, garbage).url) == [Outcome.DROPPED]
    assert posts(serve(servers, cut_body).url) == [Outcome.BROKEN]
    assert posts(serve(servers, stall_body).url, timeout=0.5) == [Outcome.BROKEN]
    assert posts(serve(servers, silent).url, timeout=0.5) == [Outcome.TIMEOUT]


def test_many_concurrent_calls_each_get_their_own_answer(servers: list[RawServer]) -> None:
    def echo_count(conn: socket.socket, served: int) -> bool:
        body = str(served).encode()
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        return True

    server = serve(servers, echo_count)

    async def burst() -> list[Answer | Outcome]:
        pool = ConnectionPool()
        calls = [pool.post(server.url, b"{}", {}, 5.0) for _ in range(40)]
        out = await asyncio.gather(*calls)
        out += await asyncio.gather(*(pool.post(server.url, b"{}", {}, 5.0) for _ in range(40)))
        await pool.close()
        return list(out)

    answers = asyncio.run(burst())

    assert all(isinstance(a, Answer) and a.status == 200 for a in answers)
    assert server.connections <= 40  # the second burst reused the first one's connections
