"""The replica runtime: serves one service over HTTP, verifying artifacts before loading them."""

from anycast.replica.app import DEADLINE_HEADER, ReplicaRuntime, build_app
from anycast.replica.batching import Batcher, CostModel, DeadlineExceeded, Overloaded
from anycast.replica.drain import DRAIN_SECONDS_ENV
from anycast.replica.inputs import MAX_BODY_BYTES
from anycast.replica.run import (
    EXIT_INTEGRITY,
    EXIT_OK,
    EXIT_SETUP_FAILED,
    EXIT_USAGE,
    TORCH_THREADS_ENV,
    run_artifact,
    serve_service,
    set_torch_threads,
)

__all__ = [
    "DEADLINE_HEADER",
    "DRAIN_SECONDS_ENV",
    "EXIT_INTEGRITY",
    "EXIT_OK",
    "EXIT_SETUP_FAILED",
    "EXIT_USAGE",
    "MAX_BODY_BYTES",
    "TORCH_THREADS_ENV",
    "Batcher",
    "CostModel",
    "DeadlineExceeded",
    "Overloaded",
    "ReplicaRuntime",
    "build_app",
    "run_artifact",
    "serve_service",
    "set_torch_threads",
]
