"""The kennen model zoo: small MNIST classifiers that differ in the attributes kennen predicts (torch, CPU).

After Oh et al., ICLR 2018, Section 3 ("MNIST-NETS"): every net is ``conv(10 filters, k x k)``,
``conv(20 filters, k x k)``, then ``n_conv - 2`` more ``conv(20, k x k)`` layers (padded, so the
size stays), then ``fc(50)``, ``n_fc - 2`` more ``fc(50)`` and ``fc(10)``. The activation is
applied after each pooling and each hidden layer, the optional 2x2 max-pool after each of the
first two convolutions, the optional dropout (p = 0.5) after each hidden fc layer. A fixed
``(x - 0.1307) / 0.3081`` in front makes the nets take MNIST pixels in [0, 1], so the queries
that kennen crafts live in pixel space.

Unlike the paper's zoo (10,000 nets trained for 100 epochs on all of MNIST on GPUs), this zoo
is trained briefly on CPU: each net on its own random subset of the first 50,000 MNIST
training images (``ZooSettings.train_images``, 1,000 images for 2 epochs by default). The last 10,000 training
images are the "validation" pool that kennen draws its queries from.

Imported only by :mod:`.kennen` when a zoo is built: ``import mlcapsule.attacks`` does not
import torch. Trained nets are cached (one ``.pt`` file of weights per net, keyed by its
configuration, the training settings and :data:`ZOO_VERSION`), so a rerun is fast.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import UsageError
from .data import load_idx_dataset
from .kennen import NetConfig, ZooSettings, default_cache_dir
from .substitute import limit_threads

__all__ = ["ZOO_VERSION", "ModelZoo", "MnistPools", "build_net", "build_zoo",
           "mnist_pools", "MNIST_MEAN", "MNIST_STD"]

#: Bump when the nets or their training change, so that cached weights are not reused.
ZOO_VERSION = 2
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
#: The first images of MNIST's training set train the zoo; the rest are the query pool.
ZOO_TRAIN_POOL = 50_000


class _Activation(nn.Module):
    def __init__(self, act: str) -> None:
        super().__init__()
        makers: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "elu": nn.ELU, "prelu": nn.PReLU, "tanh": nn.Tanh}
        if act not in makers:
            raise UsageError(f"unknown activation {act!r}; use relu, elu, prelu or tanh")
        self.f = makers[act]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.f(x)
        return out


class _Normalize(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - MNIST_MEAN) / MNIST_STD


def build_net(cfg: NetConfig) -> nn.Module:
    """The untrained net of ``cfg`` (weights from ``cfg.seed``); input ``[N, 1, 28, 28]`` pixels
    in [0, 1], output logits ``[N, 10]``."""
    if cfg.ks not in (3, 5) or cfg.n_conv < 2 or cfg.n_fc < 2 or cfg.pool not in ("max_2", "none") \
            or cfg.drop not in ("yes", "no") or cfg.opt not in ("sgd", "adam"):
        raise UsageError(f"not a kennen zoo configuration: {cfg}")
    torch.manual_seed(cfg.seed)
    pool = cfg.pool == "max_2"
    layers: list[nn.Module] = [_Normalize()]
    side = 28
    for c_in, c_out in ((1, 10), (10, 20)):
        layers.append(nn.Conv2d(c_in, c_out, cfg.ks))
        side = side - cfg.ks + 1
        if pool:
            layers.append(nn.MaxPool2d(2))
            side //= 2
        layers.append(_Activation(cfg.act))
    for _ in range(cfg.n_conv - 2):
        layers += [nn.Conv2d(20, 20, cfg.ks, padding=cfg.ks // 2), _Activation(cfg.act)]
    layers += [nn.Flatten(), nn.Linear(20 * side * side, 50), _Activation(cfg.act)]
    if cfg.drop == "yes":
        layers.append(nn.Dropout(0.5))
    for _ in range(cfg.n_fc - 2):
        layers += [nn.Linear(50, 50), _Activation(cfg.act)]
        if cfg.drop == "yes":
            layers.append(nn.Dropout(0.5))
    layers.append(nn.Linear(50, 10))
    return nn.Sequential(*layers)


@dataclass
class MnistPools:
    """MNIST as the zoo uses it: uint8 images ``[n, 28, 28]`` and labels."""

    train_x: np.ndarray  # the first 50,000 training images: the zoo's training data
    train_y: np.ndarray
    val_x: np.ndarray  # the last 10,000 training images: the query pool
    val_y: np.ndarray
    test_x: np.ndarray  # the 10,000 test images
    test_y: np.ndarray


_POOLS: dict[str, MnistPools] = {}


def mnist_pools(root: str | os.PathLike[str] | None = None) -> MnistPools:
    """MNIST split for kennen (read once per process from the shared datasets)."""
    key = str(root)
    if key not in _POOLS:
        x, y = load_idx_dataset("mnist", "train", root=root)
        tx, ty = load_idx_dataset("mnist", "test", root=root)
        _POOLS[key] = MnistPools(x[:ZOO_TRAIN_POOL], y[:ZOO_TRAIN_POOL], x[ZOO_TRAIN_POOL:], y[ZOO_TRAIN_POOL:], tx, ty)
    return _POOLS[key]


def to_pixels(images: np.ndarray) -> np.ndarray:
    """uint8 ``[n, 28, 28]`` -> float32 ``[n, 1, 28, 28]`` in [0, 1]."""
    return (np.asarray(images, dtype=np.float32) / 255.0).reshape(len(images), 1, 28, 28)


def _cache_key(cfg: NetConfig, settings: ZooSettings) -> str:
    blob = json.dumps({"v": ZOO_VERSION, "net": cfg.to_dict(), "train": settings.to_dict()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def train_net(cfg: NetConfig, settings: ZooSettings, pools: MnistPools) -> tuple[nn.Module, float]:
    """Train one zoo net briefly; returns it (in eval mode) and its MNIST test accuracy."""
    limit_threads()
    net = build_net(cfg)
    rng = np.random.default_rng(cfg.seed)
    idx = rng.choice(len(pools.train_x), size=min(settings.train_images, len(pools.train_x)), replace=False)
    x = torch.from_numpy(to_pixels(pools.train_x[idx]))
    y = torch.from_numpy(pools.train_y[idx].astype(np.int64))
    opt: torch.optim.Optimizer
    if cfg.opt == "sgd":
        opt = torch.optim.SGD(net.parameters(), lr=settings.lr_sgd, momentum=0.5)
    else:
        opt = torch.optim.Adam(net.parameters(), lr=settings.lr_adam)
    gen = torch.Generator().manual_seed(cfg.seed)
    net.train()
    for _ in range(settings.epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), settings.batch_size):
            b = perm[i:i + settings.batch_size]
            opt.zero_grad()
            nn.functional.cross_entropy(net(x[b]), y[b]).backward()
            nn.utils.clip_grad_norm_(net.parameters(), 5.0)  # brief, fast training must not diverge
            opt.step()
    net.eval()
    return net, _accuracy(net, pools.test_x[:settings.eval_images], pools.test_y[:settings.eval_images])


def _accuracy(net: nn.Module, images: np.ndarray, labels: np.ndarray) -> float:
    if not len(images):
        return float("nan")
    with torch.no_grad():
        pred = net(torch.from_numpy(to_pixels(images))).argmax(dim=1).numpy()
    return float(np.mean(pred == labels))


@dataclass
class ModelZoo:
    """Trained zoo nets (eval mode, frozen) with their configurations."""

    configs: list[NetConfig]
    nets: list[nn.Module]
    accuracies: list[float]
    settings: ZooSettings = field(default_factory=ZooSettings)
    seconds_trained: float = 0.0  # time spent training (0 when every net came from the cache)
    cached: int = 0  # nets loaded from the cache

    def __len__(self) -> int:
        return len(self.configs)

    def subset(self, index: Sequence[int]) -> ModelZoo:
        return ModelZoo([self.configs[i] for i in index], [self.nets[i] for i in index],
                        [self.accuracies[i] for i in index], self.settings)


def build_zoo(configs: Sequence[NetConfig], *, settings: ZooSettings | None = None,
              cache_dir: str | os.PathLike[str] | None = None, cache: bool = True,
              root: str | os.PathLike[str] | None = None) -> ModelZoo:
    """Train (or load from the cache) one net per configuration."""
    settings = settings or ZooSettings()
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    pools: MnistPools | None = None
    nets: list[nn.Module] = []
    accs: list[float] = []
    spent = 0.0
    hits = 0
    for cfg in configs:
        path = folder / f"net-{_cache_key(cfg, settings)}.pt"
        net: nn.Module | None = None
        acc = float("nan")
        if cache and path.exists():
            try:
                blob = torch.load(path, map_location="cpu", weights_only=True)
                net = build_net(cfg)
                net.load_state_dict(blob["state_dict"])
                acc = float(blob["accuracy"])
                hits += 1
            except Exception:  # a damaged or foreign file: train again and overwrite it
                net = None
        if net is None:
            pools = pools or mnist_pools(root)
            t0 = time.perf_counter()
            net, acc = train_net(cfg, settings, pools)
            spent += time.perf_counter() - t0
            if cache:
                folder.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".tmp{os.getpid()}")
                torch.save({"state_dict": net.state_dict(), "accuracy": acc, "config": cfg.to_dict()}, tmp)
                os.replace(tmp, path)
        net.eval()
        for p in net.parameters():
            p.requires_grad_(False)
        nets.append(net)
        accs.append(acc)
    return ModelZoo(list(configs), nets, accs, settings, seconds_trained=spent, cached=hits)
