"""Training: the digit CNN and its training loop."""

from anycast.training.model import (
    MNIST_MEAN,
    MNIST_STD,
    DigitCNN,
    load_model,
    preprocess,
    save_weights,
)

__all__ = ["MNIST_MEAN", "MNIST_STD", "DigitCNN", "load_model", "preprocess", "save_weights"]
