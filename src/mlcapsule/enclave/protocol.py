"""The host <-> enclave message protocol (the ECALLs), version 1.

Pure encoding and decoding, no I/O policy. One message is one frame::

    u32le  body length (<= MAX_FRAME)
    body:  "MC" | u8 protocol version (1) | u8 kind (0 request, 1 reply)
           | u32le header length (<= MAX_HEADER) | header (JSON object)
           | u32le buffer count (<= MAX_BUFFERS) | { u64le length | bytes }*

A request header is ``{"op": NAME, "args": {...}}``; a reply header is ``{"ok": {...}}`` or
``{"error": {"type": CLASS, "message": ..., "hint": ...}}``. Tensors travel as raw buffers,
described in the header as ``{"name", "dtype", "shape", "buf"}``, and are decoded as views of
the received frame (no copy). Every length is checked against its cap and against what is left
of the frame before anything is sliced or allocated.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ProtocolError

PROTOCOL_VERSION = 1
MAX_FRAME = 2 * 1024 * 1024 * 1024 - 1
MAX_HEADER = 16 * 1024 * 1024
MAX_BUFFERS = 4096
REQUEST, REPLY = 0, 1
#: The ECALLs. Nothing secret crosses this interface in either direction.
OPS = ("hello", "load", "setup_begin", "setup_finish", "infer", "apply_voucher", "usage_report", "usage_ack",
       "status", "shutdown")
_DTYPES = {"float32", "float64", "float16", "int64", "int32", "int16", "int8", "uint8", "bool"}
_LEN = struct.Struct("<I")
_PREFIX = struct.Struct("<2sBBI")


@dataclass
class Message:
    kind: int
    header: dict[str, Any]
    buffers: list[memoryview] = field(default_factory=list)


def encode(kind: int, header: Mapping[str, Any], buffers: Sequence[memoryview | bytes] = ()) -> list[memoryview | bytes]:
    """The frame as a list of pieces for ``os.writev`` (tensor bytes are not copied)."""
    hdr = json.dumps(header, separators=(",", ":")).encode()
    if len(hdr) > MAX_HEADER or len(buffers) > MAX_BUFFERS:
        raise ProtocolError("message too large")
    parts: list[memoryview | bytes] = [b"", _PREFIX.pack(b"MC", PROTOCOL_VERSION, kind, len(hdr)), hdr,
                                       _LEN.pack(len(buffers))]
    for b in buffers:
        parts += [struct.pack("<Q", len(b)), b]
    total = sum(len(p) for p in parts)
    if total > MAX_FRAME:
        raise ProtocolError("message too large")
    parts[0] = _LEN.pack(total)
    return parts


def decode(body: bytearray | memoryview) -> Message:
    """Parse one frame body. Raises ProtocolError on anything malformed."""
    view = memoryview(body)
    if len(view) < _PREFIX.size + 4:
        raise ProtocolError("truncated message")
    magic, version, kind, hlen = _PREFIX.unpack_from(view, 0)
    if magic != b"MC":
        raise ProtocolError("not an enclave message")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"enclave protocol version {version} is not {PROTOCOL_VERSION}",
                            hint="host and enclave must come from the same mlcapsule installation")
    if kind not in (REQUEST, REPLY):
        raise ProtocolError("bad message kind")
    pos = _PREFIX.size
    if hlen > MAX_HEADER or pos + hlen + 4 > len(view):
        raise ProtocolError("bad header length")
    try:
        header = json.loads(bytes(view[pos:pos + hlen]))
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError("header is not JSON") from e
    if not isinstance(header, dict):
        raise ProtocolError("header is not an object")
    pos += hlen
    (count,) = _LEN.unpack_from(view, pos)
    pos += 4
    if count > MAX_BUFFERS:
        raise ProtocolError("too many buffers")
    buffers = []
    for _ in range(count):
        if pos + 8 > len(view):
            raise ProtocolError("truncated buffer length")
        (n,) = struct.unpack_from("<Q", view, pos)
        pos += 8
        if n > len(view) - pos:
            raise ProtocolError("buffer runs past the message")
        buffers.append(view[pos:pos + n])
        pos += n
    if pos != len(view):
        raise ProtocolError("trailing bytes after message")
    return Message(kind, header, buffers)


def pack_tensors(tensors: Mapping[str, np.ndarray], buffers: list[memoryview | bytes]) -> list[dict[str, Any]]:
    """Describe ``tensors`` for a header and append their bytes (views, not copies) to ``buffers``."""
    out = []
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        if arr.dtype.name not in _DTYPES:
            raise ProtocolError(f"tensor {name!r} has unsupported dtype {arr.dtype}")
        out.append({"name": name, "dtype": arr.dtype.name, "shape": list(arr.shape), "buf": len(buffers)})
        buffers.append(memoryview(arr).cast("B") if arr.size else b"")
    return out


def unpack_tensors(desc: Any, buffers: Sequence[memoryview]) -> dict[str, np.ndarray]:
    if not isinstance(desc, list):
        raise ProtocolError("tensors must be a list")
    out: dict[str, np.ndarray] = {}
    for d in desc:
        try:
            name, dtype, shape, idx = d["name"], np.dtype(d["dtype"]), tuple(int(s) for s in d["shape"]), int(d["buf"])
        except (KeyError, TypeError, ValueError) as e:
            raise ProtocolError("malformed tensor description") from e
        if dtype.name not in _DTYPES or not 0 <= idx < len(buffers) or any(s < 0 for s in shape) or len(shape) > 16:
            raise ProtocolError("malformed tensor description")
        buf = buffers[idx]
        if int(np.prod(shape, dtype=np.int64)) * dtype.itemsize != len(buf):
            raise ProtocolError(f"tensor {name!r} size does not match its shape")
        out[str(name)] = np.frombuffer(buf, dtype=dtype).reshape(shape) if len(buf) else np.zeros(shape, dtype)
    return out


# -- framing over file descriptors ------------------------------------------------------------
def _read_exact(fd: int, n: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = os.readv(fd, [view[got:]])
        if k == 0:
            raise EOFError("peer closed the channel")
        got += k
    return buf


def read_frame(fd: int) -> Message:
    (n,) = _LEN.unpack(_read_exact(fd, 4))
    if n > MAX_FRAME:
        raise ProtocolError("frame too large")
    return decode(_read_exact(fd, n))


def write_frame(fd: int, parts: list[memoryview | bytes]) -> None:
    views = [memoryview(p).cast("B") if not isinstance(p, bytes) else memoryview(p) for p in parts if len(p)]
    while views:
        n = os.writev(fd, views[:1024])
        while n and views:
            if n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][n:]
                n = 0
