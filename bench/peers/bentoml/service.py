"""The digit CNN as a BentoML service: `bentoml serve service:Digits`."""

from __future__ import annotations

import bentoml
import digits


@bentoml.service(workers=1)
class Digits:
    def __init__(self) -> None:
        self.model = digits.load()

    @bentoml.api
    def predict(self, image: str) -> dict:
        return digits.predict(self.model, image)
