"""Serving benchmark: the same digit CNN and weights behind every system, loaded by one wrk.

    .venv/bin/python bench/serving.py [--warmup 10] [--duration 20] [--systems a,b,...]

Each system runs in a child process of its own (inside a private network namespace when
``unshare -n`` works, so nothing it opens is reachable from outside and no port clashes
with anything else on the machine): the child starts the server, waits until it answers a
real digit, warms it up with wrk, then measures with wrk while sampling the peak RSS of the
server's process tree. Results go to bench/results/serving.{md,json}.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))

import harness
from harness import BENCH, CACHE, PYTHON, REPO, RESULTS, log
from requirements import PEERS

BATCH_SIZE = 64
MAX_WAIT_MS = 5
UNLOADED_SECONDS = 5.0  # calls one at a time: the latency of a hop, with no queue in front
DIGITS_PER_CALL = 16  # the batched row's second load: callers that send 16 digits a call
COLUMNS = ["system", "version", "rps", "p50_ms", "p99_ms", "errors", "peak_rss_mb", "note"]
ANYCAST_SYSTEMS = ["anycast-replica", "anycast-gateway", "anycast-gateway-batched"]
SYSTEMS = ["model-inprocess", "fastapi-plain", *ANYCAST_SYSTEMS, *PEERS]


@dataclass(frozen=True)
class Server:
    """How to start one HTTP system and where wrk sends its load."""

    argv: list[str]
    path: str
    note: str
    ready_path: str | None = None  # GET until 200; None: POST a digit to ``path``
    cwd: Path | None = None
    env: dict[str, str] = field(default_factory=dict)


def python_path(*extra: Path) -> str:
    return os.pathsep.join(str(p) for p in (REPO / "src", BENCH / "peers", *extra))


def model_env() -> dict[str, str]:
    return {"BENCH_WEIGHTS": str(harness.weights()), "ANYCAST_TORCH_THREADS": "1"}


def peer_server(name: str, port: int) -> Server:
    python = str(harness.venv_python(name))
    env = {**model_env(), "BENCH_PORT": str(port), "PYTHONPATH": python_path()}
    folder = BENCH / "peers" / name
    if name == "bentoml":
        bentoml = str(harness.venv_python(name).parent / "bentoml")
        argv = [bentoml, "serve", "service:Digits", "--host", "127.0.0.1", "--port", str(port)]
        return Server(argv, "/predict", "1 worker, no batching", cwd=folder, env=env)
    script = {"litserve": "server.py", "ray-serve": "app.py", "lepton-photon": "photon.py"}[name]
    notes = {
        "litserve": "1 worker, no batching",
        "ray-serve": (
            "1 replica, no batching, max_ongoing_requests=64, model in a worker thread; "
            "RSS includes Ray's raylet/GCS"
        ),
        "lepton-photon": "Photon.launch(), no batching",
    }
    return Server([python, str(folder / script)], "/predict", notes[name], cwd=folder, env=env)


def http_server(system: str, port: int) -> Server:
    if system == "fastapi-plain":
        env = {**model_env(), "BENCH_PORT": str(port), "PYTHONPATH": python_path()}
        argv = [PYTHON, str(BENCH / "peers" / "fastapi_plain" / "app.py")]
        return Server(argv, "/predict", "sync def endpoint, 1 uvicorn worker", env=env)
    if system == "anycast-replica":
        argv = [
            str(Path(PYTHON).parent / "anycast"),
            "serve",
            f"{BENCH / 'services' / 'plain_service.py'}:DigitClassifier",
            "--port",
            str(port),
            "--file",
            f"weights.safetensors={harness.weights()}",
        ]
        note = "`anycast serve`, plain handler"
        return Server(argv, "/v1/predict", note, ready_path="/readyz", env=model_env())
    return peer_server(system, port)


# -- one system, measured in its own (network-namespaced) child process ------------------------


def measure(
    url: str, roots: list[int], args: argparse.Namespace, headers: dict[str, str] | None = None
) -> dict[str, Any]:
    """Warm up, then the measured wrk run; peak RSS of ``roots``' trees over both."""
    with harness.PeakRss(roots) as rss:
        if args.warmup > 0:
            harness.run_wrk(url, args.warmup, connections=args.connections, headers=headers)
        result = harness.run_wrk(url, args.duration, connections=args.connections, headers=headers)
    row = {**result.as_row(), "requests": result.requests, "peak_rss_mb": round(rss.peak_mb, 1)}
    return {**row, "error_detail": result.detail}


def measure_unloaded(url: str) -> dict[str, Any]:
    """p50/p99 of calls made one at a time (one connection), after the loaded run: what a
    call costs with no queue in front of it. At 64 busy connections p50 is mostly queueing
    (about 64 / rps), so a hop's own latency shows only here."""
    result = harness.run_wrk(url, UNLOADED_SECONDS, connections=1, threads=1)
    return {"connections": 1, **result.as_row()}


def measure_per_call(url: str, args: argparse.Namespace) -> dict[str, Any]:
    """The batched row's second load: each call carries DIGITS_PER_CALL digits (a JSON
    array), so the replica's per-call HTTP cost is shared by that many rows."""
    kwargs: dict[str, Any] = {"connections": args.connections, "per_call": DIGITS_PER_CALL}
    harness.run_wrk(url, min(args.warmup, 5.0), **kwargs)
    result = harness.run_wrk(url, args.duration, **kwargs)
    row = result.as_row()
    return {
        "digits_per_call": DIGITS_PER_CALL,
        "digits_per_s": round(result.rps * DIGITS_PER_CALL, 1),
        **row,
        "error_detail": result.detail,
    }


def run_http(system: str, args: argparse.Namespace) -> dict[str, Any]:
    from anycast.core.http import free_port

    port = free_port()
    server = http_server(system, port)
    log_path = CACHE / "logs" / f"{system}.log"
    log_path.unlink(missing_ok=True)
    proc = harness.start(server.argv, log_path, cwd=server.cwd, env=server.env)
    base = f"http://127.0.0.1:{port}"
    try:
        body = harness.bodies()[0]
        headers = {"content-type": "application/json"}
        if server.ready_path:
            harness.wait_ready(base + server.ready_path, proc, log_path)
        harness.wait_ready(base + server.path, proc, log_path, body=body, headers=headers)
        row = measure(base + server.path, [proc.pid], args)
        if system == "anycast-replica":
            row["extra"] = {"unloaded": measure_unloaded(base + server.path)}
    finally:
        harness.stop(proc)
    return {**row, "note": server.note}


def build_and_push(config: Any, service_file: Path, version: str) -> str:
    """Build the bench service into an artifact, push it and register it."""
    from anycast.control.client import ControlClient
    from anycast.registry import LocalStorage, Registry, build_artifact

    artifact_id, tar = build_artifact(
        f"{service_file}:DigitClassifier",
        name="digits",
        version=version,
        files={"weights.safetensors": harness.weights()},
        out_dir=config.home / "dist",
    )
    pushed = Registry(LocalStorage(config.registry_dir)).push(tar)
    ControlClient(config.control_url).register_artifact(
        artifact_id, "digits", version, pushed["manifest"]
    )
    return artifact_id


def run_gateway(system: str, args: argparse.Namespace) -> dict[str, Any]:
    """A one-region local cluster (control plane, agent, gateway), one replica, via the gateway."""
    from anycast.cli.cluster import deploy_artifact, wait_ready
    from anycast.core.config import DEFAULT_REGIONS, ClusterConfig
    from anycast.core.http import free_port
    from anycast.local import LocalCluster

    batched = system.endswith("-batched")
    service = BENCH / "services" / ("batched_service.py" if batched else "plain_service.py")
    home = CACHE / f"cluster-{system}"
    shutil.rmtree(home, ignore_errors=True)
    config = ClusterConfig(
        home=home,
        control_port=free_port(),
        gateway_port=free_port(),
        agent_port_base=free_port(),
        regions=[DEFAULT_REGIONS[0]],
        gateway_region=DEFAULT_REGIONS[0].name,
        simulate_latency=False,
        gateway_data_plane="haproxy",  # HAProxy carries the calls, the gateway steers it
    )
    harness.ensure_haproxy()
    cluster = LocalCluster(config)
    os.environ["ANYCAST_TORCH_THREADS"] = "1"
    try:
        cluster.up()
        artifact = build_and_push(cluster.config, service, "1")
        deploy_artifact(cluster.config, "digits", artifact, 1, [])
        wait_ready(config.control_url, "digits", {config.gateway_region: 1}, timeout=180)
        url = f"{config.gateway_url}/v1/deployments/digits/predict"
        headers = {"content-type": "application/json"}
        harness.wait_ready(url, None, None, body=harness.bodies()[0], headers=headers)
        roots = [p.pid for p in cluster.processes() if p.pid is not None]
        if batched:
            rows_of = BatchRows(config.control_url)
            row = measure(url, roots, args)
            row["mean_batch_rows"] = rows_of.mean_since_last()
            per_call = measure_per_call(url, args)
            row["extra"] = {"per_call": {**per_call, "mean_batch_rows": rows_of.mean_since_last()}}
        else:
            row = measure(url, roots, args)
            row["extra"] = {"unloaded": measure_unloaded(url)}
    finally:
        cluster.down()
    knobs = f"max_batch_size={BATCH_SIZE}, max_wait_ms={MAX_WAIT_MS}" if batched else "plain"
    note = (
        f"1 region, 1 replica, {knobs} handler; gateway with --data-plane haproxy; "
        "RSS sums control plane, agent, gateway (with HAProxy), replica"
    )
    return {**row, "note": note}


class BatchRows:
    """Mean rows per model call of the deployment's one replica between two readings of its
    ``anycast_batch_rows`` histogram (warm-up included)."""

    def __init__(self, control_url: str) -> None:
        from anycast.control.client import ControlClient

        (replica,) = ControlClient(control_url).replicas(deployment="digits")
        self.metrics_url = f"{replica['endpoint']}/metrics"
        self.last = self.read()

    def read(self) -> tuple[float, float]:
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        values = {"anycast_batch_rows_sum": 0.0, "anycast_batch_rows_count": 0.0}
        for family in text_string_to_metric_families(httpx.get(self.metrics_url).text):
            for sample in family.samples:
                if sample.name in values:
                    values[sample.name] += sample.value
        return values["anycast_batch_rows_sum"], values["anycast_batch_rows_count"]

    def mean_since_last(self) -> float | None:
        (rows, calls), (rows_before, calls_before) = self.read(), self.last
        self.last = (rows, calls)
        return (
            round((rows - rows_before) / (calls - calls_before), 1)
            if calls > calls_before
            else None
        )


def run_inprocess(args: argparse.Namespace) -> dict[str, Any]:
    """Digits/s of the model alone at batch 64 (one torch thread), and with PNG decoding."""
    import digits
    import numpy as np
    import torch

    from anycast.training import preprocess

    os.environ.update(model_env())
    model = digits.load()
    images = [json.loads(b)["image"] for b in harness.bodies()]
    pixels = np.stack([digits.decode(image) for image in images])  # (300, 28, 28)
    batches = [preprocess(np.roll(pixels, -i * BATCH_SIZE, axis=0)[:BATCH_SIZE]) for i in range(5)]

    def forward(i: int) -> None:
        with torch.inference_mode():
            model(batches[i % len(batches)]).softmax(dim=1)

    def decode_and_forward(i: int) -> None:
        start = i * BATCH_SIZE % len(images)
        digits.predict_many(model, (images * 2)[start : start + BATCH_SIZE])

    _timed(forward, min(args.warmup, 3.0))
    seconds, latencies = _timed(forward, args.duration)
    decode_seconds, decode_latencies = _timed(decode_and_forward, max(2.0, args.duration / 4))
    with_decode = len(decode_latencies) * BATCH_SIZE / decode_seconds
    ordered = sorted(latencies)
    return {
        "rps": round(len(latencies) * BATCH_SIZE / seconds, 1),
        "p50_ms": round(ordered[len(ordered) // 2], 2),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 2),
        "errors": 0,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "note": (
            f"digits/s of model forward+softmax at batch {BATCH_SIZE}, 1 torch thread; "
            f"p50/p99 per batch; with base64+PNG decode: {with_decode:,.0f} digits/s"
        ),
    }


def _timed(step: Callable[[int], None], seconds: float) -> tuple[float, list[float]]:
    latencies: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        began = time.perf_counter()
        step(len(latencies))
        latencies.append((time.perf_counter() - began) * 1000)
    return time.perf_counter() - start, latencies


def run_inner(system: str, args: argparse.Namespace) -> dict[str, Any]:
    if system == "model-inprocess":
        return run_inprocess(args)
    if system.startswith("anycast-gateway"):
        return run_gateway(system, args)
    return run_http(system, args)


# -- the driver --------------------------------------------------------------------------------


def batching_available() -> bool:
    import anycast

    return "max_batch_size" in inspect.signature(anycast.handler).parameters


def version_of(system: str) -> str:
    if system == "model-inprocess":
        import torch

        return f"torch {torch.__version__}"
    if system == "fastapi-plain":
        import fastapi
        import uvicorn

        return f"fastapi {fastapi.__version__}, uvicorn {uvicorn.__version__}"
    if system in ANYCAST_SYSTEMS:
        import anycast

        return f"anycast {anycast.__version__}"
    return PEERS[system][0].replace("==", " ").replace("[serve]", "")


def skip_reason(system: str, netns: bool) -> str | None:
    """Why a system cannot run here, or None; creates peers' venvs as a side effect."""
    if system == "ray-serve" and not netns:
        return (
            "not run: Ray listens beyond loopback, so it runs only inside a private network "
            "namespace, and `unshare -n` does not work here"
        )
    if system == "anycast-gateway-batched" and not batching_available():
        return (
            "not run: @anycast.handler(max_batch_size=..., max_wait_ms=...) has not landed "
            "in src/anycast/sdk/service.py yet"
        )
    if system in PEERS:
        try:
            harness.ensure_venv(system, PEERS[system])
        except (RuntimeError, subprocess.CalledProcessError) as exc:
            return f"not run: {exc}"
    return None


def run_system(system: str, args: argparse.Namespace, netns: bool) -> dict[str, Any]:
    row: dict[str, Any] = {"system": system, "version": version_of(system)}
    empty = dict.fromkeys(["rps", "p50_ms", "p99_ms", "errors", "peak_rss_mb"])
    reason = skip_reason(system, netns)
    if reason:
        return {**row, **empty, "note": reason}

    out = CACHE / "rows" / f"{system}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    argv = [PYTHON, str(Path(__file__).resolve()), "--inner", system, "--result", str(out)]
    argv += ["--warmup", str(args.warmup), "--duration", str(args.duration)]
    argv += ["--connections", str(args.connections)]
    if netns and system != "model-inprocess":
        argv = harness.in_netns(argv)
    log.info("running %s", system)
    budget = args.warmup + args.duration + 400
    try:
        subprocess.run(argv, timeout=budget, check=False, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {**row, **empty, "note": f"failed: no result within {budget:.0f} s"}
    no_result = {"error": "child wrote no result"}
    result: dict[str, Any] = json.loads(out.read_text()) if out.is_file() else no_result
    if "error" in result:
        return {**row, **empty, "note": f"failed: {result['error']}"}
    result.pop("requests", None)
    detail = result.pop("error_detail", "")
    if detail:
        result["note"] = f"{result['note']}; errors: {detail}"
    mean_rows = result.pop("mean_batch_rows", None)
    if mean_rows is not None:
        result["note"] += f"; {mean_rows} rows per model call"
    result["note"] += "".join(extra_notes(result.get("extra", {})))
    return {**row, **result}


def extra_notes(extra: dict[str, Any]) -> list[str]:
    """The row's second measurements, as clauses of its note."""
    notes = []
    if "unloaded" in extra:
        one = extra["unloaded"]
        notes.append(f"; one connection: p50 {one['p50_ms']:.2f} ms, p99 {one['p99_ms']:.2f} ms")
    if "per_call" in extra:
        many = extra["per_call"]
        notes.append(
            f"; {many['digits_per_call']} digits per call: {many['digits_per_s']:,.0f} "
            f"digits/s, p50 {many['p50_ms']:.1f} ms, p99 {many['p99_ms']:.1f} ms, "
            f"errors {many['errors']}, {many.get('mean_batch_rows')} rows per model call"
        )
        if many.get("error_detail"):
            notes.append(f" ({many['error_detail']})")
    return notes


def evaluate(rows: list[dict[str, Any]], connections: int = 64) -> list[str]:
    """The three targets, each said plainly as MET or NOT MET (or not evaluated)."""
    by = {r["system"]: r for r in rows if r.get("rps")}
    gateway, replica = by.get("anycast-gateway"), by.get("anycast-replica")
    peers = [by[p] for p in PEERS if p in by]
    best = max(peers, key=lambda r: r["rps"]) if peers else None
    lines = []

    if gateway and best:
        ratio = gateway["rps"] / best["rps"]
        met = ratio >= 1.5 and gateway["p99_ms"] <= best["p99_ms"]
        lines.append(
            f"(a) anycast-gateway rps >= 1.5x the best peer's ({best['system']}) with p99 <= "
            f"its p99: **{'MET' if met else 'NOT MET'}** - {gateway['rps']:,.0f} vs "
            f"{best['rps']:,.0f} rps ({ratio:.2f}x), p99 {gateway['p99_ms']:.1f} vs "
            f"{best['p99_ms']:.1f} ms"
        )
    else:
        lines.append("(a) **not evaluated**: the gateway row or every peer row is missing")

    if gateway and replica:
        lines.append(gateway_overhead(gateway, replica, connections))
    else:
        lines.append("(b) **not evaluated**: the gateway or the replica row is missing")

    batched, inproc = by.get("anycast-gateway-batched"), by.get("model-inprocess")
    if batched and inproc:
        lines.append(batched_share(batched, inproc))
    else:
        lines.append(
            "(c) **not evaluated**: the batched gateway row or the in-process row is missing"
        )
    return lines


def gateway_overhead(gateway: dict[str, Any], replica: dict[str, Any], connections: int) -> str:
    """Target (b): the p50 a gateway hop adds, taken from the one-connection runs (at 64 busy
    connections p50 is about 64 / rps, so its gap restates the throughput gap), and the share
    of the replica's throughput kept at 64 connections."""
    kept = gateway["rps"] / replica["rps"]
    loaded = gateway["p50_ms"] - replica["p50_ms"]
    one_gw = gateway.get("extra", {}).get("unloaded")
    one_rep = replica.get("extra", {}).get("unloaded")
    if one_gw is None or one_rep is None:
        return (
            "(b) **not evaluated**: the one-connection runs of the gateway or replica are missing"
        )
    added = one_gw["p50_ms"] - one_rep["p50_ms"]
    met = added <= 1.0 and kept >= 0.8
    return (
        f"(b) the gateway adds <= 1 ms p50 over the direct replica and keeps >= 80% of its "
        f"throughput: **{'MET' if met else 'NOT MET'}** - one call at a time it adds "
        f"{added:+.2f} ms p50 ({one_gw['p50_ms']:.2f} vs {one_rep['p50_ms']:.2f} ms); at "
        f"{connections} connections it keeps {kept:.0%} ({gateway['rps']:,.0f} of "
        f"{replica['rps']:,.0f} rps), and there p50 differs by {loaded:+.1f} ms "
        f"({gateway['p50_ms']:.1f} vs {replica['p50_ms']:.1f} ms): with every connection "
        f"busy, p50 is about {connections} / rps, so it follows the throughput"
    )


def batched_share(batched: dict[str, Any], inproc: dict[str, Any]) -> str:
    """Target (c), for both loads of the batched row: one digit a call (the payloads every
    system gets) and DIGITS_PER_CALL digits a call."""
    share = batched["rps"] / inproc["rps"]
    text = (
        f"(c) batched digits/s >= 70% of in-process batched: with one digit per call "
        f"**{'MET' if share >= 0.7 else 'NOT MET'}** - {batched['rps']:,.0f} vs "
        f"{inproc['rps']:,.0f} digits/s ({share:.1%})"
    )
    many = batched.get("extra", {}).get("per_call")
    if many is not None and not many["errors"]:
        share = many["digits_per_s"] / inproc["rps"]
        text += (
            f"; with {many['digits_per_call']} digits per call "
            f"**{'MET' if share >= 0.7 else 'NOT MET'}** - {many['digits_per_s']:,.0f} "
            f"digits/s ({share:.1%})"
        )
    return text


def conditions(args: argparse.Namespace, netns: bool, load: tuple[float, ...]) -> str:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO
    ).stdout.strip()
    return (
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {commit}, "
        f"{os.cpu_count()} cores, load average {load[0]:.2f} at start, Python "
        f"{platform.python_version()}; wrk {args.connections} connections, 2 threads, "
        f"{args.warmup:g} s warm-up + {args.duration:g} s measured, "
        f"{harness.DISTINCT_BODIES} distinct MNIST test digits as base64 PNG JSON; "
        f"{'each system in its own network namespace' if netns else 'on 127.0.0.1'}"
    )


def write_results(
    rows: list[dict[str, Any]], targets: list[str], about: str, results: Path = RESULTS
) -> str:
    results.mkdir(parents=True, exist_ok=True)
    extra = {row["system"]: row["extra"] for row in rows if row.get("extra")}
    rows = [{k: v for k, v in row.items() if k != "extra"} for row in rows]
    table = harness.markdown_table(rows, COLUMNS)
    text = "\n".join(
        [
            "# Serving benchmark",
            "",
            about,
            "",
            table,
            "",
            "rps of model-inprocess is digits/s. Targets:",
            "",
            *[f"- {line}" for line in targets],
            "",
        ]
    )
    (results / "serving.md").write_text(text)
    # "extra": second measurements per system (one-connection latency, digits per call)
    payload = {"rows": rows, "extra": extra, "targets": targets, "conditions": about}
    (results / "serving.json").write_text(json.dumps(payload, indent=2) + "\n")
    return text


def parse_args() -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=float, default=float(env("BENCH_WARMUP", "10")))
    parser.add_argument("--duration", type=float, default=float(env("BENCH_DURATION", "20")))
    parser.add_argument("--connections", type=int, default=int(env("BENCH_CONNECTIONS", "64")))
    parser.add_argument(
        "--systems",
        default=env("BENCH_SYSTEMS", ",".join(SYSTEMS)),
        help=f"comma-separated subset of: {', '.join(SYSTEMS)}",
    )
    parser.add_argument(
        "--results-dir", type=Path, default=RESULTS, help="where serving.{md,json} go"
    )
    parser.add_argument("--inner", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> int:
    harness.setup_logging()
    args = parse_args()
    if args.inner:
        try:
            row = run_inner(args.inner, args)
        except Exception as exc:  # the driver turns this into the row's note
            log.exception("%s failed", args.inner)
            row = {"error": f"{type(exc).__name__}: {exc}"[:400]}
        args.result.write_text(json.dumps(row))
        return 0

    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown:
        raise SystemExit(f"unknown systems {unknown}; choose from {', '.join(SYSTEMS)}")
    load = os.getloadavg()
    harness.weights()
    harness.bodies_file()
    harness.ensure_wrk()
    netns = harness.netns_available()
    rows = [run_system(system, args, netns) for system in systems]
    text = write_results(
        rows, evaluate(rows, args.connections), conditions(args, netns, load), args.results_dir
    )
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
