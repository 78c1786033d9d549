"""A service whose one handler takes a fixed time, for the autoscaling tests.

Each call sleeps ``seconds`` (default 0.3, at most 5) without holding a thread, so a few
callers keep a known number of calls in flight on a replica that starts in a second.
"""

import asyncio
import os

from pydantic import BaseModel, Field

import anycast


class Nap(BaseModel):
    seconds: float = Field(default=0.3, ge=0, le=5)


class Woke(BaseModel):
    region: str
    pid: int


class SlowEcho(anycast.Service):
    @anycast.handler
    async def nap(self, request: Nap) -> Woke:
        await asyncio.sleep(request.seconds)
        return Woke(region=os.environ.get("ANYCAST_REGION", ""), pid=os.getpid())
