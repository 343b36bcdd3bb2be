"""Provider-side export helpers: a trained torch or scikit-learn model → ``onnx.ModelProto``.

These run on the provider's machine before :func:`mlcapsule.pack`. torch, scikit-learn and
skl2onnx are optional extras and are imported only inside the functions that need them, so the
client and the enclave never import them.

Public API:

* :func:`torch_to_onnx` — export a ``torch.nn.Module`` (single tensor in, single tensor out).
* :func:`sklearn_to_onnx` — convert a fitted scikit-learn classifier, regressor or Pipeline.
* :func:`keep_outputs` — prune a model to some of its outputs (e.g. drop a classifier's label).

Notes on the exporters (torch 2.13, skl2onnx 1.20):

* ``torch.onnx.export`` defaults to the dynamo (``torch.export``) exporter since torch 2.9. That
  exporter needs the separate ``onnxscript`` package (not a dependency of torch), emits opset 18
  or newer (asking for 17 logs a failed down-conversion and returns opset 18), prints progress
  lines and deprecates writing to a BytesIO. :func:`torch_to_onnx` therefore uses the
  TorchScript exporter (``dynamo=False``) by default: it ships with torch, honours the requested
  opset exactly, takes ``dynamic_axes`` for the batch dimension and writes one self-contained
  proto (weights embedded, no external data). ``exporter="dynamo"`` is available too.
* skl2onnx names a classifier's outputs ``"label"`` (int64 ``[N]``) and ``"probabilities"``
  (float ``[N, n_classes]``, with ``zipmap=False``) and a regressor's output ``"variable"``
  (float ``[N, 1]``). Its tree converters also import the default ONNX domain twice; the
  duplicate is removed here.
* skl2onnx 1.20 passes Python ``bool`` values in integer attributes for
  HistGradientBoosting models, which protobuf 7 rejects ("Expected an int, got a boolean");
  :func:`sklearn_to_onnx` coerces them to ``int`` while converting.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import threading
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np
import onnx

from .enclave.errors import UsageError

__all__ = ["torch_to_onnx", "sklearn_to_onnx", "keep_outputs"]

_TORCH_HINT = "pip install 'mlcapsule[torch]'"
_SKLEARN_HINT = "pip install 'mlcapsule[sklearn]'"


# -- shared helpers ---------------------------------------------------------------------------
def _iter_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _iter_tensors(attr.g)
            for g in attr.graphs:
                yield from _iter_tensors(g)


def _assert_self_contained(model: onnx.ModelProto) -> None:
    external = [t.name for t in _iter_tensors(model.graph) if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise UsageError(
            f"the exported model keeps {len(external)} tensors in external data files (e.g. {external[0]!r})",
            hint="a capsule needs the weights inside the model; models over 2 GB are not supported",
        )


def _dedupe_opsets(model: onnx.ModelProto) -> None:
    """Keep one opset import per domain (the highest version)."""
    best: dict[str, int] = {}
    for op in model.opset_import:
        best[op.domain] = max(best.get(op.domain, 0), op.version)
    if len(best) != len(model.opset_import):
        del model.opset_import[:]
        for domain, version in best.items():
            model.opset_import.append(onnx.helper.make_opsetid(domain, version))


def _check(model: onnx.ModelProto, what: str) -> None:
    try:
        onnx.checker.check_model(model)
    except Exception as e:  # onnx raises ValidationError and, on odd protos, others
        raise UsageError(f"{what} produced a model that fails the ONNX checker: {e}") from e


def _captured_names(node: onnx.NodeProto) -> set[str]:
    """Every name read inside ``node``'s subgraphs (If, Loop, Scan), at any depth."""
    names: set[str] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        for attr in n.attribute:
            for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                for sub in g.node:
                    names.update(i for i in sub.input if i)
                    stack.append(sub)
    return names


def keep_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """Return a copy of ``model`` whose graph outputs are only ``names`` (in that order).

    Nodes and initializers that no longer contribute to an output are removed, e.g. the ArgMax
    that computes a classifier's ``"label"`` when only ``"probabilities"`` is kept.
    """
    by_name = {o.name: o for o in model.graph.output}
    missing = [n for n in names if n not in by_name]
    if missing or not names:
        raise UsageError(f"the model has no output {missing[0] if missing else '(none asked)'!r}; "
                         f"it has {sorted(by_name)}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    needed = set(names)
    keep_nodes = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            keep_nodes.append(node)
            needed.update(i for i in node.input if i)
            needed.update(_captured_names(node))
    keep_nodes.reverse()
    nodes = [onnx.NodeProto() for _ in keep_nodes]
    for dst, src in zip(nodes, keep_nodes, strict=True):
        dst.CopyFrom(src)
    del graph.node[:]
    graph.node.extend(nodes)
    inits = [t for t in graph.initializer if t.name in needed]
    if len(inits) != len(graph.initializer):
        kept = [onnx.TensorProto() for _ in inits]
        for dst, src in zip(kept, inits, strict=True):
            dst.CopyFrom(src)
        del graph.initializer[:]
        graph.initializer.extend(kept)
    outputs = [by_name[n] for n in names]
    del graph.output[:]
    graph.output.extend(outputs)
    value_info = [v for v in graph.value_info if v.name in needed]
    del graph.value_info[:]
    graph.value_info.extend(value_info)
    used_domains = {n.domain for n in graph.node}
    ops = [op for op in out.opset_import if op.domain in used_domains or op.domain in ("", "ai.onnx")]
    del out.opset_import[:]
    out.opset_import.extend(ops)
    return out


# -- torch --------------------------------------------------------------------------------------
def _import_torch() -> Any:
    try:
        import torch
    except ImportError as e:
        raise UsageError(f"exporting a torch model needs PyTorch ({e})", hint=_TORCH_HINT) from e
    return torch


def torch_to_onnx(
    module: Any,
    example_input: Any,
    *,
    input_name: str = "input",
    output_name: str = "output",
    dynamic_batch: bool = True,
    opset: int = 17,
    exporter: Literal["auto", "torchscript", "dynamo"] = "auto",
    verify: bool = False,
) -> onnx.ModelProto:
    """Export ``module`` (a ``torch.nn.Module`` taking one tensor) to a single-file ONNX model.

    ``example_input`` is a tensor (or numpy array) with a representative shape; its first
    dimension becomes the dynamic batch dimension ``"N"`` when ``dynamic_batch`` is true. The
    module is exported in eval mode (its training flag is restored afterwards). The result has
    all weights embedded (no external data) and passes the ONNX checker.

    ``exporter``: ``"torchscript"`` (the default behind ``"auto"``) uses
    ``torch.onnx.export(..., dynamo=False)``; ``"dynamo"`` uses the torch.export-based exporter,
    which needs the ``onnxscript`` package and opset 18 or newer. With ``verify`` the exported
    model is run with onnxruntime on ``example_input`` and compared with the module's output.
    """
    torch = _import_torch()
    if not isinstance(module, torch.nn.Module):
        raise UsageError(f"torch_to_onnx needs a torch.nn.Module, got {type(module).__name__}")
    if isinstance(example_input, (tuple, list)) and len(example_input) == 1:
        example_input = example_input[0]
    if isinstance(example_input, np.ndarray):
        example_input = torch.from_numpy(example_input)
    if not isinstance(example_input, torch.Tensor):
        raise UsageError("torch_to_onnx needs one example input tensor (models with several inputs are not supported)")
    if example_input.ndim == 0 and dynamic_batch:
        raise UsageError("the example input is a scalar, so it has no batch dimension; pass dynamic_batch=False")
    if exporter not in ("auto", "torchscript", "dynamo"):
        raise UsageError(f"unknown exporter {exporter!r}; use 'auto', 'torchscript' or 'dynamo'")
    if input_name == output_name:
        raise UsageError("input_name and output_name must differ")

    export_params = inspect.signature(torch.onnx.export).parameters
    if exporter == "auto":
        exporter = "torchscript"
    if exporter == "dynamo" and "dynamo" not in export_params:
        raise UsageError(f"torch {torch.__version__} has no dynamo ONNX exporter", hint="use exporter='torchscript'")

    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            if exporter == "torchscript":
                proto = _export_torchscript(
                    torch, module, example_input, input_name, output_name, dynamic_batch, opset, export_params,
                )
            else:
                proto = _export_dynamo(torch, module, example_input, input_name, output_name, dynamic_batch, opset)
            _assert_self_contained(proto)
            _check(proto, "torch.onnx.export")
            if verify:
                _verify_torch(torch, module, example_input, proto, input_name)
    finally:
        module.train(was_training)
    return proto


def _export_torchscript(
    torch: Any, module: Any, x: Any, input_name: str, output_name: str, dynamic_batch: bool, opset: int,
    export_params: Any,
) -> onnx.ModelProto:
    kwargs: dict[str, Any] = {
        "input_names": [input_name],
        "output_names": [output_name],
        "opset_version": opset,
        "export_params": True,
        "do_constant_folding": True,
    }
    if dynamic_batch:
        kwargs["dynamic_axes"] = {input_name: {0: "N"}, output_name: {0: "N"}}
    if "dynamo" in export_params:
        kwargs["dynamo"] = False
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # "You are using the legacy TorchScript-based ONNX export" and friends: chosen on purpose.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        try:
            torch.onnx.export(module, (x,), buf, **kwargs)
        except Exception as e:  # torch raises many kinds (RuntimeError, SymbolicValueError, ...)
            raise UsageError(f"torch.onnx.export failed: {type(e).__name__}: {e}",
                             hint="check that the model's operators are exportable at this opset") from e
    try:
        return onnx.load_model_from_string(buf.getvalue())
    except Exception as e:
        raise UsageError(f"torch.onnx.export wrote an unreadable model: {e}") from e


def _export_dynamo(
    torch: Any, module: Any, x: Any, input_name: str, output_name: str, dynamic_batch: bool, opset: int,
) -> onnx.ModelProto:
    try:
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise UsageError("the dynamo ONNX exporter needs the onnxscript package",
                         hint="pip install onnxscript, or use exporter='torchscript'") from e
    if opset < 18:
        raise UsageError(f"the dynamo exporter produces opset 18 or newer, not {opset}",
                         hint="pass opset=18 or higher, or use exporter='torchscript'")
    kwargs: dict[str, Any] = {
        "input_names": [input_name],
        "output_names": [output_name],
        "opset_version": opset,
        "dynamo": True,
        "external_data": False,
        "verbose": False,
        "optimize": True,
    }
    if dynamic_batch:
        kwargs["dynamic_shapes"] = ({0: torch.export.Dim("N")},)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        try:
            program = torch.onnx.export(module, (x,), **kwargs)
        except Exception as e:
            raise UsageError(f"torch.onnx.export (dynamo) failed: {type(e).__name__}: {e}",
                             hint="try exporter='torchscript'") from e
    proto: onnx.ModelProto = program.model_proto  # external_data=False: weights embedded
    return proto


def _verify_torch(torch: Any, module: Any, x: Any, proto: onnx.ModelProto, input_name: str) -> None:
    import onnxruntime as ort

    expected = module(x)
    if isinstance(expected, (tuple, list)):
        expected = expected[0]
    expected = expected.detach().cpu().numpy()
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {input_name: x.detach().cpu().numpy()})[0]
    if got.shape != expected.shape or not np.allclose(got, expected, rtol=1e-4, atol=1e-4):
        diff = float(np.max(np.abs(got - expected))) if got.shape == expected.shape else float("inf")
        raise UsageError(f"the exported model does not reproduce torch's output (max difference {diff:.3g})",
                         hint="the module may depend on Python control flow or training-mode layers")


# -- scikit-learn -------------------------------------------------------------------------------
_SHIM_LOCK = threading.Lock()


@contextlib.contextmanager
def _protobuf_bool_shim() -> Iterator[None]:
    """Coerce ``bool`` elements of list attributes to ``int`` in skl2onnx's ``make_node``.

    skl2onnx 1.20's HistGradientBoosting converter builds ``nodes_missing_value_tracks_true``
    from Python/numpy booleans; protobuf 7 refuses booleans in a repeated int64 field.
    """
    try:
        from skl2onnx.common import _container
    except ImportError:  # pragma: no cover - layout of another skl2onnx version
        yield
        return
    original = getattr(_container, "make_node", None)
    if original is None:  # pragma: no cover
        yield
        return

    def make_node(*args: Any, **attrs: Any) -> Any:
        for k, v in attrs.items():
            if isinstance(v, (list, tuple)) and any(isinstance(e, (bool, np.bool_)) for e in v):
                attrs[k] = [int(e) if isinstance(e, (bool, np.bool_)) else e for e in v]
        return original(*args, **attrs)

    with _SHIM_LOCK:
        _container.make_node = make_node
        try:
            yield
        finally:
            _container.make_node = original


def sklearn_to_onnx(
    estimator: Any,
    n_features: int,
    *,
    zipmap: bool = False,
    opset: int | None = None,
    input_name: str = "input",
    probabilities_only: bool = False,
) -> onnx.ModelProto:
    """Convert a fitted scikit-learn estimator (or Pipeline) to ONNX with skl2onnx.

    The input is ``input_name``, float32 ``[N, n_features]``. Outputs, as skl2onnx names them:

    * classifiers: ``"label"`` (int64 ``[N]``) and ``"probabilities"`` (float32
      ``[N, n_classes]``, columns in the order of ``estimator.classes_``). With ``zipmap=True``
      the probabilities are a sequence of maps instead, which the capsule runtime does not
      handle; keep the default. ``probabilities_only=True`` removes the label output.
    * regressors: ``"variable"`` (float32 ``[N, 1]``, or ``[N, n_targets]``).

    ``opset`` is the default-domain opset (``None``: skl2onnx's newest tested one). Tree
    ensembles, RandomForest, GradientBoosting, HistGradientBoosting, MLP, linear models and
    Pipelines with scalers are supported, as far as skl2onnx supports them.
    """
    try:
        import sklearn.base
        from sklearn.exceptions import NotFittedError
        from sklearn.utils.validation import check_is_fitted
    except ImportError as e:
        raise UsageError(f"converting a scikit-learn model needs scikit-learn ({e})", hint=_SKLEARN_HINT) from e
    try:
        from skl2onnx import convert_sklearn
        from skl2onnx.common.data_types import FloatTensorType
    except ImportError as e:
        raise UsageError(f"converting a scikit-learn model needs skl2onnx ({e})", hint=_SKLEARN_HINT) from e

    if isinstance(n_features, bool) or not isinstance(n_features, (int, np.integer)) or n_features <= 0:
        raise UsageError(f"n_features must be a positive integer, got {n_features!r}")
    if not isinstance(estimator, sklearn.base.BaseEstimator):
        raise UsageError(f"sklearn_to_onnx needs a scikit-learn estimator, got {type(estimator).__name__}")
    try:
        check_is_fitted(estimator)
    except NotFittedError as e:
        raise UsageError(f"the {type(estimator).__name__} is not fitted yet", hint="call fit() first") from e
    fitted_n = getattr(estimator, "n_features_in_", None)
    if fitted_n is not None and int(fitted_n) != int(n_features):
        raise UsageError(f"n_features is {n_features} but the estimator was fitted on {fitted_n} features")

    classifier = sklearn.base.is_classifier(estimator)
    if probabilities_only and (not classifier or zipmap):
        raise UsageError("probabilities_only needs a classifier converted with zipmap=False")
    options: dict[Any, Any] | None = None
    if classifier:
        options = {id(estimator): {"zipmap": zipmap}}
    kwargs: dict[str, Any] = {}
    if opset is not None:
        kwargs["target_opset"] = int(opset)  # skl2onnx picks the ai.onnx.ml version it needs
    with warnings.catch_warnings(), _protobuf_bool_shim():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        try:
            model: onnx.ModelProto = convert_sklearn(
                estimator,
                initial_types=[(input_name, FloatTensorType([None, int(n_features)]))],
                options=options,
                **kwargs,
            )
        except Exception as e:  # skl2onnx raises RuntimeError, MissingShapeCalculator, ValueError ...
            raise UsageError(f"skl2onnx cannot convert this {type(estimator).__name__}: {type(e).__name__}: {e}",
                             hint="see skl2onnx's list of supported scikit-learn models") from e
    _dedupe_opsets(model)
    if probabilities_only:
        names = [o.name for o in model.graph.output]
        if "probabilities" not in names:
            raise UsageError(f"the converted classifier has no 'probabilities' output (outputs: {names})")
        model = keep_outputs(model, ["probabilities"])
    _assert_self_contained(model)
    _check(model, "skl2onnx")
    return model

