"""Anycast: train models where the data lives; serve them from every region behind one endpoint.

The public API is what this module exports; everything else may change between releases.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # type checkers see the real names; at run time they load lazily below
    from anycast.sdk import Image, Service, handler
    from anycast.sdk.onnx import OnnxModel, backend_of
    from anycast.sdk.torchscript import freeze

__version__ = "0.1.0"

__all__ = ["Image", "OnnxModel", "Service", "__version__", "backend_of", "freeze", "handler"]


def __getattr__(name: str) -> object:
    # The SDK is imported lazily so that `import anycast` stays cheap for the CLI.
    if name in ("Service", "handler", "Image"):
        from anycast import sdk

        return getattr(sdk, name)
    if name in ("OnnxModel", "backend_of"):
        from anycast.sdk import onnx

        return getattr(onnx, name)
    if name == "freeze":
        from anycast.sdk.torchscript import freeze

        return freeze
    raise AttributeError(f"module 'anycast' has no attribute {name!r}")
