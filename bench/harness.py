"""What every benchmark here shares: weights, payloads, wrk, peak RSS, processes, venvs.

Nothing in this module knows about a particular server; ``serving.py`` and ``failover.py``
describe the systems and use these pieces to start them, load them and measure them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

log = logging.getLogger("bench")

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
CACHE = REPO / ".anycast" / "bench"
VENVS = BENCH / ".venvs"
RESULTS = BENCH / "results"
PYTHON = sys.executable  # the project's .venv python, which has anycast installed

TRAIN_EPOCHS = 2
DISTINCT_BODIES = 300
TORCH_VERSION = "2.13.0"


# -- weights and payloads ----------------------------------------------------------------------


def weights() -> Path:
    """The digit CNN's weights, trained once with the project's own training and cached."""
    path = CACHE / "weights.safetensors"
    if path.is_file():
        return path
    from anycast.datasets import mnist
    from anycast.training import save_weights, train

    log.info("training the digit CNN for %d epochs (once; cached at %s)", TRAIN_EPOCHS, path)
    result = train(mnist(), epochs=TRAIN_EPOCHS)
    save_weights(result.model, path)
    log.info("trained: test accuracy %.4f", result.test_accuracy)
    return path


def bodies_file(per_call: int = 1) -> Path:
    """One JSON body per line of distinct MNIST test digits: ``{"image": "<base64 PNG>"}``,
    or with ``per_call`` > 1 a JSON array of that many such objects (a batched call)."""
    path = CACHE / f"bodies-{DISTINCT_BODIES}.jsonl"
    if per_call > 1:
        path = CACHE / f"bodies-{DISTINCT_BODIES}x{per_call}.jsonl"
    if path.is_file():
        return path
    from anycast.datasets import mnist, to_png
    from anycast.local.load import image_payload

    digits = mnist().test_images[:DISTINCT_BODIES]
    lines = [image_payload(to_png(image)).decode() for image in digits]
    if per_call > 1:  # line i: digits i, i+1, ... (wrapping), so every line differs
        lines = [
            "[" + ",".join(lines[(i + k) % len(lines)] for k in range(per_call)) + "]"
            for i in range(len(lines))
        ]
    CACHE.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def bodies() -> list[bytes]:
    return [line.encode() for line in bodies_file().read_text().splitlines() if line]


# -- wrk -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int  # non-2xx/3xx answers plus socket errors (connect, read, write, timeout)
    detail: str  # which errors, such as "non-2xx 12, timeout 3" ("" when none)

    def as_row(self) -> dict[str, float | int]:
        return {
            "rps": round(self.rps, 1),
            "p50_ms": round(self.p50_ms, 2),
            "p99_ms": round(self.p99_ms, 2),
            "errors": self.errors,
        }


def ensure_wrk() -> str:
    """The wrk binary; installed with apt-get (after apt-get update) when missing."""
    return ensure_debian_tool("wrk")


def ensure_haproxy() -> str:
    """The haproxy binary (the gateway rows' data plane); installed with apt-get when missing."""
    return ensure_debian_tool("haproxy")


def ensure_debian_tool(name: str) -> str:
    """The path of command ``name``, from the Debian package of that name when missing."""
    found = shutil.which(name)
    if found:
        return found
    log.info("%s is missing; installing the Debian package %s", name, name)
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", name], check=True)
    found = shutil.which(name)
    if not found:
        raise RuntimeError(f"apt-get install {name} finished but no {name} is on PATH")
    return found
    log.info("haproxy is missing; installing the Debian package haproxy")
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "haproxy"], check=True)
    found = shutil.which("haproxy")
    if not found:
        raise RuntimeError("apt-get install haproxy finished but no haproxy is on PATH")
    return found


def run_wrk(
    url: str,
    seconds: float,
    *,
    connections: int = 64,
    threads: int = 2,
    headers: dict[str, str] | None = None,
    timeout_s: int = 10,
    per_call: int = 1,
) -> WrkResult:
    """POST the cached digit bodies (``per_call`` digits each) to ``url`` round-robin for
    ``seconds`` with wrk."""
    env = {
        **os.environ,
        "BENCH_BODIES": str(bodies_file(per_call)),
        "BENCH_HEADERS": "\n".join(f"{k}: {v}" for k, v in (headers or {}).items()),
    }
    argv = [
        ensure_wrk(),
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        f"--timeout={timeout_s}s",
        "--latency",
        "-s",
        str(BENCH / "wrk" / "post.lua"),
        url,
    ]
    done = subprocess.run(
        argv, env=env, capture_output=True, text=True, timeout=seconds + 60, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"wrk exited {done.returncode}: {done.stderr.strip()[-300:]}")
    return parse_wrk(done.stdout)


def parse_wrk(text: str) -> WrkResult:
    """Read the JSON line our Lua ``done()`` prints, plus wrk's own error counters."""
    match = re.search(r"^BENCH_JSON (.*)$", text, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"wrk printed no summary:\n{text[-500:]}")
    data = json.loads(match.group(1))
    errors = int(data["status_errors"]) + sum(int(v) for v in data["socket_errors"].values())
    seconds = data["duration_us"] / 1e6
    return WrkResult(
        requests=int(data["requests"]),
        seconds=seconds,
        rps=int(data["requests"]) / seconds if seconds else 0.0,
        p50_ms=data["p50_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        errors=errors,
        detail=_error_detail(int(data["status_errors"]), data["socket_errors"]),
    )


def _error_detail(status_errors: int, socket_errors: dict[str, int]) -> str:
    parts = [("non-2xx", status_errors), *socket_errors.items()]
    return ", ".join(f"{name} {int(count)}" for name, count in parts if int(count))


# -- processes and their memory ------------------------------------------------------------------


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def process_tree(roots: Sequence[int]) -> list[int]:
    """``roots`` and all their descendants that are alive now."""
    tree = _children()
    seen: list[int] = []
    stack = list(roots)
    while stack:
        pid = stack.pop()
        if pid in seen or not Path(f"/proc/{pid}").exists():
            continue
        seen.append(pid)
        stack.extend(tree.get(pid, []))
    return seen


def rss_mb(pids: Sequence[int]) -> float:
    total_kb = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
                    break
        except OSError:
            continue
    return total_kb / 1024


class PeakRss:
    """Samples the summed RSS of some process trees every ``interval`` s in a thread."""

    def __init__(self, roots: Sequence[int], interval: float = 0.25) -> None:
        self.roots = list(roots)
        self.interval = interval
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-rss", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, rss_mb(process_tree(self.roots)))
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def start(argv: Sequence[str], log_path: Path, **kwargs: object) -> subprocess.Popen[bytes]:
    """Start a server in its own session, its output in ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.update(kwargs.pop("env", {}) or {})  # type: ignore[call-overload]
    with log_path.open("ab") as out:
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            **kwargs,  # type: ignore[arg-type]
        )


def stop(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM the server's whole tree, then SIGKILL whatever is left after ``grace``."""
    pids = process_tree([proc.pid])
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    for pid in process_tree(pids):
        _signal(pid, signal.SIGKILL)
    proc.wait(timeout=5)


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        return


def wait_ready(
    url: str,
    proc: subprocess.Popen[bytes] | None,
    log_path: Path | None,
    timeout: float = 180.0,
    *,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> None:
    """Until ``url`` answers 200 (a POST of ``body`` when given); fail early if proc died."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {tail(log_path)}")
        try:
            if body is None:
                response = httpx.get(url, timeout=5)
            else:
                response = httpx.post(url, content=body, headers=headers, timeout=10)
            if response.status_code == 200:
                return
            last = f"HTTP {response.status_code}: {response.text[:200]}"
        except httpx.HTTPError as exc:
            last = type(exc).__name__
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready after {timeout:.0f} s ({last}): {tail(log_path)}")


def tail(path: Path | None, lines: int = 3) -> str:
    if path is None or not path.is_file():
        return ""
    text = path.read_text(errors="replace").strip().splitlines()
    return " | ".join(line.strip() for line in text[-lines:])[-400:]


# -- private network namespaces ------------------------------------------------------------------


def netns_available() -> bool:
    """Whether ``unshare -n`` works here (root, or user namespaces allowed)."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    done = subprocess.run(
        ["unshare", "-n", "sh", "-c", "ip link set lo up"], capture_output=True, check=False
    )
    return done.returncode == 0


def in_netns(argv: Sequence[str]) -> list[str]:
    """``argv`` run in a fresh network namespace holding only its own loopback."""
    command = " ".join(_quote(a) for a in argv)
    return ["unshare", "-n", "sh", "-c", f"ip link set lo up && exec {command}"]


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


# -- virtual environments of the peers -----------------------------------------------------------


def venv_python(name: str) -> Path:
    return VENVS / name / "bin" / "python"


def ensure_venv(name: str, requirements: Sequence[str]) -> Path:
    """``bench/.venvs/<name>`` with torch==2.13.0 installed first, then ``requirements``."""
    root = VENVS / name
    stamp = root / ".bench-requirements"
    wanted = "\n".join([f"torch=={TORCH_VERSION}", *requirements])
    if stamp.is_file() and stamp.read_text() == wanted and venv_python(name).exists():
        return venv_python(name)

    log.info("creating %s: %s", root, ", ".join(requirements))
    subprocess.run([_base_python(), "-m", "venv", "--clear", str(root)], check=True)
    pip = [str(venv_python(name)), "-m", "pip", "install", "--quiet"]
    constraints = root / "torch-constraint.txt"
    constraints.write_text(f"torch=={TORCH_VERSION}\n")
    _pip([*pip, f"torch=={TORCH_VERSION}"], name)
    _pip([*pip, "-c", str(constraints), *requirements], name)
    stamp.write_text(wanted)
    return venv_python(name)


def _pip(argv: list[str], name: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        lines = [ln for ln in (done.stderr or done.stdout).splitlines() if "ERROR" in ln]
        raise RuntimeError(f"pip install for {name} failed: {(lines or ['?'])[-1][:300]}")


def _base_python() -> str:
    """A plain Python 3.11 to make venvs from (not the project's venv)."""
    base = getattr(sys, "_base_executable", None) or sys.executable
    return shutil.which("python3.11") or base


# -- output --------------------------------------------------------------------------------------


def markdown_table(rows: Sequence[dict[str, object]], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [_cell(row.get(c)) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.1f}" if value >= 100 else f"{value:.2f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
