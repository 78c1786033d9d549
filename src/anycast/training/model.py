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
    """Conv(1->32, 3x3), MaxPool 2x2 + ReLU, Flatten, Dense 64 + ReLU, Dropout, Dense 10.

    Its weights and activations are kept channels-last (NHWC in memory, NCHW in shape), where
    max pooling is several times faster than on NCHW tensors. Pooling before ReLU gives the
    same numbers as ReLU before pooling (both are maxima) on a quarter of the values.
    """

    def __init__(self, dropout: float = 0.25) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, kernel_size=3),  # (N, 1, 28, 28) -> (N, 32, 26, 26)
            nn.MaxPool2d(2),  # -> (N, 32, 13, 13)
            nn.ReLU(),
            nn.Flatten(),  # -> (N, 5408), in NCHW order whatever the memory format
        )
        self.classifier = nn.Sequential(
            nn.Linear(32 * 13 * 13, 64),
            nn.ReLU(),
            TrainingDropout(dropout),
            nn.Linear(64, NUM_CLASSES),  # -> (N, 10) logits
        )
        self.to(memory_format=torch.channels_last)  # type: ignore[call-overload]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The conv's channels-last weight makes every activation after it channels-last.
        return self.classifier(self.features(x))


class TrainingDropout(nn.Dropout):
    """nn.Dropout that is not called at all in eval mode, where it is the identity anyway.

    Every torch call from Python releases and retakes the GIL, which costs more than the
    call itself when a replica's event loop wants the GIL too.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) if self.training else x


def preprocess(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 pixels (N, 28, 28) or (28, 28) -> normalised float tensor (N, 1, 28, 28)."""
    if isinstance(images, np.ndarray) and images.dtype == np.uint8:
        # A lookup per pixel, shaped by numpy: no torch call (each one hands off the GIL).
        channel = images[np.newaxis, np.newaxis] if images.ndim == 2 else images[:, np.newaxis]
        return torch.from_numpy(_NORMALISED.take(channel))
    tensor = torch.as_tensor(images)
    if tensor.ndim == 2:
        tensor = tensor.unsqueeze(0)
    return _normalise(tensor.to(torch.float32)).unsqueeze(1)


def _normalise(tensor: torch.Tensor) -> torch.Tensor:
    """Float pixels in 0-255 -> (pixel / 255 - mean) / std, in place."""
    return tensor.div_(255.0).sub_(MNIST_MEAN).div_(MNIST_STD)


# Every uint8 pixel's normalised value, computed by the same torch ops as any other input.
_NORMALISED: np.ndarray = _normalise(torch.arange(256, dtype=torch.float32)).numpy()


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
