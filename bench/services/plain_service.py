"""The digit classifier with a plain handler: one model call per request (batching off).

The same code as examples/mnist/service.py had before batching, kept here so the
benchmark's "batching off" row does not change when the example does.
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

    @anycast.handler
    def predict(self, request: DigitRequest) -> DigitPrediction:
        pixels = request.image.to_array(mode="L", size=(28, 28))  # (28, 28) uint8
        with torch.inference_mode():
            probabilities = self.model(preprocess(pixels)).softmax(dim=1)[0]  # (10,)
        digit = int(probabilities.argmax())
        return DigitPrediction(
            digit=digit,
            probability=float(probabilities[digit]),
            probabilities=probabilities.tolist(),
        )
