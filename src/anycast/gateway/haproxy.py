"""An optional HAProxy data plane: HAProxy carries the calls, the Python gateway steers it.

With ``--data-plane haproxy`` the gateway starts HAProxy (master-worker) on its public port
and serves its own app on an internal loopback port. HAProxy forwards the calls it can
serve alone straight to the replicas: a call to a known handler of a deployment that is
neither deterministic (those are cached in Python) nor asks for its own deadline
(``X-Anycast-Timeout-Ms``), from a known caller region, while a region of that deployment
has a server up. Everything else goes to the Python app, which answers exactly as in the
Python data plane: health, metrics, routes, bad input, holding calls while a region wakes.

The configuration is rendered from the routing table (:func:`plan_of`, :func:`render`):
per deployment and region a backend of that region's replicas, and per caller region
``use_backend`` rules in the routing module's nearest-first order. Each backend ends with
the Python app as its backup server, so a call whose region lost every replica while it was
being retried is finished by Python's own routing (failover, simulated delay, holding).

:class:`HaproxySupervisor` keeps HAProxy in step: a change of backends or servers is
written atomically and applied by a seamless reload (``reload`` on the master CLI; the
listening sockets pass to the new worker over the stats socket), and the Python view of each
replica's health (probes, ejections) is pushed with ``set server ... state`` on the stats
socket, without a reload. HAProxy also checks ``/readyz`` itself and marks a server down at
its first refused connection. The calls HAProxy carries are counted from its own stats
(:mod:`anycast.gateway.haproxy_metrics`), read over the same socket at each scrape.

HAProxy answers what it refuses itself as the Python gateway would: JSON error pages
(:func:`error_pages`, given with ``errorfile``, which also covers its parse errors) with the
Python codes, buffers that take the request lines and headers Python takes, HTTP/1.0 and 1.1
only, and a body that may be slow but not stall longer than Python's body timeout. Its files
live in the gateway's home (:func:`haproxy_paths`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import hashlib
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from anycast.core.body import body_timeout
from anycast.core.errors import ConfigError, Unavailable
from anycast.gateway.haproxy_metrics import READ_TIMEOUT, STAT_COMMAND, HaproxyStats
from anycast.gateway.routing import ReplicaHealth, RoutingTable

if TYPE_CHECKING:
    from anycast.gateway.server import Gateway

log = logging.getLogger(__name__)

DATA_PLANES = ("python", "haproxy")
CALL_PATH_HEADER = "X-Anycast-Call-Path"  # set by HAProxy for the Python app, never by callers
PYTHON_BACKEND = "python"
MAX_RETRIES = 6
# Buffers: the request line and headers must fit in BUFSIZE - MAXREWRITE bytes: 31 KiB, where
# HAProxy's default 15 KiB refuses a 20 KB query string the Python data plane takes. A buffer is
# allocated only while data passes through it, so idle keep-alive connections cost none; the
# worst case, every one of MAXCONN connections with both directions full, is about
# MAXCONN * 4 buffers (512 MiB), in practice a few MiB.
MAXCONN = 4096
BUFSIZE = 32 * 1024
MAXREWRITE = 1024  # room for the headers HAProxy adds (call path, deadline, region)
HEADER_LIMIT_KIB = (BUFSIZE - MAXREWRITE) // 1024
HTTP_REQUEST_TIMEOUT = 120.0  # s for the headers and the first buffer of body, in all
# Unix socket paths are at most 107 bytes, and HAProxy binds ``<path>.<pid>.tmp`` first: with
# pids of up to 7 digits, 95 are left. Longer homes get their sockets in a short /tmp folder.
MAX_SOCKET_PATH = 95
_HANDLER_PATTERN = "[A-Za-z_][A-Za-z0-9_]{0,63}"  # anycast.core.names' handler rule
_UNSAFE = re.compile(r"[^A-Za-z0-9_.:-]")
INSTALL_HINT = (
    "the HAProxy data plane needs the haproxy binary: install Debian's package with "
    "`apt-get install -y haproxy`, or run the gateway with --data-plane python"
)


def check_data_plane(name: str) -> str:
    if name not in DATA_PLANES:
        raise ConfigError(
            f"--data-plane must be one of {', '.join(DATA_PLANES)}, got {name!r}",
            code="invalid_data_plane",
        )
    return name


def haproxy_binary() -> str:
    """The haproxy executable on PATH; ConfigError saying how to install it when missing."""
    found = shutil.which("haproxy")
    if found is None:
        raise ConfigError(INSTALL_HINT, code="haproxy_missing")
    return found


# -- the plan: what HAProxy should route, free of HAProxy syntax --------------------------------


@dataclass(frozen=True)
class Server:
    name: str  # HAProxy server name, unique in its backend
    address: str  # host:port
    replica_id: str


@dataclass(frozen=True)
class Backend:
    name: str
    deployment: str
    region: str
    servers: tuple[Server, ...]


@dataclass(frozen=True)
class DeploymentPlan:
    name: str
    paths: tuple[str, ...]  # exact call paths HAProxy serves; empty with any_handler
    any_handler: bool  # no handler declarations: every valid handler name, all idempotent
    once_paths: tuple[str, ...]  # non-idempotent handlers: retried on connection failure only
    backends: tuple[Backend, ...]
    order: tuple[tuple[str, tuple[str, ...]], ...]  # caller region -> backend names, nearest first


@dataclass(frozen=True)
class Settings:
    public_port: int
    python_port: int
    socket_path: str
    gateway_region: str
    try_timeout: float = 20.0
    deadline: float = 60.0
    hold_seconds: float = 30.0
    simulate_latency: bool = False
    host: str = "127.0.0.1"
    max_body_bytes: int = 32 * 1024 * 1024  # larger bodies go to the Python app's 413
    body_timeout: float = field(default_factory=body_timeout)  # s a body may stall, as Python
    error_dir: str = ""  # HAProxy's JSON error pages (error_pages); the supervisor sets it


@dataclass(frozen=True)
class Plan:
    settings: Settings
    regions: tuple[str, ...]  # callers HAProxy may serve: the table's regions
    deployments: tuple[DeploymentPlan, ...]
    draining: bool = False

    def servers(self) -> dict[str, Server]:
        """Every replica server as ``backend/server`` -> server."""
        return {
            f"{b.name}/{s.name}": s for d in self.deployments for b in d.backends for s in b.servers
        }


def plan_of(table: RoutingTable, settings: Settings, *, draining: bool = False) -> Plan:
    """What HAProxy routes for this table; a draining gateway sends everything to Python."""
    if draining or table.revision is None:
        return Plan(settings, (), (), draining)
    deployments = tuple(
        plan
        for name in sorted(table.deployments)
        if (plan := _deployment_plan(table, name, settings)) is not None
    )
    return Plan(settings, tuple(sorted(table.regions)), deployments)


def _deployment_plan(table: RoutingTable, name: str, settings: Settings) -> DeploymentPlan | None:
    backends = {}
    for region in sorted({r.region for r in table.routes if r.deployment == name}):
        servers = _servers(table, name, region)
        if servers:
            backends[region] = Backend(f"{name}.{region}", name, region, servers)
    if not backends:
        return None  # no replica anywhere: Python holds its calls while a region wakes
    policies = table.handlers.get(table.deployments[name], {})
    prefix = f"/v1/deployments/{name}/"
    paths = tuple(prefix + h for h, p in sorted(policies.items()) if not p.deterministic)
    if policies and not paths:
        return None  # every handler is cached by Python
    once = tuple(prefix + h for h, p in sorted(policies.items()) if not p.idempotent)
    order = tuple(
        (
            caller,
            tuple(backends[r].name for r in _regions_for(table, caller, settings) if r in backends),
        )
        for caller in sorted(table.regions)
    )
    return DeploymentPlan(name, paths, not policies, once, tuple(backends.values()), order)


def _regions_for(table: RoutingTable, caller: str, settings: Settings) -> list[str]:
    # Limitation: HAProxy cannot sleep a simulated round trip, so with simulated latency on
    # it serves only calls answered in the caller's own region; Python serves the rest.
    if settings.simulate_latency:
        return [caller]
    return table.region_order(caller)


def _servers(table: RoutingTable, deployment: str, region: str) -> tuple[Server, ...]:
    servers, names = [], set()
    for route in sorted(table.replicas_of(deployment, region), key=lambda r: r.replica_id):
        address = _address(route.endpoint)
        name = _UNSAFE.sub("_", route.replica_id) or "replica"
        if address is None or name in names or name == PYTHON_BACKEND:
            continue  # not plain HTTP (Python still routes to it), or a clashing name
        names.add(name)
        servers.append(Server(name, address, route.replica_id))
    return tuple(servers)


def _address(endpoint: str) -> str | None:
    try:
        url = urlsplit(endpoint)
        port = url.port
    except ValueError:
        return None
    if url.scheme != "http" or not url.hostname or port is None or url.path not in ("", "/"):
        return None
    return f"{url.hostname}:{port}"


def usable_servers(plan: Plan, table: RoutingTable, health: ReplicaHealth, now: float) -> set[str]:
    """``backend/server`` keys the Python view keeps in rotation (probes and ejections)."""
    usable = set()
    for deployment in plan.deployments:
        for backend in deployment.backends:
            routes = table.replicas_of(deployment.name, backend.region)
            ids = {r.replica_id for r in health.rotation(routes, now)}
            usable |= {f"{backend.name}/{s.name}" for s in backend.servers if s.replica_id in ids}
    return usable


# -- rendering -----------------------------------------------------------------------------------


def render(plan: Plan, usable: Iterable[str] = ()) -> str:
    """The whole haproxy.cfg for ``plan``; servers not in ``usable`` start disabled."""
    enabled = set(usable)
    parts = [_global(plan.settings), _defaults(plan.settings), _frontend(plan)]
    parts.append(_python_backend(plan.settings))
    for deployment in plan.deployments:
        for backend in deployment.backends:
            parts.append(_region_backend(plan.settings, deployment, backend, enabled))
    return "\n".join(parts)


def _global(s: Settings) -> str:
    hard_stop = int(s.deadline + s.hold_seconds + 10)
    return _section(
        "global",
        "nbthread 1",
        f"maxconn {MAXCONN}",
        f"tune.bufsize {BUFSIZE}",
        f"tune.maxrewrite {MAXREWRITE}",
        f"stats socket {s.socket_path} mode 600 level admin expose-fd listeners",
        f"hard-stop-after {hard_stop}s",
    )


def _defaults(s: Settings) -> str:
    lines = [
        "mode http",
        # On a reload the old worker answers its idle keep-alive callers' next request with
        # "Connection: close" rather than closing under them as they send it.
        "option idle-close-on-response",
        "timeout connect 2s",
        # As Python's body timeout: a caller may take as long as it likes, but not pause
        # longer than this between two bytes (while HAProxy waits for the request or body).
        f"timeout client {_ms(s.body_timeout)}",
        # The headers and the buffered first part of the body, in all (Python has no limit).
        f"timeout http-request {_ms(max(HTTP_REQUEST_TIMEOUT, s.body_timeout))}",
        "timeout http-keep-alive 30s",
        "timeout queue 10s",
        "timeout check 1s",
        f"timeout server {_ms(s.try_timeout)}",
    ]
    if s.error_dir:  # errorfile, not http-error: only these answer HAProxy's parse errors
        lines += [f"errorfile {code} {_error_path(s, code)}" for code in error_pages(s)]
    return _section("defaults", *lines)


# -- HAProxy's own errors, as JSON like the Python gateway's --------------------------------------

_REASONS = {
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Payload Too Large",
    425: "Too Early",
    429: "Too Many Requests",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


def _error_messages(s: Settings) -> dict[int, tuple[str, str]]:
    """Status -> (code, message) of every error HAProxy can answer itself."""
    return {
        400: (
            "invalid_request",
            "the request is not valid HTTP/1.1 (RFC 9112): send a request line "
            "'METHOD /path HTTP/1.1' (or HTTP/1.0), well-formed headers with at most "
            f"{HEADER_LIMIT_KIB} KiB of request line and headers, a single Content-Length of "
            "digits or Transfer-Encoding: chunked, and an absolute URI only with the same "
            "host as the Host header",
        ),
        403: ("forbidden", "the gateway does not take this request"),
        404: ("not_found", "no such route on the gateway"),
        405: ("method_not_allowed", "calls are POST /v1/deployments/NAME/HANDLER"),
        408: (
            "body_timeout",
            f"the request stalled: no byte for {s.body_timeout:g} s, or its headers and "
            f"first {BUFSIZE // 1024} KiB of body took over "
            f"{max(HTTP_REQUEST_TIMEOUT, s.body_timeout):g} s in all; send the whole "
            "request without pausing",
        ),
        413: ("payload_too_large", f"the gateway accepts bodies of at most {s.max_body_bytes}"),
        425: ("too_early", "the request came too early in the connection; send it again"),
        429: ("too_many_requests", "too many requests at once; retry shortly"),
        500: ("internal", "internal error in the gateway's HAProxy; see the gateway's log"),
        501: (
            "not_implemented",
            "this Transfer-Encoding is not supported: send Content-Length or "
            "Transfer-Encoding: chunked",
        ),
        502: (
            "replica_dropped",
            "the replica closed the connection or answered invalid HTTP before answering; retry",
        ),
        503: ("unavailable", "no replica could answer this call; retry shortly"),
        504: (
            "replica_timeout",
            f"the replica did not answer within the per-try timeout of {s.try_timeout:.1f} s",
        ),
    }


def error_pages(s: Settings) -> dict[int, bytes]:
    """Status -> the whole HTTP answer HAProxy sends for its own errors (``errorfile``)."""
    pages = {}
    for status, (code, message) in _error_messages(s).items():
        body = json.dumps({"error": {"code": code, "message": message}}).encode()
        headers = [
            f"HTTP/1.1 {status} {_REASONS[status]}",
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
            "Cache-Control: no-cache",
            "Connection: close",
        ]
        if status == 503:
            headers.append("Retry-After: 1")  # as the Python gateway's 503s
        pages[status] = ("\r\n".join(headers) + "\r\n\r\n").encode() + body
    return pages


def write_error_pages(s: Settings) -> None:
    """Write :func:`error_pages` into ``s.error_dir``, where the configuration names them."""
    Path(s.error_dir).mkdir(parents=True, exist_ok=True)
    for status, page in error_pages(s).items():
        _error_path(s, status).write_bytes(page)


def _error_path(s: Settings, status: int) -> Path:
    return Path(s.error_dir) / f"{status}.http"


_VERSION_ERROR = json.dumps(
    {
        "error": {
            "code": "unsupported_http_version",
            "message": "HTTP/VERSION is not supported: send HTTP/1.1 or HTTP/1.0",
        }
    }
).replace("VERSION", "%[req.ver]")  # req.ver is digit.digit: HAProxy checks the version's form


def _frontend(plan: Plan) -> str:
    s = plan.settings
    lines = [
        f"bind {s.host}:{s.public_port}",
        # As the Python gateway (and RFC 9112): no other HTTP version, rather than passing on
        # a request HAProxy read as 1.1.
        "http-request return status 400 content-type application/json "
        f"lf-string '{_VERSION_ERROR}' if !{{ req.ver 1.1 }} !{{ req.ver 1.0 }}",
        f"http-request del-header {CALL_PATH_HEADER}",
        f"default_backend {PYTHON_BACKEND}",
    ]
    if not plan.deployments:
        return _section("frontend anycast", *lines)
    lines += [
        "acl call method POST",
        "acl python_only req.hdr_cnt(X-Anycast-Timeout-Ms) gt 0",
        "acl python_only req.fhdr_cnt(X-Anycast-Region) gt 1",
        # Bodies without a length, or too large, get the Python app's checks and answers.
        "acl python_only req.hdr_cnt(Content-Length) eq 0",
        f"acl python_only req.hdr_val(Content-Length) gt {s.max_body_bytes}",
    ]
    for region in plan.regions:
        lines.append(f"acl from.{region} req.fhdr(X-Anycast-Region) -m str {region}")
        if region == s.gateway_region:
            lines.append(f"acl from.{region} req.fhdr_cnt(X-Anycast-Region) eq 0")
            lines.append(f"acl from.{region} req.fhdr(X-Anycast-Region) -m len 0")
    for d in plan.deployments:
        lines.append(_call_acl(d))
        for backend in d.backends:
            lines += [
                f"acl up.{backend.name} srv_is_up({backend.name}/{x.name})" for x in backend.servers
            ]
    lines.append(f"use_backend {PYTHON_BACKEND} if !call || python_only")
    for d in plan.deployments:
        for caller, names in d.order:
            lines += [f"use_backend {n} if call.{d.name} from.{caller} up.{n}" for n in names]
    return _section("frontend anycast", *lines)


def _call_acl(d: DeploymentPlan) -> str:
    if d.any_handler:
        return f"acl call.{d.name} path_reg ^/v1/deployments/{d.name}/{_HANDLER_PATTERN}$"
    return f"acl call.{d.name} path {' '.join(d.paths)}"


def _python_backend(s: Settings) -> str:
    return _section(
        f"backend {PYTHON_BACKEND}",
        "http-reuse always",
        f"timeout server {_ms(s.deadline + s.hold_seconds + 5)}",
        f"server gateway 127.0.0.1:{s.python_port}",
    )


def _region_backend(s: Settings, d: DeploymentPlan, b: Backend, enabled: set[str]) -> str:
    retries = min(MAX_RETRIES, len(b.servers) + 1)  # every server once, then the Python backup
    deadline_ms = min(600_000, max(1, int(s.try_timeout * 1000)))
    lines = [
        "balance leastconn",
        "http-reuse always",
        "option http-buffer-request",
        "option httpchk GET /readyz",
        "http-check expect status 200",
        f"retries {retries}",
        "option redispatch 1",
        "retry-on conn-failure empty-response junk-response response-timeout 502 503",
    ]
    if d.once_paths:
        lines.append(f"http-request disable-l7-retry if {{ path {' '.join(d.once_paths)} }}")
    lines += [
        f"http-request set-header {CALL_PATH_HEADER} %[path]",
        f"http-request set-header X-Anycast-Deadline-Ms {deadline_ms}",
        "http-request replace-path ^/v1/deployments/[^/]+/(.*) /v1/\\1",
        f"http-response set-header X-Anycast-Region {b.region} if "
        "{ res.fhdr_cnt(X-Anycast-Replica) gt 0 } !{ res.fhdr_cnt(X-Anycast-Region) gt 0 }",
        "compression algo gzip",
        "compression type application/json",
        "compression offload",
        "default-server check inter 500ms fastinter 250ms downinter 1s rise 2 fall 2 "
        "observe layer4 error-limit 1 on-error mark-down",
    ]
    for server in b.servers:
        off = "" if f"{b.name}/{server.name}" in enabled else " disabled"
        lines.append(f"server {server.name} {server.address}{off}")
    lines.append(f"server {PYTHON_BACKEND} 127.0.0.1:{s.python_port} backup no-check")
    return _section(f"backend {b.name}", *lines)


def _section(header: str, *lines: str) -> str:
    return "\n".join([header, *(f"    {line}" for line in lines)]) + "\n"


def _ms(seconds: float) -> str:
    return f"{max(1, int(seconds * 1000))}ms"


# -- the supervisor ------------------------------------------------------------------------------


_PRCTL: Any = None
with contextlib.suppress(OSError, AttributeError):  # looked up before any fork: the child
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl  # of a threaded process must not dlopen
PR_SET_PDEATHSIG = 1
MIN_RELOAD_INTERVAL = 1.0  # seconds between reloads, so one never lands in the last one's exec
HOLD_LIMIT = 30.0  # seconds an idle connection may keep an old worker from exiting


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """HAProxy gets SIGTERM if the gateway dies without stopping it."""
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM)


def haproxy_paths(home: Path, public_port: int) -> tuple[Path, Path]:
    """The folder of HAProxy's configuration and the folder of its sockets, for one gateway.

    Both are ``<home>/run/haproxy-<port>``, beside the gateway's pid file, so HAProxy's command
    line names the home it belongs to. When that path is too long for a Unix socket, the
    sockets go to ``<tmp>/anycast-haproxy-<hash>``, the same folder each time for that home
    and port, so a gateway that was killed leaves nothing its next start does not clear.
    """
    run_dir = home.resolve() / "run" / f"haproxy-{public_port}"
    if len(str(run_dir / "master.sock")) <= MAX_SOCKET_PATH:
        return run_dir, run_dir
    digest = hashlib.sha256(str(run_dir).encode()).hexdigest()[:12]
    return run_dir, Path(tempfile.gettempdir()) / f"anycast-haproxy-{digest}"


class HaproxySupervisor:
    """Runs HAProxy as the gateway's child and keeps its configuration in step.

    Its files are the configuration, the error pages and the pid file in ``run_dir``, and the
    master and stats sockets beside ``settings.socket_path``; they are cleared at start (with
    any HAProxy a killed gateway left running) and removed at stop.
    """

    def __init__(
        self,
        gateway: Gateway,
        settings: Settings,
        run_dir: Path,
        *,
        interval: float = 0.2,
        binary: str | None = None,
    ) -> None:
        if not settings.error_dir:
            settings = replace(settings, error_dir=str(run_dir / "errors"))
        self.gateway = gateway
        self.settings = settings
        self.run_dir = run_dir
        self.interval = interval
        self.binary = binary or haproxy_binary()
        self.config_path = run_dir / "haproxy.cfg"
        self.pid_path = run_dir / "haproxy.pid"
        self.socket_dir = Path(settings.socket_path).parent
        self.master_socket = self.socket_dir / "master.sock"
        self.process: subprocess.Popen[bytes] | None = None
        self.plan: Plan | None = None
        self.reloads = 0
        self._pushed: set[str] = set()
        self._repush_at: float | None = None
        self._task: asyncio.Task[None] | None = None
        self._reloaded_at = -math.inf
        read = functools.partial(_unix_command, settings.socket_path, STAT_COMMAND, READ_TIMEOUT)
        # The calls HAProxy carries, for /metrics and /v1/routes; old workers read via the master.
        self.stats = HaproxyStats(read, self._workers)
        self._holds: dict[int, tuple[socket.socket, float]] = {}  # old worker -> idle connection

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self, timeout: float = 10.0) -> None:
        """Write the first configuration, start HAProxy and wait until it listens."""
        await asyncio.to_thread(self._clear_stale)
        await self._spawn()
        await self._wait_listening(timeout)
        self._task = asyncio.create_task(self._follow_forever())
        log.info(
            "haproxy data plane (pid %d) on %s:%d, python app on 127.0.0.1:%d",
            self.process.pid if self.process else 0,
            self.settings.host,
            self.settings.public_port,
            self.settings.python_port,
        )

    async def _spawn(self) -> None:
        """Start the HAProxy master with the configuration of the gateway's current view."""
        plan, usable = self._desired()
        await asyncio.to_thread(self._write, render(plan, usable), True)
        argv = [self.binary, "-W", "-q", "-S", str(self.master_socket), "-p", str(self.pid_path)]
        argv += ["-f", str(self.config_path)]
        # Popen on the event loop's thread: the death signal follows the thread that forked.
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        self.plan, self._pushed, self._reloaded_at = plan, usable, time.monotonic()
        self.stats.follow(plan)

    async def _wait_listening(self, timeout: float) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while not _port_open(self.settings.host, self.settings.public_port):
            if self.process.poll() is not None:
                raise Unavailable(
                    f"haproxy exited with code {self.process.returncode} at start-up; its "
                    f"messages are in the gateway's log (config {self.config_path})"
                )
            if time.monotonic() > deadline:
                raise Unavailable(f"haproxy did not listen within {timeout:.0f} s")
            await asyncio.sleep(0.05)

    async def stop(self, grace: float = 10.0) -> None:
        """Soft-stop HAProxy (calls in flight finish), then end it after ``grace`` seconds."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for pid in list(self._holds):
            self._release(pid)
        process = self.process
        if process is None or process.poll() is not None:
            self.remove_files()
            return
        process.send_signal(signal.SIGUSR1)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(process.wait, grace)
                break
            log.warning("haproxy (pid %d) still runs; sending %s", process.pid, sig.name)
            process.send_signal(sig)
            grace = 5.0
        self.remove_files()
        log.info("haproxy data plane stopped")

    def health(self) -> dict[str, Any]:
        """For the gateway's ``/healthz``: whether HAProxy runs, and its stats socket answered."""
        process = self.process
        running = process is not None and process.poll() is None
        return {
            "up": running,
            "pid": process.pid if running and process else None,
            "stats_socket": self.stats.up,  # at the last reading (scrape or reload)
            "reloads": self.reloads,
        }

    # -- its files ---------------------------------------------------------------------------

    def _files(self) -> list[Path]:
        config = self.config_path
        return [
            config,
            config.with_suffix(".cfg.new"),
            self.pid_path,
            self.master_socket,
            Path(self.settings.socket_path),
        ]

    def _clear_stale(self) -> None:
        """Before a start: end a HAProxy a killed gateway left, and remove its files."""
        self._end_stale_haproxy()
        self.remove_files()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_error_pages(self.settings)

    def _end_stale_haproxy(self) -> None:
        try:
            pid = int(self.pid_path.read_text().split()[0])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except (OSError, ValueError, IndexError):
            return
        if str(self.config_path) not in cmdline.split("\0"):
            return  # the pid is another process's now
        parent = _parent_of(pid)
        if parent not in (None, 1, os.getpid()) and "anycast" in _cmdline(parent):
            raise Unavailable(
                f"another gateway (pid {parent}) runs HAProxy for this home and port "
                f"({self.config_path}); stop it or pick another --port"
            )
        log.warning("ending haproxy (pid %d) left running by a previous gateway", pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 5.0
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)

    def remove_files(self) -> None:
        """Remove HAProxy's files, and its folders once empty."""
        for path in self._files():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        shutil.rmtree(self.settings.error_dir, ignore_errors=True)
        for folder in {self.socket_dir, self.run_dir}:
            with contextlib.suppress(OSError):  # missing, or holding files not ours
                folder.rmdir()

    # -- following the gateway's view --------------------------------------------------------

    def _desired(self) -> tuple[Plan, set[str]]:
        gw = self.gateway
        plan = plan_of(gw.table, self.settings, draining=gw.draining)
        return plan, usable_servers(plan, gw.table, gw.health, time.monotonic())

    async def _follow_forever(self) -> None:
        while True:
            try:
                await self.sync()
            except Exception:  # a failed round is retried on the next one
                log.exception("haproxy data plane: sync failed")
            await asyncio.sleep(self.interval)

    async def sync(self) -> None:
        """Reload on a new plan; push changed server states over the stats socket."""
        if self.process is not None and self.process.poll() is not None:
            log.error("haproxy exited with code %s; starting it again", self.process.returncode)
            await self._spawn()
            return
        if self.stats.old_workers or self._holds:
            await asyncio.to_thread(self._count_old_workers)
        plan, usable = self._desired()
        if plan != self.plan:
            if time.monotonic() - self._reloaded_at >= MIN_RELOAD_INTERVAL:
                await self._reload(plan, usable)
            return
        now = time.monotonic()
        changed = usable ^ self._pushed
        if self._repush_at is not None and now >= self._repush_at:
            changed, self._repush_at = set(plan.servers()), None
        if changed:
            await asyncio.to_thread(self._push_states, changed, usable)
            self._pushed = usable

    async def _reload(self, plan: Plan, usable: set[str]) -> None:
        if not await asyncio.to_thread(self._write, render(plan, usable), False):
            self.plan = plan  # refused (logged): not tried again until the plan changes
            return
        try:
            # Hold the worker about to be replaced (so its last calls are counted), then the
            # master starts a new worker, which takes the listening sockets over.
            await asyncio.to_thread(self._hold_current_worker)
            await asyncio.to_thread(self._master, "reload")
        except OSError as exc:  # the master is busy starting a worker: next round
            log.warning("haproxy master did not take the reload (%s); retrying", exc)
            return
        self.plan, self._pushed, self.reloads = plan, usable, self.reloads + 1
        self.stats.follow(plan)
        self.stats.old_workers = True  # read them until they exit
        self._reloaded_at = time.monotonic()
        self._repush_at = self._reloaded_at + 1.0  # states that changed while it started
        log.info(
            "haproxy reloaded: %d deployments, %d servers%s",
            len(plan.deployments),
            len(plan.servers()),
            " (draining: every call goes to the python app)" if plan.draining else "",
        )

    def _write(self, text: str, first: bool) -> bool:
        """Check ``text`` with ``haproxy -c`` and swap it in atomically; False if refused."""
        tmp = self.config_path.with_suffix(".cfg.new")
        tmp.write_text(text)
        check = subprocess.run(
            [self.binary, "-c", "-q", "-f", str(tmp)], capture_output=True, text=True
        )
        if check.returncode != 0:
            if first:
                raise ConfigError(f"haproxy refused the rendered configuration: {check.stderr}")
            log.error(
                "haproxy refused a rendered configuration; kept the last one: %s", check.stderr
            )
            return False
        os.replace(tmp, self.config_path)
        return True

    def _push_states(self, keys: Iterable[str], usable: set[str]) -> None:
        commands = [f"set server {k} state {'ready' if k in usable else 'maint'}" for k in keys]
        self.runtime(commands)

    def runtime(self, commands: list[str]) -> str:
        """Send commands to the worker's stats socket; their answers, joined."""
        return _unix_command(self.settings.socket_path, "; ".join(commands))

    def _master(self, command: str, timeout: float = 2.0) -> str:
        return _unix_command(str(self.master_socket), command, timeout)

    # -- counting the calls of workers a reload replaced ---------------------------------------

    def _workers(self) -> tuple[set[int], dict[int, str]]:
        """Pids of the running workers, and ``show stat`` of each old one, from the master."""
        current, old = workers_of(self._master("show proc", READ_TIMEOUT))
        stats = {pid: self._master(f"@!{pid} show stat", READ_TIMEOUT) for pid in old}
        return current | old, stats

    def _hold_current_worker(self) -> None:
        """Before a reload: read the worker, and keep an idle connection to it open.

        A replaced worker exits once its last connection closes, often right after answering
        a call; the held connection keeps it until a reading taken once it stopped listening
        shows that no call is left, so its last calls are counted.
        """
        if not self.stats.refresh():
            return
        pid = self.stats.current_pid
        if pid is None or pid in self._holds:
            return
        try:
            sock = socket.create_connection((self.settings.host, self.settings.public_port), 1.0)
        except OSError as exc:
            log.warning("haproxy worker %s not held for counting: %s", pid, exc)
            return
        time.sleep(0.05)  # accepted by this worker, not left in the backlog for the next one
        self._holds[pid] = (sock, time.monotonic())

    def _count_old_workers(self) -> None:
        self.stats.refresh()
        now = time.monotonic()
        for pid, (_, since) in list(self._holds.items()):
            done = pid in self.stats.drained  # read since it stopped, with no call left
            if done or pid not in self.stats.alive or now - since > HOLD_LIMIT:
                self._release(pid)

    def _release(self, pid: int) -> None:
        sock, _ = self._holds.pop(pid)
        sock.close()


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, exited but not yet reaped, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def _parent_of(pid: int) -> int | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    ppid = next((line.split()[1] for line in status.splitlines() if line.startswith("PPid:")), "")
    return int(ppid) if ppid.isdigit() else None


def _cmdline(pid: int) -> str:
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return ""


def workers_of(show_proc: str) -> tuple[set[int], set[int]]:
    """The current and the old worker pids in the master CLI's ``show proc``."""
    section, current, old = "", set[int](), set[int]()
    for line in show_proc.splitlines():
        if line.startswith("#"):
            section = line.lstrip("# ").strip()
            continue
        first = line.split(maxsplit=1)[0] if line.strip() else ""
        if first.isdigit() and section in ("workers", "old workers"):
            (old if section == "old workers" else current).add(int(first))
    return current, old


def _unix_command(path: str, command: str, timeout: float = 2.0) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall((command + "\n").encode())
        sock.shutdown(socket.SHUT_WR)  # the CLI answers, then closes
        chunks = []
        with contextlib.suppress(ConnectionResetError):  # a reloading master just hangs up
            while chunk := sock.recv(65536):
                chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


def _port_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0
