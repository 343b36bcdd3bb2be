"""Substitute models in torch (CPU): builders and a small, deterministic trainer.

Imported only by the attacks that train a substitute; ``import mlcapsule.attacks`` does not
import torch.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .models import TorchPredictor

__all__ = ["limit_threads", "mlp", "small_cnn", "Standardize", "train", "jacobian_sign"]


def limit_threads(n: int | None = None) -> None:
    """Torch intra-op threads: ``n``, else ``MLCAPSULE_TORCH_THREADS``, else 1 (attacks train
    small models, for which more threads only add overhead on a busy machine)."""
    want = n if n is not None else int(os.environ.get("MLCAPSULE_TORCH_THREADS", "1"))
    if torch.get_num_threads() != want:
        torch.set_num_threads(want)


def mlp(n_features: int, hidden: Sequence[int], n_classes: int, *, seed: int = 0) -> nn.Module:
    """``Linear → ReLU`` per hidden width, then ``Linear`` to logits."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    width = n_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, n_classes))
    return nn.Sequential(*layers)


def small_cnn(channels: int, side: int, n_classes: int, *, seed: int = 0) -> nn.Module:
    """Two conv 3x3 + max-pool blocks and a dense head, for ``[N, channels, side, side]`` inputs."""
    torch.manual_seed(seed)
    flat = 32 * (side // 4) * (side // 4)
    return nn.Sequential(
        nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(flat, 64), nn.ReLU(), nn.Linear(64, n_classes),
    )


class Standardize(nn.Module):
    """``(x - mean) / std`` with two fixed scalars (taken from the training inputs)."""

    def __init__(self, mean: float, std: float) -> None:
        super().__init__()
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std) if std > 0 else 1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def train(module: nn.Module, x: np.ndarray, y: np.ndarray, *, epochs: int = 50, lr: float = 1e-2,
          batch_size: int = 64, weight_decay: float = 0.0, seed: int = 0,
          input_shape: Sequence[int] | None = None, standardize: bool = True) -> TorchPredictor:
    """Train ``module`` (logits out) with Adam on labels ``y`` [n] (cross-entropy) or on
    posteriors ``y`` [n, c] (soft cross-entropy, as Knockoff Nets train on the victim's answers).
    With ``standardize``, a fixed :class:`Standardize` (the mean and standard deviation of all
    training input values) is put in front of the module. Returns the model as a predictor."""
    limit_threads()
    torch.manual_seed(seed)
    xa = np.asarray(x, dtype=np.float32)
    if input_shape is not None:
        xa = xa.reshape(len(xa), *input_shape)
    if standardize and xa.size:
        module = nn.Sequential(Standardize(float(xa.mean()), float(xa.std())), module)
    xt = torch.from_numpy(xa)
    soft = np.asarray(y).ndim == 2
    yt = torch.from_numpy(np.asarray(y, dtype=np.float32 if soft else np.int64))
    opt = torch.optim.Adam(module.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    n = len(xt)
    module.train()
    for _ in range(epochs if n else 0):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            opt.zero_grad()
            out = module(xt[idx])
            if soft:
                loss = -(yt[idx] * torch.log_softmax(out, dim=1)).sum(dim=1).mean()
            else:
                loss = nn.functional.cross_entropy(out, yt[idx])
            loss.backward()
            opt.step()
    module.eval()
    return TorchPredictor(module, input_shape=input_shape)


def jacobian_sign(predictor: TorchPredictor, x: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """sign(∂F_label(x)/∂x) for each row, where F is the substitute's softmax (Papernot et al.)."""
    module: Any = predictor.module
    xa = np.asarray(x, dtype=np.float32)
    shape = xa.shape
    if predictor.input_shape is not None:
        xa = xa.reshape(len(xa), *predictor.input_shape)
    xt = torch.from_numpy(xa).requires_grad_(True)
    module.eval()
    probs = torch.softmax(module(xt), dim=1)
    picked = probs.gather(1, torch.from_numpy(np.asarray(labels, np.int64)).view(-1, 1)).sum()
    (grad,) = torch.autograd.grad(picked, xt)
    return np.sign(grad.numpy()).reshape(shape)
