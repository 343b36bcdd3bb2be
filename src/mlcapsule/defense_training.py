"""Pack-time training of the defenses' models (untrusted provider-side code; torch allowed).

:func:`train_kennen_detector` trains the kennen-io detector of issue 12 item 5, after the
MLCapsule paper (Hanzlik et al., Section 7): a binary classifier that tells a benign query from
a query crafted by kennen-io (Oh et al., ICLR 2018). Its architecture is the paper's: two 5x5
convolutions with 10 and 20 filters, each followed by a 2x2 max-pool, then a fully connected
layer of 50 units, ReLU, dropout and a softmax, trained with Adam and cross-entropy. It is
exported to ONNX (opset 17, through :func:`mlcapsule.export.torch_to_onnx`) with a dynamic batch
axis, so that it can travel in the capsule as its own segment and run in the enclave on every
query. :func:`evaluate_detector` measures it with ONNX Runtime, as the enclave runs it.

Torch is imported inside the functions: importing this module needs numpy and onnx only.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import onnx

from .enclave.errors import UsageError

__all__ = ["train_kennen_detector", "train_kennen_detector_torch", "export_kennen_detector", "evaluate_detector",
           "detector_scores", "DetectorEvaluation", "DETECTOR_INPUT", "DETECTOR_OUTPUT", "MALICIOUS"]

#: The detector's ONNX input and output names. The output is softmax ``[N, 2]``.
DETECTOR_INPUT = "input"
DETECTOR_OUTPUT = "probabilities"
#: The output column of the probability that a query is malicious (a kennen-io probe); column 0
#: is benign. This column is the score that the enclave's kennen defense compares with its threshold.
MALICIOUS = 1


def _image_shape(row_shape: tuple[int, ...], image_shape: Sequence[int] | None) -> tuple[int, int, int]:
    size = int(np.prod(row_shape)) if row_shape else 1
    if image_shape is not None:
        shape = tuple(int(v) for v in image_shape)
        if len(shape) != 3 or int(np.prod(shape)) != size:
            raise UsageError(f"image_shape {shape} does not hold the {size} values of a row {row_shape}")
        return shape[0], shape[1], shape[2]
    if len(row_shape) == 3:
        return row_shape[0], row_shape[1], row_shape[2]
    if len(row_shape) == 2:
        return 1, row_shape[0], row_shape[1]
    side = int(round(np.sqrt(size)))
    if len(row_shape) == 1 and side * side == size:
        return 1, side, side
    raise UsageError(f"cannot read rows of shape {row_shape} as images",
                     hint="pass image_shape=(channels, height, width)")


def _check_rows(name: str, x: np.ndarray) -> np.ndarray:
    a = np.asarray(x, dtype=np.float32)
    if a.ndim < 2 or len(a) == 0:
        raise UsageError(f"{name} must be a non-empty batch of inputs [n, ...], got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise UsageError(f"{name} has non-finite values")
    return a


def _build(torch: Any, image: tuple[int, int, int], mean: float, std: float, dropout: float) -> Any:
    nn = torch.nn
    c, h, w = image
    fh, fw = ((h - 4) // 2 - 4) // 2, ((w - 4) // 2 - 4) // 2
    if fh < 1 or fw < 1:
        raise UsageError(f"images of {h}x{w} are too small for two 5x5 convolutions and 2x2 pools (16x16 at least)")

    class Prepare(nn.Module):  # type: ignore[name-defined]
        """Rows as the capsule receives them -> standardised [N, C, H, W] images."""

        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mean", torch.tensor(float(mean)))
            self.register_buffer("std", torch.tensor(float(std) if std > 0 else 1.0))

        def forward(self, x: Any) -> Any:
            return (x.reshape(-1, c, h, w) - self.mean) / self.std

    return nn.Sequential(
        Prepare(),
        nn.Conv2d(c, 10, 5), nn.MaxPool2d(2), nn.ReLU(),
        nn.Conv2d(10, 20, 5), nn.MaxPool2d(2), nn.ReLU(),
        nn.Flatten(), nn.Linear(20 * fh * fw, 50), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(50, 2), nn.Softmax(dim=1),
    )


def train_kennen_detector(benign: np.ndarray, malicious: np.ndarray, *, epochs: int = 10, seed: int = 0,
                          lr: float = 1e-3, batch_size: int = 64, dropout: float = 0.5, balance: bool = True,
                          image_shape: Sequence[int] | None = None, threads: int | None = None) -> onnx.ModelProto:
    """Train the kennen-io detector on ``benign`` and ``malicious`` example inputs; return it as ONNX.

    Both arrays hold rows of one shape, the capsule model's input shape without the batch axis
    (e.g. ``[n, 1, 28, 28]`` or ``[n, 784]``); the ONNX model takes ``[N, *row shape]`` float32
    (input ``"input"``) and returns ``"probabilities"`` ``[N, 2]`` (softmax: column 0 benign,
    column 1 malicious). Rows are read as ``image_shape`` (channels, height, width), by default
    inferred: 3 axes as they are, 2 axes as one channel, a flat square row as one square channel.
    Inputs are standardised with the mean and standard deviation of the benign values (two
    constants inside the model).

    Training: Adam (``lr``), cross-entropy, ``epochs`` passes in batches of ``batch_size``,
    dropout ``dropout`` after the 50-unit layer; ``balance`` weights the two classes equally
    (no effect when the two sets have the same size). Deterministic for a ``seed`` (torch runs
    on ``threads`` threads, default ``MLCAPSULE_TORCH_THREADS`` or 1).
    """
    module = train_kennen_detector_torch(benign, malicious, epochs=epochs, seed=seed, lr=lr, batch_size=batch_size,
                                         dropout=dropout, balance=balance, image_shape=image_shape, threads=threads)
    b = np.asarray(benign, dtype=np.float32)
    info = f"{len(b)} benign, {len(np.asarray(malicious))} malicious, {epochs} epochs, seed {seed}"
    return export_kennen_detector(module, b[:2], trained_on=info)


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as e:
        raise UsageError(f"training the kennen-io detector needs PyTorch ({e})",
                         hint="pip install 'mlcapsule[torch]'") from e
    return torch


def train_kennen_detector_torch(benign: np.ndarray, malicious: np.ndarray, *, epochs: int = 10, seed: int = 0,
                                lr: float = 1e-3, batch_size: int = 64, dropout: float = 0.5, balance: bool = True,
                                image_shape: Sequence[int] | None = None, threads: int | None = None) -> Any:
    """:func:`train_kennen_detector` before the export: the trained ``torch.nn.Module`` (eval mode),
    taking rows ``[N, *row shape]`` and returning the softmax ``[N, 2]``."""
    torch = _import_torch()
    b = _check_rows("benign", benign)
    m = _check_rows("malicious", malicious)
    if b.shape[1:] != m.shape[1:]:
        raise UsageError(f"benign rows {b.shape[1:]} and malicious rows {m.shape[1:]} differ in shape")
    if epochs < 1 or batch_size < 1 or not 0.0 <= dropout < 1.0:
        raise UsageError("epochs and batch_size must be at least 1, and dropout in [0, 1)")
    row_shape = tuple(int(v) for v in b.shape[1:])
    image = _image_shape(row_shape, image_shape)
    want = threads if threads is not None else int(os.environ.get("MLCAPSULE_TORCH_THREADS", "1"))
    old_threads = torch.get_num_threads()
    torch.set_num_threads(want)
    try:
        torch.manual_seed(seed)
        net = _build(torch, image, float(b.mean()), float(b.std()), dropout)
        x = torch.from_numpy(np.concatenate([b, m]))
        y = torch.from_numpy(np.concatenate([np.zeros(len(b), np.int64), np.ones(len(m), np.int64)]))
        weight = None
        if balance:
            n = len(b) + len(m)
            weight = torch.tensor([n / (2.0 * len(b)), n / (2.0 * len(m))], dtype=torch.float32)
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        gen = torch.Generator().manual_seed(seed)
        net.train()
        for _ in range(epochs):
            perm = torch.randperm(len(x), generator=gen)
            for i in range(0, len(x), batch_size):
                idx = perm[i:i + batch_size]
                opt.zero_grad()
                probs = net(x[idx])
                # cross-entropy on the softmax output (the log of the probabilities, floored for stability)
                loss = torch.nn.functional.nll_loss(torch.log(probs.clamp(min=1e-12)), y[idx], weight=weight)
                loss.backward()
                opt.step()
        net.eval()
    finally:
        torch.set_num_threads(old_threads)
    net.image_shape = image
    return net


def export_kennen_detector(module: Any, example: np.ndarray, *, trained_on: str = "") -> onnx.ModelProto:
    """Export a detector module to ONNX (opset 17, dynamic batch axis ``"N"``, checked against
    torch on ``example`` rows by :func:`mlcapsule.export.torch_to_onnx`), with metadata."""
    torch = _import_torch()
    from .export import torch_to_onnx

    ex = torch.from_numpy(np.ascontiguousarray(example, dtype=np.float32))
    proto = torch_to_onnx(module, ex, input_name=DETECTOR_INPUT, output_name=DETECTOR_OUTPUT,
                          dynamic_batch=True, opset=17, verify=True)
    proto.doc_string = ("mlcapsule kennen-io detector (MLCapsule, Section 7): conv5x5(10)-pool-relu, "
                        "conv5x5(20)-pool-relu, fc50-relu-dropout, fc2-softmax; output column 1 = malicious")
    image = getattr(module, "image_shape", None)
    meta = [("mlcapsule.detector", "kennen-io"), ("mlcapsule.classes", "benign,malicious")]
    if image is not None:
        meta.append(("mlcapsule.image_shape", ",".join(map(str, image))))
    if trained_on:
        meta.append(("mlcapsule.trained_on", trained_on))
    for key, value in meta:
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return proto


def _session(model: onnx.ModelProto | bytes | str | os.PathLike[str]) -> Any:
    import onnxruntime as ort

    if isinstance(model, onnx.ModelProto):
        data: bytes | str = model.SerializeToString()
    elif isinstance(model, bytes):
        data = model
    else:
        data = os.fspath(model)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])


def detector_scores(model: onnx.ModelProto | bytes | str | os.PathLike[str] | Any, x: np.ndarray, *,
                    batch: int = 1024) -> np.ndarray:
    """The detector's probability that each row of ``x`` is malicious, ``[n]`` float64 (ONNX Runtime).

    ``model`` is the ONNX detector (a proto, its bytes or a path) or an ONNX Runtime session."""
    sess = model if hasattr(model, "run") and hasattr(model, "get_inputs") else _session(model)
    inp = sess.get_inputs()[0]
    a = np.asarray(x, dtype=np.float32)
    dims = inp.shape[1:]
    if all(isinstance(d, int) for d in dims):
        a = a.reshape(len(a), *dims)
    outs = [sess.run(None, {inp.name: a[i:i + batch]})[0] for i in range(0, len(a), batch)]
    if not outs:
        return np.zeros(0, np.float64)
    return np.asarray(np.concatenate(outs)[:, MALICIOUS], dtype=np.float64)


@dataclass
class DetectorEvaluation:
    """The detector on a benign set and a malicious stream (flagged: score >= threshold)."""

    accuracy: float  # over both sets
    false_denial_rate: float  # benign rows flagged
    false_denials: int
    detection_rate: float  # malicious rows flagged
    missed: int  # malicious rows not flagged
    first_flagged: int | None  # index (from 0) of the first flagged malicious row; 0: caught at once
    n_benign: int
    n_malicious: int
    threshold: float
    seconds_per_query: float  # ONNX Runtime, in batches, one thread
    single_query_ms: float | None = None  # one row per run, mean over the rows timed

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate_detector(model: onnx.ModelProto | bytes | str | os.PathLike[str], benign: np.ndarray,
                      malicious: np.ndarray, *, threshold: float = 0.5, time_single: int = 0) -> DetectorEvaluation:
    """Accuracy, false denials of ``benign`` rows, and the first flagged row of the ``malicious``
    stream (in the order given: the attacker's query order), with ONNX Runtime.

    A row is flagged when its malicious probability is at least ``threshold``, as the enclave's
    ``kennen:threshold=...`` defense does. ``time_single`` > 0 also times that many one-row runs
    (the per-query cost in the enclave)."""
    sess = _session(model)
    b = np.asarray(benign, dtype=np.float32)
    m = np.asarray(malicious, dtype=np.float32)
    t0 = time.perf_counter()
    sb = detector_scores(sess, b)
    sm = detector_scores(sess, m)
    per_query = (time.perf_counter() - t0) / max(1, len(b) + len(m))
    fb = ~(sb < threshold)
    fm = ~(sm < threshold)
    hits = np.flatnonzero(fm)
    single = None
    if time_single > 0 and len(b):
        rows = b[np.arange(time_single) % len(b)]
        detector_scores(sess, rows[:1])  # warm-up
        t0 = time.perf_counter()
        for r in rows:
            detector_scores(sess, r[None])
        single = (time.perf_counter() - t0) / len(rows) * 1e3
    n = len(b) + len(m)
    return DetectorEvaluation(
        accuracy=float((int((~fb).sum()) + int(fm.sum())) / n) if n else float("nan"),
        false_denial_rate=float(fb.mean()) if len(b) else float("nan"), false_denials=int(fb.sum()),
        detection_rate=float(fm.mean()) if len(m) else float("nan"), missed=int((~fm).sum()),
        first_flagged=int(hits[0]) if len(hits) else None, n_benign=len(b), n_malicious=len(m),
        threshold=float(threshold), seconds_per_query=per_query, single_query_ms=single)
