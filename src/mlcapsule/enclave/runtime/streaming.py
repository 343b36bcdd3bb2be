"""Streaming mode: run a model whose weights need not fit in the enclave's memory.

Enclave side. This is the paper's layer-wise MLCapsule layer, done with the real engine. The
plan (segments, splits, pinned tensors, the memory budget) is made by :mod:`.planner` on the
graph alone; the weights are read by :mod:`.weights`; this module runs the plan in ONNX Runtime.

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

import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from ..errors import FormatError, InputError, MlcapsuleError, UsageError
from . import planner
from .planner import (
    MIN_LIMIT_MB,
    MiB as MiB,  # re-exported: the enclave core sizes the limit with it
    Plan,
    Segment,
    Split,
    Tensor,
)
from .weights import (
    WeightReader as WeightReader,  # re-exported: shared with resident mode
    aligned_empty,
    mapped_buffer,
)


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
#: How each split axis is combined, as ``describe`` names it.
_AXIS_NAMES = {"k": "reduction (summed)", "n": "output (concatenated)", "c": "output channels (concatenated)"}

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


class StreamingModel:
    """Runs a capsule's model segment by segment within ``limit_bytes`` of memory.

    ``graph_bytes``: the decrypted graph with placeholders; ``reader``: the weights segment.
    The model takes ownership of ``reader`` and closes it. The plan is :mod:`.planner`'s; this
    class decrypts what it names and runs it.
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

    # -- loading -------------------------------------------------------------------------------
    def _plan(self, model: onnx.ModelProto) -> None:
        """Plan (:mod:`.planner`), decrypting the pinned tensors on the way; then the scratch and
        the sessions."""
        reader = self.reader
        info = planner.analyse(model, plain_length=reader.plain_length, public_architecture=self.public_architecture)
        pins, pinned_bytes = planner.choose_pins(info.weights, self.limit)
        self._decrypt_pins(pins, pinned_bytes)
        plan = planner.schedule(info, limit=self.limit, pinned=pins, pinned_bytes=pinned_bytes,
                                chunk_size=reader.chunk_size, plain_length=reader.plain_length, threads=reader.threads)
        self._adopt(plan)
        # Mapped and populated now: the pages count from load on, and no query pays their faults.
        self._scratch = mapped_buffer(plan.scratch_bytes) if plan.scratch_bytes else None
        self._open_sessions()
        self._drop_pins()

    def _decrypt_pins(self, pins: list[Tensor], pinned_bytes: int) -> None:
        """The pinned tensors, decrypted once into one buffer, in segment order (each chunk once)."""
        self._pinned: dict[str, np.ndarray] = {}
        if not pins:
            return
        buf = aligned_empty(pinned_bytes)
        off = 0
        for t in pins:
            self.reader.read_into(buf.data[off:off + t.length], t.offset)
            self._pinned[t.name] = buf[off:off + t.length].view(t.dtype).reshape(t.shape)
            off += t.aligned

    def _adopt(self, plan: Plan) -> None:
        self.plan = plan
        self._graph = plan.graph
        self._inline = plan.graph.inline
        self.input_names = plan.graph.input_names
        self.output_names = plan.graph.output_names
        self.steps = plan.steps
        self._step_seconds = [[0.0, 0.0] for _ in plan.steps]  # per step: decrypting, in all
        self.pinned_bytes = plan.pinned_bytes
        self.activation_bytes = plan.activation_bytes
        self.estimate_complete = plan.estimate_complete
        self.scratch_cap = plan.scratch_cap
        self.scratch_bytes = plan.scratch_bytes
        self.reserve_bytes = plan.reserve_bytes
        self.room = plan.room
        self.max_batch = plan.max_batch
        self.io_item_bytes = plan.io_item_bytes
        self._batched = plan.batched

    def _open_sessions(self) -> None:
        """A session per segment (its weight feeds: views of the scratch, made once), two per split."""
        for step in self.steps:
            if isinstance(step, Segment):
                step.session = self._session(planner.segment_model(self._graph, step, self._pinned))
                assert self._scratch is not None or not step.weights
                for t, off in zip(step.weights, step.offsets, strict=True):
                    step.feeds[t.name] = self._scratch[off:off + t.length].view(t.dtype).reshape(t.shape)  # type: ignore[index]
            else:
                first, rest = planner.split_models(self._graph, step)
                step.first = self._session(first)
                step.rest = self._session(rest) if rest is not None else None

    def _drop_pins(self) -> None:
        """The sessions hold their own copies of the pinned tensors now; keep only what a split
        node feeds at run time."""
        keep = {s.c for s in self.steps if isinstance(s, Split) and s.c in self._pinned}
        pins_left = {name: self._pinned[name].copy() for name in keep}
        for v in self._pinned.values():
            v.fill(0)
        self._pinned = pins_left

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
            for out, o in zip(outputs, part, strict=True):
                out[i:i + len(o)] = o
            del part
        return outputs

    def _run_once(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        t0 = time.perf_counter()
        values: dict[str, Any] = dict(feeds)
        scratch = self._scratch.data if self._scratch is not None else None
        reader = self.reader
        for k, step in enumerate(self.steps):
            t_step, d_step = time.perf_counter(), reader.seconds
            if isinstance(step, Segment):
                for t, off in zip(step.weights, step.offsets, strict=True):
                    reader.read_into(scratch[off:off + t.length], t.offset)  # type: ignore[index]
                ins = {name: values[name] for name in step.act_inputs}
                ins.update(step.feeds)
                values.update(zip(step.outputs, step.session.run(step.outputs, ins), strict=True))
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

    def _run_split(self, sp: Split, values: dict[str, Any], scratch: memoryview | None) -> np.ndarray:
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
        segs = [s for s in self.steps if isinstance(s, Segment)]
        splits = [s for s in self.steps if isinstance(s, Split)]
        return {
            "mode": "streaming",
            "architecture": "public",
            "memory_limit": self.limit,
            "segments": len(segs),
            "split_nodes": [{"op": s.node.op_type, "axis": _AXIS_NAMES[s.axis],
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
            "steps": [{"kind": "segment" if isinstance(s, Segment) else f"split {s.node.op_type}",
                       "nodes": len(s.nodes) if isinstance(s, Segment) else 1,
                       "weight_bytes": s.weight_bytes if isinstance(s, Segment) else s.weight.length,
                       "decrypt_seconds": t[0], "seconds": t[1]}
                      for s, t in zip(self.steps, self._step_seconds, strict=True)],
            "onnxruntime": dict(_ORT_SETUP or {}),
        }

    def close(self) -> None:
        for step in getattr(self, "steps", []):
            if isinstance(step, Segment):
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
