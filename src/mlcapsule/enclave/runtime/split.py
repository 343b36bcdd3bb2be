"""Split an ONNX model into a graph without weights and one contiguous weights blob.

Provider side. Each weight tensor is replaced in the graph by an ONNX external-data placeholder::

    data_location = EXTERNAL, external_data = {location: PLACEHOLDER, offset: O, length: L}

where O is the tensor's offset in the weights blob (64-byte aligned) and L its byte length. The
graph thereby carries the tensor directory in ONNX's own vocabulary; the enclave hands views of
its decrypted blob to ONNX Runtime with ``add_initializer`` and ORT never reads the placeholder.
Small integer tensors (shapes, axes) stay inline, because ORT's optimizers must see their values.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

PLACEHOLDER = "__mlcapsule_sealed_weights__"
ALIGN = 64
INLINE_INT_BYTES = 4096
_FLOATS = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}


@dataclass
class SplitModel:
    graph: onnx.ModelProto  # with placeholders
    blob: bytearray  # the weights, plaintext
    attribute_params: int  # bytes of parameters held in node attributes (trees) or Constant nodes

    @property
    def graph_bytes(self) -> bytes:
        return self.graph.SerializeToString()


def _attribute_bytes(graph: onnx.GraphProto) -> int:
    total = 0
    for node in graph.node:
        for a in node.attribute:
            total += len(a.floats) * 4 + len(a.ints) * 8 + (a.t.ByteSize() if a.HasField("t") else 0)
            for g in list(a.graphs) + ([a.g] if a.HasField("g") else []):
                total += _attribute_bytes(g)
    return total


def _externalize(t: TensorProto) -> bool:
    if t.data_type == TensorProto.STRING or t.data_location == TensorProto.EXTERNAL:
        return False
    if t.data_type in _FLOATS:
        return True
    nbytes = int(np.prod(t.dims, dtype=np.int64)) * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    return nbytes >= INLINE_INT_BYTES


def _tensors(graph: onnx.GraphProto) -> list[TensorProto]:
    out = list(graph.initializer)
    for node in graph.node:
        for a in node.attribute:
            for g in list(a.graphs) + ([a.g] if a.HasField("g") else []):
                out += _tensors(g)
    return out


def split_model(model: onnx.ModelProto) -> SplitModel:
    """Move weight tensors into one blob. The input model is not modified."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in _tensors(m.graph):
        if t.data_location == TensorProto.EXTERNAL:
            raise ValueError(f"initializer {t.name!r} uses external data; "
                             "load it with onnx.load(..., load_external_data=True) first")
    blob = bytearray()
    for t in _tensors(m.graph):
        if not _externalize(t):
            continue
        arr = np.ascontiguousarray(numpy_helper.to_array(t))
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        pad = -len(blob) % ALIGN
        blob += bytes(pad)
        offset = len(blob)
        blob += arr.tobytes()
        dims, name, dtype = list(t.dims), t.name, t.data_type
        t.Clear()
        t.name, t.data_type = name, dtype
        t.dims.extend(dims)
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", PLACEHOLDER), ("offset", str(offset)), ("length", str(arr.nbytes))):
            e = t.external_data.add()
            e.key, e.value = k, v
    return SplitModel(m, blob, _attribute_bytes(m.graph))
