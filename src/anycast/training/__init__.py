"""Training: the digit CNN, its training loop and safetensors I/O."""

from anycast.training.model import (
    MNIST_MEAN,
    MNIST_STD,
    DigitCNN,
    load_model,
    preprocess,
    save_weights,
)
from anycast.training.train import Progress, TrainResult, evaluate, train

__all__ = [
    "MNIST_MEAN",
    "MNIST_STD",
    "DigitCNN",
    "Progress",
    "TrainResult",
    "evaluate",
    "load_model",
    "preprocess",
    "save_weights",
    "train",
]
