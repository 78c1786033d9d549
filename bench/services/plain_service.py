"""The digit classifier with a plain handler: one model call per request (batching off).

The handler is the one examples/mnist/service.py had before batching, kept here so the
benchmark's "batching off" row does not change when the example's handler does. The request
and response models, and the answer made of the probabilities, come from the example
(mnist_example.py is a link to it, so an artifact built from this folder carries it).
"""

from __future__ import annotations

import torch
from mnist_example import DigitPrediction, DigitRequest, answer

import anycast
from anycast.training import load_model, preprocess


class DigitClassifier(anycast.Service):
    def setup(self) -> None:
        network = load_model(self.file("weights.safetensors"))
        self.model = anycast.freeze(network, torch.zeros(1, 1, 28, 28))

    @anycast.handler
    def predict(self, request: DigitRequest) -> DigitPrediction:
        pixels = request.image.to_array(mode="L", size=(28, 28))  # (28, 28) uint8
        with torch.inference_mode():
            probabilities = self.model(preprocess(pixels)).softmax(dim=1)  # (1, 10)
        return answer(probabilities.tolist()[0])
