"""anycast.freeze: the same numbers as the eager module, any batch size, clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from pydantic import BaseModel
from readiness import wait_failed

import anycast
from anycast.core.errors import ConfigError
from anycast.replica import build_app
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


class BranchesOnValues(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # a trace would keep only the branch of its example
            return x * 2
        return -x


class LoopsOverRows(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([row * 2 for row in x])  # a trace would fix the number of rows


@pytest.mark.parametrize(
    ("module", "what"),
    [(BranchesOnValues(), "Python boolean"), (LoopsOverRows(), "Iterating over a tensor")],
)
def test_a_forward_that_depends_on_its_input_values_is_refused(
    module: torch.nn.Module, what: str
) -> None:
    # Traced, BranchesOnValues would answer -ones with -2s where the module gives ones.
    with pytest.raises(ConfigError) as refused:
        anycast.freeze(module, torch.ones(2, 3))
    message = str(refused.value)
    assert message.startswith(f"cannot freeze {type(module).__name__}: its forward depends")
    assert what in message and "shape (2, 3)" in message and "serve this one eagerly" in message


class FlattensRows(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], -1) * 2  # a traced shape, not a Python value


def test_a_forward_reading_its_batch_size_still_freezes_and_runs_at_any_batch_size() -> None:
    frozen = anycast.freeze(FlattensRows(), torch.zeros(1, 2, 3))
    batch = torch.arange(30.0).reshape(5, 2, 3)
    assert torch.equal(frozen(batch), FlattensRows()(batch))


@pytest.mark.parametrize(
    ("example", "got"),
    [([[0.0, 0.0, 0.0]], "list"), (np.zeros((1, 3), np.float32), "ndarray"), (None, "NoneType")],
)
def test_an_example_that_is_not_a_tensor_is_refused_saying_what_is_allowed(
    example: object, got: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        anycast.freeze(torch.nn.Linear(3, 2), example)  # type: ignore[arg-type]
    assert str(refused.value) == (
        "freeze() takes an example input batch as a torch.Tensor (or a tuple of tensors, "
        f"one per input of forward), got {got}"
    )


def test_a_forward_of_two_inputs_freezes_on_a_tuple_and_one_tensor_gets_a_hint() -> None:
    x, y = torch.ones(4, 3), torch.arange(12.0).reshape(4, 3)
    frozen = anycast.freeze(NeedsTwoInputs(), (torch.zeros(1, 3), torch.zeros(1, 3)))
    assert torch.equal(frozen(x, y), x + y)
    with pytest.raises(ConfigError, match=r"pass a tuple of example tensors$"):
        anycast.freeze(NeedsTwoInputs(), torch.zeros(1, 3))


class Row(BaseModel):
    x: list[float]


class FreezesWrongly(anycast.Service):
    def setup(self) -> None:
        self.model = anycast.freeze(torch.nn.Linear(3, 2), torch.zeros(1, 5))

    @anycast.handler()
    def predict(self, request: Row) -> Row:
        return request


def test_a_setup_whose_freeze_fails_says_why_in_readyz(tmp_path: Path) -> None:
    reasons: list[str] = []
    app = build_app(
        FreezesWrongly,
        tmp_path,
        replica_id="r-0",
        artifact_id="dev",
        on_setup_failure=reasons.append,
    )
    with TestClient(app) as client:
        wait_failed(reasons, timeout=30)
        ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["status"] == "failed"
    message = ready.json()["error"]["message"]
    assert message.startswith(
        "setup() failed: cannot freeze Linear: tracing it on an example of shape (1, 5) failed"
    )
    assert "mat1 and mat2 shapes cannot be multiplied" in message
