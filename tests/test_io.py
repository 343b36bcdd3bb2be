"""Host-side input loading and output formatting."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mlcapsule.enclave.errors import FormatError, InputError, MlcapsuleError, UsageError
from mlcapsule.io import Preprocessing, format_outputs, load_inputs, write_outputs

TENSOR = Preprocessing()


# -- Preprocessing ------------------------------------------------------------------------------------
def test_preprocessing_round_trips_through_json() -> None:
    prep = Preprocessing(kind="image", image_size=(224, 200), channels=3, layout="NCHW", scale=1 / 255,
                         mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    d = json.loads(json.dumps(prep.to_dict()))
    assert d["image_size"] == [224, 200] and d["mean"] == [0.485, 0.456, 0.406]
    assert Preprocessing.from_dict(d) == prep
    assert Preprocessing.from_dict({}) == Preprocessing()  # missing keys take the defaults
    assert Preprocessing.from_dict(Preprocessing().to_dict()) == Preprocessing()
    assert prep.sample_shape() == (3, 224, 200)
    listed = Preprocessing(kind="image", image_size=[8, 8], channels=1, layout="flat")  # type: ignore[arg-type]
    assert listed.image_size == (8, 8) and listed.sample_shape() == (64,)


@pytest.mark.parametrize("patch", [
    {"colour": True},
    {"kind": "audio"},
    {"kind": "image", "image_size": None},
    {"image_size": [8]},
    {"image_size": [8, 0]},
    {"image_size": [8.0, 8.0]},
    {"image_size": "8x8"},
    {"channels": 2},
    {"channels": True},
    {"channels": "3"},
    {"layout": "CHW"},
    {"scale": 0},
    {"scale": -1.0},
    {"scale": "1/255"},
    {"scale": float("nan")},
    {"mean": [0.5]},
    {"mean": [0.5, 0.5, "x"]},
    {"std": [1.0, 0.0, 1.0]},
    {"dtype": "float16"},
    {"invert": 1},
])
def test_preprocessing_from_dict_is_strict(patch: dict) -> None:
    d = {**Preprocessing(kind="image", image_size=(8, 8)).to_dict(), **patch}
    with pytest.raises(FormatError):
        Preprocessing.from_dict(d)


def test_preprocessing_from_dict_needs_an_object() -> None:
    with pytest.raises(FormatError):
        Preprocessing.from_dict([1, 2])


def test_preprocessing_constructor_raises_usage_error() -> None:
    with pytest.raises(UsageError, match="channels"):
        Preprocessing(channels=4)
    with pytest.raises(UsageError, match="image_size"):
        Preprocessing(kind="image")


# -- array formats ----------------------------------------------------------------------------------
def test_npy_batch_and_single_sample(tmp_path: Path) -> None:
    batch = np.arange(12, dtype=np.float64).reshape(3, 4)
    np.save(tmp_path / "b.npy", batch)
    np.save(tmp_path / "s.npy", np.arange(4, dtype=np.int16))
    got = load_inputs([tmp_path / "b.npy"], TENSOR, ["N", 4])
    assert got.dtype == np.float32 and got.flags.c_contiguous
    np.testing.assert_array_equal(got, batch)
    got = load_inputs([tmp_path / "s.npy", tmp_path / "b.npy"], TENSOR, [None, 4])
    assert got.shape == (4, 4)
    np.testing.assert_array_equal(got[0], np.arange(4))
    # Fortran order and big-endian data read correctly.
    np.save(tmp_path / "f.npy", np.asfortranarray(batch).astype(">f4"))
    np.testing.assert_array_equal(load_inputs([tmp_path / "f.npy"], TENSOR, ["N", 4]), batch)


def test_npz_single_array_or_named(tmp_path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    np.savez(tmp_path / "one.npz", anything=x)
    np.testing.assert_array_equal(load_inputs([tmp_path / "one.npz"], TENSOR, ["N", 3]), x)
    np.savez_compressed(tmp_path / "named.npz", x=x, y=np.zeros(2))
    np.testing.assert_array_equal(load_inputs([tmp_path / "named.npz"], TENSOR, ["N", 3]), x)
    np.savez(tmp_path / "input.npz", input=x, labels=np.zeros(2))
    np.testing.assert_array_equal(load_inputs([tmp_path / "input.npz"], TENSOR, ["N", 3]), x)
    np.savez(tmp_path / "many.npz", a=x, b=x)
    with pytest.raises(InputError, match="'x' or 'input'"):
        load_inputs([tmp_path / "many.npz"], TENSOR, ["N", 3])


def test_pickled_arrays_are_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match="object"):
        load_inputs([tmp_path / "obj.npy"], TENSOR, ["N"])
    np.save(tmp_path / "str.npy", np.array(["a", "b"]))
    with pytest.raises(InputError, match="not numbers"):
        load_inputs([tmp_path / "str.npy"], TENSOR, ["N"])
    (tmp_path / "pickle.npy").write_bytes(b"\x80\x04\x95" + b"\x00" * 20)
    with pytest.raises(InputError, match="npy"):
        load_inputs([tmp_path / "pickle.npy"], TENSOR, ["N"])


def test_truncated_npy_is_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "t.npy", np.zeros((100, 4), dtype=np.float32))
    data = (tmp_path / "t.npy").read_bytes()
    (tmp_path / "t.npy").write_bytes(data[:-10])
    with pytest.raises(InputError, match="truncated"):
        load_inputs([tmp_path / "t.npy"], TENSOR, ["N", 4])


def test_csv_with_and_without_header(tmp_path: Path) -> None:
    (tmp_path / "h.csv").write_text("a,b,c\n1,2,3\n\n4, 5.5 ,-6e1\n")
    got = load_inputs([tmp_path / "h.csv"], TENSOR, ["N", 3])
    np.testing.assert_array_equal(got, [[1, 2, 3], [4, 5.5, -60]])
    (tmp_path / "n.csv").write_text("1,2,3\r\n")
    assert load_inputs([tmp_path / "n.csv"], TENSOR, [1, 3]).shape == (1, 3)
    (tmp_path / "ragged.csv").write_text("1,2,3\n4,5\n")
    with pytest.raises(InputError, match="line 2 has 2 values"):
        load_inputs([tmp_path / "ragged.csv"], TENSOR, ["N", 3])
    (tmp_path / "words.csv").write_text("x,y\n1,2\nthree,4\n")
    with pytest.raises(InputError, match="line 3"):
        load_inputs([tmp_path / "words.csv"], TENSOR, ["N", 2])
    (tmp_path / "empty.csv").write_text("only,a,header\n")
    with pytest.raises(InputError, match="no rows"):
        load_inputs([tmp_path / "empty.csv"], TENSOR, ["N", 3])


def test_csv_rows_are_reshaped_to_the_sample_shape(tmp_path: Path) -> None:
    (tmp_path / "img.csv").write_text("0,1,2,3\n4,5,6,7\n")
    got = load_inputs([tmp_path / "img.csv"], TENSOR, ["N", 1, 2, 2])
    assert got.shape == (2, 1, 2, 2)
    np.testing.assert_array_equal(got[1, 0], [[4, 5], [6, 7]])


def test_json_list_and_inputs_object(tmp_path: Path) -> None:
    (tmp_path / "l.json").write_text("[[1, 2.5], [3, -4]]")
    np.testing.assert_array_equal(load_inputs([tmp_path / "l.json"], TENSOR, ["N", 2]), [[1, 2.5], [3, -4]])
    (tmp_path / "o.json").write_text(json.dumps({"inputs": [7, 8]}))
    np.testing.assert_array_equal(load_inputs([tmp_path / "o.json"], TENSOR, ["N", 2]), [[7, 8]])
    for bad, match in [('[[1, 2], [3]]', "rectangular"), ('[[1, "2"]]', "not a number"),
                       ('[[true, 1]]', "not a number"), ('{"x": [1, 2]}', "inputs"), ("[1, 2", "JSON"),
                       ("[" * 100 + "]" * 100, "nested")]:
        (tmp_path / "bad.json").write_text(bad)
        with pytest.raises(InputError, match=match):
            load_inputs([tmp_path / "bad.json"], TENSOR, ["N", 2])


def test_shape_mismatch_says_expected_and_actual(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.zeros((3, 65), dtype=np.float32))
    with pytest.raises(InputError) as ei:
        load_inputs([tmp_path / "x.npy"], TENSOR, ["N", 64])
    msg = ei.value.message
    assert "expected input of shape [N, 64]" in msg and "one sample of shape [64]" in msg
    assert "got [3, 65]" in msg and "x.npy" in msg
    np.save(tmp_path / "y.npy", np.zeros((2, 64), dtype=np.float32))
    with pytest.raises(InputError) as ei:
        load_inputs([tmp_path / "y.npy"], TENSOR, [1, 64])
    assert "exactly 1 sample" in ei.value.message and "got [2, 64]" in ei.value.message
    assert "[1, 64]" in ei.value.message
    np.save(tmp_path / "z.npy", np.zeros((0, 64), dtype=np.float32))
    with pytest.raises(InputError, match="no samples"):
        load_inputs([tmp_path / "z.npy"], TENSOR, ["N", 64])


def test_files_with_different_dynamic_shapes_are_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.zeros((1, 3, 4), dtype=np.float32))
    np.save(tmp_path / "b.npy", np.zeros((1, 3, 5), dtype=np.float32))
    with pytest.raises(InputError, match="different shapes"):
        load_inputs([tmp_path / "a.npy", tmp_path / "b.npy"], TENSOR, ["N", 3, "L"])


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        load_inputs([tmp_path / "missing.npy"], TENSOR, ["N", 2])
    (tmp_path / "x.txt").write_text("1,2")
    with pytest.raises(InputError, match="unsupported input file type"):
        load_inputs([tmp_path / "x.txt"], TENSOR, ["N", 2])
    with pytest.raises(InputError, match="no input files"):
        load_inputs([], TENSOR, ["N", 2])
    (tmp_path / "dir.npy").mkdir()
    with pytest.raises(InputError, match="folder"):
        load_inputs([tmp_path / "dir.npy"], TENSOR, ["N", 2])


# -- images ------------------------------------------------------------------------------------------------
def _gradient_rgb(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx * 255 // (w - 1), yy * 255 // (h - 1), np.full_like(xx, 40)], axis=-1).astype(np.uint8)


def test_image_is_resized_scaled_and_laid_out(tmp_path: Path) -> None:
    pixels = _gradient_rgb(30, 40)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    Image.fromarray(pixels[::-1]).save(tmp_path / "b.png")
    prep = Preprocessing(kind="image", image_size=(12, 16), channels=3, layout="NCHW", scale=1 / 255)
    got = load_inputs([tmp_path / "a.png", tmp_path / "b.png"], prep, ["N", 3, 12, 16])
    assert got.shape == (2, 3, 12, 16) and got.dtype == np.float32
    expected = np.asarray(Image.fromarray(pixels).resize((16, 12), Image.Resampling.BILINEAR), np.float32) / 255
    np.testing.assert_allclose(got[0], expected.transpose(2, 0, 1), atol=1e-6)
    assert 0.0 <= got.min() and got.max() <= 1.0
    assert got[0, 0, 0, 0] < 0.1 and got[0, 0, 0, -1] > 0.9  # red grows left to right
    assert np.allclose(got[0, 2], 40 / 255, atol=1e-6)  # constant blue survives resizing

    nhwc = Preprocessing(kind="image", image_size=(12, 16), layout="NHWC", mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0))
    got2 = load_inputs([tmp_path / "a.png"], nhwc, [1, 12, 16, 3])
    np.testing.assert_allclose(got2[0], (expected - 0.5) / np.array([0.25, 0.5, 1.0]), atol=1e-5)


def test_grayscale_digits_style_image(tmp_path: Path) -> None:
    values = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4  # 0..252
    Image.fromarray(values).save(tmp_path / "d.png")  # 2-D uint8: mode L
    Image.fromarray(np.stack([values] * 3, -1)).save(tmp_path / "rgb.jpg", quality=100)
    values = values.astype(np.float64)
    prep = Preprocessing(kind="image", image_size=(8, 8), channels=1, layout="flat", scale=16 / 255)
    got = load_inputs([tmp_path / "d.png"], prep, ["N", 64])
    assert got.shape == (1, 64)
    np.testing.assert_allclose(got[0], values.reshape(-1) * 16 / 255, atol=1e-5)
    inv = Preprocessing(kind="image", image_size=(8, 8), channels=1, layout="flat", scale=16 / 255, invert=True)
    np.testing.assert_allclose(load_inputs([tmp_path / "d.png"], inv, ["N", 64])[0],
                               (255 - values.reshape(-1)) * 16 / 255, atol=1e-5)
    got_jpg = load_inputs([tmp_path / "rgb.jpg"], prep, ["N", 64])  # converted to L
    np.testing.assert_allclose(got_jpg[0], values.reshape(-1) * 16 / 255, atol=0.5)
    # A flat image feeds an [N, 1, 8, 8] model as well.
    assert load_inputs([tmp_path / "d.png"], prep, ["N", 1, 8, 8]).shape == (1, 1, 8, 8)


def test_image_errors(tmp_path: Path) -> None:
    Image.fromarray(_gradient_rgb(8, 8)).save(tmp_path / "a.png")
    with pytest.raises(InputError, match="tensors, not images"):
        load_inputs([tmp_path / "a.png"], TENSOR, ["N", 3, 8, 8])
    prep = Preprocessing(kind="image", image_size=(8, 8), channels=3)
    with pytest.raises(InputError, match=r"expected input of shape \[N, 1, 8, 8\].*got \[1, 3, 8, 8\]"):
        load_inputs([tmp_path / "a.png"], prep, ["N", 1, 8, 8])
    (tmp_path / "fake.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(InputError, match="cannot read the image"):
        load_inputs([tmp_path / "fake.png"], prep, ["N", 3, 8, 8])


# -- robustness ------------------------------------------------------------------------------------------
_SUFFIXES = [".npy", ".json", ".csv", ".npz", ".png"]
_IMAGE_PREP = Preprocessing(kind="image", image_size=(4, 4), channels=1, layout="flat")


def _npy_like() -> st.SearchStrategy[bytes]:
    """Bytes that get past the .npy magic, so the header and data parsing are exercised."""
    header = st.sampled_from([
        "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }",
        "{'descr': '|O', 'fortran_order': False, 'shape': (2,), }",
        "{'descr': '<f8', 'fortran_order': True, 'shape': (100000000000, 3), }",
        "{'descr': [('a', '<i4')], 'fortran_order': False, 'shape': (1,), }",
        "{'descr': '<U3', 'fortran_order': False, 'shape': (2,), }",
        "{'descr': '<f4', 'shape': (-1, 3), 'fortran_order': False}",
    ]) | st.text(max_size=80)
    return st.builds(
        lambda h, body: b"\x93NUMPY\x01\x00" + len(h.encode("utf-8", "replace")).to_bytes(2, "little")
        + h.encode("utf-8", "replace") + body,
        header, st.binary(max_size=64),
    )


def _text_like() -> st.SearchStrategy[bytes]:
    return st.text(alphabet=st.sampled_from(list("0123456789,.-e+[]{}\" \nnaNIfty:inputs")), max_size=120).map(
        lambda s: s.encode())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(suffix=st.sampled_from(_SUFFIXES), data=st.binary(max_size=300) | _npy_like() | _text_like(),
       shape=st.sampled_from([["N", 3], [None], [2, 3], ["N", 1, 2, 2], ["N", 16]]))
def test_arbitrary_bytes_raise_only_mlcapsule_errors(suffix: str, data: bytes, shape: list) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"input{suffix}"
        path.write_bytes(data)
        try:
            out = load_inputs([path], _IMAGE_PREP, shape)
        except MlcapsuleError as e:
            assert isinstance(e, (InputError, UsageError))
            assert e.message
        else:
            assert out.dtype == np.float32 and out.ndim == len(shape) and out.shape[0] >= 1


# -- outputs ----------------------------------------------------------------------------------------------
def test_format_probabilities_with_class_names() -> None:
    probs = np.array([[0.1, 0.7, 0.2], [0.5, 0.25, 0.25]], dtype=np.float32)
    rows = format_outputs(probs, ["cat", "dog", "fish"], top_k=2)
    assert len(rows) == 2
    assert rows[0]["class"] == "dog" and rows[0]["index"] == 1
    assert rows[0]["probability"] == pytest.approx(0.7)
    assert rows[0]["probabilities"] == pytest.approx([0.1, 0.7, 0.2])
    assert "scores" not in rows[0]
    assert [t["class"] for t in rows[0]["top"]] == ["dog", "fish"]
    assert rows[1]["class"] == "cat"
    json.dumps(rows)  # JSON-ready


def test_format_logits_reports_scores_and_softmax() -> None:
    logits = np.array([[2.0, -1.0, 0.5, 0.0]], dtype=np.float32)
    (row,) = format_outputs(logits, None, top_k=10)
    assert row["class"] == 0 and row["index"] == 0
    assert row["scores"] == pytest.approx([2.0, -1.0, 0.5, 0.0])
    e = np.exp(logits[0] - logits[0].max())
    assert row["probabilities"] == pytest.approx(list(e / e.sum()))
    assert sum(row["probabilities"]) == pytest.approx(1.0)
    assert [t["index"] for t in row["top"]] == [0, 2, 3, 1]  # top_k capped at the class count
    # Positive values that do not sum to 1 are scores as well.
    (row,) = format_outputs(np.array([[0.2, 0.3]]), ["a", "b"])
    assert "scores" in row and row["class"] == "b"


def test_format_other_shapes_and_errors() -> None:
    assert format_outputs(np.array([1.5, -2.0]), None) == [{"value": 1.5}, {"value": -2.0}]
    assert format_outputs(np.array([[3.0]]), None) == [{"value": 3.0}]
    rows = format_outputs(np.zeros((1, 2, 2)), None)
    assert rows == [{"shape": [2, 2], "values": [[0.0, 0.0], [0.0, 0.0]]}]
    (row,) = format_outputs(np.array([[np.nan, 1.0]]), None)
    assert row["scores"][0] is None and row["index"] == 1
    with pytest.raises(FormatError, match="3 class names"):
        format_outputs(np.zeros((1, 4)), ["a", "b", "c"])
    with pytest.raises(UsageError):
        format_outputs(np.zeros((1, 4)), None, top_k=0)


def test_write_outputs_npy_and_json(tmp_path: Path) -> None:
    out = np.array([[0.25, 0.75], [1.0, 0.0]], dtype=np.float32)
    write_outputs(out, tmp_path / "o.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "o.npy", allow_pickle=False), out)
    write_outputs(out, tmp_path / "o.json")
    assert json.loads((tmp_path / "o.json").read_text()) == [[0.25, 0.75], [1.0, 0.0]]
    # JSON outputs read back as inputs.
    np.testing.assert_array_equal(load_inputs([tmp_path / "o.json"], TENSOR, ["N", 2]), out)
    write_outputs(np.array([math.inf, 1.0]), tmp_path / "inf.json")
    assert json.loads((tmp_path / "inf.json").read_text()) == [None, 1.0]
    rows = format_outputs(out, ["no", "yes"])
    write_outputs(rows, tmp_path / "rows.json")
    assert json.loads((tmp_path / "rows.json").read_text())[0]["class"] == "yes"
    with pytest.raises(UsageError, match=r"\.npy, \.json, \.csv"):
        write_outputs(out, tmp_path / "o.txt")
    with pytest.raises(UsageError, match="only an array"):
        write_outputs(rows, tmp_path / "rows.npy")


def _valid_files() -> dict[str, bytes]:
    import io as _io

    files: dict[str, bytes] = {}
    buf = _io.BytesIO()
    np.save(buf, np.arange(6, dtype=np.float32).reshape(2, 3))
    files[".npy"] = buf.getvalue()
    buf = _io.BytesIO()
    np.savez_compressed(buf, x=np.arange(6, dtype=np.float32).reshape(2, 3))
    files[".npz"] = buf.getvalue()
    buf = _io.BytesIO()
    Image.fromarray(np.arange(16, dtype=np.uint8).reshape(4, 4) * 16).save(buf, format="PNG")
    files[".png"] = buf.getvalue()
    buf = _io.BytesIO()
    Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3) * 5).save(buf, format="JPEG")
    files[".jpg"] = buf.getvalue()
    files[".json"] = b'{"inputs": [[1, 2, 3], [4, 5, 6]]}'
    files[".csv"] = b"a,b,c\n1,2,3\n4,5,6\n"
    return files


_VALID = _valid_files()


@settings(max_examples=300, deadline=None)
@given(suffix=st.sampled_from(sorted(_VALID)), cut=st.integers(0, 400),
       flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4))
def test_damaged_valid_files_raise_only_mlcapsule_errors(suffix: str, cut: int, flips: list) -> None:
    data = bytearray(_VALID[suffix])
    for pos, value in flips:
        data[pos % len(data)] = value
    if cut % 3 == 0:
        data = data[: max(1, len(data) - cut)]
    shape: list[int | str] = ["N", 16] if suffix in (".png", ".jpg") else ["N", 3]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"input{suffix}"
        path.write_bytes(bytes(data))
        try:
            out = load_inputs([path], _IMAGE_PREP, shape)
        except MlcapsuleError as e:
            assert isinstance(e, InputError) and e.message
        else:
            assert out.dtype == np.float32 and out.shape[1:] == (shape[1],)
