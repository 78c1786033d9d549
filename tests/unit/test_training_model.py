"""The digit CNN: channels-last inference gives the numbers of the plain NCHW network."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from anycast.datasets import Mnist, mnist
from anycast.training import DigitCNN, load_model, preprocess, save_weights
from anycast.training.model import MNIST_MEAN, MNIST_STD


@pytest.fixture(scope="module")
def held_out() -> np.ndarray:
    data: Mnist = mnist()
    return data.test_images[:512]  # (512, 28, 28) uint8


@pytest.fixture(scope="module")
def model() -> DigitCNN:
    torch.manual_seed(7)
    return DigitCNN().eval()


def nchw_reference(model: DigitCNN, pixels: np.ndarray) -> torch.Tensor:
    """The network as first written: NCHW tensors, ReLU before pooling, arithmetic scaling."""
    x = torch.as_tensor(pixels).to(torch.float32).div(255.0).sub(MNIST_MEAN).div(MNIST_STD)
    x = x.unsqueeze(1)  # (N, 1, 28, 28)
    conv, hidden, out = model.features[0], model.classifier[0], model.classifier[3]
    weight = conv.weight.detach().clone(memory_format=torch.contiguous_format)
    y = F.conv2d(x, weight, conv.bias)  # (N, 32, 26, 26)
    assert y.stride() == torch.empty(y.shape).stride(), "the reference must run NCHW"
    y = F.max_pool2d(F.relu(y), 2).flatten(1)  # (N, 5408)
    return F.linear(F.relu(F.linear(y, hidden.weight, hidden.bias)), out.weight, out.bias)


def test_predictions_equal_the_nchw_network_on_held_out_digits(
    model: DigitCNN, held_out: np.ndarray
) -> None:
    with torch.inference_mode():
        expected = nchw_reference(model, held_out)
        for size in (1, 7, 64, len(held_out)):
            got = torch.cat([model(preprocess(held_out[i : i + size])) for i in range(0, 64, size)])
            want = expected[: len(got)]
            assert float((got - want).abs().max()) < 1e-5
            assert torch.equal(got.argmax(dim=1), want.argmax(dim=1))


def test_one_image_and_a_batch_of_one_give_the_same_answer(
    model: DigitCNN, held_out: np.ndarray
) -> None:
    with torch.inference_mode():
        single = model(preprocess(held_out[3]))
        batch = model(preprocess(held_out[3:4]))
    assert single.shape == (1, 10)
    assert torch.equal(single, batch)


def test_preprocess_gives_the_same_values_for_numpy_torch_and_any_dtype() -> None:
    every_pixel = np.arange(256, dtype=np.uint8).reshape(16, 16)
    expected = torch.as_tensor(every_pixel).to(torch.float32)
    expected = expected.div_(255.0).sub_(MNIST_MEAN).div_(MNIST_STD).unsqueeze(0).unsqueeze(1)

    assert torch.equal(preprocess(every_pixel), expected)  # uint8 numpy: the lookup table
    assert torch.equal(preprocess(torch.as_tensor(every_pixel)), expected)
    assert torch.equal(preprocess(every_pixel.astype(np.float64)), expected)
    assert torch.equal(
        preprocess(np.stack([every_pixel] * 3)[:, ::2, ::2])[1], expected[0, :, ::2, ::2]
    )
    assert preprocess(every_pixel).dtype == torch.float32


def test_saved_weights_load_back_to_the_same_predictions(
    model: DigitCNN, held_out: np.ndarray, tmp_path: Path
) -> None:
    path = save_weights(model, tmp_path / "weights.safetensors")
    loaded = load_model(path)
    with torch.inference_mode():
        batch = preprocess(held_out[:32])
        assert torch.equal(loaded(batch), model(batch))
    assert not loaded.training
