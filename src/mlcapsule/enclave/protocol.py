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
import math
import os
import struct
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._util import munlock
from .errors import ProtocolError

PROTOCOL_VERSION = 1
MAX_FRAME = 2 * 1024 * 1024 * 1024 - 1
MAX_HEADER = 16 * 1024 * 1024
MAX_BUFFERS = 4096
REQUEST, REPLY = 0, 1
#: The ECALLs are typed and parsed in ``ecalls.py`` (the only tensors are in the binary infer
#: frame below). Nothing secret crosses this interface in either direction.
#: The largest tensor either side accepts, in bytes, and the most dimensions it may have. Every
#: dimension counts at least 1 against the cap (``max(d, 1)``), so a zero-size tensor cannot
#: declare dimensions numpy refuses either. Checked on the declared numbers, with Python ints,
#: before any numpy call or allocation (red team, issue 9: numpy's own ValueError came out).
MAX_TENSOR_BYTES = 1 << 36
MAX_RANK = 16
_LEN = struct.Struct("<I")
_PREFIX = struct.Struct("<2sBBI")


@dataclass
class Message:
    kind: int
    header: dict[str, Any]
    buffers: list[memoryview] = field(default_factory=list)


def encode(kind: int, header: Mapping[str, Any],
           buffers: Sequence[memoryview | bytes] = ()) -> list[memoryview | bytes]:
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
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
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


def check_shape(shape: Sequence[int], itemsize: int) -> int:
    """The byte size of a tensor of ``shape``, after checking the rank and every dimension
    against the caps (:data:`MAX_RANK`, :data:`MAX_TENSOR_BYTES`); Python ints only, so nothing
    overflows and nothing is allocated. Raises ProtocolError."""
    if len(shape) > MAX_RANK:
        raise ProtocolError("a tensor has too many dimensions")
    room = MAX_TENSOR_BYTES // itemsize
    for d in shape:
        if d < 0 or d > room:
            raise ProtocolError("a tensor is too large")
        room //= max(d, 1)
    return math.prod(shape) * itemsize


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


# -- tensor frames: the fast path of `infer` ----------------------------------------------------
#
# A JSON header costs more than a small model's inference, so `infer` has its own binary frame
# (same length prefix, same "MC" | version | kind start, so one reader handles both)::
#
#     body: "MC" | u8 version (1) | u8 kind (2 request, 3 reply) | u32le flags (0) | u32le count
#           count x { u8 dtype | u8 ndim | u8 place | u8 0 | u32le 0 | u64le offset | u64le nbytes
#                     | ndim x u64le dim }
#           inline data: the inline tensors' bytes, back to back, in order
#
# Tensors travel positionally, in the manifest's order of inputs (request) or outputs (reply).
# ``place`` 0: inline, ``offset`` counts from the start of the inline data; ``place`` 1: in the
# shared-memory arena (:class:`SharedArena`), ``offset`` counts from its start. Errors still come
# back as JSON replies (kind 1). Every field is checked before anything is sliced or allocated.
TENSOR_REQUEST, TENSOR_REPLY = 2, 3
MAX_TENSORS = 64
#: Tensors of at least this many bytes go through shared memory when there is an arena.
INLINE_MAX = 32 * 1024
_T_DTYPES = ("float32", "float64", "float16", "int64", "int32", "int16", "int8", "uint8", "bool")
_T_CODE = {name: i for i, name in enumerate(_T_DTYPES)}
_T_NP = tuple(np.dtype(n) for n in _T_DTYPES)
_T_PREFIX = struct.Struct("<2sBBII")
_T_DESC = struct.Struct("<BBBBIQQ")
_ARENA_ALIGN = 64


def frame_kind(body: bytearray | memoryview) -> int:
    """The kind byte of a frame body (-1 if it is too short to say)."""
    return body[3] if len(body) >= 4 else -1


#: Frame heads of small, native, contiguous tensor lists, by (kind, dtypes and shapes): a query
#: stream repeats one signature, and its head is the same bytes every time.
_HEADS: dict[tuple[Any, ...], tuple[bytes, bytes]] = {}
_HEADS_MAX = 64


def encode_tensors(kind: int, arrays: Sequence[np.ndarray], arena: SharedArena | None = None,
                   *, inline_max: int = INLINE_MAX) -> list[memoryview | bytes]:
    """A tensor frame for ``os.writev``. Large tensors are copied into ``arena`` (from offset 0);
    small ones travel inline as views (not copied)."""
    try:
        key = (kind, inline_max, *[(a.dtype.num, a.shape) for a in arrays])
        cached = _HEADS.get(key)
    except AttributeError:
        cached = None
    if cached is not None and all(a.flags.c_contiguous and a.dtype.isnative for a in arrays):
        return [cached[0], cached[1], *[a.data.cast("B") for a in arrays if a.nbytes]]
    parts = _encode_tensors(kind, arrays, arena, inline_max=inline_max)
    if (len(_HEADS) < _HEADS_MAX and len(parts) == 2 + sum(1 for a in arrays if a.nbytes)
            and all(a.nbytes < inline_max and a.flags.c_contiguous and a.dtype.isnative for a in arrays)):
        _HEADS[key] = (bytes(parts[0]), bytes(parts[1]))
    return parts


def _encode_tensors(kind: int, arrays: Sequence[np.ndarray], arena: SharedArena | None = None,
                    *, inline_max: int = INLINE_MAX) -> list[memoryview | bytes]:
    if len(arrays) > MAX_TENSORS:
        raise ProtocolError("too many tensors")
    head = bytearray(_T_PREFIX.size + sum(_T_DESC.size + 8 * a.ndim for a in arrays))
    _T_PREFIX.pack_into(head, 0, b"MC", PROTOCOL_VERSION, kind, 0, len(arrays))
    parts: list[memoryview | bytes] = [b"", memoryview(head)]
    big = arena is not None and any(a.nbytes >= inline_max for a in arrays)
    if big:
        assert arena is not None
        arena.reserve(sum(-(-a.nbytes // _ARENA_ALIGN) * _ARENA_ALIGN for a in arrays if a.nbytes >= inline_max))
    pos, inline, shared = _T_PREFIX.size, 0, 0
    for a in arrays:
        code = _T_CODE.get(a.dtype.name)
        if code is None or a.ndim > 16:
            raise ProtocolError(f"unsupported tensor {a.dtype} of rank {a.ndim}")
        if not a.dtype.isnative:  # the frame carries native byte order (a big-endian array keeps its values)
            a = a.astype(a.dtype.newbyteorder("="))
        if not a.flags.c_contiguous:
            a = np.ascontiguousarray(a)
        n = a.nbytes
        if big and n >= inline_max:
            assert arena is not None
            arena.write(shared, a)
            _T_DESC.pack_into(head, pos, code, a.ndim, 1, 0, 0, shared, n)
            shared += -(-n // _ARENA_ALIGN) * _ARENA_ALIGN
        else:
            _T_DESC.pack_into(head, pos, code, a.ndim, 0, 0, 0, inline, n)
            if n:
                parts.append(a.data.cast("B"))
            inline += n
        pos += _T_DESC.size
        if a.ndim:
            struct.pack_into(f"<{a.ndim}Q", head, pos, *a.shape)
            pos += 8 * a.ndim
    total = len(head) + inline
    if total > MAX_FRAME:
        raise ProtocolError("message too large")
    parts[0] = _LEN.pack(total)
    return parts


def decode_tensors(body: bytearray | memoryview, arena: SharedArena | None = None, *,
                   copy: bool = False, reuse: list[np.ndarray | None] | None = None) -> tuple[int, list[np.ndarray]]:
    """(kind, tensors) of a tensor frame. Inline tensors are views of ``body`` unless ``copy``;
    tensors in shared memory are always copied out (the other side may change them), into the
    array at the same position of ``reuse`` when it has the same shape and dtype (the enclave
    keeps its input buffers from one call to the next: fresh pages cost a fault each)."""
    view = memoryview(body)
    last = _LAST_HEAD
    if last is not None and len(view) == last[1] and view[:len(last[0])] == last[0]:
        # The same head as the last frame decoded (a query stream repeats one signature): the
        # same bytes were checked then, and the total length matches, so the data is in place.
        kind, pos, parsed = last[2], len(last[0]), last[3]
        if copy:
            return kind, [np.frombuffer(view, dtype=d, count=c, offset=pos + o).reshape(sh).copy() if c else
                          np.empty(sh, d) for d, sh, o, c in parsed]
        return kind, [np.frombuffer(view, dtype=d, count=c, offset=pos + o).reshape(sh) if c else
                      np.empty(sh, d) for d, sh, o, c in parsed]
    return _decode_tensors(view, arena, copy=copy, reuse=reuse)


#: (head bytes, frame length, kind, [(dtype, shape, offset, count)]) of the last inline-only frame.
_LAST_HEAD: tuple[bytes, int, int, list[tuple[np.dtype, tuple[int, ...], int, int]]] | None = None


def _decode_tensors(view: memoryview, arena: SharedArena | None = None, *,
                    copy: bool = False, reuse: list[np.ndarray | None] | None = None) -> tuple[int, list[np.ndarray]]:
    global _LAST_HEAD
    if len(view) < _T_PREFIX.size:
        raise ProtocolError("truncated message")
    magic, version, kind, flags, count = _T_PREFIX.unpack_from(view, 0)
    if magic != b"MC" or version != PROTOCOL_VERSION or kind not in (TENSOR_REQUEST, TENSOR_REPLY) or flags:
        raise ProtocolError("not a tensor message")
    if count > MAX_TENSORS:
        raise ProtocolError("too many tensors")
    pos = _T_PREFIX.size
    descs = []
    for _ in range(count):
        if pos + _T_DESC.size > len(view):
            raise ProtocolError("truncated tensor description")
        code, ndim, place, r0, r1, offset, nbytes = _T_DESC.unpack_from(view, pos)
        pos += _T_DESC.size
        if code >= len(_T_DTYPES) or ndim > MAX_RANK or place > 1 or r0 or r1 or pos + 8 * ndim > len(view):
            raise ProtocolError("malformed tensor description")
        shape = struct.unpack_from(f"<{ndim}Q", view, pos) if ndim else ()
        pos += 8 * ndim
        # Every dimension against the caps before numpy sees the shape: a zero-size tensor
        # with huge dimensions made np.empty raise ValueError.
        if check_shape(shape, _T_NP[code].itemsize) != nbytes:
            raise ProtocolError("a tensor's size does not match its shape")
        if place == 1 and (arena is None or not arena.holds(offset, nbytes)):
            # Checked before anything is allocated: a tensor declaring 4 TiB allocates nothing.
            raise ProtocolError("a tensor lies outside the shared memory" if arena is not None
                                else "a tensor is in shared memory, but there is none")
        descs.append((_T_NP[code], shape, place, offset, nbytes))
    out: list[np.ndarray] = []
    inline = 0
    for pos_i, (dtype, shape, place, offset, nbytes) in enumerate(descs):
        if place == 0:
            if offset != inline or pos + offset + nbytes > len(view):
                raise ProtocolError("inline tensor data out of place")
            inline += nbytes
            if nbytes == 0:
                out.append(np.empty(shape, dtype))
                continue
            arr = np.frombuffer(view, dtype=dtype, count=nbytes // dtype.itemsize, offset=pos + offset).reshape(shape)
            out.append(arr.copy() if copy else arr)
        else:
            if arena is None:
                raise ProtocolError("a tensor is in shared memory, but there is none")
            old = reuse[pos_i] if reuse is not None and pos_i < len(reuse) else None
            arr = old if old is not None and old.shape == shape and old.dtype == dtype else np.empty(shape, dtype)
            if reuse is not None:
                reuse.extend([None] * (pos_i + 1 - len(reuse)))
                reuse[pos_i] = arr
            if nbytes:
                try:
                    arena.read_into(offset, arr.data.cast("B"))
                except (OSError, ValueError, OverflowError) as e:  # e.g. mmap refused: the peer's fault
                    raise ProtocolError("a tensor in shared memory cannot be read") from e
            out.append(arr)
    if pos + inline != len(view):
        raise ProtocolError("trailing bytes after message")
    if all(place == 0 for _, _, place, _, _ in descs):
        _LAST_HEAD = (bytes(view[:pos]), len(view), kind,
                      [(d, sh, o, nb // d.itemsize) for d, sh, _, o, nb in descs])
    return kind, out


#: How long a reader polls its pipe before it blocks (see :meth:`FrameReader._spin`).
SPIN_SECONDS = 100e-6
#: ... which host and enclave do only while calls take less than this: polling beside a model
#: that keeps every CPU busy slows it down more than a wake-up costs.
SPIN_IF_UNDER = 1e-3


class FrameReader:
    """Reads length-prefixed frames from a pipe with as few ``readv`` calls as possible (usually
    one per frame). A frame's body is returned as a view that is valid until the next read."""

    def __init__(self, fd: int, size: int = 256 * 1024, spin: float = SPIN_SECONDS) -> None:
        import select

        self.spin = spin
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)
        self.fd = fd
        self._buf = bytearray(size)
        self._mv = memoryview(self._buf)
        self._start = self._end = 0

    def _fill(self, need: int) -> None:
        if self._end - self._start >= need:
            return
        if self._start + need > len(self._buf):
            n = self._end - self._start
            self._buf[:n] = self._buf[self._start:self._end]
            self._start, self._end = 0, n
        while self._end - self._start < need:
            if self.spin:
                self._spin()
            k = os.readv(self.fd, [self._mv[self._end:]])
            if k == 0:
                raise EOFError("peer closed the channel")
            self._end += k

    def _spin(self) -> None:
        """Poll for up to ``spin`` seconds before blocking: on an idle machine, waking a blocked
        process costs more (100+ µs here) than a small model's whole inference."""
        end = time.perf_counter() + self.spin
        poll, yield_ = self._poll.poll, os.sched_yield
        while time.perf_counter() < end:
            if poll(0):
                return
            yield_()  # let the peer run if it shares this CPU

    def read(self) -> memoryview:
        self._fill(4)
        (n,) = _LEN.unpack_from(self._buf, self._start)
        if n > MAX_FRAME:
            raise ProtocolError("frame too large")
        if n + 4 <= len(self._buf):
            self._fill(4 + n)
            body = self._mv[self._start + 4:self._start + 4 + n]
            self._start += 4 + n
            if self._start == self._end:
                self._start = self._end = 0
            return body
        big = bytearray(n)  # larger than the buffer: read the rest straight into its own buffer
        have = self._end - self._start - 4
        big[:have] = self._buf[self._start + 4:self._end]
        self._start = self._end = 0
        view = memoryview(big)
        while have < n:
            k = os.readv(self.fd, [view[have:]])
            if k == 0:
                raise EOFError("peer closed the channel")
            have += k
        return view


class SharedArena:
    """A memfd shared by host and enclave for large tensors.

    The host creates it (:meth:`create`, sealed against shrinking, so neither side can make the
    other's mapping fault) and passes the descriptor to the worker at spawn. Either side grows it
    when what it writes does not fit (:meth:`reserve`); the reader maps the new size when an
    offset lies beyond its mapping (:meth:`view`). Calls are serialized by the host, so one arena
    serves requests and replies: each writes from offset 0. The enclave copies what it reads
    into its own memory before using it, as an SGX enclave copies ``[in]`` buffers: the host
    could change shared pages while the enclave works.
    """

    GROW = 1 << 20
    #: With ``release``, copies go in pieces of this size, each unmapped from this process once
    #: copied (the memfd keeps the data): the enclave's memory then does not count a tensor
    #: twice, once shared and once copied, which matters under a memory limit.
    PIECE = 1 << 20

    def __init__(self, fd: int, *, release: bool = False) -> None:
        self.fd = fd
        self.size = 0
        self.release = release
        self._map: Any = None
        self._retired: list[Any] = []

    @classmethod
    def create(cls, name: str = "mlcapsule-io") -> SharedArena:
        import fcntl

        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
        return cls(fd)

    @classmethod
    def adopt(cls, fd: int, *, release: bool = False) -> SharedArena:
        """The enclave's side: use ``fd`` only if it is sealed against shrinking. ``release``
        (streaming mode) unmaps pages once copied, trading page faults for memory."""
        import fcntl
        import stat

        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ProtocolError("the shared-memory descriptor is not a memory file")
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        if not seals & fcntl.F_SEAL_SHRINK:
            raise ProtocolError("the shared-memory file is not sealed against shrinking")
        return cls(fd, release=release)

    def _map_to(self, size: int) -> None:
        import mmap

        new = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        if self.release:
            munlock(new)  # the hardened worker locks future mappings; released pages must not be
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a view is still alive somewhere: unmap it later
                self._retired.append(self._map)
        self._map, self.size = new, size

    def reserve(self, nbytes: int) -> None:
        """Make sure ``[0, nbytes)`` exists and is mapped, growing the file if needed."""
        if nbytes <= self.size:
            return
        have = os.fstat(self.fd).st_size
        if have < nbytes:
            have = max(nbytes, 2 * have)
            have = -(-have // self.GROW) * self.GROW
            os.ftruncate(self.fd, have)
        self._map_to(have)

    def holds(self, offset: int, nbytes: int) -> bool:
        """Does the shared file hold bytes ``[offset, offset + nbytes)``? (Nothing is mapped.)"""
        end = offset + nbytes
        if end <= self.size:
            return True
        try:
            return end <= os.fstat(self.fd).st_size
        except OSError:
            return False

    def view(self, offset: int, nbytes: int) -> memoryview:
        if offset + nbytes > self.size:
            have = os.fstat(self.fd).st_size
            if offset + nbytes > have:
                raise ProtocolError("a tensor lies outside the shared memory")
            self._map_to(have)
        return memoryview(self._map)[offset:offset + nbytes]

    def write(self, offset: int, arr: np.ndarray) -> None:
        if arr.nbytes:
            self._copy(offset, arr.data.cast("B"), to_arena=True)

    def read_into(self, offset: int, out: memoryview) -> None:
        if len(out):
            self._copy(offset, out, to_arena=False)

    def _copy(self, offset: int, data: memoryview, *, to_arena: bool) -> None:
        import mmap

        n = len(data)
        view = self.view(offset, n)
        step = self.PIECE if self.release else n
        try:
            for i in range(0, n, step):
                j = min(i + step, n)
                if to_arena:
                    view[i:j] = data[i:j]
                else:
                    data[i:j] = view[i:j]
                if self.release:
                    lo = -(-(offset + i) // mmap.PAGESIZE) * mmap.PAGESIZE
                    hi = (offset + j) // mmap.PAGESIZE * mmap.PAGESIZE
                    if hi > lo:
                        try:
                            self._map.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
                        except (OSError, ValueError):
                            self.release = False
        finally:
            view.release()

    def close(self) -> None:
        for m in [self._map, *self._retired]:
            if m is not None:
                try:
                    m.close()
                except BufferError:
                    pass
        self._map, self._retired, self.size = None, [], 0
        try:
            os.close(self.fd)
        except OSError:
            pass
