"""Dynamic batching: concurrent calls of a batched handler become one model call.

Each batched handler has one :class:`Batcher`, whose loop takes the oldest waiting call and
adds the calls behind it, whole, while their rows fit in ``max_batch_size``. It waits for
more calls for at most ``max_wait_ms`` after the oldest one arrived (fixed mode), or, in
adaptive mode, only while the measured cost says another call is worth waiting for. Then it
runs the model once and hands each call its own slice of the results.

A call that is cancelled while it waits (its caller timed out or hung up) is skipped; a
model call that raises is retried one call at a time, so the call that caused it fails alone.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from anycast.core.errors import AnycastError, Unavailable
from anycast.replica.metrics import ReplicaMetrics

log = logging.getLogger(__name__)

RunBatch = Callable[[list[Any]], Awaitable[list[Any]]]

PROBE_EVERY = 16  # an adaptive batcher that learnt not to wait still tries once in 16 batches


class Overloaded(Unavailable):
    """A call would not be answered before its deadline, so it is refused before it waits."""

    code = "overloaded"


class DeadlineExceeded(Unavailable):
    """A call's deadline passed while it waited for its batch."""

    code = "deadline_exceeded"


class BadBatchResult(AnycastError):
    """A batched handler returned a wrong number of responses."""

    code = "bad_response"


@dataclass(eq=False)
class _Call:
    rows: list[Any]
    future: asyncio.Future[list[Any]]
    enqueued: float
    deadline: float | None

    @property
    def live(self) -> bool:
        return not self.future.done()

    def resolve(self, results: list[Any]) -> None:
        if self.live:
            self.future.set_result(results)

    def fail(self, exc: BaseException) -> None:
        if self.live:
            self.future.set_exception(exc)


@dataclass
class CostModel:
    """What a model call costs and what waiting for more calls yields, measured as it serves.

    Model time is fitted as ``fixed + per_row * rows`` by least squares over recent batches
    (older ones fade by ``decay`` per batch). The arrival rate is the one seen while waiting
    (rows that joined per second waited), not between any two calls: callers that each wait
    for their answer arrive in bursts right after a batch, and then nobody comes during a wait.
    """

    decay: float = 0.9
    _sums: list[float] = field(default_factory=lambda: [0.0] * 5)  # n, x, y, xx, xy
    _waits: list[float] = field(default_factory=lambda: [0.0, 0.0])  # seconds, rows gained

    @property
    def known(self) -> bool:
        return self._sums[0] > 0

    def observe_batch(self, rows: int, seconds: float) -> None:
        n, x, y, xx, xy = (value * self.decay for value in self._sums)
        self._sums = [n + 1, x + rows, y + seconds, xx + rows * rows, xy + rows * seconds]

    def observe_wait(self, seconds: float, rows: int) -> None:
        """A batch waited ``seconds`` in all, and ``rows`` rows joined it meanwhile."""
        waited, gained = (value * self.decay for value in self._waits)
        self._waits = [waited + seconds, gained + rows]

    @property
    def arrival_rate(self) -> float | None:
        """Rows per second that joined batches while they waited; None before any wait."""
        waited, gained = self._waits
        return gained / waited if waited > 0 else None

    def fit(self) -> tuple[float, float]:
        """(fixed seconds per model call, seconds per row); (0, 0) before any batch."""
        n, x, y, xx, xy = self._sums
        if n <= 0:
            return 0.0, 0.0
        spread = n * xx - x * x
        if spread <= 1e-9 * max(n * xx, 1.0):
            # Every batch had the same size: fixed and per-row cost cannot be told apart, so
            # count it all as fixed, which makes waiting look worthwhile and varies the sizes.
            return y / n, 0.0
        per_row = max((n * xy - x * y) / spread, 0.0)
        fixed = max((y - per_row * x) / n, 0.0)
        return fixed, per_row

    def estimate(self, rows: int) -> float:
        """Expected seconds of one model call of ``rows`` rows."""
        fixed, per_row = self.fit()
        return fixed + per_row * rows


class Batcher:
    """Gathers the calls of one batched handler into model calls of at most ``max_batch_size``
    rows. ``run(rows)`` makes one model call and returns one result per row, in order."""

    def __init__(
        self,
        name: str,
        run: RunBatch,
        *,
        max_batch_size: int,
        max_wait_ms: float,
        adaptive: bool = False,
        isolate_failures: bool = True,
        metrics: ReplicaMetrics | None = None,
    ) -> None:
        self.name = name
        self.run = run
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self.adaptive = adaptive
        self.isolate_failures = isolate_failures
        self.metrics = metrics
        self.cost = CostModel()
        self._queue: deque[_Call] = deque()
        self._queued_rows = 0
        self._arrived = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._running: tuple[float, int] | None = None  # (started, rows) of the model call
        self._batches = 0
        self._closed = False

    @property
    def queued(self) -> int:
        """Calls waiting for a model call (cancelled ones not counted)."""
        return sum(call.live for call in self._queue)

    async def submit(self, rows: list[Any], deadline: float | None = None) -> list[Any]:
        """Queue one call's rows and wait for their results (``deadline`` is monotonic s)."""
        future = self.enqueue(rows, deadline)
        try:
            return await future
        finally:
            if not future.done():  # the caller was cancelled: its rows must not reach the model
                future.cancel()

    def enqueue(self, rows: list[Any], deadline: float | None = None) -> asyncio.Future[list[Any]]:
        """Queue one call's rows; the future gets their results. Cancelling it withdraws the
        call (its rows do not reach the model unless their model call already began)."""
        if self._closed:
            raise Unavailable(f"handler {self.name} is stopping; retry on another replica")
        if not 1 <= len(rows) <= self.max_batch_size:
            raise ValueError(f"a call carries 1 to {self.max_batch_size} rows, got {len(rows)}")
        now = time.monotonic()
        if self.adaptive and deadline is not None:
            self._shed_if_late(len(rows), now, deadline)

        call = _Call(rows, asyncio.get_running_loop().create_future(), now, deadline)
        self._queue.append(call)
        self._queued_rows += len(rows)
        self._arrived.set()
        self._ensure_loop()
        return call.future

    async def close(self) -> None:
        """Stop the loop; calls still queued are answered 503."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        stopping = Unavailable(f"handler {self.name} is stopping; retry on another replica")
        while self._queue:
            self._queue.popleft().fail(stopping)

    def _ensure_loop(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._loop(), name=f"anycast-batcher-{self.name}"
            )

    async def _loop(self) -> None:
        while True:
            batch = await self._next_batch()
            try:
                await self._run(batch)
            except asyncio.CancelledError:
                for call in batch:
                    call.fail(Unavailable(f"handler {self.name} is stopping; retry"))
                raise
            except Exception as exc:  # a bug here must not stop the handler for good
                log.exception("handler %s: batch loop error", self.name)
                for call in batch:
                    call.fail(exc)

    async def _next_batch(self) -> list[_Call]:
        """The oldest live call and the calls behind it that fit, once waiting stops paying."""
        batch = [await self._first_live()]
        rows = len(batch[0].rows)
        waited, gained = 0.0, 0
        while rows < self.max_batch_size:
            following = self._peek_live()
            if following is None:
                budget = self._wait_budget(batch, rows)
                if budget <= 0:
                    break
                started = time.monotonic()
                arrived = await self._next_arrival(budget)
                waited += time.monotonic() - started
                if not arrived:
                    break
                continue
            if rows + len(following.rows) > self.max_batch_size:
                break
            batch.append(self._pop())
            rows += len(following.rows)
            gained += len(following.rows) if waited else 0
        if waited:
            self.cost.observe_wait(waited, gained)
        self._batches += 1
        return batch

    async def _first_live(self) -> _Call:
        while True:
            call = self._peek_live()
            if call is not None:
                return self._pop()
            self._arrived.clear()
            await self._arrived.wait()

    def _peek_live(self) -> _Call | None:
        """The first queued call still worth running; drops cancelled and expired ones."""
        now = time.monotonic()
        while self._queue:
            call = self._queue[0]
            if call.live and (call.deadline is None or call.deadline > now):
                return call
            self._pop()
            if call.live:
                self._count_shed()
                call.fail(DeadlineExceeded(self._late_message(call, now)))
        return None

    def _pop(self) -> _Call:
        call = self._queue.popleft()
        self._queued_rows -= len(call.rows)
        return call

    async def _next_arrival(self, timeout: float) -> bool:
        self._arrived.clear()
        try:
            await asyncio.wait_for(self._arrived.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def _wait_budget(self, batch: list[_Call], rows: int) -> float:
        """Seconds still worth waiting for another call to join ``batch``."""
        now = time.monotonic()
        budget = batch[0].enqueued + self.max_wait - now
        if not self.adaptive:
            return budget

        # One more row saves the fixed cost of the model call it would otherwise need, and
        # costs each of the `rows` rows waiting the time until it comes. So wait at most
        # fixed / rows for it, and only while it is expected within that time (the measured
        # rate says so); never past a deadline in the batch. With no rate measured yet, or
        # once in PROBE_EVERY batches, wait anyway, to measure it.
        if not self.cost.known:
            return 0.0
        fixed, _ = self.cost.fit()
        rate = self.cost.arrival_rate
        probing = rate is None or self._batches % PROBE_EVERY == 0
        if not probing and (rate or 0.0) * fixed < rows:
            return 0.0
        deadlines = [call.deadline for call in batch if call.deadline is not None]
        if deadlines:
            budget = min(budget, min(deadlines) - now - self.cost.estimate(rows + 1))
        return min(budget, fixed / rows)

    def _shed_if_late(self, rows: int, now: float, deadline: float) -> None:
        """Refuse a call at once when the work queued ahead of it outlasts its deadline."""
        if not self.cost.known:
            return
        expected = self._expected_seconds(rows, now)
        if now + expected <= deadline:
            return
        self._count_shed()
        raise Overloaded(
            f"handler {self.name} cannot answer within the deadline: answering would take "
            f"about {expected * 1000:.0f} ms with the work queued ahead, and the deadline is "
            f"{max(deadline - now, 0) * 1000:.0f} ms away; retry later or on another replica",
            expected_ms=round(expected * 1000, 1),
        )

    def _expected_seconds(self, rows: int, now: float) -> float:
        fixed, per_row = self.cost.fit()
        ahead = max(self._queued_rows, 0) + rows
        batches = math.ceil(ahead / self.max_batch_size)
        busy = 0.0
        if self._running is not None:
            started, running_rows = self._running
            busy = max(started + self.cost.estimate(running_rows) - now, 0.0)
        return busy + batches * fixed + per_row * ahead

    def _late_message(self, call: _Call, now: float) -> str:
        waited = (now - call.enqueued) * 1000
        return (
            f"handler {self.name}: the call's deadline passed after {waited:.0f} ms in the "
            "queue; retry later or on another replica"
        )

    def _count_shed(self) -> None:
        if self.metrics is not None:
            self.metrics.shed.labels(self.name).inc()

    async def _run(self, batch: list[_Call]) -> None:
        batch = [call for call in batch if call.live]  # some may have left while it waited
        if not batch:
            return
        rows = [row for call in batch for row in call.rows]
        started = time.monotonic()
        if self.metrics is not None:
            waits = [started - call.enqueued for call in batch]
            self.metrics.observe_batch(self.name, len(rows), waits)
        self._running = (started, len(rows))
        try:
            results = await self._model_call(rows)
        except Exception as exc:
            await self._after_failure(batch, exc)
            return
        finally:
            self._running = None
        self.cost.observe_batch(len(rows), time.monotonic() - started)
        self._hand_out(batch, results)

    async def _model_call(self, rows: list[Any]) -> list[Any]:
        results = list(await self.run(rows))
        if len(results) != len(rows):
            raise BadBatchResult(
                f"handler {self.name} returned {len(results)} responses for {len(rows)} "
                "requests; a batched handler returns one response per request, in order"
            )
        return results

    def _hand_out(self, batch: list[_Call], results: list[Any]) -> None:
        offset = 0
        for call in batch:
            call.resolve(results[offset : offset + len(call.rows)])
            offset += len(call.rows)

    async def _after_failure(self, batch: list[_Call], exc: Exception) -> None:
        """Retry the calls of a failed batch one by one, so only the faulty call fails."""
        live = [call for call in batch if call.live]
        if len(live) < 2 or not self.isolate_failures or isinstance(exc, BadBatchResult):
            for call in live:
                call.fail(exc)
            return

        log.warning(
            "handler %s: a model call of %d calls raised %s; running them one call at a time",
            self.name,
            len(live),
            type(exc).__name__,
        )
        for call in live:
            started = time.monotonic()
            self._running = (started, len(call.rows))
            try:
                call.resolve(await self._model_call(call.rows))
            except Exception as single:
                call.fail(single)
            finally:
                self._running = None
