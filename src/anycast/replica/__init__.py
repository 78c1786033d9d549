"""The replica runtime: serves one service over HTTP, verifying artifacts before loading them."""

from anycast.replica.app import ReplicaRuntime, build_app
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
    "EXIT_INTEGRITY",
    "EXIT_OK",
    "EXIT_SETUP_FAILED",
    "EXIT_USAGE",
    "MAX_BODY_BYTES",
    "TORCH_THREADS_ENV",
    "ReplicaRuntime",
    "build_app",
    "run_artifact",
    "serve_service",
    "set_torch_threads",
]
