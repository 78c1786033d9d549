"""The digit CNN as a Lepton Photon, run locally."""

from __future__ import annotations

import os

import digits
from leptonai.photon import Photon


class Digits(Photon):
    def init(self) -> None:
        self.model = digits.load()

    @Photon.handler
    def predict(self, image: str) -> dict:
        return digits.predict(self.model, image)


if __name__ == "__main__":
    Digits(name="digits").launch(host="127.0.0.1", port=int(os.environ["BENCH_PORT"]))
