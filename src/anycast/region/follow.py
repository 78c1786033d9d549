"""Follow the control plane's state by long-poll, keeping the last known state when it is down."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import httpx

from anycast.core.errors import AnycastError

log = logging.getLogger(__name__)


class StateSource(Protocol):
    def state(self, after: int = 0, wait: float = 0) -> dict[str, Any]: ...


class StateFollower:
    """A daemon thread that long-polls ``/v1/state`` and keeps the newest answer.

    ``latest`` is the last state received (None until the first one). While the control
    plane is unreachable it stays as it was and the follower retries every ``retry`` s.
    """

    def __init__(
        self,
        source: StateSource,
        *,
        wait: float = 10.0,
        retry: float = 0.5,
        on_state: Callable[[dict[str, Any]], None] | None = None,
        name: str = "state-follower",
    ) -> None:
        self.source = source
        self.wait = wait
        self.retry = retry
        self.on_state = on_state
        self.latest: dict[str, Any] | None = None
        self.connected: bool | None = None
        self.changed = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    @property
    def revision(self) -> int:
        return int(self.latest.get("revision", 0)) if self.latest else 0

    def start(self) -> StateFollower:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def poll_once(self, wait: float | None = None) -> bool:
        """Fetch one state; True when a new one arrived."""
        try:
            state = self.source.state(after=self.revision, wait=self.wait if wait is None else wait)
        except (AnycastError, httpx.HTTPError, OSError) as exc:
            self._set_connected(False, exc)
            return False
        self._set_connected(True)
        if self.latest is not None and state.get("revision") == self.revision:
            return False
        self.latest = state
        self.changed.set()
        if self.on_state is not None:
            self.on_state(state)
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            if not self.poll_once() and not self.connected:
                self._stop.wait(max(0.0, self.retry - (time.monotonic() - started)))

    def _set_connected(self, connected: bool, exc: BaseException | None = None) -> None:
        if connected == self.connected:
            return
        self.connected = connected
        if connected:
            log.info("control plane reachable; following its state")
        else:
            log.warning("control plane unreachable (%s); keeping the last known state", exc)
