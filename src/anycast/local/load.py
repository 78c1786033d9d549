"""Send many prediction calls through the gateway at once and summarise what happened.

Used by ``anycast demo`` and by the load and fault tests: every call records the caller's
region, who served it, how long it took and what it answered.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import httpx

from anycast.core.http import async_client


@dataclass(frozen=True)
class CallResult:
    index: int
    caller_region: str
    status: int
    served_region: str | None
    replica: str | None
    latency_ms: float
    answer: dict | None = None
    error: str | None = None
    finished_at: float = 0.0  # time.monotonic() when the answer (or the error) arrived

    @property
    def ok(self) -> bool:
        return self.status == 200


@dataclass
class LoadReport:
    calls: list[CallResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> int:
        return sum(1 for c in self.calls if not c.ok)

    def served_by_region(self) -> dict[str, int]:
        return dict(Counter(c.served_region for c in self.calls if c.ok and c.served_region))

    def latency_ms(self, caller_region: str | None = None) -> dict[str, float]:
        values = sorted(
            c.latency_ms
            for c in self.calls
            if c.ok and (caller_region is None or c.caller_region == caller_region)
        )
        return {"p50_ms": percentile(values, 50), "p99_ms": percentile(values, 99)}

    def accuracy(self, labels: Sequence[int], key: str = "digit") -> float:
        answered = [c for c in self.calls if c.ok and c.answer is not None]
        if not answered:
            return 0.0
        right = [c for c in answered if c.answer and c.answer.get(key) == int(labels[c.index])]
        return len(right) / len(self.calls)

    def errors(self) -> dict[str, int]:
        return dict(Counter(c.error or str(c.status) for c in self.calls if not c.ok))

    def max_gap_ms(self, start: float, end: float) -> float:
        """The longest stretch of ``[start, end]`` (monotonic seconds) with no call answered OK."""
        times = sorted(c.finished_at for c in self.calls if c.ok)
        edges = [start, *times, end]
        return round(max(b - a for a, b in itertools.pairwise(edges)) * 1000, 1)


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of an ascending sequence (0.0 when empty)."""
    if not sorted_values:
        return 0.0
    rank = max(0, min(len(sorted_values) - 1, math.ceil(pct / 100 * len(sorted_values)) - 1))
    return round(float(sorted_values[rank]), 2)


def image_payload(png: bytes) -> bytes:
    """The JSON body of a predict call carrying one PNG."""
    return json.dumps({"image": base64.b64encode(png).decode()}).encode()


async def _one_call(
    http: httpx.AsyncClient, url: str, index: int, body: bytes, caller: str
) -> CallResult:
    headers = {"content-type": "application/json", "x-anycast-region": caller}
    start = time.perf_counter()
    try:
        response = await http.post(url, content=body, headers=headers)
    except httpx.HTTPError as exc:
        latency = (time.perf_counter() - start) * 1000
        return CallResult(
            index,
            caller,
            0,
            None,
            None,
            latency,
            error=type(exc).__name__,
            finished_at=time.monotonic(),
        )
    latency = (time.perf_counter() - start) * 1000
    answer = None
    error = None
    try:
        answer = response.json()
    except ValueError:
        error = "response is not JSON"
    if response.status_code != 200 and isinstance(answer, dict):
        error = str(answer.get("error", {}).get("code", response.status_code))
    return CallResult(
        index,
        caller,
        response.status_code,
        response.headers.get("x-anycast-region"),
        response.headers.get("x-anycast-replica"),
        latency,
        answer if isinstance(answer, dict) else None,
        error,
        time.monotonic(),
    )


async def run_load(
    url: str,
    bodies: Sequence[bytes],
    callers: Sequence[str],
    *,
    concurrency: int = 32,
    timeout: float = 30.0,
    on_result: Callable[[CallResult, int], None] | None = None,
) -> LoadReport:
    """POST every body to ``url`` with at most ``concurrency`` calls in flight.

    Call ``i`` comes from region ``callers[i % len(callers)]``. ``on_result`` is told of each
    finished call together with how many have finished so far.
    """
    report = LoadReport()
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(bodies)):
        queue.put_nowait(i)

    async def worker(http: httpx.AsyncClient) -> None:
        while True:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            result = await _one_call(http, url, i, bodies[i], callers[i % len(callers)])
            report.calls.append(result)
            if on_result is not None:
                on_result(result, len(report.calls))

    return await _drive(report, worker, concurrency, timeout)


async def run_until(
    url: str,
    bodies: Sequence[bytes],
    callers: Sequence[str],
    stop: asyncio.Event,
    *,
    concurrency: int = 8,
    timeout: float = 30.0,
    max_calls: int = 1_000_000,
) -> LoadReport:
    """POST ``bodies`` round-robin to ``url`` until ``stop`` is set (or ``max_calls`` are sent).

    Every call in flight when ``stop`` is set still finishes and is counted.
    """
    report = LoadReport()
    sent = 0

    async def worker(http: httpx.AsyncClient) -> None:
        nonlocal sent
        while not stop.is_set() and sent < max_calls:
            i, sent = sent, sent + 1
            body, caller = bodies[i % len(bodies)], callers[i % len(callers)]
            report.calls.append(await _one_call(http, url, i, body, caller))

    return await _drive(report, worker, concurrency, timeout)


async def _drive(
    report: LoadReport,
    worker: Callable[[httpx.AsyncClient], Awaitable[None]],
    concurrency: int,
    timeout: float,
) -> LoadReport:
    """Run ``concurrency`` copies of ``worker`` over one client; time and order the calls."""
    start = time.perf_counter()
    async with async_client(timeout=timeout, max_connections=concurrency) as http:
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
    report.seconds = time.perf_counter() - start
    report.calls.sort(key=lambda c: c.index)
    return report
