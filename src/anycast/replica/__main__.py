"""``python -m anycast.replica``: run one replica from an unpacked artifact.

The region agent starts replicas this way; the exit codes are listed in
:mod:`anycast.replica.run`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from anycast.core.http import LOOPBACK
from anycast.core.logs import setup_logging
from anycast.replica.run import run_artifact


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m anycast.replica",
        description="Verify an unpacked artifact, then serve its service over HTTP.",
    )
    parser.add_argument("--artifact", type=Path, required=True, help="unpacked artifact folder")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--replica-id", required=True)
    parser.add_argument("--host", default=LOOPBACK)
    parser.add_argument(
        "--artifact-id",
        default=None,
        help="expected artifact id (default: the folder name, if it is 64 hex digits)",
    )
    parser.add_argument(
        "--drain-seconds",
        type=float,
        default=None,
        help="on SIGTERM, how long calls in progress may take to finish "
        "(default: env ANYCAST_DRAIN_SECONDS, else 10)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging("replica")
    return run_artifact(
        args.artifact,
        port=args.port,
        replica_id=args.replica_id,
        artifact_id=args.artifact_id,
        host=args.host,
        drain_seconds=args.drain_seconds,
    )


if __name__ == "__main__":
    sys.exit(main())
