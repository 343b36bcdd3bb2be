"""Small ONNX model builders for the tests, the demo and the benchmarks.

Everything here is built with ``onnx.helper`` and numpy only (no torch): the weights are random,
drawn from a seeded :class:`numpy.random.Generator`, so the same arguments always give the same
model, byte for byte. The architectures are real (MobileNetV2 and VGG16 have exactly the layer
shapes and parameter counts of the torchvision models); only the weights are not trained.
The exception is :func:`digits_classifier`, which trains a small scikit-learn classifier on the
``load_digits`` data set that ships inside scikit-learn (nothing is downloaded).

All builders use ONNX opset 17, name their input ``"input"`` and pass
``onnx.checker.check_model``.

Public API:

* :func:`mlp` — Gemm+Relu multi-layer perceptron, output ``"probabilities"`` (or ``"logits"``).
* :func:`mobilenet_v2` — MobileNetV2 (3,504,872 trainable parameters at 1000 classes).
* :func:`vgg16` — VGG16 (138,357,544 parameters at 224x224 and 1000 classes, ~550 MB).
* :func:`dense_layer`, :func:`conv_layer` — the single layers of the paper's Tables 1 and 2.
* :func:`digits_classifier` — a trained scikit-learn MLP on the 8x8 digits, with test data.
* :func:`count_parameters` — number of weights stored in a model's initializers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

__all__ = [
    "OPSET",
    "mlp",
    "mobilenet_v2",
    "vgg16",
    "dense_layer",
    "conv_layer",
    "digits_classifier",
    "count_parameters",
]

#: The ONNX opset every builder here targets.
OPSET = 17

_BN_EPS = 1e-5
#: Models with more weight bytes than this are not run through onnx.checker when built.
_CHECK_LIMIT = 64 << 20


class _Graph:
    """Accumulates nodes and initializers with unique names; a tiny layer vocabulary."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        # Initializers are written straight into the final ModelProto: protobuf copies on every
        # extend()/CopyFrom(), which is seconds for VGG16's 550 MB.
        self.proto = onnx.ModelProto()
        self.nodes: list[onnx.NodeProto] = []
        self.nbytes = 0
        self._names: set[str] = set()
        self._consts: dict[str, str] = {}

    # -- plumbing ---------------------------------------------------------------------------
    def _unique(self, name: str) -> str:
        if name in self._names:
            i = 1
            while f"{name}_{i}" in self._names:
                i += 1
            name = f"{name}_{i}"
        self._names.add(name)
        return name

    def init(self, name: str, array: np.ndarray) -> str:
        name = self._unique(name)
        t = self.proto.graph.initializer.add()
        t.name = name
        t.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
        t.dims.extend(array.shape)
        t.raw_data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
        self.nbytes += array.nbytes
        return name

    def const(self, name: str, value: float) -> str:
        """A shared float32 scalar initializer (e.g. the bounds of Clip)."""
        if name not in self._consts:
            self._consts[name] = self.init(name, np.array(value, dtype=np.float32))
        return self._consts[name]

    def node(self, op: str, inputs: Sequence[str], name: str, output: str | None = None, **attrs: Any) -> str:
        out = self._unique(output if output is not None else name)
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=self._unique(f"{name}/{op}"), **attrs))
        return out

    def normal(self, shape: Sequence[int], std: float) -> np.ndarray:
        # float32 straight from the generator: no float64 temporary, so VGG16 builds quickly.
        w = self.rng.standard_normal(tuple(shape), dtype=np.float32)
        w *= np.float32(std)
        return w

    def uniform(self, shape: Sequence[int], low: float, high: float) -> np.ndarray:
        return self.rng.uniform(low, high, size=tuple(shape)).astype(np.float32)

    # -- layers -----------------------------------------------------------------------------
    def conv(
        self, x: str, cin: int, cout: int, k: int, name: str, *, stride: int = 1, group: int = 1,
        bias: bool = False, gain: float = math.sqrt(2.0),
    ) -> str:
        fan_in = (cin // group) * k * k
        w = self.init(f"{name}.weight", self.normal((cout, cin // group, k, k), gain / math.sqrt(fan_in)))
        inputs = [x, w]
        if bias:
            inputs.append(self.init(f"{name}.bias", self.uniform((cout,), -0.05, 0.05)))
        pad = k // 2
        return self.node(
            "Conv", inputs, name, kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4, group=group,
            dilations=[1, 1],
        )

    def batchnorm(self, x: str, c: int, name: str, *, gamma: tuple[float, float] = (0.8, 1.2)) -> str:
        """BatchNormalization with random but plausible inference statistics."""
        scale = self.init(f"{name}.weight", self.uniform((c,), *gamma))
        bias = self.init(f"{name}.bias", self.uniform((c,), -0.1, 0.1))
        mean = self.init(f"{name}.running_mean", self.uniform((c,), -0.1, 0.1))
        var = self.init(f"{name}.running_var", self.uniform((c,), 0.8, 1.25))  # strictly positive
        return self.node("BatchNormalization", [x, scale, bias, mean, var], name, epsilon=_BN_EPS)

    def relu6(self, x: str, name: str) -> str:
        return self.node("Clip", [x, self.const("relu6.min", 0.0), self.const("relu6.max", 6.0)], name)

    def relu(self, x: str, name: str) -> str:
        return self.node("Relu", [x], name)

    def gemm(self, x: str, fin: int, fout: int, name: str, *, gain: float = math.sqrt(2.0)) -> str:
        # Stored as torch stores Linear weights, [out, in], hence transB=1.
        w = self.init(f"{name}.weight", self.normal((fout, fin), gain / math.sqrt(fin)))
        b = self.init(f"{name}.bias", self.uniform((fout,), -0.05, 0.05))
        return self.node("Gemm", [x, w, b], name, transB=1)

    def model(
        self, name: str, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto], doc: str,
    ) -> onnx.ModelProto:
        model = self.proto
        model.ir_version = 8  # opset 17 era: readable by every onnxruntime this project supports
        model.producer_name = "mlcapsule.models"
        model.doc_string = doc
        model.opset_import.append(helper.make_opsetid("", OPSET))
        graph = model.graph
        graph.name = name
        graph.node.extend(self.nodes)
        graph.input.extend(inputs)
        graph.output.extend(outputs)
        if self.nbytes <= _CHECK_LIMIT:
            # The checker serialises the whole model; for VGG16 that is seconds, and the tests
            # check the big models themselves.
            onnx.checker.check_model(model)
        return model


def _check_positive(**values: int) -> None:
    from ..enclave.errors import UsageError

    for k, v in values.items():
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
            raise UsageError(f"{k} must be a positive integer, got {v!r}")


def _float_input(name: str, shape: Sequence[int | str]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


# ---------------------------------------------------------------------------------------------
def mlp(
    in_features: int, hidden: Sequence[int], n_classes: int, *, seed: int = 0, softmax: bool = True,
) -> onnx.ModelProto:
    """A multi-layer perceptron: ``(Gemm → Relu) × len(hidden)``, then ``Gemm`` (and ``Softmax``).

    Input ``"input"`` float32 ``[N, in_features]``; output ``"probabilities"`` float32
    ``[N, n_classes]`` when ``softmax`` is true, otherwise the raw scores as ``"logits"``.
    """
    _check_positive(in_features=in_features, n_classes=n_classes)
    for h in hidden:
        _check_positive(hidden=h)
    g = _Graph(seed)
    x = "input"
    g._names.add(x)
    width = in_features
    for i, h in enumerate(hidden):
        x = g.relu(g.gemm(x, width, h, f"fc{i}"), f"relu{i}")
        width = h
    out_name = "probabilities" if softmax else "logits"
    scores = g.gemm(x, width, n_classes, f"fc{len(hidden)}", gain=1.0)
    if softmax:
        g.node("Softmax", [scores], "softmax", output=out_name, axis=-1)
    else:
        g.node("Identity", [scores], "logits", output=out_name)
    return g.model(
        "mlp",
        [_float_input("input", ["N", in_features])],
        [_float_input(out_name, ["N", n_classes])],
        f"MLP {in_features}-{'-'.join(map(str, hidden))}-{n_classes} (random weights, seed {seed})",
    )


# ---------------------------------------------------------------------------------------------
#: MobileNetV2 inverted residual settings (expansion t, output channels c, repeats n, stride s),
#: as in Sandler et al. 2018, Table 2, and torchvision.
_MOBILENET_V2_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                          (6, 160, 3, 2), (6, 320, 1, 1))


def mobilenet_v2(*, num_classes: int = 1000, image_size: int = 224, seed: int = 0) -> onnx.ModelProto:
    """MobileNetV2 (width 1.0) with random weights, laid out like torchvision's ``mobilenet_v2``.

    Stem conv 3x3/2 (32 channels), 17 inverted residual blocks (1x1 expansion by 6 except the
    first block, depthwise 3x3 with ``group=channels``, linear 1x1 projection, residual add when
    stride is 1 and the width is unchanged), 1x1 conv to 1280, global average pooling and a
    ``Gemm`` classifier. Every conv is followed by a separate ``BatchNormalization`` node and
    ReLU6 is ``Clip(min=0, max=6)``. Input ``"input"`` float32 ``[N, 3, image_size, image_size]``,
    output ``"logits"`` ``[N, num_classes]``. 3,504,872 trainable parameters for 1000 classes
    (plus 34,112 BatchNorm running statistics).

    The weights are He-initialised and the last BatchNorm of every residual branch has a smaller
    scale (as in "zero-init residual", but not zero), so activations neither explode nor vanish
    through the 17 blocks and the logits differ between images.
    """
    _check_positive(num_classes=num_classes, image_size=image_size)
    g = _Graph(seed)
    g._names.add("input")
    x = g.conv("input", 3, 32, 3, "features.0.0", stride=2)
    x = g.relu6(g.batchnorm(x, 32, "features.0.1"), "features.0.2")
    cin = 32
    idx = 1
    for t, c, n, s in _MOBILENET_V2_SETTINGS:
        for i in range(n):
            stride = s if i == 0 else 1
            p = f"features.{idx}.conv"
            hidden = cin * t
            y = x
            j = 0
            if t != 1:
                y = g.conv(y, cin, hidden, 1, f"{p}.{j}.0")
                y = g.relu6(g.batchnorm(y, hidden, f"{p}.{j}.1"), f"{p}.{j}.2")
                j += 1
            y = g.conv(y, hidden, hidden, 3, f"{p}.{j}.0", stride=stride, group=hidden)
            y = g.relu6(g.batchnorm(y, hidden, f"{p}.{j}.1"), f"{p}.{j}.2")
            j += 1
            y = g.conv(y, hidden, c, 1, f"{p}.{j}", gain=1.0)  # linear bottleneck: no activation
            residual = stride == 1 and cin == c
            y = g.batchnorm(y, c, f"{p}.{j + 1}", gamma=(0.3, 0.5) if residual else (0.8, 1.2))
            x = g.node("Add", [x, y], f"features.{idx}.add") if residual else y
            cin = c
            idx += 1
    x = g.conv(x, cin, 1280, 1, f"features.{idx}.0")
    x = g.relu6(g.batchnorm(x, 1280, f"features.{idx}.1"), f"features.{idx}.2")
    x = g.node("GlobalAveragePool", [x], "pool")
    x = g.node("Flatten", [x], "flatten", axis=1)
    logits = g.gemm(x, 1280, num_classes, "classifier.1", gain=1.0)
    g.node("Identity", [logits], "logits", output="logits")
    return g.model(
        "mobilenet_v2",
        [_float_input("input", ["N", 3, image_size, image_size])],
        [_float_input("logits", ["N", num_classes])],
        f"MobileNetV2 1.0, {num_classes} classes, {image_size}x{image_size} (random weights, seed {seed})",
    )


# ---------------------------------------------------------------------------------------------
_VGG16_CFG: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
                                     512, 512, 512, "M")


def vgg16(*, num_classes: int = 1000, image_size: int = 224, seed: int = 0) -> onnx.ModelProto:
    """VGG16 (configuration D of Simonyan & Zisserman) with random weights.

    13 conv 3x3 (pad 1, with bias) + Relu layers with 5 MaxPool 2x2/2, Flatten, then
    ``Gemm`` 25088→4096, Relu, 4096→4096, Relu, 4096→``num_classes`` (dropout is an identity at
    inference and left out). Input ``"input"`` float32 ``[N, 3, image_size, image_size]``,
    output ``"logits"`` ``[N, num_classes]``. At 224x224 and 1000 classes: 138,357,544
    parameters, about 553 MB of float32.

    ``image_size`` must be a multiple of 32. For sizes other than 224 the first classifier layer
    takes ``512 * (image_size // 32) ** 2`` features (torchvision instead pools adaptively to
    7x7), so small test variants stay small.
    """
    _check_positive(num_classes=num_classes, image_size=image_size)
    if image_size % 32:
        from ..enclave.errors import UsageError

        raise UsageError(f"vgg16 image_size must be a multiple of 32, got {image_size}")
    g = _Graph(seed)
    g._names.add("input")
    x = "input"
    cin = 3
    for i, v in enumerate(_VGG16_CFG):
        if v == "M":
            x = g.node("MaxPool", [x], f"features.{i}", kernel_shape=[2, 2], strides=[2, 2])
        else:
            assert isinstance(v, int)
            x = g.relu(g.conv(x, cin, v, 3, f"features.{i}", bias=True), f"features.{i}.relu")
            cin = v
    side = image_size // 32
    x = g.node("Flatten", [x], "flatten", axis=1)
    x = g.relu(g.gemm(x, 512 * side * side, 4096, "classifier.0"), "classifier.1")
    x = g.relu(g.gemm(x, 4096, 4096, "classifier.3"), "classifier.4")
    logits = g.gemm(x, 4096, num_classes, "classifier.6", gain=1.0)
    g.node("Identity", [logits], "logits", output="logits")
    return g.model(
        "vgg16",
        [_float_input("input", ["N", 3, image_size, image_size])],
        [_float_input("logits", ["N", num_classes])],
        f"VGG16, {num_classes} classes, {image_size}x{image_size} (random weights, seed {seed})",
    )


# ---------------------------------------------------------------------------------------------
def dense_layer(n: int, *, seed: int = 0) -> onnx.ModelProto:
    """One fully connected layer ``y = x W + b`` with ``W`` n×n: ``MatMul`` then ``Add``.

    Input ``"input"`` float32 ``[1, n]``, output ``"output"`` ``[1, n]`` (the paper's Table 1).
    """
    _check_positive(n=n)
    g = _Graph(seed)
    g._names.add("input")
    w = g.init("weight", g.normal((n, n), 1.0 / math.sqrt(n)))
    b = g.init("bias", g.uniform((n,), -0.05, 0.05))
    y = g.node("MatMul", ["input", w], "matmul")
    g.node("Add", [y, b], "add", output="output")
    return g.model(
        "dense_layer", [_float_input("input", [1, n])], [_float_input("output", [1, n])],
        f"dense layer {n}x{n} (random weights, seed {seed})",
    )


def conv_layer(channels: int, hw: int, *, depthwise_separable: bool = False, seed: int = 0) -> onnx.ModelProto:
    """One 3x3 convolution, ``channels`` → ``channels``, stride 1, pad 1, with bias.

    With ``depthwise_separable`` it is a depthwise 3x3 conv (``group=channels``) followed by a
    pointwise 1x1 conv, as in MobileNet. Input ``"input"`` float32 ``[1, channels, hw, hw]``,
    output ``"output"`` of the same shape (the paper's Table 2).
    """
    _check_positive(channels=channels, hw=hw)
    g = _Graph(seed)
    g._names.add("input")
    if depthwise_separable:
        y = g.conv("input", channels, channels, 3, "depthwise", group=channels, bias=True, gain=1.0)
        y = g.conv(y, channels, channels, 1, "pointwise", bias=True, gain=1.0)
    else:
        y = g.conv("input", channels, channels, 3, "conv", bias=True, gain=1.0)
    g.node("Identity", [y], "output", output="output")
    kind = "depthwise-separable conv" if depthwise_separable else "conv"
    shape: list[int | str] = [1, channels, hw, hw]
    return g.model(
        "conv_layer", [_float_input("input", shape)], [_float_input("output", shape)],
        f"{kind} 3x3, {channels} channels, {hw}x{hw} (random weights, seed {seed})",
    )


# ---------------------------------------------------------------------------------------------
def digits_classifier(seed: int = 0) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Train a small MLP on scikit-learn's 8x8 digits and convert it to ONNX (a few seconds).

    The data set ships inside scikit-learn (nothing is downloaded). 25% of it is held out.
    Returns ``(model, info)``:

    * ``model`` has one input ``"input"`` float32 ``[N, 64]`` (pixel values 0..16, as
      ``load_digits`` gives them, row-major 8x8) and **one** output ``"probabilities"`` float32
      ``[N, 10]``: skl2onnx's ``"label"`` output is pruned (it is the argmax of these).
    * ``info`` has ``x_test`` (float32 ``[n, 64]``), ``y_test`` (int64 ``[n]``), ``x_train``, ``accuracy``
      (of the ONNX model on the test split), ``class_names`` (``"0"`` .. ``"9"``) and
      ``preprocessing`` (a :class:`mlcapsule.io.Preprocessing` for 8x8 grayscale images, bright
      ink on a dark background, scaled by 16/255 and flattened), ready for a manifest via
      ``info["preprocessing"].to_dict()``.

    Needs the ``sklearn`` extra (``pip install 'mlcapsule[sklearn]'``).
    """
    from ..enclave.errors import UsageError
    from ..export import sklearn_to_onnx
    from ..io import Preprocessing

    try:
        import warnings

        from sklearn.datasets import load_digits
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.model_selection import train_test_split
        from sklearn.neural_network import MLPClassifier
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise UsageError(
            f"digits_classifier needs scikit-learn ({e})", hint="pip install 'mlcapsule[sklearn]'"
        ) from e

    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    clf = MLPClassifier(hidden_layer_sizes=(64,), max_iter=300, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x_train / 16.0, y_train)
    # The network was trained on 0..1 inputs; fold the /16 into a scaler-free model by feeding
    # the same division through the first layer's weights, so the ONNX input is the raw 0..16.
    clf.coefs_[0] = clf.coefs_[0] / 16.0
    model = sklearn_to_onnx(clf, 64, probabilities_only=True)

    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (proba,) = sess.run(None, {"input": x_test})
    accuracy = float(np.mean(np.argmax(proba, axis=1) == y_test))
    info: dict[str, Any] = {
        "x_test": np.ascontiguousarray(x_test, dtype=np.float32),
        "y_test": np.asarray(y_test, dtype=np.int64),
        # The training inputs: what a provider computes the ood defense's statistics from.
        "x_train": np.ascontiguousarray(x_train, dtype=np.float32),
        "accuracy": accuracy,
        "class_names": [str(i) for i in range(10)],
        "preprocessing": Preprocessing(
            kind="image", image_size=(8, 8), channels=1, layout="flat", scale=16.0 / 255.0,
        ),
    }
    return model, info


# ---------------------------------------------------------------------------------------------
def count_parameters(model: onnx.ModelProto, *, trainable_only: bool = False) -> int:
    """Number of values stored in ``model``'s initializers.

    With ``trainable_only``, BatchNormalization running statistics and scalar constants (such
    as the bounds of ReLU6) are left out, which is how torch counts ``parameters()``.
    """
    skip: set[str] = set()
    if trainable_only:
        for node in model.graph.node:
            if node.op_type == "BatchNormalization":
                skip.update(node.input[3:5])
    total = 0
    for t in model.graph.initializer:
        if t.name in skip or (trainable_only and len(t.dims) == 0):
            continue
        total += math.prod(t.dims)
    return total
