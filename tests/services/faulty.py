"""A service whose replicas misbehave on request, for the gateway's reliability tests.

The test writes ``<ANYCAST_TEST_FAULTS>/<pid>`` with lines ``handler=mode`` (``*`` for every
handler) to make the replica with that pid fail while its /readyz stays fine. Modes:
``500`` (handler raises), ``503`` (unavailable), ``hang`` (no answer for 20 s) and
``slow`` (answers after 4 s). Every call is appended to ``calls.log`` first.
"""

import asyncio
import os
import uuid
from pathlib import Path

from pydantic import BaseModel

import anycast
from anycast.core.errors import Unavailable


class Text(BaseModel):
    text: str


class Answer(BaseModel):
    text: str
    replica_pid: int
    nonce: str


class Faulty(anycast.Service):
    def setup(self) -> None:
        self.faults = Path(os.environ["ANYCAST_TEST_FAULTS"])

    async def _misbehave(self, handler: str) -> None:
        with (self.faults / "calls.log").open("a") as log:
            log.write(f"{os.getpid()} {handler}\n")
        path = self.faults / str(os.getpid())
        lines = path.read_text().split() if path.exists() else []
        modes = dict(line.partition("=")[::2] for line in lines)
        mode = modes.get(handler) or modes.get("*")
        if mode == "500":
            raise RuntimeError("injected failure")
        if mode == "503":
            raise Unavailable("injected unavailability")
        if mode == "hang":
            await asyncio.sleep(20)
        if mode == "slow":
            await asyncio.sleep(4)

    def _answer(self, text: str) -> Answer:
        return Answer(text=text, replica_pid=os.getpid(), nonce=uuid.uuid4().hex)

    @anycast.handler
    async def work(self, request: Text) -> Answer:
        await self._misbehave("work")
        return self._answer(request.text)

    @anycast.handler(idempotent=False)
    async def charge(self, request: Text) -> Answer:
        await self._misbehave("charge")
        return self._answer(request.text)

    # Declared deterministic although its nonce is not: the nonce shows a cached answer.
    @anycast.handler(deterministic=True)
    async def square(self, request: Text) -> Answer:
        await self._misbehave("square")
        return self._answer(request.text * 2)
