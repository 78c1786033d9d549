"""Image helpers for data set samples."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from anycast.core.errors import InvalidInput


def to_png(image: np.ndarray) -> bytes:
    """PNG bytes of one 28x28 uint8 grey image."""
    if image.shape != (28, 28) or image.dtype != np.uint8:
        raise InvalidInput(
            f"to_png expects one 28x28 uint8 image, got shape {image.shape} dtype {image.dtype}"
        )
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()
