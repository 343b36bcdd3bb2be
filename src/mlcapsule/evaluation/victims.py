"""The victims, trained with torch on the CPU (fixed seeds) and cached as ONNX by the context.

* ``mnist_cnn``: the stealing victim, a small CNN on MNIST ([N, 1, 28, 28] in [0, 1]).
* ``cifar_overfit``: the membership victim, the same small CNN overfit on a subset of CIFAR-10.
* ``mnist_overfit``: an MLP overfit on a subset of MNIST (the second membership victim).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .context import Context

__all__ = ["mnist_cnn", "cifar_overfit", "mnist_overfit", "predict", "digits_lr"]


def _with_softmax(module: Any) -> Any:
    from torch import nn

    class WithSoftmax(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: Any) -> Any:
            import torch

            return torch.softmax(self.inner(x), dim=1)

    return WithSoftmax(module)


def _train(module: Any, x: np.ndarray, y: np.ndarray, *, epochs: int, lr: float, seed: int,
           weight_decay: float = 0.0) -> Any:
    from ..attacks.substitute import train

    pred = train(module, x.reshape(len(x), -1), y, epochs=epochs, lr=lr, batch_size=64, seed=seed,
                 weight_decay=weight_decay, input_shape=x.shape[1:])
    return _with_softmax(pred.module)


def mnist_cnn(ctx: Context) -> Any:
    """The MNIST victim of the stealing experiments (trained on the first images of MNIST's training set)."""
    s = ctx.sizes
    x, y = ctx.mnist("train")
    spec = {"v": 1, "arch": "small_cnn", "n": s.mnist_train, "epochs": s.mnist_epochs, "lr": 1e-3, "seed": 0}

    def train() -> Any:
        from ..attacks.substitute import small_cnn

        return _train(small_cnn(1, 28, 10, seed=0), x[:s.mnist_train], y[:s.mnist_train], epochs=s.mnist_epochs,
                      lr=1e-3, seed=0)

    return ctx.victim("mnist-cnn", spec, train, x[:2])


def cifar_overfit(ctx: Context) -> tuple[Any, tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """(model, members, non-members): the small CNN trained to overfit ``cifar_members`` CIFAR-10
    training images (no augmentation, no weight decay); non-members are CIFAR-10 test images."""
    s = ctx.sizes
    per = s.cifar_members // 10
    xm, ym = ctx.cifar10("train", per)
    n_non = max(s.mi_candidates // 10, 1)
    xn, yn = ctx.cifar10("test", n_non)
    spec = {"v": 1, "arch": "small_cnn", "per_class": per, "epochs": s.cifar_epochs, "lr": 1e-3, "seed": 0}

    def train() -> Any:
        from ..attacks.substitute import small_cnn

        return _train(small_cnn(3, 32, 10, seed=0), xm, ym, epochs=s.cifar_epochs, lr=1e-3, seed=0)

    return ctx.victim("cifar10-overfit", spec, train, xm[:2]), (xm, ym), (xn, yn)


def mnist_overfit(ctx: Context) -> tuple[Any, tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """(model, members, non-members): a 784-256-10 MLP overfit on ``mnist_members`` MNIST training
    images (from 50,000 on, apart from the stealing victim's); non-members: MNIST test images
    from 5,000 on."""
    s = ctx.sizes
    x, y = ctx.mnist("train")
    xm, ym = x[50_000:50_000 + s.mnist_members], y[50_000:50_000 + s.mnist_members]
    xt, yt = ctx.mnist("test")
    xn, yn = xt[5000:5000 + s.mi_candidates], yt[5000:5000 + s.mi_candidates]
    spec = {"v": 1, "arch": "mlp256", "n": s.mnist_members, "epochs": s.mnist_member_epochs, "lr": 1e-3, "seed": 0}

    def train() -> Any:
        from torch import nn

        from ..attacks.substitute import mlp

        module = nn.Sequential(nn.Flatten(), mlp(784, (256,), 10, seed=0))
        return _train(module, xm, ym, epochs=s.mnist_member_epochs, lr=1e-3, seed=0)

    return ctx.victim("mnist-overfit", spec, train, xm[:2]), (xm, ym), (xn, yn)


def predict(model: Any, x: np.ndarray, batch: int = 1000) -> np.ndarray:
    """The plain model's posteriors (ONNX Runtime, one thread): the research-side ground truth."""
    from ..attacks import OnnxOracle

    oracle = OnnxOracle(model, keep_inputs=False)
    out = [oracle.query(np.ascontiguousarray(x[i:i + batch], dtype=np.float32)) for i in range(0, len(x), batch)]
    return np.concatenate(out).astype(np.float64)


def digits_lr(binary: bool) -> tuple[Any, Any, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(sklearn model, ONNX softmax(xW^T + b), x_train, x_test, y_train, y_test) on scikit-learn's
    digits: binary (odd against even) or 10-class logistic regression."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x.astype(np.float32), y, test_size=0.25, random_state=0, stratify=y)
    if binary:
        clf = LogisticRegression(max_iter=2000).fit(xtr, ytr % 2)
        w = np.vstack([np.zeros(64), clf.coef_[0]])
        b = np.array([0.0, clf.intercept_[0]])
    else:
        clf = LogisticRegression(max_iter=3000).fit(xtr, ytr)
        w, b = clf.coef_, clf.intercept_
    g = helper.make_graph(
        [helper.make_node("Gemm", ["input", "W", "B"], ["logits"], transB=1),
         helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1)],
        "lr", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", w.shape[0]])],
        [numpy_helper.from_array(np.asarray(w, np.float32), "W"),
         numpy_helper.from_array(np.asarray(b, np.float32), "B")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return clf, model, xtr, xte, ytr, yte
