"""Provider-side export: torch and scikit-learn models → ONNX that reproduces them."""

from __future__ import annotations

import sys
import warnings
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from mlcapsule import export
from mlcapsule.enclave.errors import UsageError


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _no_external_data(model: onnx.ModelProto) -> bool:
    return all(t.data_location != onnx.TensorProto.EXTERNAL and not t.external_data for t in model.graph.initializer)


# -- missing extras ---------------------------------------------------------------------------------
def test_missing_torch_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    with pytest.raises(UsageError) as ei:
        export.torch_to_onnx(object(), None)
    assert "mlcapsule[torch]" in ei.value.hint


@pytest.mark.parametrize("missing", ["sklearn", "skl2onnx"])
def test_missing_sklearn_is_a_usage_error(monkeypatch: pytest.MonkeyPatch, missing: str) -> None:
    for name in list(sys.modules):
        if name == missing or name.startswith(missing + "."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, missing, None)
    with pytest.raises(UsageError) as ei:
        export.sklearn_to_onnx(object(), 4)
    assert "mlcapsule[sklearn]" in ei.value.hint


def test_importing_export_does_not_import_torch_or_sklearn() -> None:
    import os
    import subprocess

    code = (
        "import sys, mlcapsule.export, mlcapsule.demo.models, mlcapsule.io\n"
        "bad = [m for m in ('torch', 'sklearn', 'skl2onnx', 'PIL') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


# -- torch --------------------------------------------------------------------------------------------
def _torch() -> Any:
    # Imported per test, so the scikit-learn tests still run where torch is not installed.
    return pytest.importorskip("torch", reason="torch is not installed (pip install 'mlcapsule[torch]')")


def _cnn(t: Any) -> Any:
    t.manual_seed(0)
    return t.nn.Sequential(
        t.nn.Conv2d(3, 8, 3, padding=1), t.nn.BatchNorm2d(8), t.nn.ReLU6(),
        t.nn.Conv2d(8, 8, 3, padding=1, groups=8), t.nn.BatchNorm2d(8), t.nn.ReLU(),
        t.nn.AdaptiveAvgPool2d(1), t.nn.Flatten(), t.nn.Dropout(0.5), t.nn.Linear(8, 5),
    )


def test_torch_cnn_round_trip_matches_torch() -> None:
    t = _torch()
    module = _cnn(t)
    with t.no_grad():  # give BatchNorm non-trivial running statistics
        module.train()
        for _ in range(3):
            module(t.randn(16, 3, 12, 12) * 2 + 1)
    module.train()
    example = t.randn(2, 3, 12, 12)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # the exporter's own warnings are handled
        proto = export.torch_to_onnx(module, example)
    assert module.training  # the training flag is restored
    onnx.checker.check_model(proto, full_check=True)
    assert _no_external_data(proto)
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [17]
    assert [i.name for i in proto.graph.input] == ["input"]
    assert [o.name for o in proto.graph.output] == ["output"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    module.eval()
    x = t.randn(5, 3, 12, 12)  # another batch size than the example: dynamic batch works
    with t.no_grad():
        expected = module(x).numpy()
    (got,) = _session(proto).run(None, {"input": x.numpy()})
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_torch_mlp_names_static_batch_and_verify() -> None:
    t = _torch()
    t.manual_seed(1)
    module = t.nn.Sequential(t.nn.Linear(10, 16), t.nn.Tanh(), t.nn.Linear(16, 3), t.nn.Softmax(dim=1))
    example = np.random.default_rng(0).standard_normal((1, 10)).astype(np.float32)  # numpy is accepted
    proto = export.torch_to_onnx(module, example, input_name="x", output_name="probabilities",
                                 dynamic_batch=False, opset=13, verify=True)
    assert [i.name for i in proto.graph.input] == ["x"]
    assert [o.name for o in proto.graph.output] == ["probabilities"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [13]
    (got,) = _session(proto).run(None, {"x": example})
    with t.no_grad():
        np.testing.assert_allclose(got, module(t.from_numpy(example)).numpy(), rtol=1e-5, atol=1e-6)


def test_torch_export_refuses_bad_arguments() -> None:
    t = _torch()
    lin = t.nn.Linear(2, 2)
    with pytest.raises(UsageError, match="torch.nn.Module"):
        export.torch_to_onnx(lambda x: x, t.zeros(1, 2))
    with pytest.raises(UsageError, match="one example input"):
        export.torch_to_onnx(lin, (t.zeros(1, 2), t.zeros(1, 2)))
    with pytest.raises(UsageError, match="exporter"):
        export.torch_to_onnx(lin, t.zeros(1, 2), exporter="magic")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="torch.onnx.export failed"):
        export.torch_to_onnx(lin, t.zeros(1, 3))  # wrong width: the trace fails


def test_torch_dynamo_exporter_needs_onnxscript_and_opset_18() -> None:
    t = _torch()
    lin = t.nn.Linear(2, 2)
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        with pytest.raises(UsageError, match="onnxscript"):
            export.torch_to_onnx(lin, t.zeros(1, 2), exporter="dynamo", opset=18)
    else:
        with pytest.raises(UsageError, match="opset 18"):
            export.torch_to_onnx(lin, t.zeros(1, 2), exporter="dynamo", opset=17)


# -- scikit-learn ----------------------------------------------------------------------------------
def _sk() -> None:
    pytest.importorskip("sklearn")
    pytest.importorskip("skl2onnx")


def _classifiers() -> list[Any]:
    from sklearn.ensemble import GradientBoostingClassifier, HistGradientBoostingClassifier, RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import MinMaxScaler, StandardScaler
    from sklearn.tree import DecisionTreeClassifier

    return [
        DecisionTreeClassifier(max_depth=6, random_state=0),
        RandomForestClassifier(n_estimators=15, max_depth=6, random_state=0),
        GradientBoostingClassifier(n_estimators=15, random_state=0),
        HistGradientBoostingClassifier(max_iter=15, random_state=0),
        MLPClassifier(hidden_layer_sizes=(16,), max_iter=200, random_state=0),
        make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)),
        make_pipeline(MinMaxScaler(), MLPClassifier(hidden_layer_sizes=(8,), max_iter=200, random_state=0)),
    ]


CLASSIFIER_IDS = ["tree", "forest", "gboost", "histgboost", "mlp", "pipe-logreg", "pipe-mlp"]


@pytest.mark.parametrize("index", range(len(CLASSIFIER_IDS)), ids=CLASSIFIER_IDS)
@pytest.mark.parametrize("n_classes", [2, 3])
def test_sklearn_classifier_probabilities_match(index: int, n_classes: int) -> None:
    _sk()
    from sklearn.datasets import make_classification

    x, y = make_classification(400, 8, n_informative=5, n_classes=n_classes, random_state=index)
    x = x.astype(np.float32)
    est = _classifiers()[index]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning from the small MLPs
        est.fit(x[:300], y[:300])
    model = export.sklearn_to_onnx(est, 8)
    onnx.checker.check_model(model)
    domains = [o.domain for o in model.opset_import]
    assert len(domains) == len(set(domains))  # skl2onnx's duplicate opset import is removed
    sess = _session(model)
    assert [o.name for o in sess.get_outputs()] == ["label", "probabilities"]
    assert [i.name for i in sess.get_inputs()] == ["input"]
    label, proba = sess.run(None, {"input": x[300:]})
    assert isinstance(proba, np.ndarray) and proba.shape == (100, n_classes)  # a tensor, not a zipmap
    np.testing.assert_allclose(proba, est.predict_proba(x[300:]), rtol=0, atol=1e-5)
    # The label is the argmax; where two classes tie within float32 noise sklearn may pick the other.
    agree = label == est.predict(x[300:])
    assert agree.mean() > 0.98


def test_sklearn_hist_gradient_boosting_with_missing_values() -> None:
    _sk()
    from sklearn.datasets import make_classification
    from sklearn.ensemble import HistGradientBoostingClassifier

    x, y = make_classification(500, 6, random_state=3)
    x = x.astype(np.float32)
    x[np.random.default_rng(0).random(x.shape) < 0.1] = np.nan
    est = HistGradientBoostingClassifier(max_iter=20, random_state=0).fit(x, y)
    (_, proba) = _session(export.sklearn_to_onnx(est, 6)).run(None, {"input": x})
    np.testing.assert_allclose(proba, est.predict_proba(x), atol=1e-5)


@pytest.mark.parametrize("kind", ["forest", "gboost", "histgboost", "pipe-linear"])
def test_sklearn_regressor_predictions_match(kind: str) -> None:
    _sk()
    from sklearn.datasets import make_regression
    from sklearn.ensemble import GradientBoostingRegressor, HistGradientBoostingRegressor, RandomForestRegressor
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    est = {
        "forest": RandomForestRegressor(n_estimators=10, max_depth=6, random_state=0),
        "gboost": GradientBoostingRegressor(n_estimators=20, random_state=0),
        "histgboost": HistGradientBoostingRegressor(max_iter=20, random_state=0),
        "pipe-linear": make_pipeline(StandardScaler(), Ridge()),
    }[kind]
    x, y = make_regression(300, 5, noise=1.0, random_state=0)
    x = x.astype(np.float32)
    y = (y / np.abs(y).max()).astype(np.float32)
    est.fit(x, y)
    model = export.sklearn_to_onnx(est, 5)
    sess = _session(model)
    assert [o.name for o in sess.get_outputs()] == ["variable"]
    (pred,) = sess.run(None, {"input": x})
    assert pred.shape == (300, 1)
    np.testing.assert_allclose(pred[:, 0], est.predict(x), rtol=1e-4, atol=1e-5)


def test_sklearn_probabilities_only_and_opset() -> None:
    _sk()
    from sklearn.datasets import load_iris
    from sklearn.tree import DecisionTreeClassifier

    x, y = load_iris(return_X_y=True)
    x = x.astype(np.float32)
    est = DecisionTreeClassifier(random_state=0).fit(x, y)
    model = export.sklearn_to_onnx(est, 4, probabilities_only=True, opset=17, input_name="features")
    onnx.checker.check_model(model)
    assert [o.name for o in model.graph.output] == ["probabilities"]
    assert {o.domain: o.version for o in model.opset_import}[""] == 17
    (proba,) = _session(model).run(None, {"features": x})
    np.testing.assert_allclose(proba, est.predict_proba(x), atol=1e-6)


def test_sklearn_refuses_bad_estimators() -> None:
    _sk()
    from sklearn.linear_model import LinearRegression, LogisticRegression

    with pytest.raises(UsageError, match="not fitted"):
        export.sklearn_to_onnx(LogisticRegression(), 4)
    x = np.random.default_rng(0).standard_normal((20, 4)).astype(np.float32)
    fitted = LogisticRegression().fit(x, (x[:, 0] > 0).astype(int))
    with pytest.raises(UsageError, match="fitted on 4 features"):
        export.sklearn_to_onnx(fitted, 5)
    with pytest.raises(UsageError, match="n_features"):
        export.sklearn_to_onnx(fitted, 0)
    with pytest.raises(UsageError, match="scikit-learn estimator"):
        export.sklearn_to_onnx(object(), 4)
    with pytest.raises(UsageError, match="probabilities_only"):
        export.sklearn_to_onnx(LinearRegression().fit(x, x[:, 0]), 4, probabilities_only=True)


def test_keep_outputs_prunes_dead_nodes() -> None:
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Add", ["a", "w"], ["b"]),
         helper.make_node("ArgMax", ["a"], ["label"], axis=1, keepdims=0)],
        "g", [x],
        [helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 3])],
        initializer=[helper.make_tensor("w", TensorProto.FLOAT, [3], [1.0, 2.0, 3.0]),
                     helper.make_tensor("unused", TensorProto.FLOAT, [1], [0.0])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    pruned = export.keep_outputs(model, ["b"])
    onnx.checker.check_model(pruned)
    assert [n.op_type for n in pruned.graph.node] == ["Relu", "Add"]
    assert [t.name for t in pruned.graph.initializer] == ["w"]
    assert len(model.graph.node) == 3  # the original is untouched
    with pytest.raises(UsageError, match="no output"):
        export.keep_outputs(model, ["nope"])
