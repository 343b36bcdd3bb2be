"""Streaming mode: run a model whose weights need not fit in the enclave's memory.

Enclave side. This is the paper's layer-wise MLCapsule layer, done with the real engine:

* At load, the (small) graph is decrypted and cut into *segments* in topological order. Each
  segment becomes an ONNX sub-model whose weights are graph **inputs**, and gets its own ONNX
  Runtime session, created once. No weight is decrypted at load, apart from tiny tensors
  (scalars, biases, BatchNorm statistics: at most :data:`PIN_TENSOR_BYTES` each and
  :data:`PIN_TOTAL_FRACTION` of the limit in all) which are *pinned*: decrypted once and put
  into the sub-models as initializers, so ORT's fusions (e.g. Conv+Clip) still see them.
* For each query, segment by segment, the weights of the segment are decrypted just in time,
  chunk by chunk (random access into the chunked AES-GCM segment,
  :meth:`SegmentCipher.decrypt_chunk_into`), into one fixed *scratch* buffer; the segment runs;
  the next segment overwrites the scratch. The scratch is reused rather than freed and
  allocated again, because fresh pages cost a page fault each (slow on this VM); it is wiped at
  close.
* A MatMul, Gemm or Conv whose weight alone does not fit the scratch is *split* along the stored
  weight's leading axis, so that each block is a contiguous range of the weights segment:
  for ``MatMul(A, W)`` and ``Gemm(transB=0)`` that axis is the reduction axis K, and the
  blocks' partial products are summed (``Acc + A[:, k0:k1] @ W[k0:k1]``); for ``Gemm(transB=1)``
  (torch's ``Linear`` layout, VGG-16's classifier) it is the output axis, and the blocks'
  outputs are concatenated, as are a (non-grouped) Conv's blocks of output channels. Every
  chunk of ciphertext is decrypted once per query either way.
* Activations between segments are the sessions' numpy outputs (zero-copy views of ORT's
  buffers). All sessions share one arena allocator (see :func:`configure_onnxruntime`), so the
  memory for activations is one pool that grows to the largest need, not one pool per session;
  memory patterns are off, so a run allocates tensor by tensor from that pool.
* The ciphertext is read through the capsule's read-only mmap; pages already decrypted are
  dropped from the process with ``MADV_DONTNEED`` (the page cache keeps them), so the mapped
  file does not count against the process's memory either.

The memory budget: ``limit = reserve + activations + scratch``, where the activation peak is
estimated by ONNX shape inference at batch 1, and the reserve covers the sessions, the 2 MiB
chunk bounce buffer, the pinned tensors and allocator slack. A batch whose activations would
not fit is run in sub-batches (each one streams the weights again). The limit counts from the
enclave's memory after imports and ORT's initialization, before the capsule is loaded
(:func:`memory_status`, ``status`` ECALL).

What leaves the enclave. Unless the capsule was packed with ``--public-architecture`` (its
graph segment stored in the clear), nothing per layer does: no op type, node or tensor name,
weight size, per-segment node count or per-step timing, in :meth:`StreamingModel.describe` or in
an error message (red team, issue 9: the ``status`` ECALL used to hand the host every layer of
an encrypted MLP). Aggregates do: the memory limit, total run and decryption time, and, when a
limit is refused, the smallest limit that would work as one number. The host picks the limit
and can read the worker's total memory from ``/proc`` anyway, so it could find that number by
trying limits; a per-layer figure it could not.
"""

from __future__ import annotations

import math
import mmap
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from .._util import munlock
from ..crypto.chunks import TAG_LEN, SegmentCipher, n_chunks, stored_length
from ..errors import FormatError, InputError, IntegrityError, MlcapsuleError, UsageError
from .resident import aligned_empty, mapped_buffer
from .split import PLACEHOLDER

MiB = 1 << 20
ALIGN = 64
PAGE = mmap.PAGESIZE
#: Tensors up to this size are decrypted once at load and kept ("pinned").
PIN_TENSOR_BYTES = 16 * 1024
#: ... as long as all pinned tensors together stay under this share of the limit.
PIN_TOTAL_FRACTION = 1 / 32
#: Fixed part of the reserve: what loading and the first query cost whatever the model, as
#: measured in the worker: ORT session state, code pages of the kernels that run for the first
#: time, thread stacks, frame buffers, Python objects, allocator slack.
RESERVE_FIXED = 10 * MiB
#: Per ORT session (measured: 70-130 KiB each; rounded up).
RESERVE_PER_SESSION = 192 * 1024
#: The activation estimate from shape inference is multiplied by this (ORT temporaries, arena
#: fragmentation).
ACTIVATION_MARGIN = 1.25
#: The smallest scratch worth having.
MIN_SCRATCH = 256 * 1024
#: Reads of at least this many whole chunks are decrypted by two threads.
PARALLEL_CHUNKS = 4
#: Lowest memory limit accepted, in MiB.
MIN_LIMIT_MB = 8.0


# -- process memory ---------------------------------------------------------------------------
def memory_status() -> dict[str, int]:
    """This process's memory from ``/proc/self/status``, in bytes: VmRSS, VmHWM (the peak of
    VmRSS), RssAnon, RssFile, RssShmem. Empty where /proc is unavailable."""
    out: dict[str, int] = {}
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                key, _, rest = line.partition(b":")
                if key in (b"VmRSS", b"VmHWM", b"RssAnon", b"RssFile", b"RssShmem"):
                    out[key.decode()] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return out


# -- ONNX Runtime process setup -----------------------------------------------------------------
_ORT_SETUP: dict[str, Any] | None = None


def configure_onnxruntime() -> dict[str, Any]:
    """Set up ONNX Runtime for streaming: register one arena allocator that every streaming
    session shares (``session.use_env_allocators``), so the memory for activations is one pool
    that grows to the largest need instead of one pool per session; then build a one-node
    warm-up session and run ONNX shape inference on it, so that the one-time initialization of
    both libraries (~10 MB for ORT's kernel registries and CPU detection, ~8 MB for ONNX's
    operator schemas) happens now, before the enclave's memory baseline is taken. Idempotent.

    ORT's global thread pool would save one idle thread per session, but its threads spin after
    each run (the Python API cannot turn that off) and then compete with the decryption on a
    small machine; sessions get their own pools without spinning instead.
    """
    global _ORT_SETUP
    if _ORT_SETUP is not None:
        return _ORT_SETUP
    setup: dict[str, Any] = {"shared_arena": False}
    try:  # one malloc arena for all threads: each new thread's arena would cost fresh pages
        import ctypes

        setup["malloc_arena_max"] = ctypes.CDLL(None).mallopt(-8, 1) == 1  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass
    try:
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        # kSameAsRequested: grow by what is asked, not by powers of two.
        ort.create_and_register_allocator(info, ort.OrtArenaCfg({"arena_extend_strategy": 1}))
        setup["shared_arena"] = True
    except Exception:  # e.g. already registered by someone else: sessions then use their own
        pass
    _ORT_SETUP = setup
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "warmup",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    warm = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    s = ort.InferenceSession(warm.SerializeToString(), _segment_options(1), providers=["CPUExecutionProvider"])
    s.run(None, {"x": np.zeros((1, 4), np.float32)})
    # ONNX's operator schema registry is built on first use (~8 MB); the planner needs it.
    onnx.shape_inference.infer_shapes(warm)
    return setup


def _segment_options(threads: int | None) -> ort.SessionOptions:
    so = ort.SessionOptions()
    # Every initializer a sub-model has is real (pinned or inline), so every level is correct;
    # the weights are inputs, so nothing is prepacked or re-laid-out ahead of time.
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.disable_prepacking", "1")
    so.log_severity_level = 4  # ORT's error lines name nodes; failures surface as exceptions instead
    setup = _ORT_SETUP or {}
    if threads:
        so.intra_op_num_threads = threads
    # Idle pool threads must sleep, not spin: the decryption runs between the segments.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if setup.get("shared_arena"):
        so.add_session_config_entry("session.use_env_allocators", "1")
    else:
        so.enable_cpu_mem_arena = False
    # One allocation per tensor, not one block per run: a per-run block would not fit into the
    # freed blocks of other sessions and would grow the shared arena.
    so.enable_mem_pattern = False
    return so


# -- reading the weights segment ----------------------------------------------------------------
class WeightReader:
    """Random access to the plaintext of the encrypted weights segment, without keeping it.

    ``read_into(out, start)`` fills ``out`` with plaintext bytes ``[start, start + len(out))``:
    whole chunks are decrypted straight into ``out``; a chunk only partly wanted is decrypted
    into a 2 MiB bounce buffer, which is kept, so the next read that starts inside the same
    chunk does not decrypt it again. Ciphertext pages are dropped from the process after use.
    """

    def __init__(self, capsule: Any, key: bytes, segment: str = "weights", *, release_pages: bool = True,
                 threads: int | None = None) -> None:
        m = capsule.manifest
        seg = m.segment(segment)
        if not seg.encrypted:
            raise IntegrityError("the capsule failed its integrity check")
        self.plain_length = seg.plain_length
        self.chunk_size = seg.chunk_size
        self.total = n_chunks(seg.plain_length, seg.chunk_size)
        self._view = capsule.segment_view(seg)
        if len(self._view) != stored_length(seg.plain_length, seg.chunk_size):
            self._view.release()
            raise IntegrityError("the capsule failed its integrity check")
        self._mmap = self._view.obj if isinstance(self._view.obj, mmap.mmap) else None
        self._base = capsule.data_offset + seg.offset
        self._cipher = SegmentCipher(key, m.capsule_id, m.version, seg.index, seg.chunk_size)
        self._bounce: np.ndarray | None = None
        self._bounce_index = -1
        #: The graph is public (packed with --public-architecture, stored in the clear): only
        #: then may per-layer facts appear in status and error messages.
        self.public_architecture = bool(m.public_architecture) and not m.segment("graph").encrypted
        self._release_pages = release_pages and self._mmap is not None
        if self._release_pages:
            munlock(self._mmap)  # ciphertext is public; locked pages could not be dropped
        self.bytes_decrypted = 0
        self.seconds = 0.0
        self.threads = min(2, threads or os.cpu_count() or 1)
        self._pool: Any = None

    def read_into(self, out: memoryview | np.ndarray, start: int) -> None:
        out = memoryview(out).cast("B") if not isinstance(out, memoryview) else out
        n = len(out)
        stop = start + n
        if start < 0 or stop > self.plain_length:
            raise FormatError("a tensor lies outside the weights segment")
        if n == 0:
            return
        t0 = time.perf_counter()
        cs = self.chunk_size
        whole: list[int] = []  # chunks wanted whole: decrypted straight into `out`
        for i in range(start // cs, (stop - 1) // cs + 1):
            c_lo = i * cs
            c_len = min(cs, self.plain_length - c_lo)
            a, b = max(start, c_lo), min(stop, c_lo + c_len)
            if a == c_lo and b == c_lo + c_len and i != self._bounce_index:
                whole.append(i)
                continue
            if i != self._bounce_index:  # wanted in part: through the bounce buffer, which keeps it
                if self._bounce is None:
                    self._bounce = mapped_buffer(cs)
                self._bounce_index = -1
                self._decrypt(i, memoryview(self._bounce)[:c_len])
                self._bounce_index = i
                self.bytes_decrypted += c_len
            out[a - start:b - start] = memoryview(self._bounce)[a - c_lo:b - c_lo]  # type: ignore[arg-type]
        if len(whole) >= PARALLEL_CHUNKS and self.threads > 1:
            # AES-GCM releases the GIL: a second thread decrypts half of the chunks.
            if self._pool is None:
                import threading
                from concurrent.futures import ThreadPoolExecutor

                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlcapsule-decrypt")
                # A small stack: an 8 MB one may be backed by 2 MB huge pages, which count.
                old = threading.stack_size(512 * 1024)
                try:
                    self._pool.submit(int).result()  # start the thread now, with that stack
                finally:
                    threading.stack_size(old)
            half = len(whole) // 2
            job = self._pool.submit(self._decrypt_whole, whole[:half], out, start)
            try:
                self._decrypt_whole(whole[half:], out, start)
            finally:
                job.result()
        else:
            self._decrypt_whole(whole, out, start)
        self.bytes_decrypted += sum(min(cs, self.plain_length - i * cs) for i in whole)
        self.seconds += time.perf_counter() - t0

    def _decrypt_whole(self, chunks: list[int], out: memoryview, start: int) -> None:
        cs = self.chunk_size
        for i in chunks:
            c_lo = i * cs
            self._decrypt(i, out[c_lo - start:c_lo - start + min(cs, self.plain_length - c_lo)])

    def _decrypt(self, i: int, dst: memoryview) -> None:
        step = self.chunk_size + TAG_LEN
        ct = self._view[i * step: i * step + len(dst) + TAG_LEN]
        self._cipher.decrypt_chunk_into(ct, i, self.total, dst)
        self._drop(i * step, i * step + len(dst) + TAG_LEN)

    def _drop(self, lo: int, hi: int) -> None:
        """Unmap the pages of ciphertext ``[lo, hi)`` of this segment from the process (the page
        cache keeps them); pages shared with the next chunk stay mapped until it is read."""
        if not self._release_pages:
            return
        a = (self._base + lo) // PAGE * PAGE
        b = (self._base + hi) // PAGE * PAGE
        if b > a:
            try:
                self._mmap.madvise(mmap.MADV_DONTNEED, a, b - a)  # type: ignore[union-attr]
            except (OSError, ValueError):
                self._release_pages = False

    def close(self) -> None:
        if self._bounce is not None:
            self._bounce.fill(0)
            self._bounce = None
        self._bounce_index = -1
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        self._mmap = None
        self._view.release()


# -- the plan ---------------------------------------------------------------------------------
@dataclass
class _Tensor:
    """A weight tensor in the weights segment (from its placeholder)."""

    name: str
    offset: int
    length: int
    dtype: np.dtype
    onnx_type: int
    shape: tuple[int, ...]

    @property
    def aligned(self) -> int:
        return -(-self.length // ALIGN) * ALIGN


@dataclass
class _Segment:
    nodes: list[onnx.NodeProto]
    act_inputs: list[str] = field(default_factory=list)
    weights: list[_Tensor] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    free: list[str] = field(default_factory=list)
    weight_bytes: int = 0
    session: Any = None
    offsets: list[int] = field(default_factory=list)
    feeds: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class _Split:
    """A MatMul, Gemm or Conv run in blocks of rows of its stored weight."""

    node: onnx.NodeProto
    # "k": blocks over the reduction axis, summed; "n": over output columns, concatenated;
    # "c": a Conv's blocks of output channels, concatenated
    axis: str
    a: str
    weight: _Tensor
    c: str | None  # Gemm's C input, if any
    output: str
    alpha: float = 1.0
    beta: float = 1.0
    trans_a: int = 0
    rows: int = 0  # rows per block
    blocks: list[tuple[int, int]] = field(default_factory=list)
    c_tensor: _Tensor | None = None  # C, when C is a streamed weight
    free: list[str] = field(default_factory=list)
    first: Any = None  # sessions
    rest: Any = None

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.weight.shape[1:], dtype=np.int64)) * self.weight.dtype.itemsize


def _dtype(t: int) -> np.dtype:
    return np.dtype(helper.tensor_dtype_to_np_dtype(t))


def _value_bytes(vi: onnx.ValueInfoProto) -> int | None:
    tt = vi.type.tensor_type
    if not vi.type.HasField("tensor_type") or not tt.HasField("shape"):
        return None
    n = 1
    for d in tt.shape.dim:
        if not d.HasField("dim_value"):
            return None
        n *= d.dim_value
    try:
        return n * _dtype(tt.elem_type).itemsize
    except Exception:
        return None


class StreamingModel:
    """Runs a capsule's model segment by segment within ``limit_bytes`` of memory.

    ``graph_bytes``: the decrypted graph with placeholders; ``reader``: the weights segment.
    The model takes ownership of ``reader`` and closes it.
    """

    def __init__(self, graph_bytes: bytes | bytearray, reader: WeightReader, limit_bytes: int, *,
                 threads: int | None = None) -> None:
        if limit_bytes < MIN_LIMIT_MB * MiB:
            raise UsageError(f"the memory limit must be at least {MIN_LIMIT_MB:g} MB")
        self.reader = reader
        self.limit = int(limit_bytes)
        self.threads = threads
        self.public_architecture = bool(getattr(reader, "public_architecture", False))
        self.queries = 0  # runs (sub-batches count one each)
        self.run_seconds = 0.0  # in runs, decryption included (reader.seconds)
        self._scratch: np.ndarray | None = None
        t0 = time.perf_counter()
        try:
            model = onnx.ModelProto.FromString(bytes(graph_bytes))
        except Exception as e:
            raise FormatError("the capsule's graph does not parse as ONNX") from e
        self._plan(model)
        if reader.plain_length:
            # Decrypt one chunk now: a wrong key fails at load (setup relies on it), not at a query.
            reader.read_into(memoryview(bytearray(1)), 0)
        self.load_seconds = time.perf_counter() - t0

    # -- planning ------------------------------------------------------------------------------
    def _plan(self, model: onnx.ModelProto) -> None:
        g = model.graph
        for node in g.node:
            if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
                raise UsageError("streaming mode does not support models with control flow (If, Loop, Scan)"
                                 if self.public_architecture else "streaming mode cannot run this model",
                                 hint="run this capsule without --memory-limit")
        self._opsets = list(model.opset_import)
        self._ir_version = model.ir_version
        self._functions = list(model.functions)
        self.input_names = [i.name for i in g.input]
        self.output_names = [o.name for o in g.output]

        weights: dict[str, _Tensor] = {}
        self._inline: dict[str, TensorProto] = {}
        self._init_types = {t.name: t.data_type for t in g.initializer}
        for t in g.initializer:
            if t.data_location != TensorProto.EXTERNAL:
                self._inline[t.name] = t
                continue
            ext = {e.key: e.value for e in t.external_data}
            if ext.get("location") != PLACEHOLDER:
                raise FormatError(f"{self._tensor(t.name)} points outside the capsule")
            try:
                offset, length, dtype = int(ext["offset"]), int(ext["length"]), _dtype(t.data_type)
            except (KeyError, ValueError, TypeError) as e:
                raise FormatError(f"{self._tensor(t.name)} has a malformed placeholder") from e
            count = int(np.prod(t.dims, dtype=np.int64))
            if (offset < 0 or length != count * dtype.itemsize or offset + length > self.reader.plain_length
                    or offset % ALIGN):
                raise FormatError(f"{self._tensor(t.name)} does not fit the weights segment")
            weights[t.name] = _Tensor(t.name, offset, length, dtype, t.data_type, tuple(int(d) for d in t.dims))
        self.input_names = [n for n in self.input_names if n not in weights and n not in self._inline]

        # Types everywhere, and activation sizes at batch 1, from ONNX shape inference.
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        for vi in probe.graph.input:
            for d in vi.type.tensor_type.shape.dim:
                if not d.HasField("dim_value"):
                    d.Clear()
                    d.dim_value = 1
        try:
            probe = onnx.shape_inference.infer_shapes(probe, strict_mode=False)
        except Exception:
            pass
        self._types: dict[str, int] = {}
        sizes: dict[str, int | None] = {}
        for vi in list(probe.graph.input) + list(probe.graph.value_info) + list(probe.graph.output):
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
                self._types[vi.name] = vi.type.tensor_type.elem_type
            sizes[vi.name] = _value_bytes(vi)
        del probe

        # Pinned tensors: small ones, decrypted now, smallest first, within their share.
        pin_budget = int(self.limit * PIN_TOTAL_FRACTION)
        self._pinned: dict[str, np.ndarray] = {}
        chosen: list[_Tensor] = []
        pinned_bytes = 0
        for t in sorted(weights.values(), key=lambda t: t.length):
            if t.length > PIN_TENSOR_BYTES or pinned_bytes + t.aligned > pin_budget:
                break
            chosen.append(t)
            pinned_bytes += t.aligned
        if chosen:
            pins = aligned_empty(pinned_bytes)
            off = 0
            for t in sorted(chosen, key=lambda t: t.offset):  # in segment order: each chunk once
                self.reader.read_into(memoryview(pins)[off:off + t.length], t.offset)
                self._pinned[t.name] = pins[off:off + t.length].view(t.dtype).reshape(t.shape)
                off += t.aligned
        streamed = {k: v for k, v in weights.items() if k not in self._pinned}
        self.pinned_bytes = pinned_bytes

        # Liveness of activations (positions in topological order; graph outputs live forever).
        nodes = list(g.node)
        end = len(nodes)
        last_use: dict[str, int] = {}
        for j, node in enumerate(nodes):
            for name in node.input:
                if name and name not in weights and name not in self._inline:
                    last_use[name] = j
        for name in self.output_names + self.input_names:
            last_use[name] = end  # the caller holds the inputs for the whole run
        produced_at: dict[str, int] = {name: -1 for name in self.input_names}
        for j, node in enumerate(nodes):
            for name in node.output:
                if name:
                    produced_at[name] = j
        # Live activation bytes at each node (batch 1): values produced before and used at or
        # after it, plus its outputs.
        live = [0] * max(end, 1)
        self.estimate_complete = True
        for name, p in produced_at.items():
            size = sizes.get(name)
            if size is None:
                self.estimate_complete = False
                continue
            for j in range(max(p, 0), min(last_use.get(name, p), end - 1) + 1):
                live[j] += size
        self.activation_bytes = int(max(live) * ACTIVATION_MARGIN) if nodes else 0

        # The scratch gets what the limit leaves after the reserve and the activations. Plan for a
        # guessed number of sessions; plan again if the plan needs more.
        def reserve(n_sessions: int) -> int:
            # the bounce buffer, and the ciphertext chunk a second decrypting thread has mapped
            bounce = min(self.reader.chunk_size, self.reader.plain_length) * (1 + (self.reader.threads > 1)) if streamed else 0
            return RESERVE_FIXED + bounce + pinned_bytes + n_sessions * RESERVE_PER_SESSION

        sessions = 8
        for _ in range(4):
            cap = self.limit - reserve(sessions) - self.activation_bytes
            least = MIN_SCRATCH if streamed else 0
            if cap < least:
                need = (self.limit - cap + least) / MiB
                if not self.public_architecture:
                    raise self._too_small(least - cap)
                raise UsageError(f"a memory limit of {self.limit / MiB:g} MB is too small for this model: it needs "
                                 f"at least {math.ceil(need)} MB ({self.activation_bytes / MiB:.1f} MB for activations, "
                                 f"{reserve(sessions) / MiB:.1f} MB for sessions and buffers"
                                 + (", and some room for weights)" if streamed else ")"), hint="raise --memory-limit")
            cap = max(cap, 0)
            steps = self._segments(nodes, streamed, cap)
            n_sessions = sum(1 if isinstance(s, _Segment) else 2 for s in steps)
            if n_sessions <= sessions:
                break
            sessions = n_sessions
        self.scratch_cap = cap

        # Segment boundaries: inputs, outputs, and what can be dropped after each step.
        position = {id(n): j for j, n in enumerate(nodes)}
        for step in steps:
            seg_nodes = step.nodes if isinstance(step, _Segment) else [step.node]
            last = position[id(seg_nodes[-1])]
            inside = {o for n in seg_nodes for o in n.output if o}
            if isinstance(step, _Segment):
                consumed = [i for n in seg_nodes for i in n.input if i]
                step.act_inputs = list(dict.fromkeys(
                    i for i in consumed if i not in inside and i not in weights and i not in self._inline))
                step.outputs = [o for n in seg_nodes for o in n.output if o and last_use.get(o, -1) > last]
            users = step.act_inputs if isinstance(step, _Segment) else [x for x in (step.a, step.c) if x and x not in weights]
            step.free = [i for i in users if last_use.get(i, end) <= last and i not in self.output_names]
        self.steps = steps
        self._step_seconds = [[0.0, 0.0] for _ in steps]  # per step: decrypting, in all
        n_sessions = sum(1 if isinstance(s, _Segment) else 2 for s in steps)

        # Scratch: as large as the largest step needs, no larger.
        need = 0
        for step in steps:
            if isinstance(step, _Segment):
                off = 0
                for t in step.weights:
                    step.offsets.append(off)
                    off += t.aligned
                need = max(need, off)
            else:
                c = step.c_tensor.aligned if step.c_tensor else 0
                need = max(need, c + step.rows * step.row_bytes)
        self.scratch_bytes = need
        self.reserve_bytes = reserve(n_sessions)
        # Mapped and populated now: the pages count from load on, and no query pays their faults.
        self._scratch = mapped_buffer(need) if need else None

        # Sessions, and the weight feeds as views of the scratch (made once).
        for step in steps:
            if isinstance(step, _Segment):
                step.session = self._session(self._submodel(step))
                assert self._scratch is not None or not step.weights
                for t, off in zip(step.weights, step.offsets):
                    step.feeds[t.name] = self._scratch[off:off + t.length].view(t.dtype).reshape(t.shape)  # type: ignore[index]
            else:
                first, rest = self._split_models(step)
                step.first = self._session(first)
                step.rest = self._session(rest) if rest is not None else None
        # The sessions hold their own copies of the pinned tensors now; keep only what a split
        # node feeds at run time.
        keep = {s.c for s in steps if isinstance(s, _Split) and s.c in self._pinned}
        pins_left = {name: self._pinned[name].copy() for name in keep}
        for v in self._pinned.values():
            v.fill(0)
        self._pinned = pins_left

        # Batches whose activations would not fit run in sub-batches (if every input and output
        # has the batch as its first, dynamic, dimension): the whole batch's inputs and outputs
        # stay in memory, the activations are those of one sub-batch.
        self.room = self.limit - self.reserve_bytes - self.scratch_bytes
        self.max_batch = max(1, self.room // self.activation_bytes) if self.activation_bytes else 0
        io_values = [vi for vi in list(g.input) + list(g.output) if vi.name not in weights and vi.name not in self._inline]
        self.io_item_bytes = sum(sizes.get(vi.name) or 0 for vi in io_values)
        self._batched = all(vi.type.tensor_type.shape.dim and not vi.type.tensor_type.shape.dim[0].HasField("dim_value")
                            for vi in io_values)

    def _segments(self, nodes: list[onnx.NodeProto], streamed: dict[str, _Tensor], cap: int) -> list[_Segment | _Split]:
        """Greedy, in topological order: a node joins the current segment while the segment's
        weights fit ``cap``; a node whose weights alone do not fit is split."""
        steps: list[_Segment | _Split] = []
        cur = _Segment([])
        cur_names: set[str] = set()
        for node in nodes:
            all_ws = [streamed[n] for n in dict.fromkeys(node.input) if n in streamed]
            ws = [t for t in all_ws if t.name not in cur_names]
            add = sum(t.aligned for t in ws)
            if cur.weight_bytes + add > cap:
                if cur.nodes:
                    steps.append(cur)
                cur, cur_names = _Segment([]), set()
                ws, add = all_ws, sum(t.aligned for t in all_ws)
                if add > cap:
                    steps.append(self._split(node, streamed, cap))
                    continue
            cur.nodes.append(node)
            cur.weights += ws
            cur_names.update(t.name for t in ws)
            cur.weight_bytes += add
        if cur.nodes:
            steps.append(cur)
        return steps

    def _split(self, node: onnx.NodeProto, streamed: dict[str, _Tensor], cap: int) -> _Split:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        ins = list(node.input)
        big = max((streamed[n] for n in ins if n in streamed), key=lambda t: t.length)
        why = (f"a memory limit of {self.limit / MiB:g} MB leaves {cap / MiB:.1f} MB for weights, and the "
               f"{big.length / MiB:.1f} MB tensor of this {node.op_type} node cannot be split")
        node_weights = sum(streamed[n].aligned for n in dict.fromkeys(ins) if n in streamed)

        def refuse(short: int) -> UsageError:
            # Encrypted graph: the smallest limit that works, as one number (no op, no size).
            if not self.public_architecture:
                return self._too_small(short)
            return UsageError(why, hint="raise --memory-limit")

        conv = node.op_type == "Conv" and len(big.shape) >= 3 and int(attrs.get("group", 1)) == 1
        if not (conv or (node.op_type in ("MatMul", "Gemm") and len(big.shape) == 2)) or len(ins) < 2 or ins[1] != big.name:
            raise refuse(node_weights - cap)
        if ins[0] in streamed or ins[0] in self._pinned or ins[0] in self._inline:
            raise refuse(node_weights - cap)
        c = ins[2] if node.op_type in ("Gemm", "Conv") and len(ins) > 2 and ins[2] else None
        if conv:
            sp = _Split(node, "c", ins[0], big, c, node.output[0])
        elif node.op_type == "Gemm":
            axis = "n" if attrs.get("transB", 0) else "k"
            sp = _Split(node, axis, ins[0], big, c, node.output[0], alpha=float(attrs.get("alpha", 1.0)),
                        beta=float(attrs.get("beta", 1.0)), trans_a=int(attrs.get("transA", 0)))
        else:
            sp = _Split(node, "k", ins[0], big, None, node.output[0])
        if c is not None and c in streamed:
            sp.c_tensor = streamed[c]
        room = cap - (sp.c_tensor.aligned if sp.c_tensor else 0)
        total_rows = big.shape[0]
        rows = room // sp.row_bytes if sp.row_bytes else total_rows
        if rows < 1:
            raise refuse(sp.row_bytes - room)
        n_blocks = -(-total_rows // rows)
        rows = -(-total_rows // n_blocks)  # balanced blocks
        sp.rows = rows
        sp.blocks = [(r, min(r + rows, total_rows)) for r in range(0, total_rows, rows)]
        return sp

    # -- what may leave the enclave -------------------------------------------------------------
    def _tensor(self, name: str) -> str:
        """A tensor, for an error message: named only when the architecture is public."""
        return f"tensor {name[:200]!r}" if self.public_architecture else "a tensor of the model"

    def _too_small(self, short: int) -> UsageError:
        """The limit is ``short`` bytes short: say by how much in total, as one number. An
        aggregate, like the limit itself (see the module docstring)."""
        need = math.ceil((self.limit + max(short, 0)) / MiB)
        return UsageError(f"a memory limit of {self.limit / MiB:g} MB is too small for this model: "
                          f"it needs at least {need} MB", hint="raise --memory-limit")

    # -- sub-models ----------------------------------------------------------------------------
    def _type(self, name: str) -> int:
        t = self._types.get(name) or self._init_types.get(name)
        if not t:
            what = f"the type of {name[:200]!r}" if self.public_architecture else "the types"
            raise UsageError(f"streaming mode cannot infer {what} in this model",
                             hint="run this capsule without --memory-limit")
        return t

    def _model(self, nodes: Sequence[onnx.NodeProto], inputs: list[onnx.ValueInfoProto],
               outputs: list[onnx.ValueInfoProto], initializers: list[TensorProto]) -> bytes:
        graph = helper.make_graph(list(nodes), "segment", inputs, outputs, initializers)
        m = helper.make_model(graph, opset_imports=self._opsets, ir_version=self._ir_version)
        m.functions.extend(self._functions)
        return m.SerializeToString()

    def _consts(self, names: Sequence[str]) -> list[TensorProto]:
        out = []
        for name in dict.fromkeys(names):
            if name in self._inline:
                out.append(self._inline[name])
            elif name in self._pinned:
                out.append(numpy_helper.from_array(self._pinned[name], name))
        return out

    def _submodel(self, seg: _Segment) -> bytes:
        names = [i for n in seg.nodes for i in n.input if i]
        inputs = [helper.make_tensor_value_info(n, self._type(n), None) for n in seg.act_inputs]
        inputs += [helper.make_tensor_value_info(t.name, t.onnx_type, list(t.shape)) for t in seg.weights]
        outputs = [helper.make_tensor_value_info(n, self._type(n), None) for n in seg.outputs]
        return self._model(seg.nodes, inputs, outputs, self._consts(names))

    def _split_models(self, sp: _Split) -> tuple[bytes, bytes | None]:
        t = sp.weight
        a_type = self._type(sp.a)
        a_in = helper.make_tensor_value_info("A", a_type, None)
        b_in = helper.make_tensor_value_info("B", t.onnx_type, [None, t.shape[1]])
        y_out = helper.make_tensor_value_info("Y", self._type(sp.output), None)
        consts: list[TensorProto] = []
        c_inputs: list[onnx.ValueInfoProto] = []
        c_name = ""
        if sp.c is not None:
            c_name = "C"
            c_inputs = [helper.make_tensor_value_info("C", sp.c_tensor.onnx_type if sp.c_tensor else self._type(sp.c), None)]
        if sp.node.op_type == "MatMul":
            first = self._model([helper.make_node("MatMul", ["A", "B"], ["Y"])], [a_in, b_in], [y_out], [])
            acc = helper.make_tensor_value_info("Acc", self._type(sp.output), None)
            rest = self._model([helper.make_node("MatMul", ["A", "B"], ["P"]), helper.make_node("Add", ["Acc", "P"], ["Y"])],
                               [a_in, b_in, acc], [y_out], [])
            return first, rest
        if sp.axis == "c":
            b_in = helper.make_tensor_value_info("B", t.onnx_type, [None, *t.shape[1:]])
            node = helper.make_node("Conv", ["A", "B"] + ([c_name] if c_name else []), ["Y"])
            node.attribute.extend(sp.node.attribute)
            return self._model([node], [a_in, b_in] + c_inputs, [y_out], consts), None
        gemm = {"alpha": sp.alpha, "transA": sp.trans_a}
        if sp.axis == "n":
            node = helper.make_node("Gemm", ["A", "B"] + ([c_name] if c_name else []), ["Y"], beta=sp.beta, transB=1, **gemm)
            return self._model([node], [a_in, b_in] + c_inputs, [y_out], consts), None
        node = helper.make_node("Gemm", ["A", "B"] + ([c_name] if c_name else []), ["Y"], beta=sp.beta, transB=0, **gemm)
        first = self._model([node], [a_in, b_in] + c_inputs, [y_out], consts)
        acc = helper.make_tensor_value_info("Acc", self._type(sp.output), None)
        rest = self._model([helper.make_node("Gemm", ["A", "B", "Acc"], ["Y"], beta=1.0, transB=0, **gemm)],
                           [a_in, b_in, acc], [y_out], [])
        return first, rest

    def _session(self, model_bytes: bytes) -> ort.InferenceSession:
        try:
            return ort.InferenceSession(model_bytes, _segment_options(self.threads), providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT's text names nodes and shapes: only for a public architecture
            raise FormatError("ONNX Runtime cannot load a segment of the model"
                              + (f": {e}" if self.public_architecture else "")) from e

    # -- running -------------------------------------------------------------------------------
    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        try:
            return self._run(feeds)
        except MlcapsuleError:
            raise
        except Exception as e:
            # ORT's (and numpy's) messages name nodes and shapes; unexpected exceptions would put
            # them, with a traceback, into the worker's log, which the host reads.
            raise InputError("the model cannot run on this input"
                             + (f": {str(e)[:2000]}" if self.public_architecture else ""),
                             hint="check the input against the model's description (`mlcapsule inspect`)") from e

    def _run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        batch = _batch(feeds)
        if not (self.max_batch and batch > self.max_batch and self._batched):
            return self._run_once(feeds)
        sub = (self.room - batch * self.io_item_bytes) // self.activation_bytes
        if sub < 1:
            most = max(1, (self.room - self.activation_bytes) // max(self.io_item_bytes, 1))
            # How many fit depends on the scratch, i.e. on layer sizes: a number only when public.
            raise InputError(f"a batch of {batch} does not fit in the memory limit of {self.limit / MiB:g} MB",
                             hint=(f"send at most {most} at a time" if self.public_architecture
                                   else "send smaller batches") + ", or raise --memory-limit")
        outputs: list[np.ndarray] = []
        for i in range(0, batch, sub):
            part = self._run_once({k: v[i:i + sub] for k, v in feeds.items()})
            if not outputs:  # the whole batch's outputs, filled in place: no second copy
                outputs = [np.empty((batch, *o.shape[1:]), dtype=o.dtype) for o in part]
            for out, o in zip(outputs, part):
                out[i:i + len(o)] = o
            del part
        return outputs

    def _run_once(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        t0 = time.perf_counter()
        values: dict[str, Any] = dict(feeds)
        scratch = memoryview(self._scratch) if self._scratch is not None else None
        reader = self.reader
        for k, step in enumerate(self.steps):
            t_step, d_step = time.perf_counter(), reader.seconds
            if isinstance(step, _Segment):
                for t, off in zip(step.weights, step.offsets):
                    reader.read_into(scratch[off:off + t.length], t.offset)  # type: ignore[index]
                ins = {name: values[name] for name in step.act_inputs}
                ins.update(step.feeds)
                values.update(zip(step.outputs, step.session.run(step.outputs, ins)))
            else:
                values[step.output] = self._run_split(step, values, scratch)
            for name in step.free:
                values.pop(name, None)
            times = self._step_seconds[k]
            times[0] += reader.seconds - d_step
            times[1] += time.perf_counter() - t_step
        self.queries += 1
        self.run_seconds += time.perf_counter() - t0
        return [values[name] for name in self.output_names]

    def _run_split(self, sp: _Split, values: dict[str, Any], scratch: memoryview | None) -> np.ndarray:
        assert scratch is not None and self._scratch is not None
        t = sp.weight
        a = np.asarray(values[sp.a])
        c_off = 0
        c_val: np.ndarray | None = None
        if sp.c is not None:
            if sp.c_tensor is not None:
                ct = sp.c_tensor
                self.reader.read_into(scratch[:ct.length], ct.offset)
                c_val = self._scratch[:ct.length].view(ct.dtype).reshape(ct.shape)
                c_off = ct.aligned
            elif sp.c in self._pinned:
                c_val = self._pinned[sp.c]
            elif sp.c in self._inline:
                c_val = numpy_helper.to_array(self._inline[sp.c])
            else:
                c_val = np.asarray(values[sp.c])
        row = sp.row_bytes
        width = t.shape[1]
        if sp.axis in ("n", "c"):
            out_n = t.shape[0]
            y: np.ndarray | None = None
            slice_c = c_val is not None and c_val.ndim >= 1 and c_val.shape[-1] == out_n and out_n > 1
            for r0, r1 in sp.blocks:
                self.reader.read_into(scratch[c_off:c_off + (r1 - r0) * row], t.offset + r0 * row)
                w = self._scratch[c_off:c_off + (r1 - r0) * row].view(t.dtype).reshape((r1 - r0, *t.shape[1:]))
                feeds = {"A": a, "B": w}
                if c_val is not None:
                    feeds["C"] = np.ascontiguousarray(c_val[..., r0:r1]) if slice_c else c_val
                part = sp.first.run(["Y"], feeds)[0]
                if y is None:  # (M, N) for Gemm, (N, C, H, W...) for Conv
                    y = np.empty((part.shape[0], out_n, *part.shape[2:]), dtype=part.dtype)
                y[:, r0:r1] = part
            assert y is not None
            return y
        acc: np.ndarray | None = None
        for r0, r1 in sp.blocks:
            self.reader.read_into(scratch[c_off:c_off + (r1 - r0) * row], t.offset + r0 * row)
            b = self._scratch[c_off:c_off + (r1 - r0) * row].view(t.dtype).reshape(r1 - r0, width)
            a_blk = np.ascontiguousarray(a[r0:r1] if sp.trans_a else a[..., r0:r1])
            if acc is None:
                feeds = {"A": a_blk, "B": b}
                if c_val is not None:
                    feeds["C"] = c_val
                acc = sp.first.run(["Y"], feeds)[0]
            else:
                acc = sp.rest.run(["Y"], {"A": a_blk, "B": b, "Acc": acc})[0]
        assert acc is not None
        return acc

    # -- information ---------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """The plan and its counters, for the ``status`` ECALL. Encrypted graph: aggregates only
        (the limit, total times, runs); per-layer facts only for a public architecture."""
        if not self.public_architecture:
            return {"mode": "streaming", "architecture": "private", "memory_limit": self.limit,
                    "decrypt_seconds": self.reader.seconds, "runs": self.queries, "run_seconds": self.run_seconds,
                    "onnxruntime": dict(_ORT_SETUP or {})}
        segs = [s for s in self.steps if isinstance(s, _Segment)]
        splits = [s for s in self.steps if isinstance(s, _Split)]
        return {
            "mode": "streaming",
            "architecture": "public",
            "memory_limit": self.limit,
            "segments": len(segs),
            "split_nodes": [{"op": s.node.op_type, "axis": {"k": "reduction (summed)", "n": "output (concatenated)", "c": "output channels (concatenated)"}[s.axis],
                             "weight_bytes": s.weight.length, "blocks": len(s.blocks)} for s in splits],
            "scratch_bytes": self.scratch_bytes,
            "pinned_bytes": self.pinned_bytes,
            "activation_estimate_bytes": self.activation_bytes,
            "activation_estimate_complete": self.estimate_complete,
            "reserve_bytes": self.reserve_bytes,
            "max_batch": self.max_batch or None,
            "weights_decrypted_bytes": self.reader.bytes_decrypted,
            "decrypt_seconds": self.reader.seconds,
            "runs": self.queries,
            "run_seconds": self.run_seconds,
            "steps": [{"kind": "segment" if isinstance(s, _Segment) else f"split {s.node.op_type}",
                       "nodes": len(s.nodes) if isinstance(s, _Segment) else 1,
                       "weight_bytes": s.weight_bytes if isinstance(s, _Segment) else s.weight.length,
                       "decrypt_seconds": t[0], "seconds": t[1]} for s, t in zip(self.steps, self._step_seconds)],
            "onnxruntime": dict(_ORT_SETUP or {}),
        }

    def close(self) -> None:
        for step in getattr(self, "steps", []):
            if isinstance(step, _Segment):
                step.session = None
                step.feeds = {}
            else:
                step.first = step.rest = None
        if self._scratch is not None:
            self._scratch.fill(0)
            self._scratch = None
        for v in getattr(self, "_pinned", {}).values():
            if v.flags.writeable:
                v.fill(0)
        self._pinned = {}
        self.reader.close()


def _batch(feeds: Mapping[str, np.ndarray]) -> int:
    for v in feeds.values():
        return int(v.shape[0]) if v.ndim else 1
    return 1


__all__ = ["StreamingModel", "WeightReader", "configure_onnxruntime", "memory_status", "MiB"]
