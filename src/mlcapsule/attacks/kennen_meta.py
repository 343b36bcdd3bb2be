"""kennen's meta-classifier and its training (kennen-o and kennen-io), in torch (CPU).

Imported by :mod:`.kennen` when a metamodel is trained. The meta-classifier is an MLP over
the concatenated log-probabilities of the ``n`` answers, with one softmax head per attribute,
trained with the sum of the heads' cross-entropies (the authors' ``mlp`` metamodel). kennen-io
also descends that loss with respect to the queries, through the frozen white-box zoo.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import UsageError
from .kennen import KENNEN_ATTRIBUTES, LOG_FLOOR, KennenModel, KennenSettings
from .kennen_zoo import ModelZoo, mnist_pools, to_pixels
from .substitute import limit_threads

__all__ = ["MetaClassifier", "fit", "zoo_posteriors", "zoo_log_probs"]


class MetaClassifier(nn.Module):
    """``[B, n * classes]`` features -> ``{attribute: logits [B, values]}``."""

    def __init__(self, n_features: int, heads: dict[str, int], hidden: Sequence[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = n_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.body = nn.Sequential(*layers)
        self.heads = nn.ModuleDict({k: nn.Linear(width, v) for k, v in heads.items()})
        self.mean: torch.Tensor
        self.scale: torch.Tensor
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("scale", torch.ones(n_features))

    def standardize_on(self, feats: torch.Tensor) -> None:
        """Fix the input standardisation to the statistics of ``feats`` (the training zoo's)."""
        with torch.no_grad():
            self.mean.copy_(feats.mean(dim=0))
            self.scale.copy_(feats.std(dim=0, unbiased=False).clamp(min=1e-3))

    def forward(self, f: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.body((f - self.mean) / self.scale)
        return {k: head(h) for k, head in self.heads.items()}


def zoo_log_probs(nets: Sequence[nn.Module], queries: torch.Tensor) -> torch.Tensor:
    """``[nets, n * 10]``: each net's log-probabilities on the queries, floored, flattened."""
    rows = [torch.clamp(torch.log_softmax(net(queries), dim=1), min=LOG_FLOOR).reshape(-1) for net in nets]
    return torch.nan_to_num(torch.stack(rows), nan=LOG_FLOOR)


def zoo_posteriors(zoo: ModelZoo, queries: np.ndarray) -> np.ndarray:
    limit_threads()
    q = torch.from_numpy(np.asarray(queries, dtype=np.float32))
    with torch.no_grad():
        return np.stack([torch.softmax(net(q), dim=1).numpy() for net in zoo.nets]).astype(np.float64)


def _initial_queries(settings: KennenSettings, seed: int, root: str | os.PathLike[str] | None) -> np.ndarray:
    n = settings.n_queries
    rng = np.random.default_rng(seed)
    if settings.init == "uniform":
        return rng.uniform(0.0, 1.0, size=(n, 1, 28, 28)).astype(np.float32)
    if settings.init == "gray":
        return np.full((n, 1, 28, 28), 0.5, np.float32)
    pools = mnist_pools(root)
    return to_pixels(pools.val_x[rng.choice(len(pools.val_x), size=n, replace=False)])


def fit(zoo: ModelZoo, settings: KennenSettings, *, attributes: Sequence[str] | None = None, seed: int = 0,
        root: str | os.PathLike[str] | None = None,
        init_images: np.ndarray | None = None) -> tuple[KennenModel, list[dict[str, float]]]:
    """Train a metamodel on ``zoo``; returns it and, per round, the training loss and accuracy."""
    limit_threads()
    if len(zoo) < 2:
        raise UsageError(f"kennen needs a training zoo of at least 2 nets, not {len(zoo)}")
    names = list(attributes) if attributes is not None else [
        k for k in ("act", "drop", "pool", "ks", "n_conv", "n_fc", "opt")
        if len({c.attribute(k) for c in zoo.configs}) > 1]
    if not names:
        raise UsageError("the training zoo does not vary any attribute, so there is nothing to predict")
    space: dict[str, tuple[Any, ...]] = {}
    for k in names:
        seen = {c.attribute(k) for c in zoo.configs}
        space[k] = tuple(v for v in KENNEN_ATTRIBUTES[k] if v in seen)
    labels = {k: torch.tensor([space[k].index(c.attribute(k)) for c in zoo.configs]) for k in names}

    init = init_images if init_images is not None else _initial_queries(settings, seed, root)
    init = np.asarray(init, dtype=np.float32).reshape(-1, 1, 28, 28)
    n = len(init)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    meta = MetaClassifier(n * 10, {k: len(v) for k, v in space.items()}, settings.hidden)
    opt_m = torch.optim.Adam(meta.parameters(), lr=settings.lr_meta, weight_decay=settings.weight_decay)
    q = torch.from_numpy(init.copy()).requires_grad_(settings.method == "io")
    opt_q = torch.optim.Adam([q], lr=settings.lr_query) if settings.method == "io" else None
    nets = zoo.nets
    m = len(nets)
    bm = min(settings.batch_models, m)

    def loss_of(out: dict[str, torch.Tensor], idx: torch.Tensor) -> torch.Tensor:
        return torch.stack([nn.functional.cross_entropy(out[k], labels[k][idx]) for k in names]).sum()

    def meta_phase(epochs: int) -> None:
        with torch.no_grad():
            feats = zoo_log_probs(nets, q)
        meta.standardize_on(feats)
        meta.train()
        for _ in range(epochs):
            perm = torch.randperm(m, generator=gen)
            for i in range(0, m, bm):
                idx = perm[i:i + bm]
                opt_m.zero_grad()
                loss_of(meta(feats[idx]), idx).backward()
                opt_m.step()
        meta.eval()

    def query_phase(steps: int) -> None:
        assert opt_q is not None
        for _ in range(steps):
            idx = torch.randperm(m, generator=gen)[:bm]
            opt_q.zero_grad()
            feats = zoo_log_probs([nets[int(i)] for i in idx], q)
            (grad,) = torch.autograd.grad(loss_of(meta(feats), idx), q)
            q.grad = grad
            opt_q.step()
            if settings.clip is not None:
                with torch.no_grad():
                    q.clamp_(settings.clip[0], settings.clip[1])

    history: list[dict[str, float]] = []
    rounds = settings.rounds if settings.method == "io" else 1
    for r in range(rounds):
        meta_phase(settings.meta_epochs)
        if settings.method == "io":
            query_phase(settings.query_steps)
            if r == rounds - 1:
                meta_phase(settings.meta_epochs)
        with torch.no_grad():
            out = meta(zoo_log_probs(nets, q))
            all_idx = torch.arange(m)
            rec = {"round": float(r), "loss": float(loss_of(out, all_idx))}
            for k in names:
                rec[f"{k}.train_accuracy"] = float((out[k].argmax(dim=1) == labels[k]).float().mean())
        history.append(rec)
    model = KennenModel(queries=q.detach().numpy().copy(), attributes=space, meta=meta, settings=settings)
    return model, history
