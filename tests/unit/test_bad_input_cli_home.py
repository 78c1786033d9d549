"""The CLI in-process: a --home without a cluster, and `anycast deploy` without --artifact."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from servers import ThreadServer
from typer.testing import CliRunner

from anycast.cli.main import app
from anycast.control.api import build_app as build_control_app
from anycast.control.client import ControlClient
from anycast.control.store import SQLiteStore
from anycast.core.config import ClusterConfig
from anycast.core.http import free_port
from anycast.registry import LocalStorage, Registry, build_artifact

runner = CliRunner()


def squashed(text: str) -> str:
    """``text`` without whitespace: rich wraps (and folds long paths) to the terminal width."""
    return "".join(text.split())


def says(output: str, expected: str) -> bool:
    return squashed(expected) in squashed(output)


@pytest.mark.parametrize(
    "command",
    [
        ["status"],
        ["down"],
        ["deploy", "digits", "--replicas", "3"],
        ["rollback", "digits"],
        ["backup", "create", "--out", "b.tar"],
        ["push", "dist/x-1.tar"],
    ],
)
@pytest.mark.parametrize("made", [False, True])
def test_a_home_without_a_cluster_exits_2_saying_how_to_start_one(
    tmp_path: Path, command: list[str], made: bool
) -> None:
    home = tmp_path / "nonexistent"
    if made:
        home.mkdir()  # a folder, but no cluster.yaml in it

    result = runner.invoke(app, [*command, "--home", str(home)])

    assert result.exit_code == 2, result.output
    what = "holds no cluster.yaml" if made else "does not exist"
    assert says(result.output, f"no cluster at --home {home}: the folder {what}")
    assert says(result.output, f"`anycast up --home {home}`")
    assert "7070" not in result.output  # never someone else's control plane on the default port
    assert not (home / "cluster.yaml").exists()


def test_predict_with_a_home_without_a_cluster_exits_2(tmp_path: Path) -> None:
    image = tmp_path / "digit.png"
    image.write_bytes(b"\x89PNG")
    home = tmp_path / "nonexistent"

    result = runner.invoke(app, ["predict", str(image), "--home", str(home)])

    assert result.exit_code == 2, result.output
    assert says(result.output, f"`anycast up --home {home}`")


def test_status_of_a_home_with_a_cluster_still_asks_its_control_plane(tmp_path: Path) -> None:
    port = free_port()
    ClusterConfig(home=tmp_path, control_port=port).save()

    result = runner.invoke(app, ["status", "--home", str(tmp_path)])

    assert result.exit_code == 1
    assert says(result.output, f"the control plane at http://127.0.0.1:{port} does not answer")


class ControlServer:
    """The control plane app of ``home`` served by uvicorn in a thread."""

    def __init__(self, home: Path) -> None:
        self.config = ClusterConfig(home=home, control_port=free_port())
        self.config.save()
        self.store = SQLiteStore(self.config.control_db)
        control = build_control_app(self.store, self.config.regions)
        self.http = ThreadServer(control, port=self.config.control_port)

    def start(self) -> ControlServer:
        self.http.start()
        return self

    def stop(self) -> None:
        self.http.stop()
        self.store.close()


@pytest.fixture
def control(tmp_path: Path) -> Iterator[ControlServer]:
    """A cluster home whose control plane runs, with artifact echo:1 pushed and registered."""
    server = ControlServer(tmp_path / "home").start()
    (tmp_path / "svc").mkdir()
    (tmp_path / "svc" / "service.py").write_text("class Echo:\n    pass\n")
    _, tar = build_artifact(
        f"{tmp_path / 'svc' / 'service.py'}:Echo", name="echo", version="1", out_dir=tmp_path
    )
    pushed = Registry(LocalStorage(server.config.registry_dir)).push(tar)
    with ControlClient(server.config.control_url) as client:
        client.register_artifact(
            pushed["id"], pushed["name"], pushed["version"], pushed["manifest"]
        )
    yield server
    server.stop()


def test_deploy_without_artifact_keeps_the_artifact_and_changes_the_replicas(
    control: ControlServer,
) -> None:
    home = str(control.config.home)
    created = runner.invoke(app, ["deploy", "echo", "--artifact", "echo:1", "--no-wait",
                                  "--home", home])  # fmt: skip
    assert created.exit_code == 0, created.output
    with ControlClient(control.config.control_url) as client:
        before = client.deployment("echo")

    scaled = runner.invoke(app, ["deploy", "echo", "--replicas", "3", "--no-wait", "--home", home])

    assert scaled.exit_code == 0, scaled.output
    with ControlClient(control.config.control_url) as client:
        after = client.deployment("echo")
    assert after["artifact"] == before["artifact"]
    assert after["replicas"] == {"ap-southeast": 3, "eu-west": 3, "us-east": 3}
    assert after["revision"] > before["revision"]
    assert after.get("rollout") == before.get("rollout")  # no rollout: the same artifact
    assert says(scaled.output, f"artifact {before['artifact'][:12]}")


def test_deploy_without_artifact_of_a_new_deployment_says_to_give_one(
    control: ControlServer,
) -> None:
    home = str(control.config.home)

    result = runner.invoke(app, ["deploy", "digits", "--replicas", "3", "--home", home])

    assert result.exit_code == 1
    assert says(result.output, "deployment 'digits' does not exist yet, so there is no artifact")
    assert says(result.output, "give --artifact REF")
    with ControlClient(control.config.control_url) as client:
        assert client.deployments() == []


def test_deploy_with_nothing_to_change_says_what_to_give(control: ControlServer) -> None:
    result = runner.invoke(app, ["deploy", "echo", "--home", str(control.config.home)])

    assert result.exit_code == 1
    assert says(result.output, "nothing to change: give --artifact REF")
