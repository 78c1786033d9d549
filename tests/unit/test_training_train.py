"""The digit classifier's training loop, evaluation and weight files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from anycast.cli import training_cmds
from anycast.core.errors import InvalidInput
from anycast.datasets import Mnist, mnist
from anycast.training import (
    Progress,
    TrainResult,
    evaluate,
    load_model,
    preprocess,
    save_weights,
    train,
)
from anycast.training.train import (
    BACKGROUND,
    DEFAULT_BATCH_SIZE,
    DEFAULT_EPOCHS,
    DEFAULT_LR,
    random_shift,
)

SHORT = {"epochs": 2, "max_train": 4000, "batch_size": 32, "augment": False}


@pytest.fixture(scope="module")
def data() -> Mnist:
    return mnist()


@pytest.fixture(scope="module")
def short_run(data: Mnist) -> TrainResult:
    return train(data, **SHORT)


def test_short_run_already_classifies_most_held_out_digits(short_run: TrainResult) -> None:
    assert short_run.test_accuracy > 0.9
    assert short_run.epochs == 2
    assert 0 < short_run.train_loss < 1
    assert short_run.seconds > 0
    assert not short_run.model.training


def test_evaluate_agrees_with_the_reported_accuracy(short_run: TrainResult, data: Mnist) -> None:
    accuracy = evaluate(short_run.model, data.test_images, data.test_labels)
    assert accuracy == short_run.test_accuracy


def test_same_seed_trains_the_same_model(short_run: TrainResult, data: Mnist) -> None:
    again = train(data, **SHORT)
    assert again.test_accuracy == short_run.test_accuracy
    for name, tensor in short_run.model.state_dict().items():
        torch.testing.assert_close(again.model.state_dict()[name], tensor)


def test_saved_weights_load_into_a_model_with_identical_predictions(
    short_run: TrainResult, data: Mnist, tmp_path: Path
) -> None:
    path = save_weights(short_run.model, tmp_path / "nested" / "weights.safetensors")
    assert path.read_bytes()[8:9] == b"{"  # safetensors: u64 header length, then JSON
    loaded = load_model(path)
    batch = preprocess(data.test_images[:500])
    with torch.inference_mode():
        np.testing.assert_array_equal(loaded(batch).numpy(), short_run.model(batch).numpy())
    assert list(path.parent.iterdir()) == [path]


def test_progress_reports_every_batch_and_test_accuracy_per_epoch(data: Mnist) -> None:
    events: list[Progress] = []
    train(data, epochs=2, max_train=640, batch_size=64, on_progress=events.append)
    per_epoch = [e for e in events if e.test_accuracy is not None]
    assert len(events) == 2 * 10 + 2
    assert [e.epoch for e in per_epoch] == [1, 2]
    assert all(e.steps == 10 and 0 <= e.train_accuracy <= 1 and e.loss > 0 for e in events)


def test_random_shift_moves_each_image_by_at_most_two_pixels() -> None:
    batch = torch.full((64, 1, 28, 28), BACKGROUND)
    batch[:, 0, 13, 13] = 5.0  # one bright pixel in the middle
    shifted = random_shift(batch, torch.Generator().manual_seed(0))
    assert shifted.shape == batch.shape
    found = torch.nonzero(shifted[:, 0] == 5.0)  # (64, 3): image, row, column
    rows, cols = found[:, 1], found[:, 2]
    assert len(rows) == 64
    assert (rows - 13).abs().max() <= 2 and (cols - 13).abs().max() <= 2
    assert len({(int(r), int(c)) for r, c in zip(rows, cols, strict=True)}) > 5


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("epochs", 0, "epochs must be at least 1"),
        ("batch_size", 0, "batch size must be at least 1"),
        ("lr", 5.0, "learning rate must be between 0 and 1"),
        ("max_train", 3, "max_train must be at least the batch size"),
    ],
)
def test_bad_training_options_are_refused_with_the_allowed_range(
    data: Mnist, option: str, value: float, message: str
) -> None:
    with pytest.raises(InvalidInput, match=message):
        train(data, **{option: value})  # type: ignore[arg-type]


def test_evaluate_refuses_mismatched_labels(short_run: TrainResult, data: Mnist) -> None:
    with pytest.raises(InvalidInput, match="as many labels as images"):
        evaluate(short_run.model, data.test_images[:10], data.test_labels[:9])


def test_cli_defaults_match_the_training_defaults() -> None:
    assert training_cmds.DEFAULT_EPOCHS == DEFAULT_EPOCHS
    assert training_cmds.DEFAULT_BATCH_SIZE == DEFAULT_BATCH_SIZE
    assert training_cmds.DEFAULT_LR == DEFAULT_LR
