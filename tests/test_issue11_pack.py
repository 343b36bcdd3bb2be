"""Issue 11, item 5 (and 13, 19): `pack` refuses what the client's loader would reject."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import mlcapsule
from mlcapsule.enclave.errors import MlcapsuleError, UsageError
from mlcapsule.enclave.format.container import CapsuleFile
from mlcapsule.io import Preprocessing, format_outputs, load_inputs
from mlcapsule.enclave.format.trust import TrustProviderKey, UnsafeTrustManifestKey  # noqa: F401


def _cnn_like(dynamic_classes: bool = False) -> onnx.ModelProto:
    """x[N, 1, 28, 28] -> flatten -> MatMul -> y[N, 10] (like an MNIST CNN's interface)."""
    w = numpy_helper.from_array(np.full((784, 10), 0.001, np.float32), "W")
    shape = np.array([-1, 784], np.int64)
    nodes = [helper.make_node("Reshape", ["x", "s"], ["f"]), helper.make_node("MatMul", ["f", "W"], ["y"])]
    out_dim: Any = "C" if dynamic_classes else 10
    g = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 28, 28])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", out_dim])],
                          [w, numpy_helper.from_array(shape, "s")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def key(tmp_path_factory) -> Path:
    from mlcapsule.enclave.crypto.keys import generate_provider_key

    k = tmp_path_factory.mktemp("k") / "provider-key.pem"
    generate_provider_key(k)
    return k


IMG = {"kind": "image", "image_size": [28, 28], "channels": 1, "layout": "NCHW", "scale": 1 / 255,
       "mean": None, "std": None, "dtype": "float32"}


@pytest.mark.parametrize("prep, classes, what", [
    ({**IMG, "channels": 3}, None, "shape"),
    ({**IMG, "image_size": [32, 32]}, None, "shape"),
    (IMG, ["a", "b", "c"], "class names"),
    ({**IMG, "mean": [0.1, 0.2]}, None, "mean"),
])
def test_pack_refuses_preprocessing_the_loader_would_reject(tmp_path, key, prep, classes, what):
    with pytest.raises(UsageError, match=what):
        mlcapsule.pack(_cnn_like(), tmp_path / "m.capsule", provider_key=key, preprocessing=prep,
                       class_names=classes, tune_runtime=False)
    assert not (tmp_path / "m.capsule").exists() and not (tmp_path / "m.capsule.key").exists()


def test_pack_counts_classes_of_a_dynamic_output_by_running_the_model(tmp_path, key):
    with pytest.raises(UsageError, match="3 class names"):
        mlcapsule.pack(_cnn_like(dynamic_classes=True), tmp_path / "m.capsule", provider_key=key,
                       class_names=["a", "b", "c"], tune_runtime=False)


_preps = st.fixed_dictionaries({
    "kind": st.just("image"),
    "image_size": st.sampled_from([[28, 28], [32, 32], [28, 14]]),
    "channels": st.sampled_from([1, 3]),
    "layout": st.sampled_from(["NCHW", "NHWC", "flat"]),
    "scale": st.sampled_from([1 / 255, 1.0, 0.5]),
    "mean": st.one_of(st.none(), st.lists(st.sampled_from([0.1, 0.5]), min_size=1, max_size=3)),
    "std": st.one_of(st.none(), st.lists(st.sampled_from([0.2, 1.0]), min_size=1, max_size=3)),
    "dtype": st.just("float32"),
})


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prep=_preps, n_classes=st.one_of(st.none(), st.integers(1, 12)))
def test_whatever_pack_accepts_the_loader_accepts(tmp_path, key, prep, n_classes):
    classes = [f"c{i}" for i in range(n_classes)] if n_classes else None
    out = tmp_path / "p.capsule"
    out.unlink(missing_ok=True)
    try:
        mlcapsule.pack(_cnn_like(), out, provider_key=key, preprocessing=prep, class_names=classes,
                       tune_runtime=False, force=True)
    except UsageError:
        return
    with CapsuleFile(out, trust=UnsafeTrustManifestKey()) as cf:
        m = cf.manifest
    p = Preprocessing.from_dict(m.preprocessing)  # the loader's parse
    from PIL import Image

    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "img.png")
    x = load_inputs([tmp_path / "img.png"], p, m.inputs[0].shape)
    y = np.zeros((x.shape[0], 10), np.float32)
    format_outputs(y, m.class_names)  # the class names fit the output


# -- item 13: no silent overwrite of a capsule and its key -------------------------------------------
def test_pack_does_not_overwrite_a_capsule_or_its_key_without_force(tmp_path, key):
    out = tmp_path / "m.capsule"
    mlcapsule.pack(_cnn_like(), out, provider_key=key, tune_runtime=False)
    first_key = (tmp_path / "m.capsule.key").read_bytes()
    with pytest.raises(UsageError, match="exists") as e:
        mlcapsule.pack(_cnn_like(), out, provider_key=key, tune_runtime=False)
    assert "--force" in e.value.hint
    assert (tmp_path / "m.capsule.key").read_bytes() == first_key
    mlcapsule.pack(_cnn_like(), out, provider_key=key, tune_runtime=False, force=True)
    assert (tmp_path / "m.capsule.key").read_bytes() != first_key


def test_pack_and_grant_warn_about_expiry_in_the_past(tmp_path, key, capsys):
    from mlcapsule.cli.main import main

    onnx.save(_cnn_like(), tmp_path / "m.onnx")
    rc = main(["pack", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "m.capsule"), "--key", str(key),
               "--expires", "2001-01-01", "--no-tune"])
    assert rc == 0
    assert "in the past" in capsys.readouterr().err
    db = f"sqlite:///{tmp_path / 's.db'}"
    assert main(["admin", "account", "add", "a", "--database-url", db]) == 0
    assert main(["admin", "capsule", "add", str(tmp_path / "m.capsule"), "--key", str(tmp_path / "m.capsule.key"),
                 "--database-url", db, "--provider-key", str(key)]) == 0
    capsys.readouterr()
    assert main(["admin", "grant", "a", str(tmp_path / "m.capsule"), "--expires", "2001-01-01",
                 "--database-url", db]) == 0
    assert "in the past" in capsys.readouterr().err


# -- item 19: the progress bar ---------------------------------------------------------------------
def test_pack_progress_shows_no_bytes_for_the_verify_stage():
    from mlcapsule.cli.main import _progress_detail

    assert "bytes" not in _progress_detail("verify", 0, 1) and "/1" not in _progress_detail("verify", 0, 1)
    assert _progress_detail("encrypt", 512 * 1024, 1024 * 1024).endswith("MB")
