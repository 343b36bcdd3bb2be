"""Resident mode: the whole model decrypted once, straight into one buffer, served by ONNX Runtime.

Enclave side. The buffer is a :func:`.weights.mapped_buffer` that the
:class:`.weights.WeightReader` fills; ``add_initializer`` hands ORT a view of it without copying
it. The ORT session options that matter (see docs/design.md, "Runtime"):

* ``session.model_external_initializers_file_folder_path`` points ORT at a private folder that
  holds an *empty* placeholder file, which satisfies ORT's check that the external-data file
  exists; ORT reads nothing from it because every placeholder tensor is overridden.
* the graph optimization level is the one the packer verified against the plain model
  (``add_initializer`` gives wrong outputs at some levels on some models: DESIGN.md §6).
* ``session.disable_prepacking`` unless the manifest enables prepacking: prepacking copies
  weights into a packed layout, doubling their memory.
* ``initializers = "copy"`` (chosen by the packer when it is faster: the optimizations at
  ``all``, e.g. the NCHWc layout for convolutions, need the real weights while the graph is
  optimized): views of the decrypted buffer go to ``add_external_initializers``, which puts them
  in the graph before it is optimized. ORT copies them while it builds the session; then the
  buffer is wiped and released, so the weights are held once, by ORT.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto

from ..errors import FormatError, InputError, MlcapsuleError
from ..format.manifest import RuntimeConfig
from .split import PLACEHOLDER
from .weights import (
    BUFFER_ALIGN as BUFFER_ALIGN,  # the buffers live in .weights; re-exported here
    aligned_empty as aligned_empty,
    mapped_buffer as mapped_buffer,
)

_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def ensure_placeholder(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / PLACEHOLDER
    if not p.exists():
        p.touch(mode=0o600)


def placeholder_views(model: onnx.ModelProto, weights: np.ndarray) -> dict[str, np.ndarray]:
    """Zero-copy numpy views of ``weights`` for every placeholder initializer of ``model``."""
    views: dict[str, np.ndarray] = {}
    size = weights.nbytes
    for t in model.graph.initializer:
        if t.data_location != TensorProto.EXTERNAL:
            continue
        ext = {e.key: e.value for e in t.external_data}
        # No tensor names in these messages: they reach the host, and the graph may be encrypted.
        if ext.get("location") != PLACEHOLDER:
            raise FormatError("a tensor of the model points outside the capsule")
        try:
            offset, length = int(ext["offset"]), int(ext["length"])
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type))
        except (KeyError, ValueError, TypeError) as e:
            raise FormatError("a tensor of the model has a malformed placeholder") from e
        count = int(np.prod(t.dims, dtype=np.int64))
        if offset < 0 or length != count * dtype.itemsize or offset + length > size or offset % dtype.itemsize:
            raise FormatError("a tensor of the model does not fit the weights segment")
        views[t.name] = weights[offset:offset + length].view(dtype).reshape(tuple(t.dims))
    return views


def session_options(cfg: RuntimeConfig, placeholder_dir: Path | None, *,
                    threads: int | None = None) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = _LEVELS[cfg.optimization]
    if placeholder_dir is not None:
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(placeholder_dir))
    if not cfg.prepacking:
        so.add_session_config_entry("session.disable_prepacking", "1")
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 4  # failures surface as exceptions (FormatError); no duplicate log line
    return so


class ResidentModel:
    """An ORT session over the decrypted weights.

    ``shared``: ORT reads the weights straight from ``weights`` (a caller-owned buffer) for as
    long as the session lives. ``copy``: ORT copies them while the session is built; ``weights``
    is then wiped (unless ``keep_weights``: the packer tries several configurations on one
    buffer) and not referenced any more, so the caller's last reference frees it.
    """

    def __init__(self, graph_bytes: bytes | bytearray, weights: np.ndarray, cfg: RuntimeConfig, *,
                 placeholder_dir: Path, threads: int | None = None, keep_weights: bool = False) -> None:
        raw = bytes(graph_bytes)  # the graph alone (weights are external): kilobytes
        try:
            model = onnx.ModelProto.FromString(raw)
        except Exception as e:  # protobuf raises its own DecodeError
            raise FormatError("the capsule's graph does not parse as ONNX") from e
        views = placeholder_views(model, weights)  # checks every placeholder against the buffer
        del model
        self.config = cfg
        self._keep = keep_weights
        self.load_breakdown: dict[str, float] = {}
        self.weights: np.ndarray | None = weights
        self._values: dict[str, Any] = {}
        if cfg.initializers == "copy":
            so = session_options(cfg, None, threads=threads)
            # ORT copies these while it builds the session (faster and with a lower peak than
            # add_external_initializers_from_files_in_memory, which copies twice).
            values = [ort.OrtValue.ortvalue_from_numpy(v) for v in views.values()]
            so.add_external_initializers(list(views), values)
            del values
        else:
            ensure_placeholder(placeholder_dir)
            so = session_options(cfg, placeholder_dir, threads=threads)
            # ORT does not keep the OrtValues alive: we must, for as long as the session lives.
            self._values = {name: ort.OrtValue.ortvalue_from_numpy(v) for name, v in views.items()}
            for name, value in self._values.items():
                so.add_initializer(name, value)
        del views
        try:
            self.session = ort.InferenceSession(raw, so, providers=["CPUExecutionProvider"])
        except Exception as e:
            if cfg.initializers == "copy" and not keep_weights and weights.flags.writeable:
                weights.fill(0)
            # ORT's text names nodes and shapes, and this message reaches the host, whose graph may
            # be encrypted: it stays in the exception's cause (the packer's trials), not the reply.
            raise FormatError("ONNX Runtime cannot load the model") from e
        finally:
            del so  # drops the in-memory file reference (copy mode)
        if cfg.initializers == "copy":
            # ORT holds its own copy now: wipe ours and let it go.
            if not keep_weights and weights.flags.writeable:
                weights.fill(0)
            self.weights = None
        self.inputs = self.session.get_inputs()
        self.outputs = self.session.get_outputs()
        self.output_names = [o.name for o in self.outputs]

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        try:
            return self.session.run(self.output_names, feeds if type(feeds) is dict else dict(feeds))
        except MlcapsuleError:
            raise
        except Exception as e:
            # ORT's messages name nodes and shapes; as an unexpected exception they would reach the
            # worker's log (which the host reads) with a traceback. The detail stays in the cause.
            raise InputError("the model cannot run on this input",
                             hint="check the input against the model's description (`mlcapsule inspect`)") from e

    def describe(self) -> dict[str, Any]:
        return {"mode": "resident", "runtime": self.config.to_dict() | {"initializers": self.config.initializers},
                **self.load_breakdown}

    def close(self) -> None:
        """Drop the session and overwrite the plaintext weights (best effort)."""
        self.session = None
        self._values = {}
        if self.weights is not None and not self._keep and self.weights.flags.writeable:
            self.weights.fill(0)
        self.weights = None


def plain_session(model_bytes: bytes, *, threads: int | None = None, **_: Any) -> ort.InferenceSession:
    """Plain ONNX Runtime on an unprotected model: the baseline the capsule must equal."""
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])

