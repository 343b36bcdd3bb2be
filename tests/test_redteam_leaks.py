"""Red team, issue 9, item 4: the host must not learn an encrypted graph's architecture.

The ``status`` ECALL returned the streaming plan of an MLP packed with an encrypted graph: every
layer's op type in order, every weight's size (and so every width), the node count per segment
and per-step timings. Error messages did the same (a refused memory limit named the op and the
size of the tensor that did not fit; ONNX Runtime's errors name nodes and shapes).

Here every model's node, tensor and value names carry a marker (``zq``) that occurs nowhere else,
so a name that leaves the enclave is found by searching what the host received: ``status``, the
error messages, and the worker's log file (which lives in a folder the host owns). With
``--public-architecture`` (the graph stored in the clear anyway) the plan is still described.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from conftest import Packed, ProviderKey, pack_model
from onnx import TensorProto, helper, numpy_helper

from mlcapsule.enclave.errors import InputError, MlcapsuleError, UsageError

MiB = 1 << 20
RNG = np.random.default_rng(11)
TENSOR_INPUT = {"kind": "tensor", "image_size": None, "channels": 1, "layout": "flat", "scale": 1.0, "mean": None,
                "std": None, "dtype": "float32"}
OP_TYPES = ("Gemm", "MatMul", "Relu", "Softmax", "Conv", "Reshape", "Add", "Mul")
#: What status["model"] may say about an encrypted graph: aggregates only.
AGGREGATE_KEYS = {"mode", "architecture", "memory_limit", "runs", "run_seconds", "decrypt_seconds", "session_seconds",
                  "runtime", "onnxruntime"}


def _model(nodes: list[onnx.NodeProto], inputs: list[Any], outputs: list[Any], inits: list[TensorProto]) -> onnx.ModelProto:
    m = helper.make_model(helper.make_graph(nodes, "zq_secret_graph", inputs, outputs, inits),
                          opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(m)
    return m


def _mlp(widths: tuple[int, ...] = (256, 1024, 1024, 512, 10)) -> onnx.ModelProto:
    """Gemm/Relu layers, then Softmax; every name carries the marker."""
    nodes, inits, x = [], [], "zq_input"
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        w = (RNG.standard_normal((b, a)) / np.sqrt(a)).astype(np.float32)  # torch's Linear layout
        inits += [numpy_helper.from_array(w, f"zq_weight_{i}"),
                  numpy_helper.from_array((RNG.standard_normal(b) * 0.1).astype(np.float32), f"zq_bias_{i}")]
        nodes.append(helper.make_node("Gemm", [x, f"zq_weight_{i}", f"zq_bias_{i}"], [f"zq_h{i}"], transB=1,
                                      name=f"zq_dense_{i}"))
        x = f"zq_h{i}"
        if i < len(widths) - 2:
            nodes.append(helper.make_node("Relu", [x], [f"zq_r{i}"], name=f"zq_act_{i}"))
            x = f"zq_r{i}"
    nodes.append(helper.make_node("Softmax", [x], ["zq_probs"], axis=-1, name="zq_softmax"))
    return _model(nodes, [helper.make_tensor_value_info("zq_input", TensorProto.FLOAT, ["N", widths[0]])],
                  [helper.make_tensor_value_info("zq_probs", TensorProto.FLOAT, ["N", widths[-1]])], inits)


def _batched_matmul() -> onnx.ModelProto:
    """A MatMul whose 4 MiB weight is 3-D: streaming cannot split it."""
    w = (RNG.standard_normal((2, 512, 1024)) / 32).astype(np.float32)
    return _model([helper.make_node("MatMul", ["zq_input", "zq_weight_3d"], ["zq_out"], name="zq_batched_matmul")],
                  [helper.make_tensor_value_info("zq_input", TensorProto.FLOAT, [2, "N", 512])],
                  [helper.make_tensor_value_info("zq_out", TensorProto.FLOAT, [2, "N", 1024])],
                  [numpy_helper.from_array(w, "zq_weight_3d")])


def _conv(c: int = 64, hw: int = 112) -> onnx.ModelProto:
    """A 3x3 convolution with large activations: a big batch does not fit a small limit."""
    w = (RNG.standard_normal((c, c, 3, 3)) / np.sqrt(9 * c)).astype(np.float32)
    return _model([helper.make_node("Conv", ["zq_input", "zq_kernel"], ["zq_c"], pads=[1, 1, 1, 1], name="zq_conv"),
                   helper.make_node("Relu", ["zq_c"], ["zq_out"], name="zq_conv_act")],
                  [helper.make_tensor_value_info("zq_input", TensorProto.FLOAT, ["N", c, hw, hw])],
                  [helper.make_tensor_value_info("zq_out", TensorProto.FLOAT, ["N", c, hw, hw])],
                  [numpy_helper.from_array(w, "zq_kernel")])


def _reshaping() -> onnx.ModelProto:
    """x @ W, reshaped to [16, -1]: ONNX Runtime fails on a batch of 1 (8 values), inside the
    model, after the input check has passed; its message names the node and the shapes."""
    w = RNG.standard_normal((8, 8)).astype(np.float32)
    return _model([helper.make_node("MatMul", ["zq_input", "zq_w"], ["zq_xw"], name="zq_project"),
                   helper.make_node("Reshape", ["zq_xw", "zq_shape"], ["zq_out"], name="zq_secret_reshape")],
                  [helper.make_tensor_value_info("zq_input", TensorProto.FLOAT, ["N", 8])],
                  [helper.make_tensor_value_info("zq_out", TensorProto.FLOAT, [16, "M"])],
                  [numpy_helper.from_array(w, "zq_w"), numpy_helper.from_array(np.array([16, -1], np.int64), "zq_shape")])


def _layer_numbers(model: onnx.ModelProto) -> set[int]:
    """Per-layer figures the host must not learn: every weight's size in bytes and elements, and
    every dimension of every weight bigger than 16."""
    out: set[int] = set()
    for t in model.graph.initializer:
        a = numpy_helper.to_array(t)
        out |= {a.nbytes, a.size} | {d for d in a.shape if d > 16}
    return out


def _numbers(obj: Any) -> list[float]:
    if isinstance(obj, bool):
        return []
    if isinstance(obj, (int, float)):
        return [obj]
    if isinstance(obj, dict):
        return [n for v in obj.values() for n in _numbers(v)]
    if isinstance(obj, list):
        return [n for v in obj for n in _numbers(v)]
    return []


def _worker_logs(cap: Any) -> str:
    """What the enclave worker wrote to its log, which is a file in a folder the host owns."""
    logs = list(Path(cap.state_dir).rglob("worker.log"))
    assert logs, "the worker's log was not found (where does the host keep it now?)"
    return "".join(p.read_text(errors="replace") for p in logs)


def assert_reveals_no_layer(text: str, model: onnx.ModelProto, *, what: str) -> None:
    assert "zq" not in text, f"{what} names a node or tensor of the encrypted graph: {text[:2000]}"
    for op in OP_TYPES:
        assert not re.search(rf"\b{op}\b", text), f"{what} names the op type {op}: {text[:2000]}"


@pytest.fixture(scope="module")
def capsules(tmp_path_factory: pytest.TempPathFactory, provider_key: ProviderKey) -> dict[str, Packed]:
    root = tmp_path_factory.mktemp("leaks")
    out = {}
    for name, model, public in (("mlp", _mlp(), False), ("mlp_public", _mlp(), True),
                                ("batched", _batched_matmul(), False), ("conv", _conv(), False),
                                ("reshape", _reshaping(), False), ("reshape_public", _reshaping(), True)):
        out[name] = pack_model(model, root / f"{name}.capsule", provider_key, tune_runtime=False,
                               preprocessing=TENSOR_INPUT, public_architecture=public)
        assert out[name].manifest.public_architecture is public
    return out


# -- status ---------------------------------------------------------------------------------------
def test_status_of_a_streaming_encrypted_mlp_reveals_no_op_size_node_or_step(tmp_path: Path,
                                                                             capsules: dict[str, Packed]) -> None:
    p = capsules["mlp"]
    x = RNG.standard_normal((2, 256)).astype(np.float32)
    with p.open(tmp_path, "streaming", memory_limit_mb=16) as cap:
        cap.predict(x)
        cap.predict(x[:1])
        status = cap.status()
        logs = _worker_logs(cap)
    model = status["model"]
    text = json.dumps(status)
    assert_reveals_no_layer(text, p.model, what="status")
    assert_reveals_no_layer(logs, p.model, what="the worker's log")
    sizes = _layer_numbers(p.model)
    leaked = [n for n in _numbers({k: v for k, v in status.items() if k != "memory"}) if n in sizes]
    assert not leaked, f"status carries per-layer sizes {leaked}"
    assert set(model) <= AGGREGATE_KEYS, f"status says more than aggregates: {sorted(set(model) - AGGREGATE_KEYS)}"
    assert model["mode"] == "streaming" and model["architecture"] == "private"
    assert model["memory_limit"] == 16 * MiB and model["runs"] >= 2  # aggregates are still there


def test_status_of_a_resident_encrypted_model_reveals_no_layer(tmp_path: Path, capsules: dict[str, Packed]) -> None:
    p = capsules["mlp"]
    with p.open(tmp_path, "resident") as cap:
        cap.predict(RNG.standard_normal((2, 256)).astype(np.float32))
        status = cap.status()
    assert status["model"]["mode"] == "resident" and status["model"]["architecture"] == "private"
    assert set(status["model"]) <= AGGREGATE_KEYS
    assert_reveals_no_layer(json.dumps(status), p.model, what="status")


def test_public_architecture_status_still_describes_the_streaming_plan(tmp_path: Path,
                                                                       capsules: dict[str, Packed]) -> None:
    p = capsules["mlp_public"]
    with p.open(tmp_path, "streaming", memory_limit_mb=16) as cap:
        cap.predict(RNG.standard_normal((2, 256)).astype(np.float32))
        model = cap.status()["model"]
    assert model["architecture"] == "public"
    assert model["segments"] >= 1 and model["steps"] and model["split_nodes"], model
    assert {s["op"] for s in model["split_nodes"]} == {"Gemm"}  # the 4 MiB layer is split
    assert any(s["weight_bytes"] == 1024 * 1024 * 4 for s in model["split_nodes"])


# -- error messages -------------------------------------------------------------------------------
def test_refused_memory_limit_gives_one_number_not_the_layer_that_does_not_fit(tmp_path: Path,
                                                                                 capsules: dict[str, Packed]) -> None:
    """Two refusals: the limit leaves no room at all (it used to break the need down into
    activations and buffers), and a 4 MiB weight that cannot be split (it used to name the op
    and the tensor's size). Each says only the smallest limit that would work."""
    for name, limit in (("mlp", 9), ("batched", 16)):
        p = capsules[name]
        with pytest.raises(UsageError) as e:
            p.open(tmp_path, f"{name}-{limit}", memory_limit_mb=limit)
        msg = e.value.diagnostics()
        assert_reveals_no_layer(msg, p.model, what="the refusal")
        m = re.fullmatch(rf"a memory limit of {limit} MB is too small for this model: it needs at least (\d+) MB"
                         r" \(raise --memory-limit\)", msg)
        assert m, msg
        need = int(m.group(1))
        assert need > limit
        if name == "batched":  # the number is right: at that limit the model loads and runs
            with p.open(tmp_path, f"{name}-{need}", memory_limit_mb=need) as cap:
                x = RNG.standard_normal((2, 1, 512)).astype(np.float32)
                y = cap.predict(x)
            np.testing.assert_allclose(y, x @ numpy_helper.to_array(p.model.graph.initializer[0]), rtol=1e-4, atol=1e-4)


def test_a_batch_too_large_for_the_limit_is_refused_without_a_plan_derived_count(tmp_path: Path,
                                                                                   capsules: dict[str, Packed]) -> None:
    p = capsules["conv"]
    with p.open(tmp_path, "conv", memory_limit_mb=44) as cap:
        with pytest.raises(InputError, match="does not fit") as e:
            cap.predict(np.zeros((12, 64, 112, 112), np.float32))
    msg = e.value.diagnostics()
    assert_reveals_no_layer(msg, p.model, what="the refusal")
    assert "at most" not in msg, msg


@pytest.mark.parametrize("mode", ["resident", "streaming"])
def test_onnx_runtime_error_does_not_reach_the_host_with_node_names(tmp_path: Path, capsules: dict[str, Packed],
                                                                    mode: str) -> None:
    """ONNX Runtime fails inside the model (a Reshape that a batch of 1 cannot satisfy): the
    reply and the worker's log say nothing of the node, its op or the shapes, and the worker
    keeps serving."""
    p = capsules["reshape"]
    limit = {"memory_limit_mb": 16} if mode == "streaming" else {}
    with p.open(tmp_path, mode, **limit) as cap:
        assert cap.predict(np.ones((2, 8), np.float32)).shape == (16, 1)
        with pytest.raises(MlcapsuleError) as e:
            cap.predict(np.ones((1, 8), np.float32))
        assert cap.predict(np.ones((2, 8), np.float32)).shape == (16, 1)  # still serving
        logs = _worker_logs(cap)
    assert_reveals_no_layer(e.value.diagnostics(), p.model, what="the error")
    assert "{1,8}" not in e.value.diagnostics() and "16" not in e.value.message
    assert_reveals_no_layer(logs, p.model, what="the worker's log")
    assert isinstance(e.value, InputError), e.value  # a clean refusal, not an internal error


def test_onnx_runtime_error_detail_is_kept_for_a_public_architecture(tmp_path: Path,
                                                                     capsules: dict[str, Packed]) -> None:
    p = capsules["reshape_public"]
    with p.open(tmp_path, "streaming", memory_limit_mb=16) as cap:
        with pytest.raises(InputError, match="cannot run on this input: .*zq_secret_reshape"):
            cap.predict(np.ones((1, 8), np.float32))
