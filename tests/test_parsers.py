"""Property tests of every parser that reads untrusted bytes.

* ``CapsuleFile``: the capsule container (arbitrary files, mutated valid capsules);
* ``Manifest.from_dict``: the manifest schema (arbitrary JSON values, mutated valid manifests);
* ``mlcapsule.enclave.protocol``: the host <-> enclave frames and tensor descriptions.

A parser may accept or refuse, but it refuses only with its own error type (an MlcapsuleError;
ProtocolError for the protocol), never with a stray ValueError, KeyError, RecursionError...
"""

from __future__ import annotations

import copy
import json
import os
import struct
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import Packed, layout

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

from mlcapsule.enclave._util import canonical_json  # noqa: E402
from mlcapsule.enclave import protocol  # noqa: E402
from mlcapsule.enclave.errors import FormatError, MlcapsuleError, ProtocolError  # noqa: E402
from mlcapsule.enclave.format import CapsuleFile, Manifest  # noqa: E402
from mlcapsule.enclave.format.container import MAGIC, MAX_MANIFEST  # noqa: E402
from mlcapsule.enclave.format.trust import TrustProviderKey, UnsafeTrustManifestKey  # noqa: F401

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- strategies ----------------------------------------------------------------------------------
def json_values(max_leaves: int = 40) -> st.SearchStrategy[Any]:
    """JSON-like data: what json.loads can return (floats include inf and nan, as Python's json does)."""
    leaves = st.one_of(
        st.none(), st.booleans(),
        st.integers(), st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(), st.text(max_size=20),
    )
    return st.recursive(
        leaves,
        lambda children: st.one_of(st.lists(children, max_size=6),
                                   st.dictionaries(st.text(max_size=12), children, max_size=6)),
        max_leaves=max_leaves,
    )


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path to a value inside nested dicts and lists."""
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, prefix + (i,))
    return out


def _get(obj: Any, path: tuple) -> Any:
    for p in path:
        obj = obj[p]
    return obj


@st.composite
def mutated(draw: st.DrawFn, base: Any, n_max: int = 3) -> Any:
    """``base`` with 1..n_max edits: replace a value (by random JSON or a nearby value), delete a
    key or element, or add a key."""
    obj = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, n_max))):
        paths = _paths(obj)
        path = draw(st.sampled_from(paths))
        kind = draw(st.sampled_from(["replace", "tweak", "delete", "add"]))
        if kind == "add" or not path:
            target = _get(obj, path)
            if isinstance(target, dict):
                target[draw(st.text(max_size=12))] = draw(json_values(8))
            elif isinstance(target, list):
                target.append(draw(json_values(8)))
            continue
        parent, key = _get(obj, path[:-1]), path[-1]
        if kind == "delete":
            del parent[key]
        elif kind == "tweak":
            v = parent[key]
            if isinstance(v, bool):
                parent[key] = not v
            elif isinstance(v, int):
                parent[key] = draw(st.sampled_from([v + 1, v - 1, -v, 0, -1, 2**31, 2**62, 2**63, 2**64, float(v)]))
            elif isinstance(v, str):
                parent[key] = draw(st.sampled_from([v[:-1], v + "0", v.upper(), "", v * 300, str(len(v))]))
            else:
                parent[key] = draw(json_values(8))
        else:
            parent[key] = draw(json_values(12))
    return obj


# -- (a) CapsuleFile -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _header(**kw: int) -> bytes:
    v = {"major": 1, "minor": 0, "flags": 0, "mlen": 2, "slen": 64, "res1": 0, "doff": 4096, "dlen": 0}
    v.update(kw)
    return struct.pack("<8sHHIIHHQQ24s", MAGIC, v["major"], v["minor"], v["flags"], v["mlen"], v["slen"], v["res1"],
                       v["doff"], v["dlen"], bytes(24))


def _open_file(path: Path, data: bytes) -> CapsuleFile | None:
    path.write_bytes(data)
    try:
        cf = CapsuleFile(path, trust=UnsafeTrustManifestKey())
    except MlcapsuleError:
        return None
    return cf


headers = st.builds(
    _header,
    major=st.sampled_from([0, 1, 1, 1, 2]), minor=st.integers(0, 3), flags=st.sampled_from([0, 0, 0, 1]),
    mlen=st.one_of(st.integers(0, 300), st.sampled_from([MAX_MANIFEST, MAX_MANIFEST + 1, 2**32 - 1])),
    slen=st.sampled_from([64, 64, 0, 65]), res1=st.sampled_from([0, 0, 1]),
    doff=st.one_of(st.sampled_from([0, 4096, 8192, 2**63]), st.integers(0, 2**64 - 1)),
    dlen=st.one_of(st.integers(0, 64), st.integers(0, 2**64 - 1)),
)


@FUZZ
@given(data=st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=200).map(lambda b: MAGIC + b),
    st.tuples(headers, st.binary(max_size=400)).map(lambda t: t[0] + t[1]),
    st.tuples(headers, json_values(20), st.binary(min_size=64, max_size=64)).map(
        lambda t: t[0] + json.dumps(t[1]).encode() + t[2]),
))
@example(data=b"")
@example(data=MAGIC)
@example(data=_header() + b"{}" + bytes(64))
def test_capsulefile_on_arbitrary_bytes_raises_only_mlcapsule_errors(fuzz_dir: Path, data: bytes) -> None:
    cf = _open_file(fuzz_dir / "arbitrary.capsule", data)
    assert cf is None, "random bytes cannot carry a valid signature"


@FUZZ
@given(manifest=json_values(30))
@example(manifest={"provider": {"key": 5}})
@example(manifest={"provider": {"key": None}})
@example(manifest={"provider": {"key": ["AAAA"]}})
@example(manifest={"provider": []})
@example(manifest="provider")
def test_capsulefile_on_arbitrary_manifest_json_raises_only_mlcapsule_errors(fuzz_dir: Path, manifest: Any) -> None:
    """A well-formed header around an arbitrary JSON manifest and a random signature."""
    body = json.dumps(manifest).encode()
    doff = -(-(64 + len(body) + 64) // 4096) * 4096
    data = _header(mlen=len(body), doff=doff) + body + os.urandom(64)
    assert _open_file(fuzz_dir / "manifest.capsule", data + bytes(doff - len(data) - 0)) is None


def test_capsulefile_on_deeply_nested_manifest_raises_format_error(fuzz_dir: Path) -> None:
    """json.loads raises RecursionError on deep nesting: the reader must turn it into FormatError."""
    body = b"[" * 200_000 + b"]" * 200_000
    doff = -(-(64 + len(body) + 64) // 4096) * 4096
    data = _header(mlen=len(body), doff=doff) + body + bytes(64)
    (fuzz_dir / "deep.capsule").write_bytes(data + bytes(doff - len(data)))
    with pytest.raises(FormatError):
        CapsuleFile(fuzz_dir / "deep.capsule", trust=UnsafeTrustManifestKey())


@st.composite
def capsule_mutations(draw: st.DrawFn, size: int) -> list[tuple[str, int, int]]:
    span = min(4096, size)
    edit = st.tuples(st.sampled_from(["set", "xor", "insert", "delete", "truncate"]), st.integers(0, span - 1),
                     st.integers(0, 255))
    return draw(st.lists(edit, min_size=1, max_size=6))


def _apply(data: bytes, edits: list[tuple[str, int, int]]) -> bytes:
    b = bytearray(data)
    for kind, pos, val in edits:
        pos = min(pos, len(b) - 1) if b else 0
        if kind == "set" and b:
            b[pos] = val
        elif kind == "xor" and b:
            b[pos] ^= val or 1
        elif kind == "insert":
            b[pos:pos] = bytes([val])
        elif kind == "delete" and b:
            del b[pos]
        elif kind == "truncate":
            del b[pos:]
    return bytes(b)


@pytest.fixture(scope="module")
def pristine(mlp_capsule: Packed) -> tuple[bytes, bytes, int]:
    data = mlp_capsule.path.read_bytes()
    lay = layout(mlp_capsule.path)
    return data, data[64:64 + lay.manifest_length], lay.signed_end


@FUZZ
@given(data=st.data())
def test_capsulefile_on_mutated_valid_capsule_raises_only_mlcapsule_errors(
        fuzz_dir: Path, pristine: tuple[bytes, bytes, int], data: st.DataObject) -> None:
    """Mutations of the first 4096 bytes (header, manifest, signature, padding) of a valid capsule:
    either refused with an MlcapsuleError, or the very same signed manifest (padding-only edits)."""
    original, manifest_bytes, signed_end = pristine
    edits = data.draw(capsule_mutations(len(original)))
    mutated_bytes = _apply(original, edits)
    cf = _open_file(fuzz_dir / "mutated.capsule", mutated_bytes)
    if cf is not None:
        with cf:
            assert cf.manifest_bytes == manifest_bytes
            assert mutated_bytes[:signed_end] == original[:signed_end]
            cf.verify_segments()


# -- (b) Manifest.from_dict ------------------------------------------------------------------------
def _roundtrips(m: Manifest) -> None:
    """Whatever the parser accepts can be written back and reads the same."""
    again = Manifest.from_dict(json.loads(canonical_json(m.to_dict())))
    assert again == m


@FUZZ
@given(d=json_values(60))
@example(d={"format": "mlcapsule-manifest/v1"})
@example(d=[])
def test_manifest_from_arbitrary_json_raises_only_format_errors(d: Any) -> None:
    try:
        m = Manifest.from_dict(d)
    except MlcapsuleError as e:
        assert isinstance(e, FormatError)
        return
    _roundtrips(m)


@pytest.fixture(scope="module")
def valid_manifest(mlp_capsule: Packed) -> dict[str, Any]:
    d = layout(mlp_capsule.path).manifest
    # fill the optional parts, so mutations reach their validation too
    d["policy"].update(budget=100, expires="2030-01-01T00:00:00+00:00")
    d["model"]["preprocessing"] = {"kind": "image", "image_size": [4, 4], "channels": 1}
    d["provider"]["server_url"] = "https://provider.example"
    Manifest.from_dict(d)
    return d


@FUZZ
@given(data=st.data())
def test_manifest_from_mutated_valid_manifest_raises_only_format_errors(valid_manifest: dict[str, Any],
                                                                        data: st.DataObject) -> None:
    d = data.draw(mutated(valid_manifest))
    try:
        m = Manifest.from_dict(d)
    except MlcapsuleError as e:
        assert isinstance(e, FormatError)
        return
    _roundtrips(m)


@pytest.mark.parametrize("path,value", [
    (("created",), "2020-01-01T00:00:00+99:00"),
    (("created",), "2020-13-01T00:00:00+00:00"),
    (("created",), "2020-01-01"),  # no time zone
    (("provider", "key"), "\u00e9" * 44),
    (("provider", "key"), "=" * 44),
    (("segments", 0, "sha256"), "A" * 64),
    (("segments", 0, "offset"), 2**62),
    (("segments", 0, "index"), True),
    (("version",), 1.0),
    (("model", "inputs", 0, "shape"), [None, True]),
    (("model", "inputs", 0, "shape"), [-1]),
    (("model", "inputs", 0, "dtype"), "object"),
    (("model", "class_names"), ["x", 1]),
    (("policy", "lease_size"), 0),
    (("runtime", "optimization"), "ALL"),
])
def test_manifest_edge_values_raise_format_error(valid_manifest: dict[str, Any], path: tuple, value: Any) -> None:
    d = copy.deepcopy(valid_manifest)
    _get(d, path[:-1])[path[-1]] = value
    with pytest.raises(FormatError):
        Manifest.from_dict(d)


# -- (c) the enclave protocol ----------------------------------------------------------------------
def _frame_body(header: Any, buffers: list[bytes] = (), *, version: int = 1, kind: int = 0) -> bytes:
    hdr = json.dumps(header).encode() if not isinstance(header, bytes) else header
    out = struct.pack("<2sBBI", b"MC", version, kind, len(hdr)) + hdr + struct.pack("<I", len(buffers))
    for b in buffers:
        out += struct.pack("<Q", len(b)) + b
    return out


def _decode_only_protocol_errors(body: bytes) -> protocol.Message | None:
    try:
        return protocol.decode(bytearray(body))
    except ProtocolError:
        return None


@FUZZ
@given(body=st.one_of(
    st.binary(max_size=200),
    st.binary(max_size=100).map(lambda b: b"MC\x01" + b),
    st.tuples(st.sampled_from([0, 1, 2]), st.integers(0, 2**32 - 1), st.binary(max_size=100)).map(
        lambda t: struct.pack("<2sBBI", b"MC", 1, t[0], t[1]) + t[2]),
    st.tuples(json_values(15), st.lists(st.binary(max_size=16), max_size=3), st.integers(0, 40)).map(
        lambda t: _frame_body(t[0], t[1])[:len(_frame_body(t[0], t[1])) - t[2]]),
))
@example(body=b"")
@example(body=_frame_body(b"[" * 100_000 + b"]" * 100_000))
@example(body=_frame_body(b"\xff\xfe"))
@example(body=_frame_body({}, [b"abc"])[:-1])
def test_protocol_decode_on_arbitrary_bytes_raises_only_protocol_errors(body: bytes) -> None:
    msg = _decode_only_protocol_errors(body)
    if msg is not None:
        assert isinstance(msg.header, dict)


@st.composite
def tensor_descriptions(draw: st.DrawFn) -> tuple[Any, list[memoryview]]:
    buffers = [memoryview(b) for b in draw(st.lists(st.binary(max_size=32), max_size=3))]
    desc_entry = st.one_of(
        json_values(10),
        st.fixed_dictionaries({
            "name": st.one_of(st.text(max_size=5), json_values(3)),
            "dtype": st.one_of(st.sampled_from(["float32", "float64", "int64", "bool", "uint8", "float16", "object",
                                                "V8", "<U3", "S0", "complex64", "f8", ">f4", "O"]), json_values(3)),
            "shape": st.one_of(st.lists(st.one_of(st.integers(-2, 8), st.integers(0, 2**64), st.floats(),
                                                  st.text(max_size=3)), max_size=18), json_values(3)),
            "buf": st.one_of(st.integers(-2, 4), st.floats(), json_values(2)),
        }),
    )
    return draw(st.one_of(json_values(10), st.lists(desc_entry, max_size=3))), buffers


_DTYPES = ["float32", "float64", "float16", "int64", "int32", "int16", "int8", "uint8", "bool"]


def _roundtrip(tensors: dict[str, np.ndarray], kind: int = protocol.TENSOR_REQUEST) -> dict[str, np.ndarray]:
    """Through the binary tensor frame (the only frame that carries tensors): by position."""
    parts = protocol.encode_tensors(kind, list(tensors.values()))
    frame = b"".join(bytes(memoryview(p).cast("B")) if not isinstance(p, bytes) else p for p in parts)
    (n,) = struct.unpack_from("<I", frame)
    assert n == len(frame) - 4
    got_kind, out = protocol.decode_tensors(bytearray(frame[4:]), copy=True)
    assert got_kind == kind
    return dict(zip(tensors, out))


def _assert_same_tensor(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype.name == want.dtype.name and got.shape == want.shape
    assert got.astype(got.dtype.newbyteorder("=")).tobytes() == want.astype(want.dtype.newbyteorder("=")).tobytes()


@FUZZ
@given(tensors=st.dictionaries(
    st.text(min_size=1, max_size=10),
    st.sampled_from(_DTYPES).flatmap(lambda dt: hnp.arrays(
        np.dtype(dt), hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5))),
    max_size=4,
))
def test_tensor_encode_decode_round_trip_is_exact(tensors: dict[str, np.ndarray]) -> None:
    out = _roundtrip(tensors)
    assert list(out) == list(tensors)
    for name, arr in tensors.items():
        _assert_same_tensor(out[name], arr)


@pytest.mark.parametrize("dtype", [">f4", ">f8", ">i8", ">i4", ">f2"])
def test_tensor_round_trip_of_non_native_byte_order_keeps_values(dtype: str) -> None:
    """A big-endian array must arrive with the same values, not with its bytes reinterpreted."""
    arr = np.arange(-3, 9, dtype=dtype).reshape(3, 4)
    out = _roundtrip({"x": arr})["x"]
    np.testing.assert_array_equal(out, arr)


def test_non_contiguous_tensors_round_trip() -> None:
    base = np.arange(60, dtype=np.float32).reshape(6, 10)
    views = {"t": base.T, "s": base[::2, 1::3], "f": np.asfortranarray(base)}
    out = _roundtrip(views)
    for k, v in views.items():
        np.testing.assert_array_equal(out[k], v)


def test_large_frame_round_trips_through_a_pipe() -> None:
    """write_frame and FrameReader over a real pipe, with a frame far bigger than the pipe buffer."""
    rng = np.random.default_rng(0)
    tensors = [rng.standard_normal((512, 1024)).astype(np.float32), np.arange(7, dtype=np.int64)]
    parts = protocol.encode_tensors(protocol.TENSOR_REPLY, tensors)
    r, w = os.pipe()
    try:
        t = threading.Thread(target=protocol.write_frame, args=(w, parts))
        t.start()
        body = protocol.FrameReader(r).read()
        _, out = protocol.decode_tensors(body, copy=True)
        t.join()
    finally:
        os.close(r)
        os.close(w)
    for got, want in zip(out, tensors):
        _assert_same_tensor(got, want)


def test_read_frame_refuses_an_oversized_length_without_allocating() -> None:
    r, w = os.pipe()
    try:
        os.write(w, struct.pack("<I", 2**32 - 1))
        with pytest.raises(ProtocolError):
            protocol.read_frame(r)
    finally:
        os.close(r)
        os.close(w)
