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
one image.
"""

from __future__ import annotations

import logging
import re
import warnings
from typing import TYPE_CHECKING, Any

from anycast.core.errors import ConfigError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


# Tracer warnings that mean the trace holds only for inputs like the example: a tensor read
# as a Python value (a branch, a loop bound, a shape) or iterated over.
UNSAFE_TRACE = r"(Converting a tensor to a Python|Iterating over a tensor)"


def freeze(module: torch.nn.Module, example: torch.Tensor | tuple[torch.Tensor, ...]) -> Any:
    """``module`` in eval mode, traced on ``example`` (one input batch) and frozen.

    ``example`` is one tensor, or a tuple of tensors for a forward that takes several inputs.
    Tracing records the operations ``example`` went through; a forward whose branches depend
    on the values of its input would keep only the branch the example took, so freeze refuses
    a module whose forward reads a tensor as a Python value or iterates over one. The batch
    size may differ from the example's. Raises ConfigError if the module cannot be traced.
    """
    import torch

    if not isinstance(module, torch.nn.Module):
        raise ConfigError(f"freeze() takes a torch.nn.Module, got {type(module).__name__}")
    check_example(example)
    module.eval()
    return trace_and_freeze(module, example)


def check_example(example: object) -> None:
    """Raise ConfigError unless ``example`` is a tensor or a non-empty tuple of tensors."""
    import torch

    parts = example if isinstance(example, tuple) and example else (example,)
    wrong = [type(part).__name__ for part in parts if not isinstance(part, torch.Tensor)]
    if wrong:
        raise ConfigError(
            "freeze() takes an example input batch as a torch.Tensor (or a tuple of tensors, "
            f"one per input of forward), got {type(example).__name__}"
            + (f" of {', '.join(wrong)}" if isinstance(example, tuple) else "")
        )


def trace_and_freeze(module: torch.nn.Module, example: Any) -> Any:
    import torch

    name, shapes = type(module).__name__, describe(example)
    try:
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("always", torch.jit.TracerWarning)
            frozen = torch.jit.freeze(torch.jit.trace(module, example))
    except Exception as exc:  # tracing raises many types: RuntimeError, TypeError, ...
        hint = (
            "; for a forward of several inputs pass a tuple of example tensors"
            if isinstance(exc, TypeError) and "positional argument" in str(exc)
            else ""
        )
        raise ConfigError(
            f"cannot freeze {name}: tracing it on an example of {shapes} failed: {exc}{hint}"
        ) from exc
    unsafe = [str(w.message) for w in caught if re.match(UNSAFE_TRACE, str(w.message))]
    if unsafe:
        raise ConfigError(
            f"cannot freeze {name}: its forward depends on the values of its input "
            f"({unsafe[0].split('.')[0]}), so a trace on an example of {shapes} could give "
            "other inputs wrong answers; freeze only a module that runs the same operations "
            "for every input, or serve this one eagerly"
        )
    for warning in caught:
        log.warning("freezing %s: %s", name, warning.message)
    return frozen


def describe(example: Any) -> str:
    """``shape (1, 3)``, or ``shapes (1, 3), (1, 2)`` for a tuple of tensors."""
    if isinstance(example, tuple):
        return "shapes " + ", ".join(str(tuple(part.shape)) for part in example)
    return f"shape {tuple(example.shape)}"
