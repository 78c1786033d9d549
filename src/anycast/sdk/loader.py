"""Find a service class from a reference such as ``examples/mnist/service.py:DigitClassifier``."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import logging
import sys
from pathlib import Path
from types import ModuleType

from anycast.core.errors import ConfigError
from anycast.sdk.service import Service, handlers_of

log = logging.getLogger(__name__)

REF_RULE = "'path/to/service.py:ClassName' (or 'package.module:ClassName')"


class ServiceImportError(ConfigError):
    """The service module was found but raised while being imported."""

    code = "service_import"


def split_ref(ref: str) -> tuple[str, str | None]:
    """``'a/b.py:Cls'`` -> ``('a/b.py', 'Cls')``; the class part is optional."""
    target, sep, class_name = ref.rpartition(":")
    if not sep:
        return ref, None
    if not target or not class_name.isidentifier():
        raise ConfigError(f"service reference must look like {REF_RULE}, got {ref!r}")
    return target, class_name


def load_service(ref: str, *, base: Path | None = None) -> type[Service]:
    """Import the module a reference names and return its Service subclass.

    A file path is resolved against ``base`` (default: the working directory) and its folder
    is put first on ``sys.path``, so the service can import its sibling modules. Without a
    class name, the module must define exactly one Service subclass.
    """
    target, class_name = split_ref(ref)
    if target.endswith(".py") or "/" in target:
        module = _import_file((base or Path.cwd()) / target)
    else:
        module = _import_module(target)
    service_cls = _pick_class(module, class_name, ref)
    if not handlers_of(service_cls):
        raise ConfigError(
            f"{service_cls.__name__} in {ref!r} has no handlers; mark a method with "
            "@anycast.handler"
        )
    return service_cls


def _import_file(path: Path) -> ModuleType:
    path = path.resolve()
    if not path.is_file() or path.suffix != ".py":
        raise ConfigError(f"service file {path} is not an existing .py file ({REF_RULE})")

    digest = hashlib.sha256(str(path).encode()).hexdigest()[:12]
    module_name = f"_anycast_service_{path.stem}_{digest}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot import {path} as a Python module")

    folder = str(path.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # pydantic resolves type hints through sys.modules
    try:
        spec.loader.exec_module(module)
    except ConfigError:
        sys.modules.pop(module_name, None)
        raise
    except Exception as exc:
        sys.modules.pop(module_name, None)
        log.exception("importing %s failed", path)
        raise ServiceImportError(f"importing {path} failed: {type(exc).__name__}: {exc}") from exc
    return module


def _import_module(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        raise ConfigError(f"no module or file {name!r}; a service is {REF_RULE}") from exc
    except ConfigError:
        raise
    except Exception as exc:
        log.exception("importing %s failed", name)
        raise ServiceImportError(f"importing {name} failed: {type(exc).__name__}: {exc}") from exc


def _pick_class(module: ModuleType, class_name: str | None, ref: str) -> type[Service]:
    defined = [
        obj
        for obj in vars(module).values()
        if inspect.isclass(obj)
        and issubclass(obj, Service)
        and obj is not Service
        and obj.__module__ == module.__name__
    ]
    names = ", ".join(sorted(c.__name__ for c in defined)) or "none"
    if class_name is None:
        if len(defined) != 1:
            raise ConfigError(
                f"{ref!r} defines {len(defined)} Service classes ({names}); name one, as in "
                f"{ref}:ClassName"
            )
        return defined[0]

    found = getattr(module, class_name, None)
    if found is None:
        raise ConfigError(f"{ref!r}: no class {class_name}; Service classes there: {names}")
    if not (inspect.isclass(found) and issubclass(found, Service)):
        raise ConfigError(f"{ref!r}: {class_name} is not a subclass of anycast.Service")
    return found
