"""anycast.freeze: the same numbers as the eager module, any batch size, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import anycast
from anycast.core.errors import ConfigError
from anycast.training import DigitCNN, preprocess


@pytest.fixture(scope="module")
def network() -> DigitCNN:
    torch.manual_seed(0)
    return DigitCNN().eval()


def digits(count: int) -> torch.Tensor:
    rng = np.random.default_rng(count)
    return preprocess(rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8))


@pytest.mark.parametrize("count", [1, 7, 64])
def test_frozen_digit_cnn_gives_the_eager_numbers_at_any_batch_size(
    network: DigitCNN, count: int
) -> None:
    frozen = anycast.freeze(network, torch.zeros(1, 1, 28, 28))
    batch = digits(count)
    with torch.inference_mode():
        eager, served = network(batch), frozen(batch)
    assert served.shape == (count, 10)
    assert torch.allclose(served, eager, atol=1e-6, rtol=0)


def test_freeze_leaves_the_module_in_eval_mode() -> None:
    network = DigitCNN().train()
    anycast.freeze(network, torch.zeros(1, 1, 28, 28))
    assert not network.training


def test_freeze_refuses_what_is_not_a_torch_module() -> None:
    with pytest.raises(ConfigError, match=r"takes a torch\.nn\.Module, got function"):
        anycast.freeze(lambda x: x, torch.zeros(1))  # type: ignore[arg-type]


class NeedsTwoInputs(torch.nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x + y


def test_a_module_that_cannot_be_traced_names_itself_and_the_example_shape() -> None:
    with pytest.raises(ConfigError, match=r"cannot freeze NeedsTwoInputs: .*\(2, 3\)"):
        anycast.freeze(NeedsTwoInputs(), torch.zeros(2, 3))
