"""Running a replica process: from source (``anycast serve``) or from a verified artifact.

Exit codes, read by the region agent: 0 stopped, 2 bad command line or settings,
3 artifact failed verification, 4 the service failed to load or its setup() raised.
A replica stopped by SIGTERM drains first (:mod:`anycast.replica.drain`) and then ends by
that signal, as uvicorn re-raises it.

Settings from the environment: ``ANYCAST_TORCH_THREADS`` (torch intra-op threads, default 1
so that replicas sharing a machine do not fight over its cores) and ``ANYCAST_DRAIN_SECONDS``
(the grace period of a drain, default 10).
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from anycast.core.errors import ConfigError, IntegrityError
from anycast.core.http import LOOPBACK, serve
from anycast.registry.artifact import manifest_id, verify_dir
from anycast.replica.app import HandlerFastPath, build_app
from anycast.replica.drain import drain_seconds_from_env
from anycast.sdk import Service, load_service, split_ref

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_INTEGRITY = 3
EXIT_SETUP_FAILED = 4

TORCH_THREADS_ENV = "ANYCAST_TORCH_THREADS"
DEV_ARTIFACT_ID = "dev"
_HEX_ID = re.compile(r"^[0-9a-f]{64}$")
# uvicorn's own graceful shutdown comes after the drain, which already waited for the calls.
_AFTER_DRAIN_SECONDS = 1


def set_torch_threads(environ: Mapping[str, str] = os.environ) -> int:
    """Limit torch's intra-op threads (default 1: several replicas share a machine's cores)."""
    raw = environ.get(TORCH_THREADS_ENV, "1")
    threads = int(raw) if raw.strip().isdigit() else 0
    if threads < 1:
        raise ConfigError(f"{TORCH_THREADS_ENV} must be a whole number of at least 1, got {raw!r}")
    import torch

    torch.set_num_threads(threads)
    return threads


def serve_service(
    service_cls: type[Service],
    *,
    files_dir: Path,
    port: int,
    replica_id: str,
    artifact_id: str = DEV_ARTIFACT_ID,
    files: Mapping[str, Path] | None = None,
    host: str = LOOPBACK,
    drain_seconds: float | None = None,
) -> int:
    """Serve ``service_cls`` until SIGTERM or SIGINT; returns the process exit code.

    If setup() raises, the process exits with EXIT_SETUP_FAILED without serving further.
    SIGTERM drains first: calls held get ``drain_seconds`` (default: env
    ANYCAST_DRAIN_SECONDS, else 10 s) to finish. Raises ConfigError for a bad grace period.
    """
    grace = drain_seconds_from_env(drain_seconds)

    def exit_after_setup_failure(reason: str) -> None:
        # Nothing was ever served, so there is nothing to drain: leave at once, with the
        # reason as the last log line for the region agent to report.
        log.error(
            "replica %s: setup() failed, exiting with code %d: %s",
            replica_id,
            EXIT_SETUP_FAILED,
            reason,
        )
        _flush_logs()
        os._exit(EXIT_SETUP_FAILED)

    app = build_app(
        service_cls,
        files_dir,
        replica_id=replica_id,
        artifact_id=artifact_id,
        files=files,
        on_setup_failure=exit_after_setup_failure,
        drain_seconds=grace,
    )
    log.info(
        "replica %s: serving %s on http://%s:%d (artifact %s); running setup()",
        replica_id,
        service_cls.__name__,
        host,
        port,
        artifact_id[:12],
    )
    serve(HandlerFastPath(app), host, port, graceful_seconds=_AFTER_DRAIN_SECONDS)
    log.info("replica %s stopped", replica_id)
    return EXIT_OK


def run_artifact(
    artifact_dir: Path,
    *,
    port: int,
    replica_id: str,
    artifact_id: str | None = None,
    host: str = LOOPBACK,
    drain_seconds: float | None = None,
) -> int:
    """Verify an unpacked artifact, then (and only then) import and serve its service."""
    expected_id = artifact_id or (artifact_dir.name if _HEX_ID.match(artifact_dir.name) else None)
    try:
        manifest = verify_dir(artifact_dir, expected_id)
        _check_service_is_verified(manifest)
    except IntegrityError as exc:
        log.error(
            "replica %s: artifact %s failed verification, refusing to start (exit %d): %s",
            replica_id,
            artifact_dir,
            EXIT_INTEGRITY,
            exc.message,
        )
        return EXIT_INTEGRITY

    try:
        set_torch_threads()
        drain_seconds = drain_seconds_from_env(drain_seconds)
    except ConfigError as exc:
        log.error("replica %s: %s (exit %d)", replica_id, exc.message, EXIT_USAGE)
        return EXIT_USAGE
    try:
        service_cls = load_service(str(manifest["service"]), base=artifact_dir)
    except ConfigError as exc:
        log.error(
            "replica %s: the service failed to load (exit %d): %s",
            replica_id,
            EXIT_SETUP_FAILED,
            exc.message,
        )
        return EXIT_SETUP_FAILED

    return serve_service(
        service_cls,
        files_dir=artifact_dir,
        port=port,
        replica_id=replica_id,
        artifact_id=expected_id or manifest_id(manifest),
        host=host,
        drain_seconds=drain_seconds,
    )


def _check_service_is_verified(manifest: dict[str, Any]) -> None:
    """The service module must be one of the checksummed files, never a stray one."""
    ref = manifest.get("service")
    if not isinstance(ref, str):
        raise IntegrityError("artifact manifest has no 'service' entry ('service.py:ClassName')")
    try:
        target, _ = split_ref(ref)
    except ConfigError as exc:
        raise IntegrityError(f"artifact manifest's service is malformed: {exc.message}") from exc
    if target not in manifest.get("files", {}):
        raise IntegrityError(
            f"artifact manifest's service file {target} is not one of its checksummed files"
        )


def _flush_logs() -> None:
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stderr.flush()
    sys.stdout.flush()
