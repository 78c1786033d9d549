"""The digit CNN as a Ray Serve deployment with one replica, HTTP on 127.0.0.1.

The model runs in a worker thread, as Ray Serve runs a sync method; computing on the
replica's event loop keeps it from answering the router's queue-length probes, and the
router then backs off (a pair of calls every 0.5 s, about 9 requests/s, in an earlier run).
``max_ongoing_requests=64`` lets all of the benchmark's connections reach the replica rather
than wait in the router's backoff at the default of 5.
"""

from __future__ import annotations

import asyncio
import os
import time

import digits
import ray
from ray import serve
from starlette.requests import Request


@serve.deployment(num_replicas=1, max_ongoing_requests=64, ray_actor_options={"num_cpus": 1})
class Digits:
    def __init__(self) -> None:
        self.model = digits.load()

    async def __call__(self, request: Request) -> dict:
        body = await request.json()
        return await asyncio.to_thread(digits.predict, self.model, body["image"])


if __name__ == "__main__":
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1")
    serve.start(http_options={"host": "127.0.0.1", "port": int(os.environ["BENCH_PORT"])})
    serve.run(Digits.bind(), route_prefix="/predict")
    while True:
        time.sleep(3600)
