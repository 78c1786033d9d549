"""The digit CNN as every hand-written server in this benchmark calls it.

Same model class and weights as the Anycast service (``anycast.training``), same decoding
(base64 PNG -> 28x28 grey pixels) and the same answer: digit, probability, probabilities.
Servers import this with the repository's ``src`` and ``bench/peers`` on PYTHONPATH.
"""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import anycast
from anycast.training import load_model, preprocess

WEIGHTS_ENV = "BENCH_WEIGHTS"


def load() -> torch.nn.Module:
    """The trained DigitCNN frozen by TorchScript, as the Anycast services run it, with one
    torch thread as Anycast replicas use."""
    torch.set_num_threads(int(os.environ.get("ANYCAST_TORCH_THREADS", "1")))
    network = load_model(Path(os.environ[WEIGHTS_ENV]))
    return anycast.freeze(network, torch.zeros(1, 1, 28, 28))


def decode(image_b64: str) -> np.ndarray:
    """A base64 PNG -> (28, 28) uint8 grey pixels."""
    with Image.open(io.BytesIO(base64.b64decode(image_b64))) as image:
        grey = image.convert("L")
        if grey.size != (28, 28):
            grey = grey.resize((28, 28))
        return np.asarray(grey, dtype=np.uint8)


def predict_many(model: torch.nn.Module, images_b64: Sequence[str]) -> list[dict]:
    """Answers for a batch of base64 PNGs, one model call for all of them."""
    pixels = np.stack([decode(image) for image in images_b64])  # (N, 28, 28)
    with torch.inference_mode():
        probabilities = model(preprocess(pixels)).softmax(dim=1)  # (N, 10)
    answers = []
    for row in probabilities.tolist():
        digit = int(np.argmax(row))
        answers.append({"digit": digit, "probability": row[digit], "probabilities": row})
    return answers


def predict(model: torch.nn.Module, image_b64: str) -> dict:
    return predict_many(model, [image_b64])[0]
