"""The digit classifier: a small convolutional network for 28x28 grey images."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

# Mean and standard deviation of MNIST pixels scaled to [0, 1].
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
NUM_CLASSES = 10


class DigitCNN(nn.Module):
    """Conv(1->32, 3x3) + ReLU, MaxPool 2x2, Flatten, Dense 64 + ReLU, Dropout, Dense 10."""

    def __init__(self, dropout: float = 0.25) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, kernel_size=3),  # (N, 1, 28, 28) -> (N, 32, 26, 26)
            nn.ReLU(),
            nn.MaxPool2d(2),  # -> (N, 32, 13, 13)
            nn.Flatten(),  # -> (N, 5408)
        )
        self.classifier = nn.Sequential(
            nn.Linear(32 * 13 * 13, 64),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(64, NUM_CLASSES),  # -> (N, 10) logits
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def preprocess(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 pixels (N, 28, 28) or (28, 28) -> normalised float tensor (N, 1, 28, 28)."""
    tensor = torch.as_tensor(images)
    if tensor.ndim == 2:
        tensor = tensor.unsqueeze(0)
    tensor = tensor.to(torch.float32).div_(255.0)
    return tensor.sub_(MNIST_MEAN).div_(MNIST_STD).unsqueeze(1)


def save_weights(model: nn.Module, path: Path) -> Path:
    """Write the model's weights as safetensors (never pickle), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(state, str(partial))
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def load_model(path: Path) -> DigitCNN:
    """A DigitCNN in eval mode with the weights stored at ``path``."""
    model = DigitCNN()
    model.load_state_dict(load_file(str(path)))
    model.eval()
    return model
