"""A compact, versioned container for defense state: a small JSON header, then raw arrays.

Layout: ``magic (4 bytes) | version (u16 BE) | header length (u32 BE) | header | arrays``. The
header is UTF-8 JSON ``{"fields": {...}, "arrays": [[name, dtype, shape], ...]}``; the arrays
follow back to back in that order, little-endian, C order. A reader checks every length against
the blob before it looks at the data, so a corrupted or forged blob raises :class:`FormatError`
and never allocates more than the blob's own size (arrays are read-only views into the blob).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from ..errors import FormatError

MAX_HEADER = 1 << 20
DTYPES = ("<f4", "<f8", "<i4", "<i8", "|u1")
_PREFIX = struct.Struct(">4sHI")


def damaged(what: str, why: str) -> FormatError:
    return FormatError(f"the {what} is damaged: {why}",
                       hint="the sealed defense state cannot be used; restore the newest copy (an older one "
                            "is detected as rollback)")


def pack(magic: bytes, version: int, fields: Mapping[str, Any], arrays: Mapping[str, npt.NDArray[Any]]) -> bytes:
    descr: list[list[Any]] = []
    chunks: list[bytes] = []
    for name, arr in arrays.items():
        a = np.ascontiguousarray(arr)
        dtype = a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype
        a = a.astype(dtype, copy=False)
        if dtype.str not in DTYPES:
            raise ValueError(f"dtype {dtype.str} of {name} cannot be stored")
        descr.append([name, dtype.str, list(a.shape)])
        chunks.append(a.tobytes())
    header = json.dumps({"fields": dict(fields), "arrays": descr}, separators=(",", ":"), sort_keys=True,
                        allow_nan=False).encode()
    if len(header) > MAX_HEADER:
        raise ValueError("defense state header too large")
    return b"".join([_PREFIX.pack(magic, version, len(header)), header, *chunks])


def unpack(blob: bytes, magic: bytes, version: int, what: str,
           max_dims: int = 3) -> tuple[dict[str, Any], dict[str, npt.NDArray[Any]]]:
    """The fields and read-only array views of a blob made by :func:`pack`; checks only the framing."""
    if not isinstance(blob, bytes | bytearray | memoryview):
        raise damaged(what, "not bytes")
    view = memoryview(blob).cast("B")
    if len(view) < _PREFIX.size:
        raise damaged(what, "truncated")
    got_magic, got_version, hlen = _PREFIX.unpack_from(view, 0)
    if got_magic != magic:
        raise damaged(what, "wrong magic")
    if got_version != version:
        raise damaged(what, f"version {got_version}, this build reads {version}")
    if hlen > MAX_HEADER or _PREFIX.size + hlen > len(view):
        raise damaged(what, "bad header length")
    try:
        header = json.loads(bytes(view[_PREFIX.size:_PREFIX.size + hlen]))
    except (ValueError, UnicodeDecodeError, RecursionError):  # deep nesting: RecursionError (fuzzing)
        raise damaged(what, "header is not JSON") from None
    if not isinstance(header, dict) or set(header) != {"fields", "arrays"} or not isinstance(header["fields"], dict) \
            or not isinstance(header["arrays"], list):
        raise damaged(what, "bad header")
    offset = _PREFIX.size + hlen
    arrays: dict[str, npt.NDArray[Any]] = {}
    for item in header["arrays"]:
        if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], str) and item[1] in DTYPES
                and isinstance(item[2], list) and len(item[2]) <= max_dims
                and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 40 for d in item[2])):
            raise damaged(what, "bad array description")
        name, dtype_s, shape = item
        if name in arrays:
            raise damaged(what, f"array {name} twice")
        dtype = np.dtype(dtype_s)
        count = 1
        for d in shape:
            count *= d
        nbytes = count * dtype.itemsize
        if offset + nbytes > len(view):
            raise damaged(what, "truncated array data")
        arr = np.frombuffer(view, dtype=dtype, count=count, offset=offset).reshape(shape)
        arrays[name] = arr
        offset += nbytes
    if offset != len(view):
        raise damaged(what, "trailing bytes")
    return header["fields"], arrays


def get_int(fields: Mapping[str, Any], key: str, low: int, high: int, what: str) -> int:
    v = fields.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
        raise damaged(what, f"{key} out of range")
    return v


def get_float(fields: Mapping[str, Any], key: str, what: str, *, optional: bool = False) -> float:
    v = fields.get(key)
    if optional and v is None:
        return float("nan")
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise damaged(what, f"{key} is not a number")
    return float(v)


def get_bool(fields: Mapping[str, Any], key: str, what: str) -> bool:
    v = fields.get(key)
    if not isinstance(v, bool):
        raise damaged(what, f"{key} is not a boolean")
    return v


def get_array(arrays: Mapping[str, npt.NDArray[Any]], key: str, dtype: str, shape: tuple[int, ...],
              what: str) -> npt.NDArray[Any]:
    a = arrays.get(key)
    if a is None or a.dtype.str != dtype or a.shape != shape:
        raise damaged(what, f"array {key} missing or of the wrong type or shape")
    return a
