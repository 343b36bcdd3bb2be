"""The streaming planner: how a model runs within a memory limit, decided on the ONNX graph alone.

Enclave side, but pure: no ONNX Runtime, no decryption, no I/O. :mod:`.streaming` decrypts
and runs what this module decides (see its docstring for the whole design):

* :func:`analyse` reads the graph: the weight tensors behind its placeholders, its inline
  constants, and the types and batch-1 sizes of its values from ONNX shape inference.
* :func:`choose_pins` picks the tiny tensors decrypted once at load (*pinned*).
* :func:`schedule` cuts the graph into steps in topological order: *segments* (runs of nodes
  whose streamed weights fit the scratch together) and *splits* (one MatMul, Gemm or Conv
  whose weight alone does not fit, run in blocks of rows of that weight); it sizes the scratch,
  the reserve and the batches, or refuses the limit.
* :func:`segment_model` and :func:`split_models` build the ONNX sub-models of the steps.

:func:`plan` chains the first three, for tests and tools that have a graph and no capsule.

What leaves the enclave: a refused limit names one number (:func:`too_small`) unless the
architecture is public; tensors are named in errors only then (:func:`tensor_label`).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import FormatError, UsageError
from .split import PLACEHOLDER

MiB = 1 << 20
ALIGN = 64
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
#: Lowest memory limit accepted, in MiB.
MIN_LIMIT_MB = 8.0
#: How many sessions the first sizing of the scratch assumes, and how often it is redone.
GUESS_SESSIONS = 8
SIZING_ROUNDS = 4


# -- the plan's parts -------------------------------------------------------------------------------
@dataclass
class Tensor:
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
class Segment:
    """Consecutive nodes whose streamed weights are decrypted into the scratch together."""

    nodes: list[onnx.NodeProto]
    act_inputs: list[str] = field(default_factory=list)
    weights: list[Tensor] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    free: list[str] = field(default_factory=list)
    weight_bytes: int = 0
    offsets: list[int] = field(default_factory=list)  # of each weight in the scratch
    # Filled in by the executor (.streaming): the ORT session, and its weight feeds.
    session: Any = None
    feeds: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class Split:
    """A MatMul, Gemm or Conv run in blocks of rows of its stored weight."""

    node: onnx.NodeProto
    # "k": blocks over the reduction axis, summed; "n": over output columns, concatenated;
    # "c": a Conv's blocks of output channels, concatenated
    axis: str
    a: str
    weight: Tensor
    c: str | None  # Gemm's C input, if any
    output: str
    alpha: float = 1.0
    beta: float = 1.0
    trans_a: int = 0
    rows: int = 0  # rows per block
    blocks: list[tuple[int, int]] = field(default_factory=list)
    c_tensor: Tensor | None = None  # C, when C is a streamed weight
    free: list[str] = field(default_factory=list)
    # Filled in by the executor (.streaming): the sessions for the first block and the others.
    first: Any = None
    rest: Any = None

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.weight.shape[1:], dtype=np.int64)) * self.weight.dtype.itemsize


Step = Segment | Split


@dataclass
class GraphInfo:
    """What :func:`analyse` reads from the graph."""

    public_architecture: bool
    opsets: list[onnx.OperatorSetIdProto]
    ir_version: int
    functions: list[onnx.FunctionProto]
    nodes: list[onnx.NodeProto]
    input_names: list[str]  # activations only (no initializer)
    output_names: list[str]
    io_values: list[onnx.ValueInfoProto]  # the graph's inputs and outputs that are activations
    weights: dict[str, Tensor]  # behind placeholders
    inline: dict[str, TensorProto]  # stored in the graph
    init_types: dict[str, int]
    types: dict[str, int]  # from shape inference
    sizes: dict[str, int | None]  # bytes at batch 1, where shape inference knows

    def is_constant(self, name: str) -> bool:
        return name in self.weights or name in self.inline


@dataclass
class Plan:
    """The steps, and the memory figures they were planned for."""

    graph: GraphInfo
    limit: int
    pinned: list[Tensor]  # decrypted once at load, in segment order
    pinned_bytes: int
    steps: list[Step]
    activation_bytes: int
    estimate_complete: bool
    scratch_cap: int  # what the limit leaves for weights
    scratch_bytes: int  # what the largest step needs of it
    reserve_bytes: int
    room: int  # for activations, batch included
    max_batch: int  # at batch-1 activations; 0 if unknown
    io_item_bytes: int  # inputs and outputs of one batch item
    batched: bool  # every input and output has a dynamic first dimension

    @property
    def sessions(self) -> int:
        return count_sessions(self.steps)


# -- what may leave the enclave -------------------------------------------------------------------
def tensor_label(name: str, public_architecture: bool) -> str:
    """A tensor, for an error message: named only when the architecture is public."""
    return f"tensor {name[:200]!r}" if public_architecture else "a tensor of the model"


def too_small(limit: int, short: int) -> UsageError:
    """The limit is ``short`` bytes short: say by how much in total, as one number. An
    aggregate, like the limit itself (see :mod:`.streaming`)."""
    need = math.ceil((limit + max(short, 0)) / MiB)
    return UsageError(f"a memory limit of {limit / MiB:g} MB is too small for this model: "
                      f"it needs at least {need} MB", hint="raise --memory-limit")


# -- reading the graph ------------------------------------------------------------------------------
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


def refuse_control_flow(graph: onnx.GraphProto, public_architecture: bool) -> None:
    """Streaming cannot cut through subgraphs (If, Loop, Scan)."""
    for node in graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise UsageError("streaming mode does not support models with control flow (If, Loop, Scan)"
                             if public_architecture else "streaming mode cannot run this model",
                             hint="run this capsule without --memory-limit")


def weight_tensor(t: TensorProto, plain_length: int, public_architecture: bool) -> Tensor:
    """The weight behind a placeholder initializer, checked against the weights segment."""
    ext = {e.key: e.value for e in t.external_data}
    if ext.get("location") != PLACEHOLDER:
        raise FormatError(f"{tensor_label(t.name, public_architecture)} points outside the capsule")
    try:
        offset, length, dtype = int(ext["offset"]), int(ext["length"]), _dtype(t.data_type)
    except (KeyError, ValueError, TypeError) as e:
        raise FormatError(f"{tensor_label(t.name, public_architecture)} has a malformed placeholder") from e
    count = int(np.prod(t.dims, dtype=np.int64))
    if offset < 0 or length != count * dtype.itemsize or offset + length > plain_length or offset % ALIGN:
        raise FormatError(f"{tensor_label(t.name, public_architecture)} does not fit the weights segment")
    return Tensor(t.name, offset, length, dtype, t.data_type, tuple(int(d) for d in t.dims))


def infer_types_and_sizes(model: onnx.ModelProto) -> tuple[dict[str, int], dict[str, int | None]]:
    """Element types everywhere, and value sizes at batch 1 (dynamic input dimensions set to 1),
    from ONNX shape inference; what it cannot infer is missing (types) or None (sizes)."""
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
    types: dict[str, int] = {}
    sizes: dict[str, int | None] = {}
    for vi in list(probe.graph.input) + list(probe.graph.value_info) + list(probe.graph.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
        sizes[vi.name] = _value_bytes(vi)
    return types, sizes


def analyse(model: onnx.ModelProto, *, plain_length: int, public_architecture: bool = False) -> GraphInfo:
    """Read ``model`` (a graph with placeholders) against a weights segment of ``plain_length``
    bytes. Raises UsageError for a graph streaming cannot run, FormatError for a bad placeholder."""
    g = model.graph
    refuse_control_flow(g, public_architecture)
    weights: dict[str, Tensor] = {}
    inline: dict[str, TensorProto] = {}
    for t in g.initializer:
        if t.data_location != TensorProto.EXTERNAL:
            inline[t.name] = t
        else:
            weights[t.name] = weight_tensor(t, plain_length, public_architecture)
    types, sizes = infer_types_and_sizes(model)
    io_values = [vi for vi in list(g.input) + list(g.output) if vi.name not in weights and vi.name not in inline]
    return GraphInfo(
        public_architecture=public_architecture,
        opsets=list(model.opset_import), ir_version=model.ir_version, functions=list(model.functions),
        nodes=list(g.node),
        input_names=[i.name for i in g.input if i.name not in weights and i.name not in inline],
        output_names=[o.name for o in g.output],
        io_values=io_values, weights=weights, inline=inline,
        init_types={t.name: t.data_type for t in g.initializer}, types=types, sizes=sizes)


# -- pinned tensors ---------------------------------------------------------------------------------
def choose_pins(weights: Mapping[str, Tensor], limit: int) -> tuple[list[Tensor], int]:
    """The small tensors to decrypt once at load: smallest first, each at most
    :data:`PIN_TENSOR_BYTES`, all within :data:`PIN_TOTAL_FRACTION` of the limit. Returns them in
    segment order (each chunk is decrypted once) and their aligned total."""
    budget = int(limit * PIN_TOTAL_FRACTION)
    chosen: list[Tensor] = []
    total = 0
    for t in sorted(weights.values(), key=lambda t: t.length):
        if t.length > PIN_TENSOR_BYTES or total + t.aligned > budget:
            break
        chosen.append(t)
        total += t.aligned
    return sorted(chosen, key=lambda t: t.offset), total


# -- activations ----------------------------------------------------------------------------------
def last_uses(info: GraphInfo) -> dict[str, int]:
    """The position (in topological order) of each activation's last use; graph inputs and
    outputs live to the end (the caller holds the inputs for the whole run)."""
    last_use: dict[str, int] = {}
    for j, node in enumerate(info.nodes):
        for name in node.input:
            if name and not info.is_constant(name):
                last_use[name] = j
    for name in info.output_names + info.input_names:
        last_use[name] = len(info.nodes)
    return last_use


def activation_estimate(info: GraphInfo, last_use: Mapping[str, int]) -> tuple[int, bool]:
    """The peak of live activation bytes at batch 1 (values produced before a node and used at
    or after it, plus its outputs), with :data:`ACTIVATION_MARGIN`; and whether every size was
    known."""
    nodes = info.nodes
    end = len(nodes)
    produced_at: dict[str, int] = {name: -1 for name in info.input_names}
    for j, node in enumerate(nodes):
        for name in node.output:
            if name:
                produced_at[name] = j
    live = [0] * max(end, 1)
    complete = True
    for name, p in produced_at.items():
        size = info.sizes.get(name)
        if size is None:
            complete = False
            continue
        for j in range(max(p, 0), min(last_use.get(name, p), end - 1) + 1):
            live[j] += size
    return (int(max(live) * ACTIVATION_MARGIN) if nodes else 0), complete


# -- cutting the graph into steps -----------------------------------------------------------------
def count_sessions(steps: Sequence[Step]) -> int:
    """ORT sessions the steps need: one per segment, two per split (first block, the others)."""
    return sum(1 if isinstance(s, Segment) else 2 for s in steps)


def reserve(n_sessions: int, *, streaming: bool, pinned_bytes: int, chunk_size: int, plain_length: int,
            threads: int) -> int:
    """Memory besides activations and scratch: the fixed part, the sessions, the pinned tensors,
    and (if any weight is streamed) the bounce buffer and the ciphertext chunk a second
    decrypting thread has mapped."""
    bounce = min(chunk_size, plain_length) * (1 + (threads > 1)) if streaming else 0
    return RESERVE_FIXED + bounce + pinned_bytes + n_sessions * RESERVE_PER_SESSION


def split_node(node: onnx.NodeProto, streamed: Mapping[str, Tensor], cap: int, *, constants: Collection[str],
               limit: int, public_architecture: bool) -> Split:
    """``node`` run in blocks of rows of its largest weight, each block within ``cap``; or the
    refusal of the limit. ``constants``: the names that are not activations (pinned, inline)."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    ins = list(node.input)
    big = max((streamed[n] for n in ins if n in streamed), key=lambda t: t.length)
    node_weights = sum(streamed[n].aligned for n in dict.fromkeys(ins) if n in streamed)

    def refuse(short: int) -> UsageError:
        # Encrypted graph: the smallest limit that works, as one number (no op, no size).
        if not public_architecture:
            return too_small(limit, short)
        return UsageError(f"a memory limit of {limit / MiB:g} MB leaves {cap / MiB:.1f} MB for weights, and the "
                          f"{big.length / MiB:.1f} MB tensor of this {node.op_type} node cannot be split",
                          hint="raise --memory-limit")

    conv = node.op_type == "Conv" and len(big.shape) >= 3 and int(attrs.get("group", 1)) == 1
    if not (conv or (node.op_type in ("MatMul", "Gemm") and len(big.shape) == 2)) or len(ins) < 2 or ins[1] != big.name:
        raise refuse(node_weights - cap)
    if ins[0] in streamed or ins[0] in constants:
        raise refuse(node_weights - cap)
    c = ins[2] if node.op_type in ("Gemm", "Conv") and len(ins) > 2 and ins[2] else None
    if conv:
        sp = Split(node, "c", ins[0], big, c, node.output[0])
    elif node.op_type == "Gemm":
        axis = "n" if attrs.get("transB", 0) else "k"
        sp = Split(node, axis, ins[0], big, c, node.output[0], alpha=float(attrs.get("alpha", 1.0)),
                   beta=float(attrs.get("beta", 1.0)), trans_a=int(attrs.get("transA", 0)))
    else:
        sp = Split(node, "k", ins[0], big, None, node.output[0])
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


def cut(nodes: Sequence[onnx.NodeProto], streamed: Mapping[str, Tensor], cap: int, *, constants: Collection[str],
        limit: int, public_architecture: bool) -> list[Step]:
    """Greedy, in topological order: a node joins the current segment while the segment's
    weights fit ``cap``; a node whose weights alone do not fit is split."""
    steps: list[Step] = []
    cur = Segment([])
    cur_names: set[str] = set()
    for node in nodes:
        all_ws = [streamed[n] for n in dict.fromkeys(node.input) if n in streamed]
        ws = [t for t in all_ws if t.name not in cur_names]
        add = sum(t.aligned for t in ws)
        if cur.weight_bytes + add > cap:
            if cur.nodes:
                steps.append(cur)
            cur, cur_names = Segment([]), set()
            ws, add = all_ws, sum(t.aligned for t in all_ws)
            if add > cap:
                steps.append(split_node(node, streamed, cap, constants=constants, limit=limit,
                                        public_architecture=public_architecture))
                continue
        cur.nodes.append(node)
        cur.weights += ws
        cur_names.update(t.name for t in ws)
        cur.weight_bytes += add
    if cur.nodes:
        steps.append(cur)
    return steps


def mark_boundaries(steps: Sequence[Step], info: GraphInfo, last_use: Mapping[str, int]) -> None:
    """Each step's activation inputs, the outputs later steps need, and what can be dropped after it."""
    end = len(info.nodes)
    position = {id(n): j for j, n in enumerate(info.nodes)}
    for step in steps:
        seg_nodes = step.nodes if isinstance(step, Segment) else [step.node]
        last = position[id(seg_nodes[-1])]
        inside = {o for n in seg_nodes for o in n.output if o}
        if isinstance(step, Segment):
            consumed = [i for n in seg_nodes for i in n.input if i]
            step.act_inputs = list(dict.fromkeys(i for i in consumed if i not in inside and not info.is_constant(i)))
            step.outputs = [o for n in seg_nodes for o in n.output if o and last_use.get(o, -1) > last]
        if isinstance(step, Segment):
            users = step.act_inputs
        else:
            users = [x for x in (step.a, step.c) if x and x not in info.weights]
        step.free = [i for i in users if last_use.get(i, end) <= last and i not in info.output_names]


def layout_scratch(steps: Sequence[Step]) -> int:
    """Place each segment's weights in the scratch (``Segment.offsets``); the scratch is as large
    as the largest step needs, no larger."""
    need = 0
    for step in steps:
        if isinstance(step, Segment):
            off = 0
            for t in step.weights:
                step.offsets.append(off)
                off += t.aligned
            need = max(need, off)
        else:
            c = step.c_tensor.aligned if step.c_tensor else 0
            need = max(need, c + step.rows * step.row_bytes)
    return need


def schedule(info: GraphInfo, *, limit: int, pinned: Sequence[Tensor], pinned_bytes: int, chunk_size: int,
             plain_length: int, threads: int) -> Plan:
    """Cut the graph into steps within ``limit`` bytes, or refuse the limit (UsageError).

    The scratch gets what the limit leaves after the reserve and the activations. The reserve
    depends on the number of sessions, so the plan is made for a guessed number and made again if
    it needs more. ``chunk_size``, ``plain_length`` and ``threads`` describe the weights reader.
    """
    pinned_names = {t.name for t in pinned}
    streamed = {k: v for k, v in info.weights.items() if k not in pinned_names}
    last_use = last_uses(info)
    activation_bytes, complete = activation_estimate(info, last_use)
    public = info.public_architecture

    def reserve_for(n_sessions: int) -> int:
        return reserve(n_sessions, streaming=bool(streamed), pinned_bytes=pinned_bytes, chunk_size=chunk_size,
                       plain_length=plain_length, threads=threads)

    sessions = GUESS_SESSIONS
    for _ in range(SIZING_ROUNDS):
        cap = limit - reserve_for(sessions) - activation_bytes
        least = MIN_SCRATCH if streamed else 0
        if cap < least:
            if not public:
                raise too_small(limit, least - cap)
            need = (limit - cap + least) / MiB
            raise UsageError(f"a memory limit of {limit / MiB:g} MB is too small for this model: it needs "
                             f"at least {math.ceil(need)} MB ({activation_bytes / MiB:.1f} MB for activations, "
                             f"{reserve_for(sessions) / MiB:.1f} MB for sessions and buffers"
                             + (", and some room for weights)" if streamed else ")"), hint="raise --memory-limit")
        cap = max(cap, 0)
        steps = cut(info.nodes, streamed, cap, constants=pinned_names | set(info.inline), limit=limit,
                    public_architecture=public)
        if count_sessions(steps) <= sessions:
            break
        sessions = count_sessions(steps)
    mark_boundaries(steps, info, last_use)
    scratch_bytes = layout_scratch(steps)
    reserve_bytes = reserve_for(count_sessions(steps))
    # Batches whose activations would not fit run in sub-batches (if every input and output has
    # the batch as its first, dynamic, dimension): the whole batch's inputs and outputs stay in
    # memory, the activations are those of one sub-batch.
    room = limit - reserve_bytes - scratch_bytes
    return Plan(
        graph=info, limit=limit, pinned=list(pinned), pinned_bytes=pinned_bytes, steps=steps,
        activation_bytes=activation_bytes, estimate_complete=complete, scratch_cap=cap,
        scratch_bytes=scratch_bytes, reserve_bytes=reserve_bytes, room=room,
        max_batch=max(1, room // activation_bytes) if activation_bytes else 0,
        io_item_bytes=sum(info.sizes.get(vi.name) or 0 for vi in info.io_values),
        batched=all(vi.type.tensor_type.shape.dim and not vi.type.tensor_type.shape.dim[0].HasField("dim_value")
                    for vi in info.io_values))


def plan(model: onnx.ModelProto, *, limit: int, plain_length: int, chunk_size: int, threads: int = 1,
         public_architecture: bool = False) -> Plan:
    """:func:`analyse`, :func:`choose_pins` and :func:`schedule` in one call: the plan the
    streaming runtime would make for ``model`` (placeholders into a weights segment of
    ``plain_length`` bytes, read in chunks of ``chunk_size`` by ``threads`` threads)."""
    if limit < MIN_LIMIT_MB * MiB:
        raise UsageError(f"the memory limit must be at least {MIN_LIMIT_MB:g} MB")
    info = analyse(model, plain_length=plain_length, public_architecture=public_architecture)
    pinned, pinned_bytes = choose_pins(info.weights, limit)
    return schedule(info, limit=limit, pinned=pinned, pinned_bytes=pinned_bytes, chunk_size=chunk_size,
                    plain_length=plain_length, threads=threads)


# -- sub-models -------------------------------------------------------------------------------------
def value_type(info: GraphInfo, name: str) -> int:
    t = info.types.get(name) or info.init_types.get(name)
    if not t:
        what = f"the type of {name[:200]!r}" if info.public_architecture else "the types"
        raise UsageError(f"streaming mode cannot infer {what} in this model",
                         hint="run this capsule without --memory-limit")
    return t


def _model(info: GraphInfo, nodes: Sequence[onnx.NodeProto], inputs: list[onnx.ValueInfoProto],
           outputs: list[onnx.ValueInfoProto], initializers: list[TensorProto]) -> bytes:
    graph = helper.make_graph(list(nodes), "segment", inputs, outputs, initializers)
    m = helper.make_model(graph, opset_imports=info.opsets, ir_version=info.ir_version)
    m.functions.extend(info.functions)
    return m.SerializeToString()


def _consts(info: GraphInfo, names: Sequence[str], pinned: Mapping[str, np.ndarray]) -> list[TensorProto]:
    out = []
    for name in dict.fromkeys(names):
        if name in info.inline:
            out.append(info.inline[name])
        elif name in pinned:
            out.append(numpy_helper.from_array(pinned[name], name))
    return out


def segment_model(info: GraphInfo, seg: Segment, pinned: Mapping[str, np.ndarray]) -> bytes:
    """The segment as an ONNX model: activations and streamed weights are inputs; inline and
    ``pinned`` tensors (name to value) are initializers."""
    names = [i for n in seg.nodes for i in n.input if i]
    inputs = [helper.make_tensor_value_info(n, value_type(info, n), None) for n in seg.act_inputs]
    inputs += [helper.make_tensor_value_info(t.name, t.onnx_type, list(t.shape)) for t in seg.weights]
    outputs = [helper.make_tensor_value_info(n, value_type(info, n), None) for n in seg.outputs]
    return _model(info, seg.nodes, inputs, outputs, _consts(info, names, pinned))


def split_models(info: GraphInfo, sp: Split) -> tuple[bytes, bytes | None]:
    """The split node's block models: for the first block (``A``, ``B`` and ``C`` in, ``Y`` out)
    and, for a summed split, the other blocks (``Acc`` in too); None when blocks are concatenated."""
    t = sp.weight
    a_type = value_type(info, sp.a)
    a_in = helper.make_tensor_value_info("A", a_type, None)
    b_in = helper.make_tensor_value_info("B", t.onnx_type, [None, t.shape[1]])
    y_out = helper.make_tensor_value_info("Y", value_type(info, sp.output), None)
    consts: list[TensorProto] = []
    c_inputs: list[onnx.ValueInfoProto] = []
    c_name = ""
    if sp.c is not None:
        c_name = "C"
        c_inputs = [helper.make_tensor_value_info("C", sp.c_tensor.onnx_type if sp.c_tensor else value_type(info, sp.c),
                                                  None)]
    if sp.node.op_type == "MatMul":
        first = _model(info, [helper.make_node("MatMul", ["A", "B"], ["Y"])], [a_in, b_in], [y_out], [])
        acc = helper.make_tensor_value_info("Acc", value_type(info, sp.output), None)
        nodes = [helper.make_node("MatMul", ["A", "B"], ["P"]), helper.make_node("Add", ["Acc", "P"], ["Y"])]
        rest = _model(info, nodes, [a_in, b_in, acc], [y_out], [])
        return first, rest
    if sp.axis == "c":
        b_in = helper.make_tensor_value_info("B", t.onnx_type, [None, *t.shape[1:]])
        node = helper.make_node("Conv", ["A", "B"] + ([c_name] if c_name else []), ["Y"])
        node.attribute.extend(sp.node.attribute)
        return _model(info, [node], [a_in, b_in] + c_inputs, [y_out], consts), None
    gemm: dict[str, Any] = {"alpha": sp.alpha, "transA": sp.trans_a}
    if sp.axis == "n":
        node = helper.make_node("Gemm", ["A", "B"] + ([c_name] if c_name else []), ["Y"], beta=sp.beta, transB=1,
                                **gemm)
        return _model(info, [node], [a_in, b_in] + c_inputs, [y_out], consts), None
    node = helper.make_node("Gemm", ["A", "B"] + ([c_name] if c_name else []), ["Y"], beta=sp.beta, transB=0,
                            **gemm)
    first = _model(info, [node], [a_in, b_in] + c_inputs, [y_out], consts)
    acc = helper.make_tensor_value_info("Acc", value_type(info, sp.output), None)
    rest = _model(info, [helper.make_node("Gemm", ["A", "B", "Acc"], ["Y"], beta=1.0, transB=0, **gemm)],
                  [a_in, b_in, acc], [y_out], [])
    return first, rest
