"""The fault suite behind ``make chaos``: bounded load through the gateway while faults hit.

A local three-region cluster serves the digit classifier with two replicas per region. Each
scenario sends calls through the gateway from callers in every region, injects one fault,
waits until the cluster has recovered, and counts calls sent, calls failed and the longest
stretch with no successful answer (``max_gap_ms``). The table is printed and written to
``bench/results/chaos.json``. A soak run then sends at least 50,000 calls of mixed payloads
(good digits and bad input) to one replica through the gateway and reports that replica's
memory at the half-way point and at the end (``bench/results/soak.json``).

Every call the suite makes is to 127.0.0.1 and every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from anycast.cli.cluster import deploy_artifact
from anycast.cli.demo import example_service, kill_region_replicas
from anycast.control.client import ControlClient
from anycast.core.config import ClusterConfig, load_config
from anycast.datasets import mnist, to_png
from anycast.local import LocalCluster
from anycast.local.load import LoadReport, image_payload, run_until
from anycast.registry import LocalStorage, Registry, build_artifact
from anycast.training import save_weights, train

DEPLOYMENT = "digits"
REPLICAS = 2
RESULTS = Path(__file__).resolve().parent / "results"
console = Console()


@dataclass
class Context:
    """What the scenarios act on: the cluster and the artifacts built for it."""

    cluster: LocalCluster
    artifacts: list[str]  # [first, second]: a rolling update moves from one to the other

    @property
    def config(self) -> ClusterConfig:
        return self.cluster.config

    @functools.cached_property
    def control(self) -> ControlClient:
        return ControlClient(self.config.control_url, timeout=5.0)

    def regions(self) -> list[str]:
        return [r.name for r in self.config.regions]

    def wait_serving(self, replicas: int = REPLICAS, timeout: float = 180.0) -> None:
        want = dict.fromkeys(self.regions(), replicas)
        wait_until(lambda: _ready_counts(self, want), timeout, f"{replicas} ready per region")


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:  # the control plane may be restarting; ask again
            pass
        time.sleep(0.25)
    raise TimeoutError(f"the cluster did not reach '{what}' within {timeout:.0f} s")


def _ready_counts(ctx: Context, want: dict[str, int], artifact: str | None = None) -> bool:
    """Exactly ``want[region]`` replicas per region, all ready (on ``artifact`` if given)."""
    replicas = ctx.control.replicas(deployment=DEPLOYMENT)
    for region, count in want.items():
        mine = [r for r in replicas if r["region"] == region]
        ready = [r for r in mine if r["state"] == "ready"]
        if artifact is not None and any(r["artifact"] != artifact for r in mine):
            return False
        if len(mine) != count or len(ready) != count:
            return False
    return True


# -- the faults ----------------------------------------------------------------------------


def kill_one_replica(ctx: Context) -> str:
    region = ctx.regions()[0]
    ready = [
        r
        for r in ctx.control.replicas(region=region, deployment=DEPLOYMENT)
        if r["state"] == "ready" and r.get("pid")
    ]
    os.kill(int(ready[0]["pid"]), signal.SIGKILL)
    ctx.wait_serving()
    return f"SIGKILL replica {ready[0]['id']}"


def kill_region(ctx: Context) -> str:
    region = ctx.regions()[1]
    pids = kill_region_replicas(ctx.config, region)
    ctx.wait_serving()
    return f"SIGKILL all {len(pids)} replicas of {region}"


def kill_agent(ctx: Context) -> str:
    region = ctx.regions()[2]
    pid = ctx.cluster.pid(f"region-{region}")
    assert pid is not None, f"the agent of {region} is not running"
    os.kill(pid, signal.SIGKILL)
    time.sleep(2.0)
    ctx.cluster.up()
    ctx.wait_serving()
    return f"SIGKILL region agent of {region}, 2 s down, restarted"


def kill_control_plane(ctx: Context) -> str:
    pid = ctx.cluster.pid("control")
    assert pid is not None, "the control plane is not running"
    os.kill(pid, signal.SIGKILL)
    time.sleep(3.0)
    ctx.cluster.up()
    ctx.wait_serving()
    return "SIGKILL control plane, 3 s down, restarted"


def rolling_update(ctx: Context) -> str:
    new = ctx.artifacts[1]
    deploy_artifact(ctx.config, DEPLOYMENT, new, REPLICAS, [])
    want = dict.fromkeys(ctx.regions(), REPLICAS)
    wait_until(lambda: _ready_counts(ctx, want, artifact=new), 300, "every replica on the update")
    return f"deploy artifact {new[:12]} over {ctx.artifacts[0][:12]}"


def scale_down(ctx: Context) -> str:
    deploy_artifact(ctx.config, DEPLOYMENT, ctx.artifacts[1], 1, [])
    want = dict.fromkeys(ctx.regions(), 1)
    wait_until(lambda: _ready_counts(ctx, want), 120, "one replica per region")
    return f"{REPLICAS} -> 1 replicas in every region"


SCENARIOS: list[tuple[str, Callable[[Context], str]]] = [
    ("replica killed", kill_one_replica),
    ("region lost", kill_region),
    ("region agent killed", kill_agent),
    ("control plane killed", kill_control_plane),
    ("rolling update", rolling_update),
    ("scale down", scale_down),
]


# -- running scenarios under load --------------------------------------------------------------


async def run_scenario(
    ctx: Context,
    fault: Callable[[Context], str],
    bodies: list[bytes],
    concurrency: int,
    lead: float = 1.5,
    tail: float = 1.5,
) -> tuple[LoadReport, str, float]:
    """Load through the gateway; ``lead`` s in, inject ``fault`` (it returns once recovered)."""
    url = f"{ctx.config.gateway_url}/v1/deployments/{DEPLOYMENT}/predict"
    stop = asyncio.Event()
    started = time.monotonic()
    load = asyncio.create_task(
        run_until(url, bodies, ctx.regions(), stop, concurrency=concurrency, max_calls=200_000)
    )
    try:
        await asyncio.sleep(lead)
        what = await asyncio.to_thread(fault, ctx)
        await asyncio.sleep(tail)
    finally:
        stop.set()
        report = await load
    return report, what, report.max_gap_ms(started, time.monotonic())


def soak_bodies(good: list[bytes]) -> tuple[list[bytes], list[int]]:
    """Mixed payloads and the status each must get: good digits and three kinds of bad input."""
    bad = [
        (b"{}", 400),
        (json.dumps({"image": "not an image"}).encode(), 400),
        (json.dumps({"image": "iVBORw0KGgoAAAANSUhEUgAA"}).encode(), 400),  # truncated PNG
    ]
    bodies, expected = [], []
    for i, body in enumerate(good):
        bodies.append(body)
        expected.append(200)
        if i % 3 == 0:
            payload, status = bad[(i // 3) % len(bad)]
            bodies.append(payload)
            expected.append(status)
    return bodies, expected


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise ValueError(f"no VmRSS for pid {pid}")


async def soak(ctx: Context, good: list[bytes], calls: int, concurrency: int) -> dict[str, Any]:
    """``calls`` calls of mixed payloads from one region; that region's replica's memory."""
    region = ctx.regions()[0]
    (replica,) = ctx.control.replicas(region=region, deployment=DEPLOYMENT)
    pid = int(replica["pid"])
    bodies, expected = soak_bodies(good)
    url = f"{ctx.config.gateway_url}/v1/deployments/{DEPLOYMENT}/predict"
    half = calls // 2
    results: list[LoadReport] = []
    memory: list[float] = []
    for part in (half, calls - half):
        stop = asyncio.Event()
        offset = sum(len(r.calls) for r in results)
        rotated = bodies[offset % len(bodies) :] + bodies[: offset % len(bodies)]
        report = await run_until(
            url, rotated, [region], stop, concurrency=concurrency, max_calls=part
        )
        results.append(report)
        memory.append(rss_mb(pid))

    unexpected = 0
    offset = 0
    for report in results:
        for call in report.calls:
            if call.status != expected[(offset + call.index) % len(expected)]:
                unexpected += 1
        offset += len(report.calls)
    growth = (memory[1] - memory[0]) / memory[0] * 100
    return {
        "calls": sum(len(r.calls) for r in results),
        "unexpected_status": unexpected,
        "replica": replica["id"],
        "rss_mb_half": round(memory[0], 1),
        "rss_mb_end": round(memory[1], 1),
        "growth_pct": round(growth, 2),
        "seconds": round(sum(r.seconds for r in results), 1),
    }


# -- setup -------------------------------------------------------------------------------------


def build_artifacts(config: ClusterConfig) -> list[str]:
    """Train a quick digit model and build two versions of its artifact (same weights)."""
    data = mnist()
    work = config.home / "work"
    weights = work / "weights.safetensors"
    if not weights.is_file():
        with console.status("training a quick digit model (1 epoch, 2,000 digits)"):
            result = train(data, epochs=1, max_train=2000)
            save_weights(result.model, weights)
    control = ControlClient(config.control_url)
    registry = Registry(LocalStorage(config.registry_dir))
    ids = []
    run = time.strftime("%Y%m%d%H%M%S")  # versions are immutable: each run builds new ones
    for version in (f"chaos-{run}-1", f"chaos-{run}-2"):
        artifact_id, tar = build_artifact(
            f"{example_service()}:DigitClassifier",
            name=DEPLOYMENT,
            version=version,
            files={"weights.safetensors": weights},
            out_dir=work / "dist",
        )
        pushed = registry.push(tar)
        control.register_artifact(artifact_id, DEPLOYMENT, version, pushed["manifest"])
        ids.append(artifact_id)
    return ids


def digit_bodies(count: int) -> list[bytes]:
    data = mnist()
    return [image_payload(to_png(image)) for image in data.test_images[:count]]


def markdown(rows: list[dict[str, Any]], soak_result: dict[str, Any] | None) -> str:
    """The results as the Markdown page the README links to."""
    lines = [
        "# Fault suite",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, `make chaos`: a local cluster of "
        f"three regions, {REPLICAS} digit replicas each, callers in every region.",
        "",
        "| scenario | fault | calls | failed | max gap ms |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['scenario']} | {row['fault']} | {row['calls']} | {row['failed']} "
            f"| {row['max_gap_ms']:.0f} |"
        )
    if soak_result is not None:
        lines += [
            "",
            f"Soak: {soak_result['calls']} calls of mixed payloads (good digits and bad input) "
            f"in {soak_result['seconds']} s, {soak_result['unexpected_status']} with an "
            f"unexpected status; replica memory {soak_result['rss_mb_half']} MB at half-way and "
            f"{soak_result['rss_mb_end']} MB at the end ({soak_result['growth_pct']:+.2f}%).",
        ]
    return "\n".join(lines) + "\n"


def print_table(rows: list[dict[str, Any]]) -> None:
    table = Table(title="fault suite: calls through the gateway while each fault is injected")
    for column in ("scenario", "fault", "calls", "failed", "max gap ms"):
        table.add_column(column)
    for row in rows:
        failed = f"[{'green' if row['failed'] == 0 else 'red'}]{row['failed']}[/]"
        table.add_row(
            row["scenario"], row["fault"], str(row["calls"]), failed, f"{row['max_gap_ms']:.0f}"
        )
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--home", type=Path, default=Path(".anycast/chaos"))
    parser.add_argument("--port-base", type=int, default=17070)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--soak-calls", type=int, default=50_000)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    config = load_config(args.home).model_copy(
        update={
            "home": args.home.resolve(),
            "control_port": args.port_base,
            "gateway_port": args.port_base + 1,
            "agent_port_base": args.port_base + 2,
        }
    )
    cluster = LocalCluster(config)
    args.results.mkdir(parents=True, exist_ok=True)
    try:
        with console.status("starting a local three-region cluster"):
            cluster.up()
        ctx = Context(cluster, build_artifacts(cluster.config))
        deploy_artifact(ctx.config, DEPLOYMENT, ctx.artifacts[0], REPLICAS, [])
        with console.status(f"waiting for {REPLICAS} ready replicas per region"):
            ctx.wait_serving()
        bodies = digit_bodies(500)

        rows = []
        for name, fault in SCENARIOS:
            with console.status(f"scenario: {name}"):
                report, what, gap = asyncio.run(run_scenario(ctx, fault, bodies, args.concurrency))
            row = {
                "scenario": name,
                "fault": what,
                "calls": len(report.calls),
                "failed": report.failed,
                "max_gap_ms": gap,
                "errors": report.errors(),
            }
            rows.append(row)
            console.print(f"  {name}: {row['calls']} calls, {row['failed']} failed")
        print_table(rows)
        (args.results / "chaos.json").write_text(json.dumps({"rows": rows}, indent=2) + "\n")
        (args.results / "chaos.md").write_text(markdown(rows, None))

        with console.status(f"soak: {args.soak_calls} calls of mixed payloads"):
            result = asyncio.run(soak(ctx, bodies, args.soak_calls, args.concurrency))
        (args.results / "soak.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.results / "chaos.md").write_text(markdown(rows, result))
        console.print(
            f"soak: {result['calls']} calls in {result['seconds']} s, "
            f"{result['unexpected_status']} with an unexpected status; replica memory "
            f"{result['rss_mb_half']} MB at half-way, {result['rss_mb_end']} MB at the end "
            f"({result['growth_pct']:+.2f}%)"
        )
    finally:
        with console.status("stopping the cluster"):
            cluster.down()
    failed = sum(r["failed"] for r in rows) + result["unexpected_status"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
