"""Train the keyword spotter (torch, CPU) and export it with its front end as one ONNX graph.

The model is a small DS-CNN (depthwise-separable CNN: the family of Hello Edge and TensorFlow
Lite for Microcontrollers' micro_speech): a 10x4 convolution with stride 2, four depthwise
3x3 + pointwise 1x1 blocks, average pooling and a linear layer, on 49 x 40 log-mel features.
The exported graph is raw audio -> :func:`.frontend.frontend_graph` -> DS-CNN -> softmax.
The only module of this package that imports torch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from . import WINDOW
from .data import Dataset
from .frontend import FEATURES, HOP, LOG_EPS, N_FFT, N_FRAMES, N_MELS, OPSET, frontend_graph, hann, mel_matrix


class TorchFrontend(nn.Module):
    """The training front end: the same features as the ONNX graph's, in torch."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("window", torch.from_numpy(hann()))
        self.register_buffer("mel", torch.from_numpy(mel_matrix()))

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        spec = torch.stft(audio, n_fft=N_FFT, hop_length=HOP, win_length=N_FFT, window=self.window,  # type: ignore[arg-type]
                          center=False, onesided=True, return_complex=True)  # [N, 257, 49]
        power = spec.real ** 2 + spec.imag ** 2
        return torch.log(power.transpose(1, 2) @ self.mel + LOG_EPS).unsqueeze(1)  # type: ignore[operator]


def torch_features(audio: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return TorchFrontend()(torch.from_numpy(np.asarray(audio, np.float32).reshape(-1, WINDOW))).numpy()


class DSCNN(nn.Module):
    def __init__(self, n_classes: int, channels: int = 64, blocks: int = 4) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.BatchNorm2d(1), nn.Conv2d(1, channels, (10, 4), stride=2, padding=(5, 1)),
                                   nn.BatchNorm2d(channels), nn.ReLU()]
        for _ in range(blocks):
            layers += [nn.Conv2d(channels, channels, 3, padding=1, groups=channels), nn.BatchNorm2d(channels),
                       nn.ReLU(), nn.Conv2d(channels, channels, 1), nn.BatchNorm2d(channels), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(channels, n_classes)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        h = self.body(feats).mean(dim=(2, 3))
        return self.head(self.drop(h))


class Posteriors(nn.Module):
    def __init__(self, net: DSCNN) -> None:
        super().__init__()
        self.net = net

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(feats), dim=-1)


@dataclass
class Trained:
    net: DSCNN
    classes: tuple[str, ...]
    test_accuracy: float
    train_seconds: float
    per_class: dict[str, float]
    confusion: np.ndarray


def _spec_augment(f: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Mask one band of up to 6 mel bins and one stretch of up to 10 frames per clip."""
    f = f.clone()
    n = f.shape[0]
    for i in range(n):
        w = int(torch.randint(0, 7, (1,), generator=g))
        s = int(torch.randint(0, f.shape[3] - w + 1, (1,), generator=g))
        f[i, :, :, s:s + w] = f[i].mean()
        w = int(torch.randint(0, 11, (1,), generator=g))
        s = int(torch.randint(0, f.shape[2] - w + 1, (1,), generator=g))
        f[i, :, s:s + w, :] = f[i].mean()
    return f


def train(ds: Dataset, *, epochs: int = 12, batch: int = 64, lr: float = 3e-3, channels: int = 64,
          blocks: int = 4, seed: int = 0, threads: int | None = 1, label_smoothing: float = 0.05,
          dropout: float = 0.2,
          log: Callable[[str], Any] | None = None) -> Trained:
    """Train on ``ds.x_train``; report the accuracy on the held-out voices of ``ds.x_test``.

    ``threads``: torch's intra-op threads (1 by default: on a shared machine more threads than
    free cores made training ten times slower)."""
    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    fe = TorchFrontend()
    with torch.no_grad():  # the front end has no weights to learn: features once, up front
        xtr = torch.cat([fe(torch.from_numpy(ds.x_train[i:i + 512])) for i in range(0, len(ds.x_train), 512)])
        xte = torch.cat([fe(torch.from_numpy(ds.x_test[i:i + 512])) for i in range(0, len(ds.x_test), 512)])
    ytr = torch.from_numpy(ds.y_train)
    net = DSCNN(len(ds.classes), channels, blocks)
    net.drop.p = dropout
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-3)
    steps = epochs * -(-len(xtr) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    for epoch in range(epochs):
        net.train()
        perm = torch.randperm(len(xtr), generator=g)
        total = 0.0
        for i in range(0, len(xtr), batch):
            idx = perm[i:i + batch]
            xb = _spec_augment(xtr[idx], g)
            loss = loss_fn(net(xb), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        if log:
            log(f"[kws] epoch {epoch + 1}/{epochs}: loss {total / len(xtr):.3f} "
                f"({time.perf_counter() - t0:.0f} s)")
    net.eval()
    with torch.no_grad():
        pred = net(xte).argmax(-1).numpy()
    k = len(ds.classes)
    conf = np.zeros((k, k), np.int64)
    np.add.at(conf, (ds.y_test, pred), 1)
    per_class = {c: float(conf[i, i] / max(conf[i].sum(), 1)) for i, c in enumerate(ds.classes)}
    acc = float((pred == ds.y_test).mean())
    return Trained(net, ds.classes, acc, time.perf_counter() - t0, per_class, conf)


def to_onnx(net: DSCNN) -> onnx.ModelProto:
    """Raw audio [N, 16000] -> posteriors [N, classes]: the ONNX front end, then the DS-CNN."""
    from ..export import torch_to_onnx

    net.eval()
    example = torch.zeros(1, 1, N_FRAMES, N_MELS)
    body = torch_to_onnx(Posteriors(net), example, input_name=FEATURES, output_name="posteriors", opset=OPSET)
    fe = frontend_graph()
    body = onnx.version_converter.convert_version(body, OPSET) if _opset(body) != OPSET else body
    body.ir_version = fe.ir_version = max(body.ir_version, fe.ir_version)
    merged = onnx.compose.merge_models(fe, body, io_map=[(FEATURES, FEATURES)], prefix2="net_")
    # merge_models renames the second graph's outputs too: give the output back its name.
    out = merged.graph.output[0].name
    if out != "posteriors":
        for node in merged.graph.node:
            for j, o in enumerate(node.output):
                if o == out:
                    node.output[j] = "posteriors"
        merged.graph.output[0].name = "posteriors"
    merged.graph.name = "kws_dscnn"
    onnx.checker.check_model(merged)
    return merged


def _opset(m: onnx.ModelProto) -> int:
    return next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), OPSET)
