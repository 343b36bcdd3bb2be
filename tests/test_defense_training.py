"""The kennen-io detector trainer (issue 12 item 5), on crafted inputs from a tiny kennen-io run.

The malicious examples are real kennen-io queries (mlcapsule.attacks.kennen), crafted against a
tiny white-box zoo (8 pooled nets trained on 300 MNIST images) in 20 sessions of 20 queries;
the test stream comes from 5 further sessions that started from other images. The benign
examples are MNIST. Everything runs with fixed seeds on one torch thread.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

pytest.importorskip("torch")

from mlcapsule.attacks.kennen import (  # noqa: E402
    DetectorData,
    KennenSettings,
    ZooSettings,
    build_zoo,
    kennen_detector_data,
    sample_zoo_configs,
)
from mlcapsule.attacks.kennen_zoo import mnist_pools, to_pixels  # noqa: E402
from mlcapsule.defense_training import (  # noqa: E402
    DETECTOR_INPUT,
    DETECTOR_OUTPUT,
    MALICIOUS,
    detector_scores,
    evaluate_detector,
    export_kennen_detector,
    train_kennen_detector,
    train_kennen_detector_torch,
)
from mlcapsule.errors import UsageError  # noqa: E402

SMALL_ZOO = {"pool": ["max_2"], "n_conv": [2], "n_fc": [2]}
CRAFT = KennenSettings(method="io", n_queries=20, rounds=2, meta_epochs=20, query_steps=5, batch_models=8)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> DetectorData:
    import os

    os.environ["MLCAPSULE_TORCH_THREADS"] = "1"
    cache = tmp_path_factory.mktemp("kennen-cache")
    zoo = build_zoo(sample_zoo_configs(8, space=SMALL_ZOO, seed=1),
                    settings=ZooSettings(train_images=300, epochs=1, eval_images=100), cache_dir=cache)
    return kennen_detector_data(zoo, n_train=400, n_test=100, settings=CRAFT, cache_dir=cache)


@pytest.fixture(scope="module")
def detector(data: DetectorData) -> onnx.ModelProto:
    return train_kennen_detector(data.train_benign, data.train_malicious, epochs=6, seed=0)


def test_data_has_the_papers_layout(data: DetectorData) -> None:
    assert data.train_benign.shape == data.train_malicious.shape == (400, 1, 28, 28)
    assert data.test_benign.shape == data.test_malicious.shape == (100, 1, 28, 28)
    # the test stream comes from sessions that gave no training row
    assert not set(data.train_sessions.tolist()) & set(data.test_sessions.tolist())
    assert data.train_benign.min() >= 0.0 and data.train_benign.max() <= 1.0


def test_detector_follows_the_paper(detector: onnx.ModelProto) -> None:
    g = detector.graph
    ops = [n.op_type for n in g.node]
    convs = [n for n in g.node if n.op_type == "Conv"]
    assert len(convs) == 2 and ops.count("MaxPool") == 2 and ops[-1] == "Softmax"
    for node in convs:
        ks = next(a.ints for a in node.attribute if a.name == "kernel_shape")
        assert list(ks) == [5, 5]
    weights = {t.name: t for t in g.initializer}
    filters = [list(weights[n.input[1]].dims)[0] for n in convs]
    assert filters == [10, 20]
    dense = [list(t.dims) for t in g.initializer if len(t.dims) == 2]
    assert sorted(d[0] for d in dense) == [2, 50]  # fc 50, then the 2-way softmax layer
    inp = g.input[0]
    assert inp.name == DETECTOR_INPUT and g.output[0].name == DETECTOR_OUTPUT
    assert inp.type.tensor_type.shape.dim[0].dim_param == "N"  # dynamic batch axis
    assert max(op.version for op in detector.opset_import if op.domain in ("", "ai.onnx")) == 17
    meta = {p.key: p.value for p in detector.metadata_props}
    assert meta["mlcapsule.detector"] == "kennen-io" and meta["mlcapsule.classes"] == "benign,malicious"


def test_detector_catches_kennen_io_without_denying_benign_mnist(detector: onnx.ModelProto,
                                                                 data: DetectorData) -> None:
    ev = evaluate_detector(detector, data.test_benign, data.test_malicious)
    assert ev.accuracy >= 0.97
    assert ev.first_flagged == 0  # caught on the first malicious query
    assert ev.detection_rate >= 0.97
    assert ev.false_denial_rate <= 0.03
    # a larger benign set: MNIST test images the detector never saw
    many = to_pixels(mnist_pools().test_x[:2000])
    wide = evaluate_detector(detector, many, data.test_malicious)
    assert wide.false_denial_rate <= 0.02, wide


def test_onnx_detector_matches_torch(data: DetectorData) -> None:
    import torch

    module = train_kennen_detector_torch(data.train_benign[:200], data.train_malicious[:200], epochs=2, seed=3)
    proto = export_kennen_detector(module, data.train_benign[:2])
    x = np.concatenate([data.test_benign, data.test_malicious])
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()
    got = detector_scores(proto, x)
    np.testing.assert_allclose(got, expected[:, MALICIOUS], atol=1e-5)
    assert np.array_equal(got >= 0.5, expected[:, MALICIOUS] >= 0.5)
    # the public trainer gives the same model for the same seed and data
    again = train_kennen_detector(data.train_benign[:200], data.train_malicious[:200], epochs=2, seed=3)
    np.testing.assert_allclose(detector_scores(again, x), got, atol=1e-6)


def test_flat_rows_keep_their_shape(data: DetectorData) -> None:
    b = data.train_benign[:100].reshape(100, 784)
    m = data.train_malicious[:100].reshape(100, 784)
    proto = train_kennen_detector(b, m, epochs=1)
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "N" and dims[1].dim_value == 784
    assert detector_scores(proto, m[:5]).shape == (5,)


def test_bad_examples_are_refused() -> None:
    x = np.zeros((4, 1, 28, 28), np.float32)
    with pytest.raises(UsageError):
        train_kennen_detector(x, np.zeros((4, 784), np.float32))
    with pytest.raises(UsageError):
        train_kennen_detector(x, np.full((4, 1, 28, 28), np.nan, np.float32))
    with pytest.raises(UsageError):
        train_kennen_detector(np.zeros((4, 8, 8), np.float32), np.zeros((4, 8, 8), np.float32))
    with pytest.raises(UsageError):
        train_kennen_detector(np.zeros((0, 1, 28, 28), np.float32), x)
    with pytest.raises(UsageError):
        train_kennen_detector(np.zeros((4, 3, 7), np.float32), np.zeros((4, 3, 7), np.float32))


def test_importing_the_trainer_does_not_import_torch() -> None:
    src = Path(__file__).resolve().parents[1] / "src"
    code = ("import sys; import mlcapsule.defense_training, mlcapsule.attacks.kennen, mlcapsule.attacks; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "False"
