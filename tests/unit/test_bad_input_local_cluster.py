"""`anycast up` must not take another process's answer on a port for its own role's."""

from __future__ import annotations

import http.server
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from anycast.core.config import ClusterConfig
from anycast.core.errors import Unavailable
from anycast.core.http import port_in_use
from anycast.local.cluster import LocalCluster, Role


class Healthy(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b'{"status": "ok"}')

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def stranger() -> Iterator[int]:
    """Another process's server answering /healthz; yields its port."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Healthy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_a_health_answer_from_another_process_is_not_our_roles(
    tmp_path: Path, stranger: int
) -> None:
    cluster = LocalCluster(ClusterConfig(home=tmp_path))
    cluster.run_dir.mkdir(parents=True)
    # Our "control" process is alive but never listens: the answer on the port is the stranger's.
    ours = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "anycast"])
    try:
        cluster.pid_file("control").write_text(f"{ours.pid}\n")
        url = f"http://127.0.0.1:{stranger}/healthz"
        role = Role("control", [], url, stranger, "--control-port")

        with pytest.raises(Unavailable, match="did not answer"):
            cluster._wait_healthy([role], timeout=2)
    finally:
        ours.kill()
        ours.wait()


def test_port_in_use_sees_a_listener_and_not_a_closed_port() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert port_in_use(port)
    assert not port_in_use(port)
