"""Failover benchmark: lose every replica of the caller's region under load, through the gateway.

    .venv/bin/python bench/failover.py [--calls 4000] [--concurrency 16] [--region eu-west]

A local three-region cluster (``LocalCluster``, as ``anycast up``) runs the digit service
of examples/mnist/service.py with two replicas per region, in a private network namespace
when ``unshare -n`` works. Calls go through the gateway from one caller region; after a
fifth of them every replica of that region is SIGKILLed. Reported: calls failed, the time
from the kill to the last failed or rerouted-away call, and p99 in a window around the
kill. Results go to bench/results/failover.{md,json}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import harness
import httpx
from harness import CACHE, PYTHON, REPO, RESULTS, log

from anycast.local.load import CallResult, percentile

DEPLOYMENT = "digits"


@dataclass(frozen=True)
class Timed:
    """One call with its start and end on the same clock as the kill (seconds)."""

    call: CallResult
    start: float
    end: float


def start_cluster(region: str) -> Any:
    from anycast.cli.cluster import deploy_artifact, wait_ready
    from anycast.cli.demo import _build_and_push
    from anycast.core.config import ClusterConfig
    from anycast.core.http import free_port
    from anycast.local import LocalCluster

    home = CACHE / "cluster-failover"
    shutil.rmtree(home, ignore_errors=True)
    base = free_port()
    config = ClusterConfig(
        home=home, control_port=free_port(), gateway_port=free_port(), agent_port_base=base
    )
    config.region(region)  # refuse an unknown --region before starting anything
    cluster = LocalCluster(config)
    cluster.up()
    artifact = _build_and_push(cluster.config, harness.weights())
    regions = [r.name for r in config.regions]
    deploy_artifact(cluster.config, DEPLOYMENT, artifact, 2, [])
    wait_ready(config.control_url, DEPLOYMENT, dict.fromkeys(regions, 2), timeout=300)
    return cluster


def gateway_counters(url: str) -> dict[str, float]:
    """Retries and cross-region failovers the gateway counted so far."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    totals = {"retries": 0.0, "failovers": 0.0}
    for name in totals:
        for match in re.finditer(rf"^anycast_gateway_{name}_total{{.*}} (\S+)$", text, re.M):
            totals[name] += float(match.group(1))
    return totals


async def load_with_kill(
    config: Any, bodies: list[bytes], caller: str, concurrency: int
) -> tuple[list[Timed], float, list[int]]:
    from anycast.cli.demo import kill_region_replicas
    from anycast.local.load import run_load

    url = f"{config.gateway_url}/v1/deployments/{DEPLOYMENT}/predict"
    kill_at = len(bodies) // 5
    timed: list[Timed] = []
    killed: list[int] = []
    kill_time = 0.0

    def on_result(result: CallResult, done: int) -> None:
        nonlocal kill_time
        end = time.perf_counter()
        timed.append(Timed(result, end - result.latency_ms / 1000, end))
        if done == kill_at:
            killed.extend(kill_region_replicas(config, caller))
            kill_time = time.perf_counter()
            log.info("SIGKILLed %d replicas of %s", len(killed), caller)

    await run_load(url, bodies, [caller], concurrency=concurrency, on_result=on_result)
    return timed, kill_time, killed


def summarise(
    timed: list[Timed], kill: float, caller: str, window: tuple[float, float]
) -> dict[str, Any]:
    """The switch as a caller in ``caller`` saw it; times in ms relative to the kill."""
    after = [t for t in timed if t.end >= kill]
    failed = [t for t in after if not t.call.ok]
    away = [t for t in after if t.call.ok and t.call.served_region != caller]
    last_failed = max((t.end - kill for t in failed), default=None)
    last_away = max((t.end - kill for t in away), default=None)
    first_away = min((t.end - kill for t in away), default=None)
    ends = [v for v in (last_failed, last_away) if v is not None]
    tail = timed[-max(1, len(timed) // 10) :]
    low, high = kill - window[0], kill + window[1]
    in_window = sorted(t.call.latency_ms for t in timed if t.end >= low and t.start <= high)
    before = sorted(t.call.latency_ms for t in timed if t.end < kill and t.call.ok)
    return {
        "calls": len(timed),
        "calls_after_kill": len(after),
        "failed": sum(1 for t in timed if not t.call.ok),
        "failed_after_kill": len(failed),
        "errors": dict(_count(t.call.error or str(t.call.status) for t in failed)),
        "rerouted_away": len(away),
        "switch_ms": round(max(ends) * 1000, 1) if ends else 0.0,
        "last_failed_ms": None if last_failed is None else round(last_failed * 1000, 1),
        "first_rerouted_ms": None if first_away is None else round(first_away * 1000, 1),
        "last_rerouted_ms": None if last_away is None else round(last_away * 1000, 1),
        "region_back": all(t.call.served_region == caller for t in tail),
        "window_s": [-window[0], window[1]],
        "window_calls": len(in_window),
        "window_p50_ms": percentile(in_window, 50),
        "window_p99_ms": percentile(in_window, 99),
        "before_p99_ms": percentile(before, 99),
        "served_by_region": dict(_count(t.call.served_region or "none" for t in timed)),
    }


def _count(items: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in items:
        counts[item] = counts.get(item, 0) + 1
    return counts


def run_inner(args: argparse.Namespace) -> dict[str, Any]:
    from anycast.datasets import mnist, to_png
    from anycast.local.load import image_payload

    test = mnist().test_images
    bodies = [image_payload(to_png(test[i % len(test)])) for i in range(args.calls)]
    cluster = start_cluster(args.region)
    try:
        config = cluster.config
        before = gateway_counters(config.gateway_url)
        timed, kill, killed = asyncio.run(
            load_with_kill(config, bodies, args.region, args.concurrency)
        )
        after = gateway_counters(config.gateway_url)
    finally:
        cluster.down()
    summary = summarise(timed, kill, args.region, (args.window_before, args.window_after))
    summary.update(
        {
            "caller_region": args.region,
            "replicas_killed": len(killed),
            "concurrency": args.concurrency,
            "gateway_retries": after["retries"] - before["retries"],
            "gateway_failovers": after["failovers"] - before["failovers"],
        }
    )
    return summary


TABLE = [
    ("caller region (killed)", "caller_region"),
    ("replicas killed", "replicas_killed"),
    ("calls", "calls"),
    ("failed", "failed"),
    ("kill -> last failed or rerouted-away call (ms)", "switch_ms"),
    ("kill -> last failed call (ms)", "last_failed_ms"),
    ("kill -> first call answered by another region (ms)", "first_rerouted_ms"),
    ("calls rerouted to another region", "rerouted_away"),
    ("region serving its callers again by the end", "region_back"),
    ("p50 / p99 in the window (ms)", "window"),
    ("p99 before the kill (ms)", "before_p99_ms"),
    ("gateway retries / cross-region failovers", "gateway"),
]


def render(summary: dict[str, Any], about: str) -> str:
    lo, hi = summary["window_s"]
    cells = {
        **summary,
        "window": f"{summary['window_p50_ms']:.1f} / {summary['window_p99_ms']:.1f} "
        f"({summary['window_calls']} calls from {lo:+g} s to {hi:+g} s around the kill)",
        "gateway": f"{summary['gateway_retries']:.0f} / {summary['gateway_failovers']:.0f}",
    }
    rows = [{"measure": label, "value": cells.get(key)} for label, key in TABLE]
    errors = ", ".join(f"{k} {v}" for k, v in summary["errors"].items()) or "none"
    return "\n".join(
        [
            "# Failover benchmark",
            "",
            about,
            "",
            harness.markdown_table(rows, ["measure", "value"]),
            "",
            f"Errors after the kill: {errors}. Served by region: {summary['served_by_region']}.",
            "",
        ]
    )


def parse_args() -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=int(env("BENCH_FAILOVER_CALLS", "4000")))
    parser.add_argument(
        "--concurrency", type=int, default=int(env("BENCH_FAILOVER_CONCURRENCY", "16"))
    )
    parser.add_argument("--region", default=env("BENCH_FAILOVER_REGION", "eu-west"))
    parser.add_argument("--window-before", type=float, default=1.0, help="s before the kill")
    parser.add_argument("--window-after", type=float, default=3.0, help="s after the kill")
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> int:
    harness.setup_logging()
    args = parse_args()
    if args.inner:
        args.result.write_text(json.dumps(run_inner(args)))
        return 0

    harness.weights()
    out = CACHE / "rows" / "failover.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    argv = [PYTHON, str(Path(__file__).resolve()), *sys.argv[1:], "--inner", "--result", str(out)]
    netns = harness.netns_available()
    subprocess.run(harness.in_netns(argv) if netns else argv, cwd=REPO, check=False)
    if not out.is_file():
        raise SystemExit("the failover run wrote no result; see the log above")
    summary = json.loads(out.read_text())
    about = (
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores, load "
        f"average {os.getloadavg()[0]:.2f}; 3 regions x 2 replicas, {summary['calls']} calls "
        f"at concurrency {summary['concurrency']} from {summary['caller_region']}, whose "
        "replicas are all SIGKILLed after a fifth of the calls; simulated cross-region delay "
        f"on; {'in a private network namespace' if netns else 'on 127.0.0.1'}"
    )
    text = render(summary, about)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "failover.md").write_text(text)
    (RESULTS / "failover.json").write_text(
        json.dumps({**summary, "conditions": about}, indent=2) + "\n"
    )
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
