"""The streaming planner on ONNX graphs alone: no capsule, no worker, no ONNX Runtime session.

``mlcapsule.enclave.runtime.planner`` decides how a model runs within a memory limit (segments, split
nodes, pinned tensors, scratch, reserve, batches) from the graph with its weight placeholders;
``runtime.streaming`` only runs what it decides (tests/test_streaming.py runs real capsules).
"""

from __future__ import annotations

import itertools
import re
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from mlcapsule.enclave.errors import FormatError, UsageError
from mlcapsule.enclave.runtime import planner
from mlcapsule.enclave.runtime.planner import MiB, Segment, Split
from mlcapsule.enclave.runtime.split import split_model

CHUNK = 1 * MiB
RNG = np.random.default_rng(11)


def _mlp() -> onnx.ModelProto:
    """Three Gemm layers, 256 -> 1024 -> 1024 -> 10: weights of 1 MiB, 4 MiB and 40 KiB (stored
    [K, N], transB=0), biases of 4 KiB, 4 KiB and 40 bytes."""
    def w(name: str, *shape: int) -> TensorProto:
        return numpy_helper.from_array(RNG.standard_normal(shape).astype(np.float32), name)

    nodes = [helper.make_node("Gemm", ["input", "W1", "b1"], ["h1"]), helper.make_node("Relu", ["h1"], ["r1"]),
             helper.make_node("Gemm", ["r1", "W2", "b2"], ["h2"]), helper.make_node("Relu", ["h2"], ["r2"]),
             helper.make_node("Gemm", ["r2", "W3", "b3"], ["logits"])]
    g = helper.make_graph(nodes, "mlp3", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 256])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
                          [w("W1", 256, 1024), w("b1", 1024), w("W2", 1024, 1024), w("b2", 1024),
                           w("W3", 1024, 10), w("b3", 10)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(m)
    return m


@pytest.fixture(scope="module")
def mlp() -> tuple[onnx.ModelProto, int]:
    """The MLP as the enclave sees it: the graph with placeholders, and the weights' length."""
    split = split_model(_mlp())
    return split.graph, len(split.blob)


def _plan(mlp: tuple[onnx.ModelProto, int], limit_mb: float, **kw: object) -> planner.Plan:
    graph, length = mlp
    return planner.plan(graph, limit=int(limit_mb * MiB), plain_length=length, chunk_size=CHUNK, **kw)  # type: ignore[arg-type]


def _shape(plan: planner.Plan) -> list[tuple[str, ...]]:
    """Each step as (segment, its nodes' ops...) or (split, op, axis, blocks)."""
    return [("segment", *(n.op_type for n in s.nodes)) if isinstance(s, Segment)
            else ("split", s.node.op_type, s.axis, str(len(s.blocks))) for s in plan.steps]


def _check_budget(plan: planner.Plan) -> None:
    assert plan.reserve_bytes + plan.activation_bytes + plan.scratch_bytes <= plan.limit
    assert plan.scratch_bytes <= plan.scratch_cap
    for s in plan.steps:
        if isinstance(s, Split):
            assert s.blocks[0][0] == 0 and s.blocks[-1][1] == s.weight.shape[0]
            assert all(a[1] == b[0] for a, b in itertools.pairwise(s.blocks))
            assert s.rows * s.row_bytes + (s.c_tensor.aligned if s.c_tensor else 0) <= plan.scratch_cap
        else:
            assert s.weight_bytes <= plan.scratch_cap


@pytest.mark.parametrize(("limit_mb", "expected"), [
    # everything fits: one segment, one session
    (64, [("segment", "Gemm", "Relu", "Gemm", "Relu", "Gemm")]),
    # ~3.5 MiB of scratch: the 4 MiB W2 is split over its rows (the reduction axis, summed), in 2 blocks
    (16, [("segment", "Gemm", "Relu"), ("split", "Gemm", "k", "2"), ("segment", "Relu", "Gemm")]),
    # ~1.5 MiB: W1 (1 MiB) still fits alone, W2 takes 3 blocks
    (14, [("segment", "Gemm", "Relu"), ("split", "Gemm", "k", "3"), ("segment", "Relu", "Gemm")]),
    # ~0.75 MiB: W1 is split too
    (13.25, [("split", "Gemm", "k", "2"), ("segment", "Relu"), ("split", "Gemm", "k", "6"),
             ("segment", "Relu", "Gemm")]),
])
def test_a_three_layer_mlp_is_cut_into_the_expected_steps(mlp: tuple[onnx.ModelProto, int], limit_mb: float,
                                                          expected: list[tuple[str, ...]]) -> None:
    plan = _plan(mlp, limit_mb)
    assert _shape(plan) == expected
    _check_budget(plan)
    # the biases are pinned (small, within 1/32 of the limit), in segment order; W3 (40 KiB) is not
    assert [t.name for t in plan.pinned] == ["b1", "b2", "b3"]
    assert plan.pinned_bytes == 4096 + 4096 + 64
    # every streamed weight is read by exactly one step
    streamed = [t.name for s in plan.steps for t in (s.weights if isinstance(s, Segment) else [s.weight])]
    assert sorted(streamed) == ["W1", "W2", "W3"]
    assert plan.estimate_complete and plan.activation_bytes > 0
    assert plan.batched and plan.max_batch >= 1
    assert plan.sessions == sum(1 if isinstance(s, Segment) else 2 for s in plan.steps)


def test_boundaries_free_activations_after_their_last_use(mlp: tuple[onnx.ModelProto, int]) -> None:
    plan = _plan(mlp, 14)
    first, split, last = plan.steps
    assert isinstance(first, Segment) and isinstance(split, Split) and isinstance(last, Segment)
    assert first.act_inputs == ["input"] and first.outputs == ["r1"] and first.free == []  # inputs live to the end
    assert split.a == "r1" and split.c == "b2" and split.output == "h2" and split.free == ["r1"]
    assert last.act_inputs == ["h2"] and last.outputs == ["logits"] and last.free == ["h2"]
    # the segment's weights are laid out in the scratch, aligned
    assert last.offsets == [0] and plan.scratch_bytes == max(first.weight_bytes, last.weight_bytes,
                                                             split.rows * split.row_bytes)


def test_a_limit_too_small_is_refused_with_one_number(mlp: tuple[onnx.ModelProto, int]) -> None:
    with pytest.raises(UsageError) as e:
        _plan(mlp, 12)
    msg = str(e.value)
    assert re.fullmatch(r"a memory limit of 12 MB is too small for this model: it needs at least \d+ MB", msg), msg
    need = int(msg.split()[-2])
    assert need > 12
    # that number is a limit that works
    assert _plan(mlp, need).steps
    # with a public architecture, the refusal may explain itself
    with pytest.raises(UsageError, match="for activations"):
        _plan(mlp, 12, public_architecture=True)
    with pytest.raises(UsageError, match="at least 8 MB"):
        _plan(mlp, 4)


def test_a_node_that_cannot_be_split_is_refused_with_one_number() -> None:
    """A MatMul whose 4 MiB weight is 3-D: streaming cannot split it."""
    w = numpy_helper.from_array(np.zeros((4, 512, 512), np.float32), "W")
    g = helper.make_graph([helper.make_node("MatMul", ["input", "W"], ["output"])], "w3d",
                          [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4, 8, 512])],
                          [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 4, 8, 512])], [w])
    split = split_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
    kw = {"limit": 16 * MiB, "plain_length": len(split.blob), "chunk_size": CHUNK}
    with pytest.raises(UsageError) as e:
        planner.plan(split.graph, **kw)  # type: ignore[arg-type]
    assert re.fullmatch(r"a memory limit of 16 MB is too small for this model: it needs at least \d+ MB", str(e.value))
    with pytest.raises(UsageError, match="tensor of this MatMul node cannot be split"):
        planner.plan(split.graph, public_architecture=True, **kw)  # type: ignore[arg-type]


def test_graphs_streaming_cannot_run_are_refused_before_any_weight_is_read(mlp: tuple[onnx.ModelProto, int]) -> None:
    graph, length = mlp
    # a placeholder past the end of the weights segment
    with pytest.raises(FormatError, match="^a tensor of the model does not fit the weights segment$"):
        planner.analyse(graph, plain_length=length - 64)
    # control flow
    body = helper.make_graph([helper.make_node("Identity", ["input"], ["y"])], "b", [],
                             [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    cond = onnx.ModelProto()
    cond.CopyFrom(graph)
    cond.graph.node.append(helper.make_node("If", ["c"], ["z"], then_branch=body, else_branch=body))
    with pytest.raises(UsageError, match="^streaming mode cannot run this model$"):
        planner.analyse(cond, plain_length=length)


def test_the_sub_models_take_activations_and_streamed_weights_as_inputs(mlp: tuple[onnx.ModelProto, int]) -> None:
    plan = _plan(mlp, 14)
    pinned = {t.name: np.zeros(t.shape, t.dtype) for t in plan.pinned}
    first, split, last = plan.steps
    assert isinstance(first, Segment) and isinstance(split, Split) and isinstance(last, Segment)
    seg = onnx.ModelProto.FromString(planner.segment_model(plan.graph, first, pinned))
    assert [i.name for i in seg.graph.input] == ["input", "W1"] and [o.name for o in seg.graph.output] == ["r1"]
    assert [t.name for t in seg.graph.initializer] == ["b1"]  # pinned: a constant, which ORT's fusions see
    assert [n.op_type for n in seg.graph.node] == ["Gemm", "Relu"]
    one, rest = planner.split_models(plan.graph, split)
    assert rest is not None  # summed over K: the other blocks add to an accumulator
    one_m, rest_m = onnx.ModelProto.FromString(one), onnx.ModelProto.FromString(rest)
    assert [i.name for i in one_m.graph.input] == ["A", "B", "C"] and [n.op_type for n in one_m.graph.node] == ["Gemm"]
    assert [i.name for i in rest_m.graph.input] == ["A", "B", "Acc"]
    assert all(m.opset_import == plan.graph.opsets for m in (seg, one_m, rest_m))


def test_the_planner_does_not_import_onnxruntime() -> None:
    code = ("import sys; import mlcapsule.enclave.runtime.planner, mlcapsule.enclave.runtime.split; "
            "assert 'onnxruntime' not in sys.modules, 'onnxruntime imported'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
