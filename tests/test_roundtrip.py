"""Pack, run in the enclave worker, and compare with plain ONNX Runtime on the plain model.

The capsule must be invisible in the outputs: every model gives, through the enclave, what
``onnxruntime.InferenceSession(model.SerializeToString())`` gives, to 1e-5 relative.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import Packed, ProviderKey, assert_matches_reference, pack_model, plain_ort

import mlcapsule
from mlcapsule.enclave.errors import InputError, UsageError
from mlcapsule.enclave.format import CapsuleFile
from mlcapsule.enclave.format.trust import TrustProviderKey, UnsafeTrustManifestKey  # noqa: F401

RNG_SEED = 1234


def _sklearn_models() -> dict[str, object]:
    pytest.importorskip("sklearn")
    pytest.importorskip("skl2onnx")
    from sklearn.ensemble import GradientBoostingClassifier, HistGradientBoostingClassifier, RandomForestClassifier

    return {
        "GradientBoostingClassifier": GradientBoostingClassifier(n_estimators=25, max_depth=3, random_state=0),
        "HistGradientBoostingClassifier": HistGradientBoostingClassifier(max_iter=25, random_state=0),
        "RandomForestClassifier": RandomForestClassifier(n_estimators=15, max_depth=6, random_state=0),
    }


def _classification_data() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import make_classification

    x, y = make_classification(n_samples=400, n_features=10, n_informative=6, n_classes=3, random_state=0)
    return x.astype(np.float32), y


@pytest.fixture(scope="module")
def tree_models() -> dict[str, onnx.ModelProto]:
    from mlcapsule.export import sklearn_to_onnx

    x, y = _classification_data()
    out = {}
    for name, est in _sklearn_models().items():
        est.fit(x, y)  # type: ignore[attr-defined]
        out[name] = sklearn_to_onnx(est, x.shape[1])
    return out


# -- neural networks -----------------------------------------------------------------------------
def test_mlp_matches_plain_onnxruntime(tmp_path: Path, mlp_capsule: Packed) -> None:
    x = np.random.default_rng(RNG_SEED).standard_normal((7, 16)).astype(np.float32)
    (ref,) = plain_ort(mlp_capsule.model, {"input": x})
    with mlp_capsule.open(tmp_path) as cap:
        got = cap.predict(x)
        outs = cap.run({"input": x})
    assert_matches_reference(got, ref)
    assert set(outs) == {"probabilities"}
    assert_matches_reference(outs["probabilities"], ref)


def test_mobilenet_v2_batch_2_matches_plain_onnxruntime(tmp_path: Path, mobilenet_capsule: Packed) -> None:
    """A MobileNetV2-sized CNN (3.5 M random weights), batch 2 at 224x224."""
    x = np.random.default_rng(RNG_SEED).standard_normal((2, 3, 224, 224)).astype(np.float32)
    (ref,) = plain_ort(mobilenet_capsule.model, {"input": x})
    with mobilenet_capsule.open(tmp_path) as cap:
        got = cap.predict(x)
    assert got.shape == (2, 1000)
    assert_matches_reference(got, ref)
    # the two images are told apart (the model is not degenerate, so the comparison means something)
    assert not np.allclose(got[0], got[1])


def test_conv_layer_matches_plain_onnxruntime(tmp_path: Path, provider_key: ProviderKey) -> None:
    from mlcapsule.demo import models

    model = models.conv_layer(16, 20, depthwise_separable=True, seed=3)
    packed = pack_model(model, tmp_path / "conv.capsule", provider_key)
    x = np.random.default_rng(RNG_SEED).standard_normal((1, 16, 20, 20)).astype(np.float32)
    (ref,) = plain_ort(model, {"input": x})
    with packed.open(tmp_path) as cap:
        assert_matches_reference(cap.predict(x), ref)


# -- scikit-learn through skl2onnx -------------------------------------------------------------------
@pytest.mark.parametrize("name", ["GradientBoostingClassifier", "HistGradientBoostingClassifier", "RandomForestClassifier"])
def test_sklearn_tree_ensemble_matches_plain_onnxruntime(tmp_path: Path, provider_key: ProviderKey,
                                                         tree_models: dict[str, onnx.ModelProto], name: str) -> None:
    model = tree_models[name]
    packed = pack_model(model, tmp_path / "trees.capsule", provider_key)
    assert packed.manifest.segment("graph").encrypted  # the trees live in the graph: it must be encrypted
    x, _ = _classification_data()
    x = x[:50]
    ref_label, ref_proba = plain_ort(model, {"input": x})
    with packed.open(tmp_path) as cap:
        outs = cap.run({"input": x})
        label = cap.predict(x)  # the first output of a skl2onnx classifier is the label
    assert_matches_reference(outs["label"], ref_label)
    assert_matches_reference(outs["probabilities"], ref_proba)
    assert_matches_reference(label, ref_label)


# -- public architecture --------------------------------------------------------------------------
def test_public_architecture_leaves_graph_in_clear_and_outputs_unchanged(tmp_path: Path, provider_key: ProviderKey,
                                                                         mlp_model: onnx.ModelProto) -> None:
    packed = pack_model(mlp_model, tmp_path / "public.capsule", provider_key, public_architecture=True)
    m = packed.manifest
    assert m.public_architecture is True
    assert m.segment("graph").encrypted is False
    assert m.segment("weights").encrypted is True
    with CapsuleFile(packed.path, trust=UnsafeTrustManifestKey()) as cf:
        assert cf.manifest.segment("graph").encrypted is False
        view = cf.segment_view(cf.manifest.segment("graph"))
        graph = onnx.ModelProto.FromString(bytes(view))
        view.release()
    # the plaintext graph is the architecture only: same nodes, every float tensor a placeholder
    assert [n.name for n in graph.graph.node] == [n.name for n in mlp_model.graph.node]
    assert all(t.data_location == onnx.TensorProto.EXTERNAL and not t.raw_data for t in graph.graph.initializer)
    x = np.random.default_rng(RNG_SEED).standard_normal((5, 16)).astype(np.float32)
    (ref,) = plain_ort(mlp_model, {"input": x})
    with packed.open(tmp_path) as cap:
        assert_matches_reference(cap.predict(x), ref)


def test_public_architecture_cnn_outputs_unchanged(tmp_path: Path, provider_key: ProviderKey) -> None:
    from mlcapsule.demo import models

    model = models.conv_layer(8, 12, seed=5)
    packed = pack_model(model, tmp_path / "public-conv.capsule", provider_key, public_architecture=True)
    assert packed.manifest.segment("graph").encrypted is False
    x = np.random.default_rng(RNG_SEED).standard_normal((1, 8, 12, 12)).astype(np.float32)
    (ref,) = plain_ort(model, {"input": x})
    with packed.open(tmp_path) as cap:
        assert_matches_reference(cap.predict(x), ref)


@pytest.mark.parametrize("name", ["GradientBoostingClassifier", "RandomForestClassifier"])
def test_public_architecture_is_refused_for_tree_ensembles(tmp_path: Path, provider_key: ProviderKey,
                                                           tree_models: dict[str, onnx.ModelProto], name: str) -> None:
    """A tree ensemble's parameters are node attributes: a public graph would publish the model."""
    out = tmp_path / "trees-public.capsule"
    with pytest.raises(UsageError, match="public-architecture"):
        mlcapsule.pack(tree_models[name], out, provider_key=provider_key.path, public_architecture=True)
    assert not out.exists()
    assert not list(tmp_path.glob("*.key"))


# -- API --------------------------------------------------------------------------------------------
def test_pack_and_open_accept_a_path_or_a_modelproto(tmp_path: Path, provider_key: ProviderKey,
                                                     mlp_model: onnx.ModelProto) -> None:
    onnx_path = tmp_path / "mlp.onnx"
    onnx.save(mlp_model, str(onnx_path))
    from_path = mlcapsule.pack(onnx_path, tmp_path / "from-path.capsule", provider_key=provider_key.path)
    from_str = mlcapsule.pack(str(onnx_path), tmp_path / "from-str.capsule", provider_key=str(provider_key.path))
    from_proto = mlcapsule.pack(mlp_model, tmp_path / "from-proto.capsule", provider_key=provider_key.path)
    x = np.random.default_rng(RNG_SEED).standard_normal((3, 16)).astype(np.float32)
    (ref,) = plain_ort(mlp_model, {"input": x})
    for i, res in enumerate((from_path, from_str, from_proto)):
        assert res.manifest.inputs == from_proto.manifest.inputs
        assert res.manifest.outputs == from_proto.manifest.outputs
        # open_capsule takes a str or a Path
        target = str(res.capsule_path) if i % 2 else res.capsule_path
        with mlcapsule.open_capsule(target, trust=UnsafeTrustManifestKey(), unsafe_dev_key=str(res.key_path), state_dir=tmp_path / f"state{i}",
                                    platform_dir=tmp_path / "platform") as cap:
            assert_matches_reference(cap.predict(x), ref)
    # every pack makes a new capsule id and a new content key
    ids = {r.manifest.capsule_id for r in (from_path, from_str, from_proto)}
    assert len(ids) == 3
    assert len({r.key_path.read_bytes() for r in (from_path, from_str, from_proto)}) == 3


def test_pack_does_not_modify_the_callers_model(tmp_path: Path, provider_key: ProviderKey,
                                                mlp_model: onnx.ModelProto) -> None:
    before = mlp_model.SerializeToString()
    mlcapsule.pack(mlp_model, tmp_path / "m.capsule", provider_key=provider_key.path)
    assert mlp_model.SerializeToString() == before


def test_session_is_reused_across_many_predict_calls(tmp_path: Path, mlp_capsule: Packed) -> None:
    rng = np.random.default_rng(RNG_SEED)
    total = 0
    with mlp_capsule.open(tmp_path) as cap:
        pid = cap._enclave.proc.pid
        first = cap.status()
        assert first["loaded"] is True and first["queries_this_session"] == 0
        for i in range(40):
            n = 1 + i % 4
            x = rng.standard_normal((n, 16)).astype(np.float32)
            (ref,) = plain_ort(mlp_capsule.model, {"input": x}) if i % 10 == 0 else (None,)
            got = cap.predict(x)
            assert got.shape == (n, 5)
            if ref is not None:
                assert_matches_reference(got, ref)
            total += n
        st = cap.status()
        assert cap._enclave.proc.pid == pid  # one worker for the whole session
        assert st["queries_this_session"] == total
        assert st["load_seconds"] == first["load_seconds"]  # loaded once, never again
        assert st["capsule"]["capsule_id"] == str(mlp_capsule.manifest.capsule_id)


def test_wrong_input_shape_is_refused_and_the_session_survives(tmp_path: Path, mlp_capsule: Packed) -> None:
    x = np.ones((2, 16), np.float32)
    with mlp_capsule.open(tmp_path) as cap:
        with pytest.raises(InputError):
            cap.predict(np.ones((2, 15), np.float32))
        with pytest.raises(InputError):
            cap.run({"not_the_input": x})
        with pytest.raises(InputError):
            cap.predict(np.ones((0, 16), np.float32))
        # float64 is converted to the model's dtype on the host side
        assert_matches_reference(cap.predict(x.astype(np.float64)), plain_ort(mlp_capsule.model, {"input": x})[0])
        assert cap.status()["queries_this_session"] == 2


def test_scalar_output_keeps_its_shape(tmp_path: Path, provider_key: ProviderKey) -> None:
    """A model whose output is a 0-d tensor (ReduceSum with keepdims=0) returns a 0-d array, as ORT does."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.arange(1, 5, dtype=np.float32).reshape(1, 4), "w")
    graph = helper.make_graph(
        [helper.make_node("Mul", ["input", "w"], ["m"]), helper.make_node("ReduceSum", ["m"], ["total"], keepdims=0)],
        "scalar", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("total", TensorProto.FLOAT, [])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    packed = pack_model(model, tmp_path / "scalar.capsule", provider_key)
    x = np.random.default_rng(RNG_SEED).standard_normal((2, 4)).astype(np.float32)
    (ref,) = plain_ort(model, {"input": x})
    assert ref.shape == ()
    with packed.open(tmp_path) as cap:
        assert_matches_reference(cap.predict(x), ref)
