"""``anycast.Image``: a request field holding a PNG or JPEG, checked before it is decoded.

In JSON the image is a base64 string (plain, or a ``data:image/png;base64,...`` URL); a
multipart upload gives its raw bytes. Either way the same limits apply, and the size in the
image header is checked before any pixel is decoded, so a tiny file claiming 10000x10000
pixels is refused at once.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import struct
import warnings
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from PIL import Image as PILImage
from PIL import PngImagePlugin
from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import PydanticCustomError, core_schema

from anycast.core.errors import InvalidInput, PayloadTooLarge

MAX_IMAGE_BYTES = 8 * 1024 * 1024
MAX_IMAGE_SIDE = 4096
MAX_IMAGE_PIXELS = MAX_IMAGE_SIDE * MAX_IMAGE_SIDE
FORMATS = ("PNG", "JPEG")

IMAGE_RULE = "image must be a base64-encoded PNG or JPEG (plain base64 or a data: URL)"
_MAX_BASE64_CHARS = (MAX_IMAGE_BYTES + 2) // 3 * 4
_DATA_URL = re.compile(r"^data:[\w.+/-]*(;[\w.+=-]+)*;base64,", re.IGNORECASE)
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CHUNK_HEAD = struct.Struct(">I4s")  # length, type
_CRC = struct.Struct(">I")
_IHDR = struct.Struct(">IIBBBBB")  # width, height, bit depth, colour type, compression, ...
_PLAIN_PNG_MODES = {0: "L", 2: "RGB", 4: "LA", 6: "RGBA"}  # by colour type, at 8 bits


class ImageError(InvalidInput):
    """The bytes are not a usable PNG or JPEG."""

    code = "invalid_image"


class ImageTooLarge(PayloadTooLarge):
    """The image is bigger than the replica accepts (bytes or pixels)."""

    code = "image_too_large"


class Image:
    """A decoded PNG or JPEG image; use it as a pydantic field type.

    ``.pil`` is the decoded PIL image; ``.to_array()`` gives numpy pixels.
    """

    __slots__ = ("_pil", "data", "format")

    def __init__(self, data: bytes, pil: PILImage.Image, format: str) -> None:
        self.data = data
        self.format = format
        self._pil = pil

    @classmethod
    def from_bytes(cls, data: bytes) -> Image:
        """Check and decode PNG or JPEG bytes; raise ImageError or ImageTooLarge."""
        if len(data) > MAX_IMAGE_BYTES:
            raise ImageTooLarge(
                f"image is {len(data)} bytes; at most {MAX_IMAGE_BYTES} bytes are allowed"
            )
        if not data:
            raise ImageError(f"{IMAGE_RULE}; got no bytes")
        pil = _open_checked(data)
        return cls(data, pil, str(pil.format))

    @classmethod
    def from_base64(cls, text: str) -> Image:
        """Decode a base64 string or ``data:`` URL, then check it as :meth:`from_bytes`."""
        return cls.from_bytes(_decode_base64(text))

    @property
    def pil(self) -> PILImage.Image:
        """The decoded image (shared: copy it before changing it in place)."""
        return self._pil

    @property
    def width(self) -> int:
        return int(self._pil.width)

    @property
    def height(self) -> int:
        return int(self._pil.height)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        return self.width, self.height

    def to_array(self, mode: str = "L", size: tuple[int, int] | None = None) -> np.ndarray:
        """Pixels as uint8: (height, width) for mode "L", (height, width, C) otherwise.

        ``size`` is (width, height); the image is resized (bilinear) when it differs.
        """
        return np.array(self._pixels(mode, size), dtype=np.uint8)  # a writable copy

    @staticmethod
    def stack(
        images: Sequence[Image], mode: str = "L", size: tuple[int, int] | None = None
    ) -> np.ndarray:
        """Pixels of many images as one uint8 array (N, height, width[, C]), for a batch.

        Each image is converted straight into its row of one preallocated array (no list of
        per-image arrays to copy again). Without ``size`` all images must share one size.
        """
        if not images:
            raise ValueError("Image.stack needs at least one image")
        first = images[0]._pixels(mode, size)
        sample = np.asarray(first)
        out = np.empty((len(images), *sample.shape), dtype=np.uint8)
        out[0] = sample
        # Modes of one byte per channel ("L", "RGB", ...) copy their raw bytes straight in,
        # sparing numpy's array-interface round trip per row; others convert as numpy does.
        flat = out.reshape(len(images), -1) if sample.dtype == np.uint8 else None
        for row, image in enumerate(images[1:], start=1):
            pixels = image._pixels(mode, size)
            if pixels.size != first.size:
                raise ValueError(
                    f"Image.stack: image {row} is {pixels.size[0]}x{pixels.size[1]}, not "
                    f"{first.size[0]}x{first.size[1]} like image 0; pass size=(width, height)"
                )
            if flat is not None:
                flat[row] = np.frombuffer(pixels.tobytes(), dtype=np.uint8)
            else:
                out[row] = np.asarray(pixels)
        return out  # writable and contiguous: torch.from_numpy shares it without a copy

    def _pixels(self, mode: str, size: tuple[int, int] | None) -> PILImage.Image:
        image = self._pil if self._pil.mode == mode else self._pil.convert(mode)
        if size is not None and image.size != tuple(size):
            image = image.resize(size, PILImage.Resampling.BILINEAR)
        return image

    def to_base64(self) -> str:
        return base64.b64encode(self.data).decode("ascii")

    def __repr__(self) -> str:
        return f"Image({self.format} {self.width}x{self.height}, {len(self.data)} bytes)"

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: type[Any], handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            _validate,
            serialization=core_schema.plain_serializer_function_ser_schema(
                lambda image: image.to_base64()
            ),
        )

    @classmethod
    def __get_pydantic_json_schema__(
        cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {
            "type": "string",
            "contentEncoding": "base64",
            "contentMediaType": "image/png",
            "description": (
                f"A PNG or JPEG as base64 (or a data: URL), at most {MAX_IMAGE_BYTES} bytes "
                f"and {MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE} pixels."
            ),
        }


def _validate(value: Any) -> Image:
    """Pydantic validator: turn our errors into pydantic ones so they carry their field."""
    try:
        if isinstance(value, Image):
            return value
        if isinstance(value, str):
            return Image.from_base64(value)
        if isinstance(value, bytes | bytearray | memoryview):
            return Image.from_bytes(bytes(value))
    except (ImageError, ImageTooLarge) as exc:
        raise PydanticCustomError(exc.code, exc.message) from exc
    raise PydanticCustomError("invalid_image", f"{IMAGE_RULE}; got {type(value).__name__}")


def _decode_base64(text: str) -> bytes:
    if len(text) > _MAX_BASE64_CHARS + 256:
        raise ImageTooLarge(
            f"image is about {len(text) * 3 // 4} bytes; at most {MAX_IMAGE_BYTES} bytes "
            "are allowed"
        )
    match = _DATA_URL.match(text)
    if match:
        text = text[match.end() :]
    compact = "".join(text.split())
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageError(f"{IMAGE_RULE}; the text is not valid base64") from exc


def _open_checked(data: bytes) -> PILImage.Image:
    """Read the header, check the pixel count, and only then decode every pixel."""
    plain = _plain_png(data) if data.startswith(_PNG_SIGNATURE) else None
    if plain is not None:
        return _decode_plain_png(*plain)
    try:
        pil = _open_header(data)
    except PILImage.DecompressionBombError as exc:
        raise ImageTooLarge(_too_many_pixels("more than 178 million")) from exc
    except Exception as exc:  # PIL raises many exception types on foreign or broken bytes
        raise ImageError(f"{IMAGE_RULE}; these bytes are not a complete PNG or JPEG") from exc

    _check_pixel_count(pil.size)

    try:
        if pil.format == "PNG":
            # Chunk checksums and the closing IEND chunk: catches a cut-off PNG whose pixels
            # still happen to decode.
            _check_png_chunks(data)
        pil.load()
    except Exception as exc:  # truncated or corrupt data: OSError, SyntaxError, zlib errors...
        raise ImageError(f"{IMAGE_RULE}; this {pil.format} is truncated or corrupt") from exc
    return pil


def _open_header(data: bytes) -> PILImage.Image:
    """PIL's lazy open (header only) of a PNG or JPEG; the PNG plugin directly when the bytes
    start with its signature, which spares the per-format probing of ``Image.open``."""
    if not data.startswith(_PNG_SIGNATURE):
        with warnings.catch_warnings():
            # We apply our own, lower pixel limit; PIL's warning would only add noise.
            warnings.simplefilter("ignore", PILImage.DecompressionBombWarning)
            return PILImage.open(io.BytesIO(data), formats=FORMATS)
    return PngImagePlugin.PngImageFile(io.BytesIO(data))  # its size is checked by the caller


def _check_pixel_count(size: tuple[int, int]) -> None:
    width, height = size
    if width * height > MAX_IMAGE_PIXELS or max(width, height) > MAX_IMAGE_SIDE:
        raise ImageTooLarge(_too_many_pixels(f"{width}x{height}"))


def _png_chunks(data: bytes) -> Iterator[tuple[bytes, memoryview]]:
    """(type, content) of each chunk after the signature, up to and including IEND; raises
    ValueError at a chunk whose CRC does not match or at the end of a PNG cut short."""
    view = memoryview(data)
    position, end = len(_PNG_SIGNATURE), len(data)
    while position + 12 <= end:
        length, kind = _CHUNK_HEAD.unpack_from(data, position)
        crc_at = position + 8 + length
        if crc_at + 4 > end:
            break
        if zlib.crc32(view[position + 4 : crc_at]) != _CRC.unpack_from(data, crc_at)[0]:
            raise ValueError(f"PNG chunk {kind!r} fails its CRC")
        yield kind, view[position + 8 : crc_at]
        if kind == b"IEND":
            return
        position = crc_at + 4
    raise ValueError("PNG ends before its IEND chunk")


def _check_png_chunks(data: bytes) -> None:
    """Every chunk complete with a matching CRC, up to and including IEND (as PIL's verify)."""
    for _ in _png_chunks(data):
        pass


def _plain_png(data: bytes) -> tuple[str, tuple[int, int], bytes] | None:
    """(mode, size, compressed pixels) of a sound PNG of 8-bit L, LA, RGB or RGBA pixels, not
    interlaced, with no chunk but IHDR, IDAT and IEND (what most encoders write); else None,
    and PIL reads it in full. Decoding such a PNG needs none of PIL's chunk parsing."""
    header: tuple[str, tuple[int, int]] | None = None
    pixels: list[memoryview] = []
    try:
        for kind, content in _png_chunks(data):
            if header is None:
                header = _plain_header(kind, content)
                if header is None:
                    return None
            elif kind == b"IDAT":
                pixels.append(content)
            elif kind == b"IEND":
                return header[0], header[1], b"".join(pixels)
            else:
                return None
    except ValueError:
        return None  # PIL's own reading reports what is wrong
    return None


def _plain_header(kind: bytes, content: memoryview) -> tuple[str, tuple[int, int]] | None:
    if kind != b"IHDR" or len(content) != _IHDR.size:
        return None
    width, height, depth, colour, compression, filtering, interlace = _IHDR.unpack(content)
    mode = _PLAIN_PNG_MODES.get(colour)
    if depth != 8 or mode is None or compression or filtering or interlace:
        return None
    if width == 0 or height == 0:
        return None
    return mode, (width, height)


def _decode_plain_png(mode: str, size: tuple[int, int], compressed: bytes) -> PILImage.Image:
    """The pixels of a :func:`_plain_png`, by the zlib decoder PIL uses for every PNG."""
    _check_pixel_count(size)
    pil = PILImage.new(mode, size, None)  # zeroed memory; Image.frombytes would fill it too
    try:
        pil.frombytes(compressed, "zip", mode)
    except Exception as exc:  # "not enough image data", "cannot decode image data"
        raise ImageError(f"{IMAGE_RULE}; this PNG is truncated or corrupt") from exc
    pil.format = "PNG"
    return pil


def _too_many_pixels(found: str) -> str:
    return (
        f"image is {found} pixels; at most {MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE} "
        f"({MAX_IMAGE_PIXELS} pixels) are allowed"
    )
