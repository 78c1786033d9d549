"""Waiting for a replica app under test to finish ``setup()``: ready, or failed."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_ready(get: Callable[[str], Any], timeout: float, what: str = "replica") -> None:
    """Poll ``get("/readyz")`` (a TestClient's or httpx client's get) until it answers 200."""
    deadline = time.monotonic() + timeout
    while get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, f"{what} never became ready"
        time.sleep(0.01)


def wait_failed(reasons: list[str], timeout: float) -> None:
    """Wait until a setup failure hook (``reasons.append``) has been called."""
    deadline = time.monotonic() + timeout
    while not reasons:
        assert time.monotonic() < deadline, "setup() never reported its failure"
        time.sleep(0.01)
