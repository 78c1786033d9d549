"""``anycast.freeze``: a torch module traced and frozen by TorchScript, for serving.

Eager PyTorch returns to Python after every layer and takes the GIL back each time. In a
replica the event loop holds the GIL while it reads and parses calls, and a thread that
wants it back waits for the loop to let go (up to the interpreter's switch interval, 5 ms
by default). A frozen module runs its whole forward in one call from Python, with the
weights folded in as constants, and gives the same numbers::

    def setup(self) -> None:
        self.network = load_model(self.file("weights.safetensors"))  # for export_model()
        self.model = anycast.freeze(self.network, torch.zeros(1, 1, 28, 28))

TorchScript is deprecated upstream in favour of ``torch.compile`` and ``torch.export``, but
the pinned torch has it and its warnings are silenced here. On the digit CNN, on two CPU
cores, ``torch.compile`` took 30 s to compile and its forward was slower than eager (twice
as slow for one image, four times for 64), while the frozen module was a third faster for
one image. A torch without TorchScript gets the eager module back, with a warning.
"""

from __future__ import annotations

import logging
import warnings
from typing import TYPE_CHECKING, Any

from anycast.core.errors import ConfigError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def freeze(module: torch.nn.Module, example: torch.Tensor) -> Any:
    """``module`` in eval mode, traced on ``example`` (one input batch) and frozen.

    Tracing records the operations ``example`` went through; a forward whose branches depend
    on the values of its input keeps only the branch the example took, so freeze only a
    module whose path is the same for every input (as for most feed-forward networks). The
    batch size may differ from the example's. Raises ConfigError if the module cannot be
    traced.
    """
    import torch

    if not isinstance(module, torch.nn.Module):
        raise ConfigError(f"freeze() takes a torch.nn.Module, got {type(module).__name__}")
    module.eval()
    jit = getattr(torch, "jit", None)
    if jit is None or not hasattr(jit, "freeze"):
        log.warning("this torch has no TorchScript; %s runs eagerly", type(module).__name__)
        return module
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return jit.freeze(jit.trace(module, example))
    except Exception as exc:  # tracing raises many types: RuntimeError, TypeError, ...
        raise ConfigError(
            f"cannot freeze {type(module).__name__}: tracing it on an example of shape "
            f"{tuple(getattr(example, 'shape', ()))} failed: {exc}"
        ) from exc
