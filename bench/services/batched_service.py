"""The digit classifier with a batched handler: concurrent calls share one model call.

The handler of examples/mnist/service.py (mnist_example.py is a link to it, so an artifact
built from this folder carries it), with the benchmark's own batching settings: the replica
gathers up to 64 concurrent requests, waiting at most 5 ms for more, and calls ``predict``
once with all of them.
"""

from __future__ import annotations

from mnist_example import DigitClassifier as ExampleClassifier
from mnist_example import DigitPrediction, DigitRequest

import anycast

MAX_BATCH_SIZE = 64
MAX_WAIT_MS = 5


class DigitClassifier(ExampleClassifier):
    @anycast.handler(max_batch_size=MAX_BATCH_SIZE, max_wait_ms=MAX_WAIT_MS)
    def predict(self, requests: list[DigitRequest]) -> list[DigitPrediction]:
        return super().predict(requests)
