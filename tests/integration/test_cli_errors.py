"""Mistakes a new user makes on the command line get one clear error line, never a traceback."""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster import TEXT_ECHO_SERVICE

from anycast.core.names import NAME_RULE

COMMAND = [sys.executable, "-m", "anycast.cli.main"]


def anycast(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200", "ANYCAST_HOME": str(cwd / "home")}
    return subprocess.run(
        [*COMMAND, *args], cwd=cwd, capture_output=True, text=True, timeout=120, env=env
    )


def one_line(text: str) -> str:
    return " ".join(text.split())  # rich wraps long lines


def assert_clean_failure(done: subprocess.CompletedProcess[str], code: int = 1) -> str:
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr + done.stdout
    return one_line(done.stderr)


# Deployment names are checked before any API call.


@pytest.mark.parametrize("name", ["a/b", "..", ""])
def test_deploy_with_a_bad_name_states_the_name_rule(tmp_path: Path, name: str) -> None:
    message = assert_clean_failure(anycast("deploy", name, "--artifact", "digits:1", cwd=tmp_path))

    assert f"deployment name must be {NAME_RULE}, got {name!r}" in message
    assert "no route" not in message and "HTTP 307" not in message


def test_predict_with_a_bad_deployment_name_states_the_name_rule(tmp_path: Path) -> None:
    (tmp_path / "digit.png").write_bytes(b"\x89PNG")

    done = anycast("predict", "digit.png", "--deployment", "Bad/Name", cwd=tmp_path)

    message = assert_clean_failure(done)
    assert f"--deployment must be {NAME_RULE}, got 'Bad/Name'" in message


def test_predict_of_a_folder_says_it_wants_a_file(tmp_path: Path) -> None:
    (tmp_path / "digits").mkdir()

    message = assert_clean_failure(anycast("predict", "digits", cwd=tmp_path))

    assert "digits is a folder; give the path of one PNG or JPEG file" in message


def test_push_of_a_folder_says_it_wants_the_tar(tmp_path: Path) -> None:
    (tmp_path / "dist").mkdir()

    message = assert_clean_failure(anycast("push", "dist", cwd=tmp_path))

    assert "dist is a folder; give the .tar file `anycast build` printed" in message


# `anycast serve` ports.


def test_serve_on_an_impossible_port_names_the_allowed_range(tmp_path: Path) -> None:
    (tmp_path / "service.py").write_text(TEXT_ECHO_SERVICE)

    done = anycast("serve", "service.py:Echo", "--port", "99999", cwd=tmp_path)

    message = assert_clean_failure(done, code=2)
    assert "Invalid value for '--port': Input should be less than or equal to 65535" in message
    assert "OverflowError" not in message


def test_serve_on_a_busy_port_fails_clearly(tmp_path: Path) -> None:
    (tmp_path / "service.py").write_text(TEXT_ECHO_SERVICE)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]

        done = anycast("serve", "service.py:Echo", "--port", str(port), cwd=tmp_path)

    message = assert_clean_failure(done, code=2)  # not SIGABRT (-6)
    assert f"port {port} on 127.0.0.1 is already in use by another process" in message
    assert "pass --port" in message


# `anycast build` refuses what would never serve.

BROKEN_SERVICES = {
    "missing class": (
        TEXT_ECHO_SERVICE,
        "service.py:Nope",
        "no class Nope; Service classes there: Echo",
    ),
    "syntax error": (
        "import anycast\n\nclass Echo(anycast.Service:\n    pass\n",
        "service.py:Echo",
        "syntax error at line 3 of",
    ),
    "raises at import": (
        "import anycast\n\nraise RuntimeError('no GPU here')\n",
        "service.py:Echo",
        "RuntimeError: no GPU here (at line 3 of",
    ),
    "not a service": ("class Echo:\n    pass\n", "service.py:Echo", "Echo is not a subclass"),
    "no handlers": (
        "import anycast\n\nclass Echo(anycast.Service):\n    pass\n",
        "service.py:Echo",
        "service.py:Echo' has no handlers; mark a method with @anycast.handler",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN_SERVICES))
def test_build_of_a_broken_service_says_why_and_builds_nothing(tmp_path: Path, case: str) -> None:
    source, ref, expected = BROKEN_SERVICES[case]
    (tmp_path / "service.py").write_text(source)

    done = anycast("build", ref, "--name", "echo", "--version", "1", cwd=tmp_path)

    message = assert_clean_failure(done)
    assert expected in message
    assert "nothing was built" in message
    assert not (tmp_path / "dist").exists()


# `anycast up` next to another cluster.


class OtherCluster:
    """Something else answering /healthz on a port, as another cluster's control plane does."""

    def __init__(self) -> None:
        class Healthy(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.end_headers()
                self.wfile.write(b'{"status": "ok"}')

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Healthy)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def other_cluster() -> Iterator[OtherCluster]:
    other = OtherCluster()
    yield other
    other.server.shutdown()
    other.server.server_close()


def test_up_on_a_port_another_cluster_uses_starts_nothing(
    tmp_path: Path, other_cluster: OtherCluster, port_block: int
) -> None:
    home = tmp_path / "h2"
    ports = ["--control-port", str(other_cluster.port), "--gateway-port", str(port_block)]
    ports += ["--agent-port-base", str(port_block + 1)]
    try:
        done = anycast("up", "--home", str(home), *ports, cwd=tmp_path)
    finally:
        anycast("down", "--home", str(home), cwd=tmp_path)

    message = assert_clean_failure(done)
    assert (
        f"port {other_cluster.port} (control) is already in use by another process; "
        "stop it or pass --control-port"
    ) in message
    assert "pid None" not in done.stdout
    assert not list(home.glob("run/*.pid"))  # no agent joined the other cluster


# Help texts.


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("status", "Cluster home folder (default: $ANYCAST_HOME, else .anycast)."),
        ("up", "Cluster home folder (default: $ANYCAST_HOME, else .anycast)."),
        ("backup create", "Backup file (default: ./anycast-backup-<time>.tar)."),
        ("demo", "Training epochs (default: as `anycast train`)."),
    ],
)
def test_help_texts_show_their_defaults(tmp_path: Path, command: str, expected: str) -> None:
    done = anycast(*command.split(), "--help", cwd=tmp_path)

    assert done.returncode == 0, done.stderr
    assert expected in one_line(done.stdout)
