"""Graceful drain: on SIGTERM a replica leaves rotation, serves what still reaches it, exits.

uvicorn, on SIGTERM, closes its listening socket at once, so a caller would see a refused
connection rather than a replica that is going away. The drain comes first instead:
``/readyz`` turns 503 ("draining"), so the gateway's probes take the replica out of rotation,
and until they have, calls that still arrive are served as usual: a gateway that has not yet
noticed the drain never gets a refusal for it. Once no call is held and none has arrived for
``QUIET_SECONDS`` (or the grace period ends), the signal is passed on to uvicorn, which then
stops as usual. A second SIGTERM during the drain stops the replica at once.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any, Protocol

from anycast.core.errors import ConfigError

log = logging.getLogger(__name__)

DRAIN_SECONDS_ENV = "ANYCAST_DRAIN_SECONDS"
DEFAULT_DRAIN_SECONDS = 10.0
MAX_DRAIN_SECONDS = 3600.0
_POLL_SECONDS = 0.05
# How long no call may arrive before a draining replica counts as out of every caller's
# rotation: two of the gateway's probe intervals.
QUIET_SECONDS = 1.0

SignalHandler = Callable[[int, FrameType | None], Any]


class Drainable(Protocol):
    replica_id: str

    def begin_drain(self, grace_seconds: float) -> None: ...

    def holding(self) -> int: ...

    def idle_seconds(self) -> float: ...


def drain_seconds_from_env(value: float | None = None) -> float:
    """The grace period: ``value`` if given, else env ANYCAST_DRAIN_SECONDS, else 10 s."""
    if value is None:
        raw = os.environ.get(DRAIN_SECONDS_ENV, "").strip()
        if not raw:
            return DEFAULT_DRAIN_SECONDS
        try:
            value = float(raw)
        except ValueError:
            value = -1.0
    if not 0 <= value <= MAX_DRAIN_SECONDS:
        raise ConfigError(
            f"the drain grace period must be 0 to {MAX_DRAIN_SECONDS:g} seconds, got {value!r} "
            f"(set {DRAIN_SECONDS_ENV} or --drain-seconds)"
        )
    return value


class Drainer:
    """Puts itself in front of the server's SIGTERM handler for the life of the app."""

    def __init__(self, runtime: Drainable, grace_seconds: float) -> None:
        self.runtime = runtime
        self.grace_seconds = grace_seconds
        self._server_handler: SignalHandler | None = None
        self._started = False

    def install(self) -> bool:
        """Wrap the server's SIGTERM handler (call it from the main thread, once the server
        installed its own); False, and nothing done, where that is not possible."""
        if threading.current_thread() is not threading.main_thread():
            return False
        current = signal.getsignal(signal.SIGTERM)
        if not callable(current):
            return False
        self._server_handler = current
        signal.signal(signal.SIGTERM, self._on_sigterm)
        return True

    def uninstall(self) -> None:
        if self._server_handler is None:
            return
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._server_handler)

    def _on_sigterm(self, sig: int, frame: FrameType | None) -> None:
        if self._started:
            log.warning("replica %s: second SIGTERM, stopping now", self.runtime.replica_id)
            self._stop_server(sig)
            return
        self._started = True
        self.runtime.begin_drain(self.grace_seconds)
        threading.Thread(
            target=self._wait_then_stop, args=(sig,), name="anycast-drain", daemon=True
        ).start()

    def _wait_then_stop(self, sig: int) -> None:
        started = time.monotonic()
        deadline = started + self.grace_seconds
        quiet = min(QUIET_SECONDS, self.grace_seconds)
        while time.monotonic() < deadline and (
            self.runtime.holding() or self.runtime.idle_seconds() < quiet
        ):
            time.sleep(_POLL_SECONDS)
        left = self.runtime.holding()
        if left:
            log.warning(
                "replica %s: %d calls still running after the %.1f s grace period; stopping",
                self.runtime.replica_id,
                left,
                self.grace_seconds,
            )
        else:
            log.info(
                "replica %s drained in %.2f s; stopping",
                self.runtime.replica_id,
                time.monotonic() - started,
            )
        self._stop_server(sig)

    def _stop_server(self, sig: int) -> None:
        if self._server_handler is not None:
            self._server_handler(sig, None)
