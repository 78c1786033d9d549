"""A handwritten-digit classifier served by Anycast.

Run it locally with weights.safetensors next to this file:

    anycast serve examples/mnist/service.py:DigitClassifier --port 9000
"""

from __future__ import annotations

import torch
from pydantic import BaseModel

import anycast
from anycast.training import load_model, preprocess

EXAMPLE_BATCH = torch.zeros(1, 1, 28, 28)  # (N, 1, 28, 28) normalised pixels


class DigitRequest(BaseModel):
    image: anycast.Image  # base64 PNG/JPEG in JSON, or a multipart upload named "image"


class DigitPrediction(BaseModel):
    digit: int
    probability: float
    probabilities: list[float]  # one per digit, 0-9


class DigitClassifier(anycast.Service):
    def setup(self) -> None:
        self.backend = anycast.backend_of(self)  # "onnx" in artifacts built with --format onnx
        if self.backend == "onnx":
            self.model = anycast.OnnxModel(self.file("model.onnx"))  # called like the CNN
        else:
            self.network = load_model(self.file("weights.safetensors"))
            # The same CNN run by TorchScript: one call per batch, the same numbers.
            self.model = anycast.freeze(self.network, EXAMPLE_BATCH)

    def export_model(self) -> tuple[torch.nn.Module, torch.Tensor]:
        """What `anycast build --format onnx` exports: the CNN and an example batch."""
        return self.network, EXAMPLE_BATCH

    # Batched: the replica gathers concurrent calls, and the rows of calls that send a JSON
    # array, into one list of at most 64 requests; a single-image call is a list of one.
    @anycast.handler(max_batch_size=64, max_wait_ms=2)
    def predict(self, requests: list[DigitRequest]) -> list[DigitPrediction]:
        images = [request.image for request in requests]
        pixels = anycast.Image.stack(images, mode="L", size=(28, 28))  # (N, 28, 28) uint8
        with torch.inference_mode():
            probabilities = self.model(preprocess(pixels)).softmax(dim=1)  # (N, 10)
        return [answer(row) for row in probabilities.tolist()]


def answer(probabilities: list[float]) -> DigitPrediction:
    """The most likely digit of one image, from its 10 probabilities."""
    digit = max(range(len(probabilities)), key=probabilities.__getitem__)  # the first, on ties
    return DigitPrediction(
        digit=digit, probability=probabilities[digit], probabilities=probabilities
    )
