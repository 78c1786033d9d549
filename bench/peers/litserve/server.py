"""The digit CNN as a LitServe API with one CPU worker."""

from __future__ import annotations

import os

import digits
import litserve as ls


class DigitAPI(ls.LitAPI):
    def setup(self, device: str) -> None:
        self.model = digits.load()

    def decode_request(self, request: dict) -> str:
        return request["image"]

    def predict(self, image: str) -> dict:
        return digits.predict(self.model, image)

    def encode_response(self, output: dict) -> dict:
        return output


if __name__ == "__main__":
    server = ls.LitServer(DigitAPI(), accelerator="cpu", workers_per_device=1)
    server.run(host="127.0.0.1", port=int(os.environ["BENCH_PORT"]), generate_client_file=False)
