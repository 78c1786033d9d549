"""Logging set-up for Anycast's long-running roles."""

from __future__ import annotations

import logging
import os


def setup_logging(role: str, level: str | None = None) -> None:
    """One line per event, tagged with the role, to stderr (the supervisor captures it)."""
    level = level or os.environ.get("ANYCAST_LOG_LEVEL", "INFO")
    logging.basicConfig(
        level=level.upper(),
        format=f"%(asctime)s %(levelname)s {role} %(name)s: %(message)s",
    )
    for noisy in ("httpx", "httpcore", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
