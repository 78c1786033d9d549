"""ONNX Runtime as a service's execution backend: ``anycast.OnnxModel`` and ``backend_of``.

``anycast build SERVICE --format onnx`` runs the service's ``setup()``, then its optional
hook ``export_model(self) -> (torch.nn.Module, example_input)``, exports that module to
``model.onnx`` (the first axis of the input and output may vary: it is the batch) and packs
it into the artifact, whose manifest records ``"backend": "onnx"``. At run time the service
picks its backend in ``setup()``, and the same handler code works with either, because an
``OnnxModel`` is called like the torch module it was exported from::

    def setup(self) -> None:
        self.backend = anycast.backend_of(self)  # "torch" or "onnx"
        if self.backend == "onnx":
            self.model = anycast.OnnxModel(self.file("model.onnx"))
        else:
            self.model = load_model(self.file("weights.safetensors"))

    def export_model(self) -> tuple[torch.nn.Module, torch.Tensor]:
        return self.model, torch.zeros(1, 1, 28, 28)  # the module and one example batch

ONNX Runtime is an optional dependency: ``pip install 'anycast[onnx]'``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from anycast.core.errors import AnycastError, ConfigError, InvalidInput

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

BACKENDS = ("torch", "onnx")
ONNX_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"
BACKEND_KEY = "backend"
EXPORT_HOOK = "export_model"
INPUT_NAME = "input"
OUTPUT_NAME = "output"
OPSET = 17
THREADS_ENV = "ANYCAST_TORCH_THREADS"
INSTALL_HINT = "install it with: pip install 'anycast[onnx]'"
EXPORT_HINT = (
    "define export_model(self) -> tuple[torch.nn.Module, torch.Tensor] on the service, "
    "returning the model setup() loaded and one example input batch"
)

# ONNX element types of the inputs we cast numpy arrays to before a run.
_NUMPY_TYPES: dict[str, type[np.generic]] = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}

ArrayT = TypeVar("ArrayT", "np.ndarray", "torch.Tensor")


def onnx_threads(environ: Mapping[str, str] = os.environ) -> int:
    """Intra-op threads of a session: ``$ANYCAST_TORCH_THREADS``, default 1.

    Several replicas share a machine's cores, so each uses one unless told otherwise.
    """
    raw = environ.get(THREADS_ENV, "1")
    threads = int(raw) if raw.strip().isdigit() else 0
    if threads < 1:
        raise ConfigError(f"{THREADS_ENV} must be a whole number of at least 1, got {raw!r}")
    return threads


class OnnxModel:
    """An ONNX model run by ONNX Runtime on the CPU, called like a torch module.

    ``model(x)`` takes one input batch as a numpy array or a torch tensor and returns the
    first output the same way: numpy in, numpy out; torch in, torch out.
    """

    def __init__(self, path: Path | str, *, threads: int | None = None) -> None:
        ort = _onnxruntime()
        self.path = Path(path)
        self.threads = threads if threads is not None else onnx_threads()
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(
                str(self.path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own untyped errors for bad files
            raise ConfigError(
                f"{self.path} is not a model ONNX Runtime can load: {exc}", code="bad_onnx_model"
            ) from exc
        first = self.session.get_inputs()[0]
        self.input_name = str(first.name)
        self._input_type = _NUMPY_TYPES.get(str(first.type))
        log.info("loaded ONNX model %s with %d intra-op thread(s)", self.path, self.threads)

    def __call__(self, inputs: ArrayT) -> ArrayT:
        value: Any = inputs
        torch = sys.modules.get("torch")  # a tensor can only come from an imported torch
        if torch is not None and isinstance(value, torch.Tensor):
            return torch.from_numpy(self.run(value.detach().cpu().numpy()))
        return self.run(np.asarray(value))  # type: ignore[return-value]

    def run(self, inputs: np.ndarray) -> np.ndarray:
        """The model's first output for one input batch."""
        if self._input_type is not None and inputs.dtype != self._input_type:
            inputs = inputs.astype(self._input_type)
        try:
            outputs = self.session.run(None, {self.input_name: np.ascontiguousarray(inputs)})
        except Exception as exc:  # a wrong shape or rank, reported by onnxruntime
            raise InvalidInput(
                f"the ONNX model {self.path.name} cannot run on an input of shape "
                f"{list(inputs.shape)}: {exc}"
            ) from exc
        return np.asarray(outputs[0])

    def eval(self) -> OnnxModel:
        """A no-op, so code written for a torch module may call it."""
        return self

    def __repr__(self) -> str:
        return f"OnnxModel({str(self.path)!r}, threads={self.threads})"


def backend_of(service: Any) -> str:
    """``"torch"`` or ``"onnx"``: which model this replica of ``service`` should run.

    In order: ``service.backend`` if already set to one of them (``anycast build`` sets
    ``"torch"`` while it exports); the artifact manifest's ``backend`` (an artifact built
    without ``--format onnx`` is ``"torch"``); outside an artifact (``anycast serve``),
    ``"onnx"`` when a ``model.onnx`` file is given, else ``"torch"``.
    """
    chosen = getattr(service, "backend", None)
    if chosen in BACKENDS:
        return str(chosen)
    manifest = _manifest_of(service)
    if manifest is not None:
        backend = manifest.get(BACKEND_KEY, "torch")
        if backend not in BACKENDS:
            raise ConfigError(
                f"artifact backend must be one of {', '.join(BACKENDS)}, got {backend!r}"
            )
        return str(backend)
    return "onnx" if _has_file(service, ONNX_FILE) else "torch"


def _manifest_of(service: Any) -> dict[str, Any] | None:
    if not _has_file(service, MANIFEST_FILE):
        return None
    path = service.file(MANIFEST_FILE)
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} is not a readable artifact manifest") from exc
    return manifest if isinstance(manifest, dict) else None


def _has_file(service: Any, name: str) -> bool:
    try:
        service.file(name)
    except AnycastError:
        return False
    return True


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path) -> Path:
    """Write ``model`` as ONNX to ``path``, its first input and output axis a dynamic batch.

    Checks the result with ONNX Runtime: on ``example`` it must give what torch gives.
    """
    import torch

    require_export_packages()
    model.eval()
    try:
        with warnings.catch_warnings():
            # Limitation: uses the TorchScript-based exporter (dynamo=False), deprecated by
            # torch but deterministic and needing only the onnx package; the torch.export
            # based one also needs onnxscript.
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=False,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                opset_version=OPSET,
            )
    except Exception as exc:  # torch raises many kinds for unsupported operators or inputs
        raise InvalidInput(
            f"exporting the model to ONNX failed: {type(exc).__name__}: {exc}"
        ) from exc
    _check_export(model, example, path)
    return path


def _check_export(model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    import torch

    with torch.no_grad():
        expected = model(example).detach().cpu().numpy()
    got = OnnxModel(path, threads=1).run(example.detach().cpu().numpy())
    if got.shape != expected.shape or not np.allclose(got, expected, rtol=1e-3, atol=1e-4):
        worst = float(np.max(np.abs(got - expected))) if got.shape == expected.shape else None
        raise InvalidInput(
            f"the exported ONNX model does not reproduce the torch model on the example input "
            f"(shapes {list(got.shape)} and {list(expected.shape)}, largest difference {worst})"
        )


def exported_model(service: Any) -> tuple[torch.nn.Module, torch.Tensor]:
    """Call the service's ``export_model()`` hook and check what it returns."""
    import torch

    hook = getattr(service, EXPORT_HOOK, None)
    if not callable(hook):
        raise InvalidInput(
            f"{type(service).__name__} has no exportable model for --format onnx; {EXPORT_HINT}",
            code="no_exportable_model",
        )
    result = hook()
    if (
        not isinstance(result, tuple)
        or len(result) != 2
        or not isinstance(result[0], torch.nn.Module)
        or not isinstance(result[1], torch.Tensor)
    ):
        raise InvalidInput(
            f"{type(service).__name__}.{EXPORT_HOOK}() returned {type(result).__name__}; "
            f"{EXPORT_HINT}",
            code="no_exportable_model",
        )
    return result[0], result[1]


def _onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise ConfigError(
            f"the ONNX backend needs ONNX Runtime, which is not installed; {INSTALL_HINT}",
            code="onnx_not_installed",
        ) from exc
    return onnxruntime


def require_export_packages() -> None:
    """Raise ConfigError unless onnx and onnxruntime (the ``onnx`` extra) are installed."""
    _onnxruntime()
    try:
        import onnx  # noqa: F401  (torch.onnx.export needs it to write the file)
    except ImportError as exc:
        raise ConfigError(
            f"exporting to ONNX needs the onnx package, which is not installed; {INSTALL_HINT}",
            code="onnx_not_installed",
        ) from exc
