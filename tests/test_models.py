"""The torch-free model builders: valid ONNX, runnable, faithful shapes and parameter counts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from PIL import Image

from mlcapsule.demo import models
from mlcapsule.enclave.errors import UsageError


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def _dims(vi: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


# -- mlp -----------------------------------------------------------------------------------------
def test_mlp_is_valid_and_outputs_probabilities() -> None:
    m = models.mlp(20, [32, 16], 5, seed=3)
    onnx.checker.check_model(m, full_check=True)
    assert [o.version for o in m.opset_import if o.domain in ("", "ai.onnx")] == [17]
    assert [i.name for i in m.graph.input] == ["input"]
    assert _dims(m.graph.input[0]) == ["N", 20]
    assert [o.name for o in m.graph.output] == ["probabilities"]
    assert _ops(m) == ["Gemm", "Relu", "Gemm", "Relu", "Gemm", "Softmax"]
    x = np.random.default_rng(0).standard_normal((7, 20), dtype=np.float32)
    (p,) = _session(m).run(None, {"input": x})
    assert p.shape == (7, 5) and p.dtype == np.float32
    assert np.all(np.isfinite(p)) and np.allclose(p.sum(axis=1), 1.0, atol=1e-5)
    assert np.ptp(p, axis=0).max() > 1e-4  # differs between samples
    assert models.count_parameters(m) == 20 * 32 + 32 + 32 * 16 + 16 + 16 * 5 + 5


def test_mlp_matches_numpy_reference() -> None:
    m = models.mlp(6, [4], 3, seed=1, softmax=False)
    assert [o.name for o in m.graph.output] == ["logits"]
    w = _weights(m)
    x = np.random.default_rng(1).standard_normal((5, 6), dtype=np.float32)
    h = np.maximum(x @ w["fc0.weight"].T + w["fc0.bias"], 0)
    expected = h @ w["fc1.weight"].T + w["fc1.bias"]
    (got,) = _session(m).run(None, {"input": x})
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_builders_are_deterministic_per_seed() -> None:
    a = models.mlp(8, [8], 2, seed=5).SerializeToString()
    b = models.mlp(8, [8], 2, seed=5).SerializeToString()
    c = models.mlp(8, [8], 2, seed=6).SerializeToString()
    assert a == b and a != c
    assert models.mobilenet_v2(num_classes=4, image_size=32).SerializeToString() == \
        models.mobilenet_v2(num_classes=4, image_size=32).SerializeToString()


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_builders_refuse_bad_sizes(bad: object) -> None:
    with pytest.raises(UsageError):
        models.mlp(bad, [4], 2)  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        models.dense_layer(bad)  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        models.mobilenet_v2(num_classes=bad)  # type: ignore[arg-type]


# -- MobileNetV2 -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mobilenet() -> onnx.ModelProto:
    return models.mobilenet_v2()


def test_mobilenet_v2_architecture(mobilenet: onnx.ModelProto) -> None:
    m = mobilenet
    onnx.checker.check_model(m, full_check=True)
    # torchvision's mobilenet_v2().parameters() count, exactly.
    assert models.count_parameters(m, trainable_only=True) == 3_504_872
    assert 3.5e6 < models.count_parameters(m) < 3.6e6  # + BatchNorm running statistics
    ops = _ops(m)
    convs = [n for n in m.graph.node if n.op_type == "Conv"]
    depthwise = [n for n in convs if next(a.i for a in n.attribute if a.name == "group") > 1]
    assert len(convs) == 52 and len(depthwise) == 17
    for n in depthwise:  # group == channels, 3x3
        w = next(t for t in m.graph.initializer if t.name == n.input[1])
        group = next(a.i for a in n.attribute if a.name == "group")
        assert list(w.dims) == [group, 1, 3, 3]
    assert ops.count("BatchNormalization") == 52
    assert ops.count("Clip") == 35  # ReLU6 = Clip(0, 6)
    assert ops.count("Add") == 10  # residual connections
    assert ops.count("GlobalAveragePool") == 1 and ops.count("Gemm") == 1
    w = _weights(m)
    for n in m.graph.node:
        if n.op_type == "BatchNormalization":
            assert np.all(w[n.input[4]] > 0)  # running_var
        if n.op_type == "Clip":
            assert float(w[n.input[1]]) == 0.0 and float(w[n.input[2]]) == 6.0
    assert _dims(m.graph.input[0]) == ["N", 3, 224, 224]
    assert [o.name for o in m.graph.output] == ["logits"] and _dims(m.graph.output[0]) == ["N", 1000]


def test_mobilenet_v2_runs_with_sane_activations(mobilenet: onnx.ModelProto) -> None:
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224), dtype=np.float32)
    (logits,) = _session(mobilenet).run(None, {"input": x})
    assert logits.shape == (2, 1000)
    assert np.all(np.isfinite(logits))
    assert 0.05 < logits.std() < 50  # neither vanished nor exploded
    assert np.abs(logits[0] - logits[1]).max() > 1e-3  # different images, different logits
    assert len(np.unique(logits[0].round(4))) > 100  # not all classes equal


def test_mobilenet_v2_small_variant() -> None:
    m = models.mobilenet_v2(num_classes=10, image_size=64, seed=2)
    onnx.checker.check_model(m)
    assert models.count_parameters(m, trainable_only=True) == 3_504_872 - 1281 * 1000 + 1281 * 10
    x = np.random.default_rng(1).standard_normal((3, 3, 64, 64), dtype=np.float32)
    (logits,) = _session(m).run(None, {"input": x})
    assert logits.shape == (3, 10) and np.all(np.isfinite(logits)) and logits.std() > 1e-3


# -- VGG16 -------------------------------------------------------------------------------------------
def test_vgg16_small_variant_runs() -> None:
    m = models.vgg16(num_classes=10, image_size=32)
    onnx.checker.check_model(m)
    ops = _ops(m)
    assert ops.count("Conv") == 13 and ops.count("MaxPool") == 5 and ops.count("Gemm") == 3
    conv_params = 14_714_688  # the 13 conv layers of VGG16, independent of image size
    assert models.count_parameters(m) == conv_params + 512 * 4096 + 4096 + 4096 * 4096 + 4096 + 4096 * 10 + 10
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32), dtype=np.float32)
    (logits,) = _session(m).run(None, {"input": x})
    assert logits.shape == (2, 10) and np.all(np.isfinite(logits))
    assert np.abs(logits[0] - logits[1]).max() > 1e-4


def test_vgg16_refuses_image_size_not_multiple_of_32() -> None:
    with pytest.raises(UsageError, match="multiple of 32"):
        models.vgg16(image_size=100)


@pytest.mark.slow
def test_vgg16_full_size_parameter_count() -> None:
    m = models.vgg16()
    assert models.count_parameters(m) == 138_357_544
    gemms = [n for n in m.graph.node if n.op_type == "Gemm"]
    shapes = [list(next(t for t in m.graph.initializer if t.name == g.input[1]).dims) for g in gemms]
    assert shapes == [[4096, 25088], [4096, 4096], [1000, 4096]]
    assert _dims(m.graph.input[0]) == ["N", 3, 224, 224]
    onnx.checker.check_model(m)
    assert 540e6 < m.ByteSize() < 570e6


# -- single layers -----------------------------------------------------------------------------------
def test_dense_layer_matches_numpy() -> None:
    m = models.dense_layer(64, seed=4)
    onnx.checker.check_model(m, full_check=True)
    assert _ops(m) == ["MatMul", "Add"]
    assert _dims(m.graph.input[0]) == [1, 64] and _dims(m.graph.output[0]) == [1, 64]
    assert models.count_parameters(m) == 64 * 64 + 64
    w = _weights(m)
    x = np.random.default_rng(2).standard_normal((1, 64), dtype=np.float32)
    (y,) = _session(m).run(None, {"input": x})
    np.testing.assert_allclose(y, x @ w["weight"] + w["bias"], rtol=1e-5, atol=1e-5)


def _conv_reference(x: np.ndarray, w: np.ndarray, b: np.ndarray, group: int) -> np.ndarray:
    """Plain numpy 2-D convolution, stride 1, 'same' padding, for N=1."""
    c_out, c_in_g, k, _ = w.shape
    pad = k // 2
    xp = np.pad(x[0], ((0, 0), (pad, pad), (pad, pad)))
    h, wd = x.shape[2:]
    out = np.zeros((c_out, h, wd), dtype=np.float64)
    per_group = c_out // group
    for o in range(c_out):
        g = o // per_group
        for i in range(c_in_g):
            for dy in range(k):
                for dx in range(k):
                    out[o] += w[o, i, dy, dx] * xp[g * c_in_g + i, dy:dy + h, dx:dx + wd]
        out[o] += b[o]
    return out[None].astype(np.float32)


@pytest.mark.parametrize("separable", [False, True])
def test_conv_layer_matches_numpy(separable: bool) -> None:
    c, hw = 4, 6
    m = models.conv_layer(c, hw, depthwise_separable=separable, seed=1)
    onnx.checker.check_model(m, full_check=True)
    assert _dims(m.graph.input[0]) == [1, c, hw, hw] and _dims(m.graph.output[0]) == [1, c, hw, hw]
    w = _weights(m)
    x = np.random.default_rng(3).standard_normal((1, c, hw, hw), dtype=np.float32)
    (y,) = _session(m).run(None, {"input": x})
    if separable:
        assert _ops(m).count("Conv") == 2
        assert models.count_parameters(m) == c * 9 + c + c * c + c
        mid = _conv_reference(x, w["depthwise.weight"], w["depthwise.bias"], group=c)
        expected = _conv_reference(mid, w["pointwise.weight"], w["pointwise.bias"], group=1)
    else:
        assert _ops(m).count("Conv") == 1
        assert models.count_parameters(m) == c * c * 9 + c
        expected = _conv_reference(x, w["conv.weight"], w["conv.bias"], group=1)
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)


# -- digits --------------------------------------------------------------------------------------------
def test_digits_classifier_trains_and_converts(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    pytest.importorskip("skl2onnx")
    from mlcapsule.io import Preprocessing

    m, info = models.digits_classifier()
    onnx.checker.check_model(m)
    assert [i.name for i in m.graph.input] == ["input"]
    assert [o.name for o in m.graph.output] == ["probabilities"]
    assert "ArgMax" not in _ops(m)  # the label branch is pruned
    assert info["accuracy"] > 0.9
    assert info["class_names"] == [str(i) for i in range(10)]
    x, y = info["x_test"], info["y_test"]
    assert x.dtype == np.float32 and x.shape[1] == 64 and len(x) == len(y) > 300
    assert 0 <= x.min() and x.max() <= 16
    (p,) = _session(m).run(None, {"input": x})
    assert p.shape == (len(x), 10) and p.dtype == np.float32
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-5)
    assert np.mean(p.argmax(axis=1) == y) == pytest.approx(info["accuracy"])
    prep = info["preprocessing"]
    assert isinstance(prep, Preprocessing) and prep.sample_shape() == (64,)
    assert Preprocessing.from_dict(prep.to_dict()) == prep
    # End to end through the host's image loading: the test digits saved as 8x8 PNGs (bright ink
    # on black, 0..16 stretched to 0..255) classify as the arrays do.
    from mlcapsule.io import load_inputs

    paths = []
    for i in range(20):
        pixels = np.round(x[i].reshape(8, 8) * 255 / 16).astype(np.uint8)
        paths.append(tmp_path / f"digit{i}.png")
        Image.fromarray(pixels).save(paths[-1])
    batch = load_inputs(paths, prep, ["N", 64])
    np.testing.assert_allclose(batch, x[:20], atol=16 / 255)
    (p_img,) = _session(m).run(None, {"input": batch})
    assert np.mean(p_img.argmax(axis=1) == p[:20].argmax(axis=1)) >= 0.95
