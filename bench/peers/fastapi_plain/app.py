"""What a user writes by hand: one FastAPI endpoint calling the model, run by uvicorn."""

from __future__ import annotations

import os

import digits
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel

model = digits.load()
app = FastAPI()


class DigitRequest(BaseModel):
    image: str  # base64 PNG


@app.post("/predict")
def predict(request: DigitRequest) -> dict:
    return digits.predict(model, request.image)


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(os.environ["BENCH_PORT"]), log_level="warning")
