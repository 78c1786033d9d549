"""A handwritten-digit classifier served by Anycast.

Run it locally with weights.safetensors next to this file:

    anycast serve examples/mnist/service.py:DigitClassifier --port 9000
"""

from __future__ import annotations

import torch
from pydantic import BaseModel

import anycast
from anycast.training import load_model, preprocess


class DigitRequest(BaseModel):
    image: anycast.Image  # base64 PNG/JPEG in JSON, or a multipart upload named "image"


class DigitPrediction(BaseModel):
    digit: int
    probability: float
    probabilities: list[float]  # one per digit, 0-9


class DigitClassifier(anycast.Service):
    def setup(self) -> None:
        self.model = load_model(self.file("weights.safetensors"))

    @anycast.handler
    def predict(self, request: DigitRequest) -> DigitPrediction:
        pixels = request.image.to_array(mode="L", size=(28, 28))  # (28, 28) uint8, white on black
        with torch.inference_mode():
            probabilities = self.model(preprocess(pixels)).softmax(dim=1)[0]  # (10,)
        digit = int(probabilities.argmax())
        return DigitPrediction(
            digit=digit,
            probability=float(probabilities[digit]),
            probabilities=probabilities.tolist(),
        )
