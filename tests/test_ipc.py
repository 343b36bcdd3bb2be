"""The fast path of the `infer` ECALL: binary tensor frames, the frame reader, shared memory.

Small tensors travel inline in the frame; large ones through a sealed memfd shared by host and
enclave, which the enclave copies out of before using (the host could change shared pages).
"""

from __future__ import annotations

import fcntl
import os
import struct
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import Packed, ProviderKey, pack_model
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from mlcapsule.enclave import protocol as P
from mlcapsule.enclave.errors import InputError, ProtocolError

DTYPES = ["float32", "float64", "float16", "int64", "int32", "int16", "int8", "uint8", "bool"]


def _frame(parts: list[Any]) -> bytearray:
    """The body of a frame made for writev (without its length prefix)."""
    data = b"".join(bytes(p) for p in parts)
    (n,) = struct.unpack_from("<I", data)
    assert n == len(data) - 4
    return bytearray(data[4:])


def _array(dtype: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype == "bool":
        return rng.integers(0, 2, shape).astype(bool)
    if dtype.startswith("float"):
        return rng.standard_normal(shape).astype(dtype)
    return rng.integers(-100, 100, shape).astype(dtype) if dtype != "uint8" else rng.integers(0, 255, shape).astype(dtype)


@pytest.fixture
def arenas() -> Any:
    host = P.SharedArena.create()
    enclave = P.SharedArena.adopt(os.dup(host.fd))
    yield host, enclave
    host.close()
    enclave.close()


# -- frames -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (1, 7), (2, 3, 4)])
def test_tensor_frames_round_trip_inline(dtype: str, shape: tuple[int, ...]) -> None:
    x = _array(dtype, shape)
    kind, (y,) = P.decode_tensors(_frame(P.encode_tensors(P.TENSOR_REQUEST, [x])))
    assert kind == P.TENSOR_REQUEST and y.dtype == x.dtype and y.shape == x.shape
    np.testing.assert_array_equal(y, x)


def test_tensor_frames_round_trip_through_shared_memory(arenas: Any) -> None:
    host, enclave = arenas
    xs = [_array("float32", (4, 50_000), 1), _array("int64", (3,)), _array("uint8", (100_000,), 2),
          _array("float64", (0, 5)), _array("bool", (40_000,), 3)]
    kind, ys = P.decode_tensors(_frame(P.encode_tensors(P.TENSOR_REPLY, xs, host)), enclave)
    assert kind == P.TENSOR_REPLY
    for x, y in zip(xs, ys):
        assert y.dtype == x.dtype and y.shape == x.shape
        np.testing.assert_array_equal(y, x)


def test_large_tensors_do_not_travel_inline_and_small_ones_do(arenas: Any) -> None:
    host, enclave = arenas
    big, small = _array("float32", (1, 3, 224, 224)), _array("float32", (1, 64))
    body = _frame(P.encode_tensors(P.TENSOR_REQUEST, [big, small], host))
    assert len(body) < 1024 + small.nbytes  # the 600 KB tensor is not in the frame
    assert host.size >= big.nbytes
    _, (b, s) = P.decode_tensors(body, enclave)
    np.testing.assert_array_equal(b, big)
    np.testing.assert_array_equal(s, small)
    # Without an arena everything is inline.
    assert len(_frame(P.encode_tensors(P.TENSOR_REQUEST, [big, small]))) > big.nbytes


def test_the_enclave_copies_shared_tensors_out_of_shared_memory(arenas: Any) -> None:
    host, enclave = arenas
    x = np.arange(100_000, dtype=np.float32)
    body = _frame(P.encode_tensors(P.TENSOR_REQUEST, [x], host))
    _, (y,) = P.decode_tensors(body, enclave)
    host.write(0, np.zeros_like(x))  # the host changes the shared pages afterwards
    np.testing.assert_array_equal(y, x)


def test_inline_tensors_are_views_unless_copied() -> None:
    x = np.arange(10, dtype=np.int32)
    body = _frame(P.encode_tensors(P.TENSOR_REQUEST, [x]))
    _, (view,) = P.decode_tensors(body)
    _, (copy,) = P.decode_tensors(body, copy=True)
    body[-1] ^= 0xFF
    assert view[-1] != x[-1] and copy[-1] == x[-1]


def _corruptions(body: bytearray) -> list[bytearray]:
    out = []

    def at(off: int, fmt: str, value: int) -> bytearray:
        b = bytearray(body)
        struct.pack_into(fmt, b, off, value)
        return b

    out.append(body[:5])  # truncated prefix
    out.append(body[:-1])  # truncated data
    out.append(body + b"\0")  # trailing bytes
    out.append(at(0, "<B", ord("X")))  # magic
    out.append(at(2, "<B", 9))  # version
    out.append(at(3, "<B", 7))  # kind
    out.append(at(4, "<I", 1))  # flags
    out.append(at(8, "<I", 65))  # count over the cap
    out.append(at(8, "<I", 2))  # count beyond the descriptors
    out.append(at(12, "<B", 40))  # dtype code
    out.append(at(13, "<B", 17))  # rank
    out.append(at(14, "<B", 1))  # place: shared memory, but there is none
    out.append(at(14, "<B", 2))  # place
    out.append(at(16, "<I", 1))  # reserved
    out.append(at(20, "<Q", 4))  # inline offset out of place
    out.append(at(28, "<Q", 10))  # size does not match the shape
    out.append(at(36, "<Q", 2**62))  # a huge dimension
    return out


def test_decode_rejects_every_malformed_frame_with_a_protocol_error() -> None:
    body = _frame(P.encode_tensors(P.TENSOR_REQUEST, [np.ones((1, 4), np.float32)]))
    for bad in _corruptions(body):
        with pytest.raises(ProtocolError):
            P.decode_tensors(bad)


def test_a_shared_tensor_outside_the_arena_is_refused(arenas: Any) -> None:
    host, enclave = arenas
    body = _frame(P.encode_tensors(P.TENSOR_REQUEST, [np.ones(50_000, np.float32)], host))
    struct.pack_into("<Q", body, 20, host.size)  # offset: past the end of the shared memory
    with pytest.raises(ProtocolError, match="outside"):
        P.decode_tensors(body, enclave)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_decode_on_arbitrary_bytes_raises_only_protocol_errors(data: bytes) -> None:
    for body in (bytearray(data), bytearray(b"MC\x01\x02" + data)):
        try:
            P.decode_tensors(body)
        except ProtocolError:
            pass


# -- shared memory ----------------------------------------------------------------------------------
def test_the_arena_is_sealed_against_shrinking(arenas: Any) -> None:
    host, enclave = arenas
    host.reserve(3 << 20)
    with pytest.raises(PermissionError):
        os.ftruncate(host.fd, 1 << 20)
    seals = fcntl.fcntl(host.fd, fcntl.F_GET_SEALS)
    assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_SEAL


def test_the_enclave_refuses_shared_memory_that_could_shrink() -> None:
    fd = os.memfd_create("unsealed", os.MFD_CLOEXEC)
    try:
        with pytest.raises(ProtocolError, match="sealed"):
            P.SharedArena.adopt(fd)
    finally:
        os.close(fd)
    r, w = os.pipe()
    try:
        with pytest.raises(ProtocolError):
            P.SharedArena.adopt(r)
    finally:
        os.close(r)
        os.close(w)


def test_either_side_grows_the_arena_and_the_other_follows(arenas: Any) -> None:
    host, enclave = arenas
    small = _array("float32", (20_000,))
    _, (y,) = P.decode_tensors(_frame(P.encode_tensors(P.TENSOR_REQUEST, [small], host)), enclave)
    big = _array("float32", (2_000_000,), 5)  # 8 MB: the enclave's reply grows it
    _, (z,) = P.decode_tensors(_frame(P.encode_tensors(P.TENSOR_REPLY, [big], enclave)), host, copy=True)
    np.testing.assert_array_equal(z, big)
    assert host.size >= big.nbytes and enclave.size >= big.nbytes


# -- the frame reader -------------------------------------------------------------------------------
def test_frame_reader_reads_back_to_back_frames_and_frames_larger_than_its_buffer() -> None:
    r, w = os.pipe()
    frames = [P.encode_tensors(P.TENSOR_REQUEST, [np.full(n, i, np.float32)]) for i, n in
              enumerate([1, 10, 300_000, 5, 70_000, 0])]
    t = threading.Thread(target=lambda: [P.write_frame(w, f) for f in frames])
    t.start()
    try:
        reader = P.FrameReader(r, size=64 * 1024)
        for i, n in enumerate([1, 10, 300_000, 5, 70_000, 0]):
            _, (x,) = P.decode_tensors(reader.read(), copy=True)
            assert x.shape == (n,) and (n == 0 or x[0] == i)
    finally:
        t.join()
        os.close(w)
    with pytest.raises(EOFError):
        reader.read()
    os.close(r)


def test_frame_reader_refuses_an_oversized_length() -> None:
    r, w = os.pipe()
    os.write(w, struct.pack("<I", P.MAX_FRAME + 1))
    with pytest.raises(ProtocolError):
        P.FrameReader(r).read()
    os.close(r)
    os.close(w)


# -- end to end -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def doubler(tmp_path_factory: pytest.TempPathFactory, provider_key: ProviderKey) -> Packed:
    """y = 2 x on [N, 50000] float32 (200 KB per row), plus a small second output."""
    g = helper.make_graph(
        [helper.make_node("Add", ["input", "input"], ["y"]), helper.make_node("ReduceSum", ["input"], ["s"], keepdims=0)],
        "doubler", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 50_000])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 50_000]),
         helper.make_tensor_value_info("s", TensorProto.FLOAT, [])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return pack_model(model, tmp_path_factory.mktemp("ipc") / "doubler.capsule", provider_key, tune_runtime=False)


def test_capsule_round_trip_passes_large_tensors_through_shared_memory(tmp_path: Path, doubler: Packed,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    written: list[int] = []
    read: list[int] = []
    real_write, real_read = P.write_frame, P.FrameReader.read

    def spy_write(fd: int, parts: list[Any]) -> None:
        written.append(sum(len(memoryview(p).cast("B")) for p in parts))
        real_write(fd, parts)

    def spy_read(self: P.FrameReader) -> memoryview:
        body = real_read(self)
        read.append(len(body))
        return body

    x = np.random.default_rng(3).standard_normal((3, 50_000)).astype(np.float32)
    with doubler.open(tmp_path) as cap:
        monkeypatch.setattr(P, "write_frame", spy_write)
        monkeypatch.setattr(P.FrameReader, "read", spy_read)
        out = cap.run({"input": x})
        monkeypatch.undo()
        assert cap._enclave._arena is not None and cap._enclave.info["shared_memory"]
        assert cap._enclave._arena.size >= x.nbytes
        again = cap.run({"input": x})  # the arena is reused
    np.testing.assert_array_equal(out["y"], 2 * x)
    np.testing.assert_allclose(out["s"], x.sum(), rtol=1e-4)
    np.testing.assert_array_equal(again["y"], out["y"])
    assert written and max(written) < 1024, written  # 600 KB went through shared memory, not the pipe
    assert read and max(read) < 1024, read
    out["y"][0, 0] = 123.0  # the outputs are the caller's own arrays, not views of shared memory
    assert again["y"][0, 0] != 123.0


def test_without_shared_memory_tensors_travel_inline(tmp_path: Path, doubler: Packed) -> None:
    from mlcapsule.host import EnclaveProcess

    x = np.ones((2, 50_000), np.float32)
    with EnclaveProcess(doubler.path, state_dir=tmp_path / "s", dev_key=doubler.key_path, shared_memory=False) as e:
        e.call("load", {"dev_key": str(doubler.key_path)})
        y, s = e.infer([x])
    np.testing.assert_array_equal(y, 2 * x)


def test_the_worker_answers_bad_tensor_frames_with_an_error_and_keeps_serving(tmp_path: Path, doubler: Packed) -> None:
    x = np.ones((1, 50_000), np.float32)
    with doubler.open(tmp_path) as cap:
        e = cap._enclave
        with pytest.raises(InputError):
            e.infer([x, x])  # the model takes one input
        with pytest.raises(InputError):
            e.infer([np.ones((1, 7), np.float32)])  # wrong shape
        with pytest.raises(InputError):
            e.infer([np.ones((1, 50_000), np.float64)])  # wrong dtype
        body = _frame(P.encode_tensors(P.TENSOR_REQUEST, [np.ones((1, 4), np.float32)]))
        body[12] = 99  # an unknown dtype code
        with e._lock:
            P.write_frame(e._to_worker, [struct.pack("<I", len(body)), bytes(body)])
            reply = P.decode(bytearray(e._reader.read()))
        assert reply.header["error"]["type"] == "ProtocolError"
        np.testing.assert_array_equal(cap.predict(x), 2 * x)  # still serving
