"""The digit classifier with a batched handler: concurrent calls share one model call.

Same model and answers as plain_service.py; the replica gathers up to 64 concurrent
requests (waiting at most 5 ms for more) and calls ``predict`` once with all of them.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel

import anycast
from anycast.training import load_model, preprocess


class DigitRequest(BaseModel):
    image: anycast.Image


class DigitPrediction(BaseModel):
    digit: int
    probability: float
    probabilities: list[float]


class DigitClassifier(anycast.Service):
    def setup(self) -> None:
        self.model = load_model(self.file("weights.safetensors"))

    @anycast.handler(max_batch_size=64, max_wait_ms=5)
    def predict(self, requests: list[DigitRequest]) -> list[DigitPrediction]:
        images = [request.image for request in requests]
        pixels = anycast.Image.stack(images, mode="L", size=(28, 28))  # (N, 28, 28) uint8
        with torch.inference_mode():
            probabilities = self.model(preprocess(pixels)).softmax(dim=1)  # (N, 10)
        best = probabilities.max(dim=1)  # values and indices, (N,) each
        return [
            DigitPrediction(digit=digit, probability=probability, probabilities=row)
            for digit, probability, row in zip(
                best.indices.tolist(), best.values.tolist(), probabilities.tolist(), strict=True
            )
        ]
