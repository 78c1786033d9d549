"""Turning an HTTP request into a handler's input model, with every failure a clear 4xx.

A batched handler's call carries one row (a JSON object, or a multipart upload) or several
(a JSON array of objects, answered by a JSON array in the same order). A call never carries
more rows than the handler's ``max_batch_size``: a longer array is refused with 413.
A JSON body may nest arrays and objects at most :data:`MAX_JSON_DEPTH` levels deep (the
limit of pydantic's JSON parser); a deeper one is refused with 400.
"""

from __future__ import annotations

import json
from functools import partial
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import from_json
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.types import Message

from anycast.core import body as core_body
from anycast.core.errors import InvalidInput, PayloadTooLarge
from anycast.sdk import HandlerSpec, Image, ImageTooLarge

MAX_BODY_BYTES = 12 * 1024 * 1024  # fits an 8 MiB image as base64 JSON
MULTIPART_FILE_FIELD = "image"
MAX_JSON_DEPTH = 201  # the deepest nesting pydantic's JSON parser (jiter) accepts
MAX_ROW_ERRORS = 10  # bad rows described in one answer; the rest are counted

Payload = bytes | dict[str, Any]


class UnsupportedMediaType(InvalidInput):
    status = 415
    code = "unsupported_media_type"


class BatchTooLarge(PayloadTooLarge):
    """A call to a batched handler carries more rows than its ``max_batch_size``."""

    code = "batch_too_large"


async def read_body(
    request: Request, limit: int = MAX_BODY_BYTES, timeout: float | None = None
) -> bytes:
    """The whole body: 413 once it is known to exceed ``limit``, 408 if it stalls for
    ``timeout`` s (default ``ANYCAST_BODY_TIMEOUT_S``), ClientClosed (499) if the caller hangs
    up part way."""
    return await core_body.read_body(request, limit, partial(_too_large, limit=limit), timeout)


def _too_large(size: int, limit: int) -> str:
    return f"request body is {size} bytes or more; at most {limit} bytes are allowed"


async def payload_of(spec: HandlerSpec, request: Request, body: bytes) -> Payload:
    """JSON bytes to validate, or the fields of a multipart form."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type in ("", "application/json") or media_type.endswith("+json"):
        return body
    if media_type == "multipart/form-data":
        return await _form_fields(spec, request, body)
    raise UnsupportedMediaType(
        f"content type {media_type!r} is not accepted; send application/json"
        + _multipart_hint(spec)
    )


def _multipart_hint(spec: HandlerSpec) -> str:
    if spec.image_field is None:
        return ""
    return f" or multipart/form-data with an {MULTIPART_FILE_FIELD!r} file field"


async def _form_fields(spec: HandlerSpec, request: Request, body: bytes) -> dict[str, Any]:
    if spec.image_field is None:
        raise UnsupportedMediaType(
            f"handler {spec.name} takes application/json only (its request has no single "
            "Image field to upload)"
        )

    async def replay() -> Message:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=1, max_fields=64)
    except (MultiPartException, HTTPException) as exc:
        detail = getattr(exc, "message", None) or getattr(exc, "detail", "")
        raise InvalidInput(f"multipart body is malformed: {detail}") from exc

    fields: dict[str, Any] = {}
    try:
        for key, value in form.multi_items():
            name = spec.image_field if key == MULTIPART_FILE_FIELD else key
            fields[name] = await value.read() if isinstance(value, UploadFile) else value
    finally:
        await form.close()
    if spec.image_field not in fields:
        raise InvalidInput(
            f"multipart body needs an {MULTIPART_FILE_FIELD!r} file field holding a PNG or JPEG"
        )
    return fields


def validate_input(spec: HandlerSpec, payload: Payload) -> BaseModel:
    """Validate (and decode images of) a payload; CPU-bound, so call it off the event loop."""
    model = spec.input_model
    if isinstance(payload, bytes) and not payload.strip():
        raise InvalidInput(f"request body is empty; send {_accepted(spec)}")
    try:
        if isinstance(payload, bytes):
            return model.model_validate_json(payload)
        return model.model_validate(payload)
    except ValidationError as exc:
        raise _input_error(model, exc, accepted=_accepted(spec)) from None


def _accepted(spec: HandlerSpec) -> str:
    """The bodies a handler takes, for a message: a batched one also takes an array."""
    one = f"a JSON object like {_example(spec.input_model)}"
    if not spec.batched:
        return one
    return f"{one}, or a JSON array of 1 to {spec.max_batch_size} such objects"


def validate_rows(spec: HandlerSpec, payload: Payload) -> tuple[list[BaseModel], bool]:
    """The rows of a call to a batched handler, and whether the body was a JSON array.

    Every row is validated here, before the call joins a batch, so a bad row fails only the
    call that sent it. CPU-bound, like :func:`validate_input`.
    """
    if not (isinstance(payload, bytes) and payload.lstrip()[:1] == b"["):
        return [validate_input(spec, payload)], False

    try:
        rows = from_json(payload)
    except ValueError as exc:
        raise InvalidInput(
            f"request body is not valid JSON{_json_reason(str(exc))}; send a JSON object like "
            f"{_example(spec.input_model)} or a JSON array of such objects"
        ) from None
    _check_row_count(spec, len(rows))
    return _validate_rows(spec.input_model, rows), True


def _json_reason(error: str) -> str:
    """What a parser's error says, for a message: only nesting too deep needs saying."""
    if "recursion limit" not in error:
        return ""
    return f" (it nests arrays or objects more than {MAX_JSON_DEPTH} levels deep, the most allowed)"


def _check_row_count(spec: HandlerSpec, count: int) -> None:
    limit = spec.max_batch_size or 1
    if count == 0:
        raise InvalidInput(
            "request body is an empty JSON array; the body must be a JSON object like "
            f"{_example(spec.input_model)}, or an array of 1 to {limit} such objects",
            code="empty_batch",
        )
    if count > limit:
        raise BatchTooLarge(
            f"request body has {count} rows; handler {spec.name} takes at most {limit} rows "
            f"per call (its max_batch_size); send the other {count - limit} in another call"
        )


def _validate_rows(model: type[BaseModel], rows: list[Any]) -> list[BaseModel]:
    """Every row as ``model``, or one error naming each bad row (the first MAX_ROW_ERRORS)."""
    valid: list[BaseModel] = []
    errors: list[InvalidInput] = []
    for index, row in enumerate(rows):
        try:
            valid.append(_validate_row(model, index, row, example=not errors))
        except InvalidInput as exc:
            errors.append(exc)
    if not errors:
        return valid

    first = errors[0]
    message = "; ".join(error.message for error in errors[:MAX_ROW_ERRORS])
    if len(errors) > MAX_ROW_ERRORS:
        message += f"; and {len(errors) - MAX_ROW_ERRORS} more bad rows"
    if len(errors) > 1:
        message += f" ({len(errors)} of {len(rows)} rows are invalid)"
    raise type(first)(message, code=first.code)


def _validate_row(model: type[BaseModel], index: int, row: Any, *, example: bool) -> BaseModel:
    if not isinstance(row, dict):
        like = f" like {_example(model)}" if example else ""
        raise InvalidInput(f"row {index} must be a JSON object{like}, got {type(row).__name__}")
    try:
        return model.model_validate(row)
    except ValidationError as exc:
        error = _input_error(model, exc, example=example)
        raise type(error)(f"row {index}: {error.message}", code=error.code) from None


def _input_error(
    model: type[BaseModel],
    exc: ValidationError,
    *,
    example: bool = True,
    accepted: str | None = None,
) -> InvalidInput:
    accepted = accepted or f"a JSON object like {_example(model)}"
    errors = exc.errors(include_url=False, include_input=False)
    types = {str(err["type"]) for err in errors}
    if "image_too_large" in types:
        message = next(str(e["msg"]) for e in errors if e["type"] == "image_too_large")
        return ImageTooLarge(message)
    if "json_invalid" in types:
        reason = _json_reason(" ".join(str(e["msg"]) for e in errors))
        return InvalidInput(f"request body is not valid JSON{reason}; send {accepted}")
    if any(not err["loc"] for err in errors):
        return InvalidInput(f"request body must be {accepted}", code="invalid_input")

    parts = []
    for err in errors[:5]:
        where = ".".join(str(p) for p in err["loc"])
        parts.append(f"{where}: {err['msg']}")
    message = "; ".join(parts)
    if example and types != {"invalid_image"}:
        message += f" (expected {_example(model)})"
    return InvalidInput(message)


def _example(model: type[BaseModel]) -> str:
    """A one-line sketch of the JSON a model accepts, such as {"image": "<Image>"}."""
    sketch = {}
    for name, info in model.model_fields.items():
        annotation = info.annotation
        label = getattr(annotation, "__name__", None) or str(annotation)
        if annotation is Image:
            label = "base64 PNG or JPEG"
        sketch[info.alias or name] = f"<{label}>"
    return json.dumps(sketch)
