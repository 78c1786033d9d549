"""``Service`` and ``handler``: how users describe what a replica serves.

A service is a class. ``setup()`` runs once per replica before it takes traffic; each
method marked with ``@handler`` becomes ``POST /v1/<name>``. A handler takes one pydantic
model and returns one; their type hints are the HTTP schema. A batched handler
(``@handler(max_batch_size=64)``) takes a list of requests and returns a list of responses,
one per request and in the same order; the replica gathers concurrent calls into one list.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal, TypeVar, overload

from pydantic import BaseModel

from anycast.core.errors import ConfigError, InvalidInput
from anycast.core.names import check_handler
from anycast.sdk.image import Image

F = TypeVar("F", bound=Callable[..., Any])

_OPTIONS_ATTR = "__anycast_handler__"
_HANDLERS_ATTR = "__anycast_handlers__"
_SIGNATURE_HINT = "def predict(self, request: MyRequest) -> MyResponse (both pydantic models)"
_BATCH_HINT = (
    "def predict(self, requests: list[MyRequest]) -> list[MyResponse] (one response per "
    "request, in the same order)"
)

MAX_BATCH_LIMIT = 4096
MAX_WAIT_LIMIT_MS = 1000.0
MAX_TIMEOUT_MS = 600_000
DEFAULT_MAX_WAIT_MS = 5.0
AUTO_MAX_WAIT_MS = 50.0  # the adaptive wait never exceeds this, whatever it measures
AUTO = "auto"

MaxWait = float | Literal["auto"]


class ServiceDefinitionError(ConfigError):
    """A service class or one of its handlers is written in a way Anycast cannot serve."""

    code = "service_definition"


@dataclass(frozen=True)
class HandlerOptions:
    """What ``@handler(...)`` was given; stored on the function until its class is built.

    Options are keyword-only, so new ones can be added without touching existing services.
    """

    name: str | None = None
    idempotent: bool = True
    max_batch_size: int | None = None
    max_wait_ms: MaxWait | None = None
    deterministic: bool = False
    timeout_ms: int | None = None


@dataclass(frozen=True)
class HandlerSpec:
    """A handler as the replica runtime serves it."""

    name: str
    method: str
    input_model: type[BaseModel]
    output_model: type[BaseModel]
    idempotent: bool
    is_async: bool
    image_field: str | None
    max_batch_size: int | None = None
    max_wait_ms: float = 0.0
    adaptive: bool = False
    deterministic: bool = False
    timeout_ms: int | None = None

    @property
    def path(self) -> str:
        return f"/v1/{self.name}"

    @property
    def batched(self) -> bool:
        """True when the method takes a list of requests (``max_batch_size`` was given)."""
        return self.max_batch_size is not None


@overload
def handler(fn: F, /) -> F: ...


@overload
def handler(
    *,
    idempotent: bool = True,
    name: str | None = None,
    max_batch_size: int | None = None,
    max_wait_ms: MaxWait | None = None,
    deterministic: bool = False,
    timeout_ms: int | None = None,
) -> Callable[[F], F]: ...


def handler(
    fn: F | None = None,
    /,
    *,
    idempotent: bool = True,
    name: str | None = None,
    max_batch_size: int | None = None,
    max_wait_ms: MaxWait | None = None,
    deterministic: bool = False,
    timeout_ms: int | None = None,
) -> F | Callable[[F], F]:
    """Mark a service method as an HTTP handler: ``@handler`` or ``@handler(name=...)``.

    ``idempotent=False`` tells the gateway never to retry a call on another replica.
    ``deterministic=True`` promises that equal requests get equal responses (so a response
    may be cached). ``max_batch_size=N`` makes the handler batched: it takes a list of at
    most N requests and returns a list of as many responses; concurrent calls are gathered
    for up to ``max_wait_ms`` (default 5), or, with ``max_wait_ms="auto"``, only as long as
    the measured cost per row says waiting pays off. ``timeout_ms`` is how long a call may
    wait in a batched handler's queue before it is answered 503 instead.
    """
    options = HandlerOptions(
        name=name,
        idempotent=idempotent,
        max_batch_size=max_batch_size,
        max_wait_ms=max_wait_ms,
        deterministic=deterministic,
        timeout_ms=timeout_ms,
    )

    def mark(func: F) -> F:
        _check_signature(func, options)
        _check_options(func.__name__, options)
        setattr(func, _OPTIONS_ATTR, options)
        return func

    return mark(fn) if fn is not None else mark


def _check_signature(func: Any, options: HandlerOptions) -> None:
    if not inspect.isfunction(func):
        raise ServiceDefinitionError(
            f"@handler goes directly on a method (def or async def), got {func!r}"
        )
    label = options.name or func.__name__
    try:
        check_handler(label)
    except InvalidInput as exc:
        raise ServiceDefinitionError(exc.message) from exc

    params = list(inspect.signature(func).parameters.values())
    plain = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if len(params) != 2 or any(p.kind not in plain for p in params):
        raise ServiceDefinitionError(
            f"handler {label} must take self and exactly one request: {_hint(options)}"
        )
    annotations = func.__annotations__
    if params[1].name not in annotations or "return" not in annotations:
        raise ServiceDefinitionError(
            f"handler {label} needs type hints on its request and its return value: "
            f"{_hint(options)}"
        )


def _hint(options: HandlerOptions) -> str:
    return _SIGNATURE_HINT if options.max_batch_size is None else _BATCH_HINT


def _check_options(method: str, options: HandlerOptions) -> None:
    label = options.name or method
    size, wait, timeout = options.max_batch_size, options.max_wait_ms, options.timeout_ms
    if size is not None and not _whole(size, 1, MAX_BATCH_LIMIT):
        raise ServiceDefinitionError(
            f"handler {label}: max_batch_size must be a whole number from 1 to "
            f"{MAX_BATCH_LIMIT}, got {size!r}"
        )
    if wait is not None and size is None:
        raise ServiceDefinitionError(
            f"handler {label}: max_wait_ms only applies to a batched handler; set "
            "max_batch_size too, as in @anycast.handler(max_batch_size=64, max_wait_ms=2)"
        )
    if wait is not None and wait != AUTO and not _number(wait, 0, MAX_WAIT_LIMIT_MS):
        raise ServiceDefinitionError(
            f"handler {label}: max_wait_ms must be a number of milliseconds from 0 to "
            f"{MAX_WAIT_LIMIT_MS:g}, or {AUTO!r}, got {wait!r}"
        )
    if timeout is not None and size is None:
        raise ServiceDefinitionError(
            f"handler {label}: timeout_ms bounds the wait in a batched handler's queue; set "
            "max_batch_size too, as in @anycast.handler(max_batch_size=64, timeout_ms=500)"
        )
    if timeout is not None and not _whole(timeout, 1, MAX_TIMEOUT_MS):
        raise ServiceDefinitionError(
            f"handler {label}: timeout_ms must be a whole number from 1 to {MAX_TIMEOUT_MS}, "
            f"got {timeout!r}"
        )


def _whole(value: object, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _number(value: object, low: float, high: float) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and low <= value <= high


def _resolve(cls: type, method: str, func: Any, options: HandlerOptions) -> HandlerSpec:
    name = options.name or func.__name__
    try:
        hints = typing.get_type_hints(func)
    except Exception as exc:  # NameError, or any error raised while evaluating a hint
        raise ServiceDefinitionError(
            f"cannot resolve the type hints of handler {name} in {cls.__name__}: {exc}; "
            "define the request and response models before the service class"
        ) from exc

    request_param = list(inspect.signature(func).parameters)[1]
    where = f"handler {name} in {cls.__name__}"
    input_model = _model_of(where, "request", hints.get(request_param), options)
    output_model = _model_of(where, "return", hints.get("return"), options)
    return HandlerSpec(
        name=name,
        method=method,
        input_model=input_model,
        output_model=output_model,
        idempotent=options.idempotent,
        is_async=inspect.iscoroutinefunction(func),
        image_field=_single_image_field(input_model),
        max_batch_size=options.max_batch_size,
        max_wait_ms=_max_wait_ms(options),
        adaptive=options.max_wait_ms == AUTO,
        deterministic=options.deterministic,
        timeout_ms=options.timeout_ms,
    )


def _max_wait_ms(options: HandlerOptions) -> float:
    """The fixed wait of a batched handler; with "auto" it is the cap of the adaptive wait."""
    wait = options.max_wait_ms
    if options.max_batch_size is None:
        return 0.0
    if wait == AUTO:
        return AUTO_MAX_WAIT_MS
    return DEFAULT_MAX_WAIT_MS if wait is None else float(wait)


def _model_of(where: str, role: str, hint: Any, options: HandlerOptions) -> type[BaseModel]:
    """The pydantic model a hint names: ``Model``, or ``list[Model]`` for a batched handler."""
    is_list = typing.get_origin(hint) is list
    if options.max_batch_size is not None and not is_list:
        raise ServiceDefinitionError(
            f"{where} is batched (max_batch_size={options.max_batch_size}), so its {role} "
            f"type must be a list of a pydantic model, got {hint!r}; {_BATCH_HINT}"
        )
    if options.max_batch_size is None and is_list:
        raise ServiceDefinitionError(
            f"{where}: the {role} type is {hint!r}, a list; to take a list of requests "
            "make it batched with @anycast.handler(max_batch_size=N), otherwise "
            f"{_SIGNATURE_HINT}"
        )
    model = typing.get_args(hint)[0] if is_list and typing.get_args(hint) else hint
    if not (inspect.isclass(model) and issubclass(model, BaseModel)):
        raise ServiceDefinitionError(
            f"{where}: the {role} type must be a pydantic BaseModel subclass, got "
            f"{model!r}; {_hint(options)}"
        )
    return typing.cast(type[BaseModel], model)


def _single_image_field(model: type[BaseModel]) -> str | None:
    """The one field typed ``Image`` (these handlers also take multipart uploads)."""
    fields = [name for name, info in model.model_fields.items() if info.annotation is Image]
    return fields[0] if len(fields) == 1 else None


def _collect_handlers(cls: type) -> dict[str, HandlerSpec]:
    specs: dict[str, HandlerSpec] = dict(getattr(cls, _HANDLERS_ATTR, {}))
    for attr, value in vars(cls).items():
        options = getattr(value, _OPTIONS_ATTR, None)
        if not isinstance(options, HandlerOptions):
            continue
        spec = _resolve(cls, attr, value, options)
        clash = specs.get(spec.name)
        if clash is not None and clash.method != attr:
            raise ServiceDefinitionError(
                f"{cls.__name__} has two handlers named {spec.name!r} "
                f"(methods {clash.method} and {attr}); give one another name="
            )
        specs[spec.name] = spec
    return specs


class Service:
    """Base class of a service: override ``setup()`` and mark handlers with ``@handler``.

    Files shipped with the service (the artifact's files, or ``--file`` / ``--files-dir``
    with ``anycast serve``) are found with ``self.file(name)``.
    """

    __anycast_handlers__: typing.ClassVar[dict[str, HandlerSpec]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        setattr(cls, _HANDLERS_ATTR, _collect_handlers(cls))

    def __init__(
        self, *, files_dir: Path | None = None, files: Mapping[str, Path] | None = None
    ) -> None:
        self._files_dir = Path(files_dir) if files_dir is not None else _defining_dir(type(self))
        self._files = {name: Path(path) for name, path in (files or {}).items()}

    def setup(self) -> None:
        """Load models and other state; runs once, before the replica is ready."""

    def file(self, name: str) -> Path:
        """The path of a file shipped with the service, such as ``weights.safetensors``."""
        files = getattr(self, "_files", {})
        files_dir = getattr(self, "_files_dir", None) or _defining_dir(type(self))
        path = files[name] if name in files else files_dir / _plain_name(name)
        if path.is_file():
            return path
        raise ConfigError(
            f"service file {name!r} not found (looked for {path}); files available: "
            f"{_available(files, files_dir)}. Ship it next to the service file, or pass "
            f"--file {name}=PATH to anycast serve / anycast build",
            code="file_not_found",
        )


def handlers_of(service_cls: type[Service]) -> dict[str, HandlerSpec]:
    """The handlers of a service class, by name."""
    return dict(getattr(service_cls, _HANDLERS_ATTR, {}))


def _plain_name(name: str) -> str:
    path = PurePosixPath(name)
    if not name or path.is_absolute() or ".." in path.parts:
        raise ConfigError(
            f"service file name must be a relative path inside the service, not {name!r}"
        )
    return name


def _defining_dir(cls: type) -> Path:
    try:
        return Path(inspect.getfile(cls)).resolve().parent
    except (TypeError, OSError):
        return Path.cwd()


def _available(files: Mapping[str, Path], files_dir: Path) -> str:
    names = set(files)
    if files_dir.is_dir():
        names.update(p.name for p in files_dir.iterdir() if p.is_file() and p.suffix != ".pyc")
    shown = sorted(names)[:12]
    return ", ".join(shown) + (" ..." if len(names) > len(shown) else "") if shown else "none"
