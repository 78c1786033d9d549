"""Service and handler: metadata from type hints, clear errors, files, and loading by reference."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

import anycast
from anycast.core.errors import ConfigError
from anycast.sdk import (
    HandlerSpec,
    ServiceDefinitionError,
    ServiceImportError,
    handlers_of,
    load_service,
)


class Question(BaseModel):
    text: str


class Answer(BaseModel):
    text: str


class Upload(BaseModel):
    image: anycast.Image
    note: str = ""


class Echo(anycast.Service):
    @anycast.handler
    def echo(self, request: Question) -> Answer:
        return Answer(text=request.text)

    @anycast.handler(name="shout", idempotent=False)
    async def loud(self, request: Question) -> Answer:
        return Answer(text=request.text.upper())

    @anycast.handler()
    def look(self, request: Upload) -> Answer:
        return Answer(text=str(request.image.size))

    def helper(self) -> None:
        """Not a handler."""


def test_handlers_are_collected_with_their_metadata() -> None:
    specs = handlers_of(Echo)
    assert sorted(specs) == ["echo", "look", "shout"]
    assert specs["echo"] == HandlerSpec(
        name="echo",
        method="echo",
        input_model=Question,
        output_model=Answer,
        idempotent=True,
        is_async=False,
        image_field=None,
    )
    assert specs["shout"].method == "loud"
    assert specs["shout"].idempotent is False and specs["shout"].is_async is True
    assert specs["look"].image_field == "image"
    assert specs["echo"].path == "/v1/echo"


def test_decorated_methods_stay_plain_callables() -> None:
    assert Echo().echo(Question(text="hi")) == Answer(text="hi")


def test_subclass_inherits_and_adds_handlers() -> None:
    class MoreEcho(Echo):
        @anycast.handler
        def again(self, request: Question) -> Answer:
            return Answer(text=request.text * 2)

    assert sorted(handlers_of(MoreEcho)) == ["again", "echo", "look", "shout"]
    assert sorted(handlers_of(Echo)) == ["echo", "look", "shout"]


def test_handler_without_type_hints_is_refused_at_decoration() -> None:
    with pytest.raises(ServiceDefinitionError, match="needs type hints"):

        @anycast.handler
        def predict(self, request):  # type: ignore[no-untyped-def]
            return request


def test_handler_with_wrong_arity_is_refused() -> None:
    with pytest.raises(ServiceDefinitionError, match="exactly one request"):

        @anycast.handler
        def predict(self, a: Question, b: Question) -> Answer:
            return Answer(text="")


def test_handler_types_must_be_pydantic_models() -> None:
    with pytest.raises(ServiceDefinitionError, match="request type must be a pydantic BaseModel"):

        class Bad(anycast.Service):
            @anycast.handler
            def predict(self, request: dict) -> Answer:
                return Answer(text="")


def test_unresolvable_type_hint_says_where_to_define_models() -> None:
    with pytest.raises(ServiceDefinitionError, match="define the request and response models"):

        class Bad(anycast.Service):
            @anycast.handler
            def predict(self, request: NotDefinedYet) -> Answer:  # type: ignore[name-defined]  # noqa: F821
                return Answer(text="")


def test_invalid_and_duplicate_handler_names_are_refused() -> None:
    with pytest.raises(ServiceDefinitionError, match="handler must be a Python identifier"):
        anycast.handler(name="not a name")(Echo.echo)
    with pytest.raises(ServiceDefinitionError, match="two handlers named 'echo'"):

        class Twice(anycast.Service):
            @anycast.handler
            def echo(self, request: Question) -> Answer:
                return Answer(text="")

            @anycast.handler(name="echo")
            def other(self, request: Question) -> Answer:
                return Answer(text="")


def test_file_finds_explicit_files_then_the_files_dir(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"w")
    extra = tmp_path / "elsewhere.txt"
    extra.write_text("x")
    service = Echo(files_dir=tmp_path, files={"labels.txt": extra})
    assert service.file("weights.bin") == tmp_path / "weights.bin"
    assert service.file("labels.txt") == extra


def test_missing_file_names_what_exists_and_how_to_ship_it(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"w")
    with pytest.raises(ConfigError) as info:
        Echo(files_dir=tmp_path).file("model.safetensors")
    message = info.value.message
    assert "'model.safetensors' not found" in message
    assert "weights.bin" in message and "--file model.safetensors=PATH" in message
    with pytest.raises(ConfigError, match="relative path"):
        Echo(files_dir=tmp_path).file("../etc/passwd")


SERVICE_SOURCE = """
import anycast
from pydantic import BaseModel

class In(BaseModel):
    x: int

class Out(BaseModel):
    y: int

class Doubler(anycast.Service):
    @anycast.handler
    def double(self, request: In) -> Out:
        return Out(y=request.x * 2)
"""


def test_load_service_from_a_file_path(tmp_path: Path) -> None:
    path = tmp_path / "svc.py"
    path.write_text(SERVICE_SOURCE)
    cls = load_service(f"{path}:Doubler")
    assert cls.__name__ == "Doubler"
    assert load_service(str(path)) is cls  # the only Service class in the file
    assert load_service("svc.py:Doubler", base=tmp_path) is cls


def test_load_service_errors_are_clear(tmp_path: Path) -> None:
    path = tmp_path / "svc.py"
    path.write_text(SERVICE_SOURCE)
    with pytest.raises(ConfigError, match=r"not an existing \.py file"):
        load_service(f"{tmp_path}/missing.py:Doubler")
    with pytest.raises(ConfigError, match="no class Tripler; Service classes there: Doubler"):
        load_service(f"{path}:Tripler")
    with pytest.raises(ConfigError, match=r"In is not a subclass of anycast\.Service"):
        load_service(f"{path}:In")

    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('no GPU here')\n")
    with pytest.raises(ServiceImportError, match="RuntimeError: no GPU here"):
        load_service(f"{broken}:Anything")


class Batched(anycast.Service):
    @anycast.handler(max_batch_size=64, max_wait_ms=2)
    def answer(self, requests: list[Question]) -> list[Answer]:
        return [Answer(text=request.text) for request in requests]

    @anycast.handler(max_batch_size=16, max_wait_ms="auto", timeout_ms=250, deterministic=True)
    def look(self, requests: list[Upload]) -> list[Answer]:
        return [Answer(text=str(request.image.size)) for request in requests]

    @anycast.handler(max_batch_size=8)
    def default_wait(self, requests: list[Question]) -> list[Answer]:
        return []


def test_batched_handlers_take_lists_and_carry_their_options() -> None:
    specs = handlers_of(Batched)
    answer = specs["answer"]
    assert answer.batched and answer.max_batch_size == 64 and answer.max_wait_ms == 2.0
    assert answer.input_model is Question and answer.output_model is Answer
    assert answer.adaptive is False and answer.deterministic is False and answer.idempotent

    look = specs["look"]
    assert look.adaptive is True and look.timeout_ms == 250 and look.deterministic is True
    assert look.image_field == "image"  # batched handlers take multipart uploads too
    assert specs["default_wait"].max_wait_ms == 5.0
    assert not handlers_of(Echo)["echo"].batched


def test_deterministic_and_idempotent_are_options_of_plain_handlers_too() -> None:
    class Cached(anycast.Service):
        @anycast.handler(deterministic=True, idempotent=False)
        def echo(self, request: Question) -> Answer:
            return Answer(text=request.text)

    spec = handlers_of(Cached)["echo"]
    assert spec.deterministic is True and spec.idempotent is False and not spec.batched


def test_batched_handler_must_take_and_return_lists() -> None:
    with pytest.raises(ServiceDefinitionError) as info:

        class NotAList(anycast.Service):
            @anycast.handler(max_batch_size=8)
            def answer(self, request: Question) -> Answer:
                return Answer(text="")

    message = info.value.message
    assert "is batched (max_batch_size=8)" in message and "request type must be a list" in message
    assert "def predict(self, requests: list[MyRequest]) -> list[MyResponse]" in message

    with pytest.raises(ServiceDefinitionError, match="return type must be a list"):

        class ReturnsOne(anycast.Service):
            @anycast.handler(max_batch_size=8)
            def answer(self, requests: list[Question]) -> Answer:
                return Answer(text="")

    with pytest.raises(ServiceDefinitionError, match="request type must be a pydantic BaseModel"):

        class ListOfInts(anycast.Service):
            @anycast.handler(max_batch_size=8)
            def answer(self, requests: list[int]) -> list[Answer]:
                return []


def test_a_list_handler_without_max_batch_size_is_refused() -> None:
    with pytest.raises(ServiceDefinitionError, match=r"make it batched with .*max_batch_size=N"):

        class Forgot(anycast.Service):
            @anycast.handler
            def answer(self, requests: list[Question]) -> list[Answer]:
                return []


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"max_batch_size": 0}, "max_batch_size must be a whole number from 1 to 4096, got 0"),
        ({"max_batch_size": 5000}, "got 5000"),
        ({"max_batch_size": True}, "got True"),
        ({"max_wait_ms": 2}, "max_wait_ms only applies to a batched handler"),
        ({"max_batch_size": 8, "max_wait_ms": -1}, "from 0 to 1000, or 'auto', got -1"),
        ({"max_batch_size": 8, "max_wait_ms": "soon"}, "got 'soon'"),
        ({"max_batch_size": 8, "timeout_ms": 0}, "timeout_ms must be a whole number from 1"),
        ({"timeout_ms": 100}, "timeout_ms bounds the wait in a batched handler's queue"),
    ],
)
def test_bad_batching_options_are_refused_at_decoration(
    options: dict[str, object], fragment: str
) -> None:
    with pytest.raises(ServiceDefinitionError) as info:
        anycast.handler(**options)(Batched.answer)  # type: ignore[call-overload]
    assert fragment in info.value.message
