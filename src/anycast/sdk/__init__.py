"""The service SDK: what users write a service with.

```python
class DigitClassifier(anycast.Service):
    def setup(self) -> None:
        self.model = load_model(self.file("weights.safetensors"))

    @anycast.handler
    def predict(self, request: DigitRequest) -> DigitPrediction: ...
```
"""

from anycast.sdk.image import (
    MAX_IMAGE_BYTES,
    MAX_IMAGE_PIXELS,
    MAX_IMAGE_SIDE,
    Image,
    ImageError,
    ImageTooLarge,
)
from anycast.sdk.loader import ServiceImportError, load_service, split_ref
from anycast.sdk.onnx import OnnxModel, backend_of
from anycast.sdk.service import (
    HandlerOptions,
    HandlerSpec,
    Service,
    ServiceDefinitionError,
    handler,
    handlers_of,
)
from anycast.sdk.torchscript import freeze

__all__ = [
    "MAX_IMAGE_BYTES",
    "MAX_IMAGE_PIXELS",
    "MAX_IMAGE_SIDE",
    "HandlerOptions",
    "HandlerSpec",
    "Image",
    "ImageError",
    "ImageTooLarge",
    "OnnxModel",
    "Service",
    "ServiceDefinitionError",
    "ServiceImportError",
    "backend_of",
    "freeze",
    "handler",
    "handlers_of",
    "load_service",
    "split_ref",
]
