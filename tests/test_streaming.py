"""Streaming mode (``memory_limit_mb``): outputs equal resident mode's, and the limit holds.

The models are small, but the limits are set so that the plans really stream: several segments,
and MatMul/Gemm/Conv nodes split into blocks. The enclave reports its own memory in ``status``
(VmHWM against its memory after imports, before loading); the tests check it against the limit
and cross-check it with ``/proc/PID/status`` read from outside. No timing is asserted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from conftest import Packed, ProviderKey, assert_matches_reference, pack_model, plain_ort
from onnx import TensorProto, helper, numpy_helper

from mlcapsule.demo import models
from mlcapsule.enclave.errors import InputError, UsageError

MiB = 1 << 20
RNG = np.random.default_rng(7)
#: Inputs are plain arrays (the CLI reads them from .npy files).
TENSOR_INPUT = {"kind": "tensor", "image_size": None, "channels": 1, "layout": "flat", "scale": 1.0, "mean": None,
                "std": None, "dtype": "float32"}


def _close(got: np.ndarray, ref: np.ndarray) -> None:
    """Blocked sums change the order of additions: equal to float32 rounding, not bit for bit."""
    got, ref = np.asarray(got), np.asarray(ref)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    scale = max(1.0, float(np.max(np.abs(ref))))
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * scale)


def _peak_growth(status: dict[str, Any]) -> float:
    mem = status["memory"]
    return (mem["now"]["VmHWM"] - mem["baseline"]["VmRSS"]) / MiB


def _hwm_from_outside(cap: Any) -> int:
    """VmHWM of the enclave worker, read by the host from /proc (the worker is non-dumpable, but
    its status file stays readable)."""
    for line in Path(f"/proc/{cap._enclave.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def _resident_and_streaming(packed: Packed, tmp_path: Path, x: np.ndarray, limit: float
                            ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    with packed.open(tmp_path, "resident") as cap:
        resident = cap.predict(x)
        assert cap.status()["model"]["mode"] == "resident"
    with packed.open(tmp_path, "streaming", memory_limit_mb=limit) as cap:
        streaming = cap.predict(x)
        again = cap.predict(x)  # the second query streams the same weights again
        status = cap.status()
        outside = _hwm_from_outside(cap)
    np.testing.assert_array_equal(streaming, again)
    assert status["model"]["mode"] == "streaming"
    growth = _peak_growth(status)
    assert growth <= limit, f"peak {growth:.1f} MB over the {limit} MB limit: {status['model']}"
    assert outside == status["memory"]["now"]["VmHWM"] or abs(outside - status["memory"]["now"]["VmHWM"]) < 4 * MiB
    return resident, streaming, status


# -- models -------------------------------------------------------------------------------------
def _gemm_k_model(k: int = 1536, n: int = 1024) -> onnx.ModelProto:
    """Y = 0.5 * X @ W + 2 * C with W stored [K, N] (transB=0): split over K, partial sums."""
    w = RNG.standard_normal((k, n), dtype=np.float32) / np.float32(np.sqrt(k))
    c = RNG.standard_normal(n).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("Gemm", ["input", "W", "C"], ["h"], alpha=0.5, beta=2.0),
         helper.make_node("Relu", ["h"], ["output"])],
        "gemm_k", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", k])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", n])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(c, "C")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _conv_model(c: int = 64, hw: int = 112) -> onnx.ModelProto:
    """One 3x3 convolution with a dynamic batch: about 3 MB of activations per image and tensor."""
    w = (RNG.standard_normal((c, c, 3, 3)) / np.sqrt(9 * c)).astype(np.float32)
    g = helper.make_graph([helper.make_node("Conv", ["input", "W"], ["c"], pads=[1, 1, 1, 1]),
                           helper.make_node("Relu", ["c"], ["output"])], "conv",
                          [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", c, hw, hw])],
                          [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", c, hw, hw])],
                          [numpy_helper.from_array(w, "W")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _cnn_model() -> onnx.ModelProto:
    """A small CNN whose 3x3 convolutions (2.25 MB each) must be split by output channel at a
    low limit: conv, BatchNorm, ReLU6, depthwise conv, pooling, two Gemm layers."""

    def t(name: str, *shape: int, scale: float = 1.0) -> TensorProto:
        fan = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        return numpy_helper.from_array((RNG.standard_normal(shape) * scale / np.sqrt(fan)).astype(np.float32), name)

    inits = [t("w0", 64, 3, 3, 3), t("w1", 256, 64, 3, 3), t("w2", 256, 256, 3, 3), t("b2", 256, scale=0.1),
             t("dw", 256, 1, 3, 3), t("fc0", 512, 256), t("fc0b", 512, scale=0.1), t("fc1", 10, 512), t("fc1b", 10),
             numpy_helper.from_array(np.linspace(0.8, 1.2, 256).astype(np.float32), "bn_s"),
             numpy_helper.from_array(np.linspace(-0.1, 0.1, 256).astype(np.float32), "bn_b"),
             numpy_helper.from_array(np.zeros(256, np.float32), "bn_m"),
             numpy_helper.from_array(np.ones(256, np.float32), "bn_v"),
             numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
             numpy_helper.from_array(np.array(6.0, np.float32), "hi")]
    p = [1, 1, 1, 1]
    nodes = [
        helper.make_node("Conv", ["input", "w0"], ["c0"], pads=p), helper.make_node("Relu", ["c0"], ["r0"]),
        helper.make_node("Conv", ["r0", "w1"], ["c1"], pads=p), helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=p),
        helper.make_node("BatchNormalization", ["c2", "bn_s", "bn_b", "bn_m", "bn_v"], ["n2"]),
        helper.make_node("Clip", ["n2", "lo", "hi"], ["r2"]),
        helper.make_node("Conv", ["r2", "dw"], ["d"], pads=p, group=256),
        helper.make_node("MaxPool", ["d"], ["m"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("GlobalAveragePool", ["m"], ["gap"]), helper.make_node("Flatten", ["gap"], ["f"]),
        helper.make_node("Gemm", ["f", "fc0", "fc0b"], ["g0"], transB=1), helper.make_node("Relu", ["g0"], ["h"]),
        helper.make_node("Gemm", ["h", "fc1", "fc1b"], ["logits"], transB=1),
    ]
    g = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 16, 16])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(m)
    return m


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory, provider_key: ProviderKey) -> dict[str, Packed]:
    root = tmp_path_factory.mktemp("streaming")
    out = {}
    for name, model in (("mlp", models.mlp(256, [1024, 1024], 10, seed=3)), ("gemm_k", _gemm_k_model()),
                        ("matmul", models.dense_layer(1536, seed=2)), ("cnn", _cnn_model()),
                        ("conv", _conv_model())):
        # A public architecture: these tests read the plan from `status`, which an encrypted
        # graph keeps inside the enclave (tests/test_redteam_leaks.py).
        out[name] = pack_model(model, root / f"{name}.capsule", provider_key, tune_runtime=False,
                               preprocessing=TENSOR_INPUT, public_architecture=True)
    return out


# -- outputs equal resident mode, within the limit ---------------------------------------------------
def test_mlp_streams_in_segments_and_blocks_and_equals_resident(tmp_path: Path, packed: dict[str, Packed]) -> None:
    x = RNG.standard_normal((3, 256)).astype(np.float32)
    resident, streaming, st = _resident_and_streaming(packed["mlp"], tmp_path, x, 16)
    _close(streaming, resident)
    plan = st["model"]
    assert plan["split_nodes"], plan  # the 4 MB Gemm does not fit: it is split
    assert plan["split_nodes"][0]["axis"].startswith("output")  # transB=1: blocks of output columns
    assert plan["weights_decrypted_bytes"] >= 2 * (256 * 1024 + 1024 * 1024) * 4  # decrypted for each query


def test_gemm_split_over_the_reduction_axis_sums_partial_products(tmp_path: Path, packed: dict[str, Packed]) -> None:
    p = packed["gemm_k"]
    x = RNG.standard_normal((2, 1536)).astype(np.float32)
    resident, streaming, st = _resident_and_streaming(p, tmp_path, x, 16)
    (ref,) = plain_ort(p.model, {"input": x})
    assert_matches_reference(resident, ref)
    _close(streaming, resident)
    (split,) = st["model"]["split_nodes"]
    assert split["op"] == "Gemm" and split["axis"].startswith("reduction") and split["blocks"] >= 2


def test_matmul_split_over_k_equals_resident(tmp_path: Path, packed: dict[str, Packed]) -> None:
    x = RNG.standard_normal((1, 1536)).astype(np.float32)
    resident, streaming, st = _resident_and_streaming(packed["matmul"], tmp_path, x, 16)
    _close(streaming, resident)
    (split,) = st["model"]["split_nodes"]
    assert split["op"] == "MatMul" and split["axis"].startswith("reduction") and split["blocks"] >= 3


def test_small_cnn_with_split_convolutions_equals_resident(tmp_path: Path, packed: dict[str, Packed]) -> None:
    p = packed["cnn"]
    x = RNG.standard_normal((2, 3, 16, 16)).astype(np.float32)
    resident, streaming, st = _resident_and_streaming(p, tmp_path, x, 18)
    (ref,) = plain_ort(p.model, {"input": x})
    assert_matches_reference(resident, ref)
    _close(streaming, resident)
    ops = {s["op"] for s in st["model"]["split_nodes"]}
    assert "Conv" in ops, st["model"]
    assert st["model"]["segments"] >= 2


def test_a_batch_too_large_for_the_limit_runs_in_sub_batches(tmp_path: Path, packed: dict[str, Packed]) -> None:
    p = packed["conv"]  # 64x112x112 activations: about 3 MB a tensor per image
    limit = 44
    with p.open(tmp_path, "probe", memory_limit_mb=limit) as cap:
        max_batch = cap.status()["model"]["max_batch"]
        assert max_batch and max_batch < 4
        with pytest.raises(InputError, match="does not fit"):  # its inputs and outputs alone would not
            cap.predict(np.zeros((12, 64, 112, 112), np.float32))
    x = RNG.standard_normal((max_batch + 1, 64, 112, 112)).astype(np.float32)
    resident, streaming, _ = _resident_and_streaming(p, tmp_path, x, limit)
    _close(streaming, resident)


def test_mobilenet_v2_at_a_low_limit_equals_resident(tmp_path: Path, provider_key: ProviderKey) -> None:
    p = pack_model(models.mobilenet_v2(num_classes=100, image_size=64), tmp_path / "mnv2.capsule", provider_key,
                   tune_runtime=False)
    x = RNG.standard_normal((1, 3, 64, 64)).astype(np.float32)
    resident, streaming, st = _resident_and_streaming(p, tmp_path, x, 20)
    _close(streaming, resident)
    # 9 MB of weights cannot be resident within 20 MB (the peak was checked above). The graph is
    # encrypted (MobileNetV2 keeps Clip bounds in attributes, so it cannot be packed with a public
    # architecture): status gives aggregates only, no plan.
    assert st["model"]["architecture"] == "private" and "segments" not in st["model"]


# -- the limit ------------------------------------------------------------------------------------
def test_a_limit_too_small_for_the_model_is_refused_at_load(tmp_path: Path, packed: dict[str, Packed]) -> None:
    with pytest.raises(UsageError, match="at least"):
        packed["conv"].open(tmp_path, memory_limit_mb=12)  # its activations alone need more


def test_streaming_keeps_the_worker_far_below_resident_memory(tmp_path: Path, packed: dict[str, Packed]) -> None:
    """The same capsule resident needs its weights in memory; streaming at 16 MB does not."""
    p = packed["matmul"]  # 9 MB of weights
    x = RNG.standard_normal((1, 1536)).astype(np.float32)
    with p.open(tmp_path, "r") as cap:
        cap.predict(x)
        resident_peak = _peak_growth(cap.status())
    with p.open(tmp_path, "s", memory_limit_mb=16) as cap:
        cap.predict(x)
        streaming_peak = _peak_growth(cap.status())
    assert streaming_peak <= 16 < resident_peak


def test_cli_run_with_memory_limit_prints_the_same_predictions(run_cli: Any, tmp_path: Path,
                                                               packed: dict[str, Packed]) -> None:
    p = packed["mlp"]
    x = RNG.standard_normal((2, 256)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    outs = []
    for extra in ([], ["--memory-limit", "16"]):
        out = tmp_path / f"out{len(extra)}.npy"
        r = run_cli(["run", p.path, tmp_path / "x.npy", "--unsafe-dev-key", p.key_path, "-o", out,
                     "--state-dir", tmp_path / f"state{len(extra)}", *extra])
        assert r.returncode == 0, r.stderr
        outs.append(np.load(out))
    _close(outs[1], outs[0])
