"""Extracted models in numpy (no torch needed to use them), and a torch wrapper.

* :class:`SoftmaxRegression` — ``softmax(x W^T + b)``; binary logistic regression is the
  two-class case with a zero row.
* :class:`NumpyMLP` — dense layers with ``relu``/``tanh``/``sigmoid`` and a softmax output.
* :class:`TorchPredictor` — a ``torch.nn.Module`` producing logits, as a :class:`Predictor`
  (torch is imported only when one is built).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["SoftmaxRegression", "NumpyMLP", "TorchPredictor", "softmax", "ACTIVATIONS"]


def softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return np.asarray(e / e.sum(axis=1, keepdims=True))


def _relu(a: np.ndarray) -> np.ndarray:
    return np.maximum(a, 0.0)


def _tanh(a: np.ndarray) -> np.ndarray:
    return np.tanh(a)


def _sigmoid(a: np.ndarray) -> np.ndarray:
    return np.asarray(1.0 / (1.0 + np.exp(-a)))


def _identity(a: np.ndarray) -> np.ndarray:
    return a


ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "relu": _relu, "tanh": _tanh, "sigmoid": _sigmoid, "identity": _identity,
}


@dataclass
class SoftmaxRegression:
    """``softmax(x @ weight.T + bias)``; ``weight`` [classes, features], ``bias`` [classes]."""

    weight: np.ndarray
    bias: np.ndarray

    def logits(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
        return np.asarray(x @ self.weight.T + self.bias)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return softmax(self.logits(x))

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.argmax(self.logits(x), axis=1)

    @property
    def n_params(self) -> int:
        return int(self.weight.size + self.bias.size)


@dataclass
class NumpyMLP:
    """Dense layers ``(weight [out, in], bias [out])``, ``activation`` between them, softmax last."""

    layers: list[tuple[np.ndarray, np.ndarray]]
    activation: str = "relu"

    def logits(self, x: np.ndarray) -> np.ndarray:
        act = ACTIVATIONS[self.activation]
        h = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
        for i, (w, b) in enumerate(self.layers):
            h = h @ w.T + b
            if i < len(self.layers) - 1:
                h = act(h)
        return np.asarray(h)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return softmax(self.logits(x))

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.argmax(self.logits(x), axis=1)

    @property
    def n_params(self) -> int:
        return int(sum(w.size + b.size for w, b in self.layers))

    @staticmethod
    def count_params(n_features: int, hidden: Sequence[int], n_classes: int) -> int:
        """Tramèr et al.'s "unknowns" of an MLP: every weight and bias."""
        sizes = [n_features, *hidden, n_classes]
        return int(sum((a + 1) * b for a, b in zip(sizes[:-1], sizes[1:], strict=True)))


class TorchPredictor:
    """A torch module that outputs logits, used as a :class:`~mlcapsule.attacks.results.Predictor`.

    ``input_shape`` reshapes flat rows before the module (for convolutional substitutes).
    """

    def __init__(self, module: Any, *, input_shape: Sequence[int] | None = None, batch: int = 1024) -> None:
        self.module = module
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        self.batch = batch

    def logits(self, x: np.ndarray) -> np.ndarray:
        import torch

        x = np.asarray(x, dtype=np.float32)
        if self.input_shape is not None:
            x = x.reshape(len(x), *self.input_shape)
        self.module.eval()
        outs = []
        with torch.no_grad():
            for i in range(0, len(x), self.batch):
                outs.append(self.module(torch.from_numpy(x[i:i + self.batch])).numpy())
        return np.concatenate(outs, axis=0) if outs else np.empty((0, 0), np.float32)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return softmax(self.logits(x))

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.argmax(self.logits(x), axis=1)
