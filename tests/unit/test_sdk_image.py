"""anycast.Image: what it accepts, what it refuses, and how fast it refuses huge images."""

from __future__ import annotations

import base64
import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image as PILImage
from pydantic import BaseModel, ValidationError

import anycast
from anycast.sdk import MAX_IMAGE_BYTES, Image, ImageError, ImageTooLarge


class Request(BaseModel):
    image: anycast.Image


def encode(image: PILImage.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def digit_png(size: tuple[int, int] = (28, 28)) -> bytes:
    pixels = np.zeros((size[1], size[0]), dtype=np.uint8)
    pixels[size[1] // 4 : -size[1] // 4, size[0] // 2] = 255  # a vertical stroke: a "1"
    return encode(PILImage.fromarray(pixels, mode="L"), "PNG")


def png_header_claiming(width: int, height: int) -> bytes:
    """A real, tiny PNG of ``width`` x ``height`` black pixels (compresses to ~100 KB)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    packer = zlib.compressobj(9)
    row = b"\0" * (width + 1)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def error_of(value: object) -> dict:
    with pytest.raises(ValidationError) as info:
        Request.model_validate({"image": value})
    return info.value.errors()[0]


def test_base64_png_decodes_to_pixels() -> None:
    image = Request.model_validate({"image": b64(digit_png())}).image
    pixels = image.to_array()
    assert (image.format, image.size) == ("PNG", (28, 28))
    assert pixels.shape == (28, 28) and pixels.dtype == np.uint8
    assert pixels[14, 14] == 255 and pixels[0, 0] == 0


def test_data_url_and_line_wrapped_base64_are_accepted() -> None:
    text = b64(digit_png())
    wrapped = "\n".join(text[i : i + 20] for i in range(0, len(text), 20))
    for value in (f"data:image/png;base64,{text}", wrapped):
        assert Request.model_validate({"image": value}).image.size == (28, 28)


def test_jpeg_is_resized_and_converted_to_grey() -> None:
    rgb = PILImage.new("RGB", (56, 40), (255, 255, 255))
    image = Image.from_bytes(encode(rgb, "JPEG"))
    assert image.format == "JPEG"
    pixels = image.to_array(mode="L", size=(28, 28))
    assert pixels.shape == (28, 28) and pixels.min() > 240
    assert image.to_array(mode="RGB").shape == (40, 56, 3)
    assert image.pil.size == (56, 40)


def test_raw_bytes_are_accepted_as_from_a_multipart_upload() -> None:
    assert Request.model_validate({"image": digit_png()}).image.format == "PNG"


def test_image_serialises_back_to_base64() -> None:
    text = b64(digit_png())
    assert Request.model_validate({"image": text}).model_dump(mode="json") == {"image": text}


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("", "got no bytes"),
        ("not base64 at all!", "not valid base64"),
        (b64(b"hello, this is text"), "not a complete PNG or JPEG"),
        (b64(digit_png()[:60]), "truncated or corrupt"),
        (b64(encode(PILImage.new("RGB", (8, 8)), "GIF")), "not a complete PNG or JPEG"),
        (42, "got int"),
        (None, "got NoneType"),
    ],
)
def test_bad_images_are_refused_with_the_rule(value: object, reason: str) -> None:
    error = error_of(value)
    assert error["type"] == "invalid_image"
    assert error["msg"].startswith("image must be a base64-encoded PNG or JPEG")
    assert reason in error["msg"]


def test_truncated_jpeg_is_refused() -> None:
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    jpeg = encode(PILImage.fromarray(noise), "JPEG")
    with pytest.raises(ImageError, match="truncated or corrupt"):
        Image.from_bytes(jpeg[: len(jpeg) // 2])


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def noise_image(mode: str, size: tuple[int, int] = (31, 7)) -> PILImage.Image:
    channels = len(PILImage.new(mode, (1, 1)).getbands())
    pixels = np.random.default_rng(1).integers(0, 256, (size[1], size[0], channels), np.uint8)
    return PILImage.fromarray(pixels[..., 0] if channels == 1 else pixels, mode=mode)


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA", "P", "1", "I;16"])
@pytest.mark.parametrize("options", [{}, {"optimize": True}, {"dpi": (72, 72)}])
def test_png_decodes_to_the_pixels_and_info_pil_reads(mode: str, options: dict) -> None:
    source = noise_image("L" if mode in ("P", "1", "I;16") else mode)
    image = source.convert(mode) if mode != source.mode else source
    buf = io.BytesIO()
    image.save(buf, "PNG", **options)
    data = buf.getvalue()

    decoded = Image.from_bytes(data)
    with PILImage.open(io.BytesIO(data)) as expected:
        expected.load()
        assert (decoded.format, decoded.pil.format) == ("PNG", "PNG")
        assert decoded.pil.mode == expected.mode and decoded.size == expected.size
        assert decoded.pil.tobytes() == expected.tobytes()
        assert decoded.pil.info == expected.info
        assert np.array_equal(decoded.to_array(), np.asarray(expected.convert("L")))


@pytest.mark.parametrize("cut", ["pixels cut short", "pixels not zlib"])
def test_png_with_sound_chunks_but_broken_pixels_is_refused(cut: str) -> None:
    pixels = zlib.compress(b"\0" + b"\x80" * 28)  # one row of a 28x28 image
    idat = pixels[:-8] if cut == "pixels cut short" else b"not zlib at all" * 4
    ihdr = struct.pack(">IIBBBBB", 28, 28, 8, 0, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat)
    error = error_of(b64(png + png_chunk(b"IEND", b"")))
    assert error["type"] == "invalid_image"
    assert "truncated or corrupt" in error["msg"]


def test_huge_pixel_count_is_refused_from_the_header_without_decoding() -> None:
    bomb = png_header_claiming(10_000, 10_000)
    started = time.perf_counter()
    error = error_of(b64(bomb))
    assert time.perf_counter() - started < 0.5
    assert error["type"] == "image_too_large"
    assert "10000x10000" in error["msg"] and "4096x4096" in error["msg"]


def test_too_many_bytes_are_refused_before_decoding() -> None:
    with pytest.raises(ImageTooLarge, match=f"at most {MAX_IMAGE_BYTES} bytes"):
        Image.from_bytes(b"\x89PNG" + b"\0" * MAX_IMAGE_BYTES)
    assert error_of("A" * (MAX_IMAGE_BYTES * 2))["type"] == "image_too_large"


def test_json_schema_describes_a_base64_string() -> None:
    schema = Request.model_json_schema()["properties"]["image"]
    assert schema["type"] == "string"
    assert schema["contentEncoding"] == "base64"
    assert "PNG or JPEG" in schema["description"]
