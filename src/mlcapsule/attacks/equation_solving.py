"""Tramèr et al. (USENIX Security 2016), Section 4.1: equation-solving extraction.

A model that returns confidences gives one equation per query (per class) in its unknown
parameters. The attacker knows the model class and the input dimension ``d``, draws query
inputs at random from the input domain, and solves.

* :func:`extract_logistic` — binary logistic regression ``σ(w·x + b)``: each answer gives the
  *linear* equation ``w·x + b = logit(p)``, so ``d + 1`` queries in general position recover
  ``(w, b)`` exactly (the paper's count).
* :func:`extract_softmax` — multinomial logistic regression ``softmax(Wx + b)``. ``method``:

  - ``"log-ratio"``: ``log(p_k / p_r) = (w_k - w_r)·x + (b_k - b_r)`` is linear, ``c - 1``
    equations per query in ``(c - 1)(d + 1)`` unknowns of the shift-normalised model (softmax
    is invariant to adding one vector to every row), so ``d + 1`` queries suffice, with any
    number of classes;
  - ``"loss"``: what the paper does for softmax models, minimising the cross-entropy between
    the answers and the model over all query/answer pairs (it reports 100 % fidelity at
    ``queries = unknowns = c(d + 1)``, e.g. 530 for Adult, 650 for Digits).

* :func:`extract_mlp` — an MLP with a softmax output and known architecture: no closed form;
  the paper minimises the same cross-entropy (its Table 4: 2,225 unknowns, 98.68 % test fidelity
  at 2,225 queries, 99.89 % at 4,450). We use full-batch L-BFGS with random restarts (torch).

Rounded answers (the rounding countermeasure) make the equations inexact: ``log-ratio`` then
solves in the least-squares sense over the equations whose probabilities are not rounded to 0
or 1, and more queries than unknowns help (see ``docs/attacks.md``).

Each function returns an :class:`~mlcapsule.attacks.results.AttackResult` whose ``model`` is the
extracted numpy model and whose ``trace`` has the fidelity measured by ``evaluator`` after
each entry of ``checkpoints`` (solving again on the first answers only: no further queries).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..errors import UsageError
from ._run import Sampler, check_posteriors, spend, uniform_sampler
from .models import NumpyMLP, SoftmaxRegression
from .oracle import Oracle
from .results import STOP_DONE, AttackResult, Trace

__all__ = ["extract_logistic", "extract_softmax", "extract_mlp", "logistic_unknowns", "softmax_unknowns"]

#: Probabilities at or below this (or at or above 1 - this) carry no usable equation.
_P_FLOOR = 0.0


def logistic_unknowns(n_features: int) -> int:
    return n_features + 1


def softmax_unknowns(n_features: int, n_classes: int) -> int:
    return n_classes * (n_features + 1)


def _queries(oracle: Oracle, n_features: int, queries: int, sampler: Sampler | None, low: float, high: float,
             seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    if queries < 1:
        raise UsageError(f"queries must be positive, got {queries}")
    draw = sampler or uniform_sampler((n_features,), low, high)
    x = draw(np.random.default_rng(seed), queries).reshape(queries, -1)
    if x.shape[1] != n_features:
        raise UsageError(f"the sampler drew {x.shape[1]} features, expected {n_features}")
    return spend(oracle, x)


def _checkpoints(checkpoints: Sequence[int] | None, n: int) -> list[int]:
    pts = sorted({int(c) for c in (checkpoints or []) if 0 < int(c) < n})
    return [*pts, n] if n else []


def _trace(evaluate: Callable[[int], Any], checkpoints: list[int], evaluator: Any) -> tuple[Trace, Any]:
    trace = Trace()
    model = None
    for q in checkpoints:
        model = evaluate(q)
        if evaluator is not None and model is not None:
            trace.add(q, **evaluator(model))
    return trace, model


# -- binary logistic regression -----------------------------------------------------------------------
def _binary_logits(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(logit, usable) from answers [n, 2] (p0, p1), [n, 1] or [n] (p1)."""
    y = np.asarray(y, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        if y.ndim == 2 and y.shape[1] == 2:
            # log p1 - log p0: exact even where 1 - p1 underflows, when the model computes a softmax.
            z = np.log(y[:, 1]) - np.log(y[:, 0])
            ok = (y[:, 0] > _P_FLOOR) & (y[:, 1] > _P_FLOOR)
        elif y.ndim == 1 or (y.ndim == 2 and y.shape[1] == 1):
            p = y.reshape(-1)
            z = np.log(p) - np.log1p(-p)
            ok = (p > _P_FLOOR) & (p < 1.0 - _P_FLOOR)
        else:
            raise UsageError(f"binary logistic regression answers have 1 or 2 columns, got shape {y.shape}")
    ok &= np.isfinite(z)
    return z, ok


def _solve_linear(x: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Least squares for ``[x, 1] θ = z`` (exact when square and regular); θ = [w..., b]."""
    a = np.hstack([x, np.ones((x.shape[0], 1))])
    theta, *_ = np.linalg.lstsq(a, z, rcond=None)
    return np.asarray(theta)


def extract_logistic(oracle: Oracle, n_features: int, *, queries: int | None = None, low: float = 0.0,
                     high: float = 1.0, sampler: Sampler | None = None, seed: int = 0, evaluator: Any = None,
                     checkpoints: Sequence[int] | None = None) -> AttackResult:
    """Binary LR by solving ``w·x + b = logit(p)``; ``queries`` defaults to ``d + 1``.

    The model returned is a two-class :class:`SoftmaxRegression` (row 0 zero, row 1 ``w``)."""
    queries = logistic_unknowns(n_features) if queries is None else queries
    x, y, stopped = _queries(oracle, n_features, queries, sampler, low, high, seed)
    y = check_posteriors(y, "equation solving")
    z, ok = _binary_logits(y) if len(y) else (np.empty(0), np.empty(0, dtype=bool))

    def solve(q: int) -> SoftmaxRegression | None:
        use = ok[:q]
        if not use.any():
            return None
        theta = _solve_linear(np.asarray(x[:q][use], np.float64), z[:q][use])
        w = np.vstack([np.zeros(n_features), theta[:-1]])
        return SoftmaxRegression(w, np.array([0.0, theta[-1]]))

    trace, model = _trace(solve, _checkpoints(checkpoints, len(x)), evaluator)
    return AttackResult(
        "tramer-equation-solving-logistic", queries_spent=len(x), stopped=stopped, trace=trace, model=model,
        params={"n_features": n_features, "queries": queries, "unknowns": logistic_unknowns(n_features),
                "low": low, "high": high, "seed": seed},
        metrics={**({} if not trace.points else trace.points[-1].metrics), "usable_equations": float(ok.sum())},
    )


# -- multinomial logistic regression -----------------------------------------------------------------
def _solve_log_ratio(x: np.ndarray, y: np.ndarray) -> SoftmaxRegression | None:
    """Per class k != r: least squares on the rows where p_k and p_r are both positive."""
    n, c = y.shape
    d = x.shape[1]
    with np.errstate(divide="ignore"):
        logp = np.log(y)
    # The reference class: the one positive in most rows (most equations survive rounding).
    ref = int(np.argmax((y > 0).sum(axis=0)))
    w = np.zeros((c, d))
    b = np.zeros(c)
    for k in range(c):
        if k == ref:
            continue
        ok = np.isfinite(logp[:, k]) & np.isfinite(logp[:, ref])
        if not ok.any():
            return None
        theta = _solve_linear(x[ok], logp[ok, k] - logp[ok, ref])
        w[k], b[k] = theta[:-1], theta[-1]
    return SoftmaxRegression(w, b)


def _fit_softmax_loss(x: np.ndarray, y: np.ndarray, *, hidden: Sequence[int] = (), activation: str = "relu",
                      restarts: int = 1, max_iter: int = 500, seed: int = 0, l2: float = 0.0
                      ) -> tuple[list[tuple[np.ndarray, np.ndarray]], float]:
    """Minimise the cross-entropy between answers ``y`` and ``softmax(net(x))`` (L-BFGS, float64).

    The inputs are standardised for the optimiser (uniform queries over a wide box make the
    problem ill-conditioned) and the first layer is mapped back to the raw inputs at the end."""
    import torch

    from .substitute import limit_threads

    limit_threads()
    mu = x.mean(axis=0)
    sd = x.std(axis=0)
    sd = np.where(sd > 0, sd, 1.0)
    xt = torch.from_numpy((np.asarray(x, np.float64) - mu) / sd)
    yt = torch.from_numpy(np.asarray(y, np.float64))
    sizes = [x.shape[1], *hidden, y.shape[1]]
    acts: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "identity": lambda a: a}
    act = acts[activation]
    best: tuple[list[tuple[np.ndarray, np.ndarray]], float] | None = None
    gen = torch.Generator().manual_seed(seed)

    def forward(inp: torch.Tensor, ps: list[torch.Tensor]) -> torch.Tensor:
        h = inp
        for i in range(0, len(ps), 2):
            h = h @ ps[i].T + ps[i + 1]
            if i < len(ps) - 2:
                h = act(h)
        return h

    def objective(ps: list[torch.Tensor]) -> torch.Tensor:
        loss = -(yt * torch.log_softmax(forward(xt, ps), dim=1)).sum(dim=1).mean()
        if l2:
            loss = loss + l2 * sum((p * p).sum() for p in ps[0::2])
        return loss

    for _ in range(max(1, restarts)):
        params: list[torch.Tensor] = []
        for a, b in zip(sizes[:-1], sizes[1:], strict=True):
            params.append((torch.randn(b, a, generator=gen, dtype=torch.float64) / np.sqrt(a)).requires_grad_())
            params.append(torch.zeros(b, dtype=torch.float64).requires_grad_())
        opt = torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter, tolerance_grad=1e-10, tolerance_change=1e-14,
                                history_size=50, line_search_fn="strong_wolfe")

        def closure(ps: list[torch.Tensor] = params, opt: torch.optim.LBFGS = opt) -> torch.Tensor:
            opt.zero_grad()
            loss = objective(ps)
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            final = float(objective(params))
        layers = [(params[i].detach().numpy().copy(), params[i + 1].detach().numpy().copy())
                  for i in range(0, len(params), 2)]
        if best is None or final < best[1]:
            best = (layers, final)
    assert best is not None
    layers, final = best
    w0, b0 = layers[0]
    layers[0] = (w0 / sd, b0 - (w0 / sd) @ mu)  # back to raw inputs: W (x - mu) / sd + b
    return layers, final


def extract_softmax(oracle: Oracle, n_features: int, *, queries: int | None = None, method: str = "log-ratio",
                    low: float = 0.0, high: float = 1.0, sampler: Sampler | None = None, seed: int = 0,
                    evaluator: Any = None, checkpoints: Sequence[int] | None = None,
                    max_iter: int = 500) -> AttackResult:
    """Multinomial LR. ``queries`` defaults to ``d + 1`` (``log-ratio``) or to the unknowns
    ``c(d + 1)`` (``loss``, the paper's count), ``c`` read from the first answer."""
    if method not in ("log-ratio", "loss"):
        raise UsageError(f"method must be 'log-ratio' or 'loss', got {method!r}")
    if queries is None and method == "loss":
        # The paper's count needs c: one query tells it (and is kept as an equation).
        x0, y0, stopped = _queries(oracle, n_features, 1, sampler, low, high, seed + 1)
        if stopped != STOP_DONE:
            return AttackResult("tramer-equation-solving-softmax", queries_spent=len(x0), stopped=stopped,
                                params={"method": method})
        queries = softmax_unknowns(n_features, int(check_posteriors(y0, "equation solving").shape[1])) - 1
    else:
        x0, y0 = np.empty((0, n_features), np.float32), np.empty((0, 0))
    queries = logistic_unknowns(n_features) if queries is None else queries
    x, y, stopped = _queries(oracle, n_features, queries, sampler, low, high, seed)
    y = check_posteriors(y, "equation solving")
    if len(x0):
        x, y = np.concatenate([x0, x]), np.concatenate([np.asarray(y0, np.float64), y])
    x = np.asarray(x, np.float64)
    c = y.shape[1] if y.ndim == 2 else 0

    def solve(q: int) -> SoftmaxRegression | None:
        if method == "log-ratio":
            return _solve_log_ratio(x[:q], y[:q])
        ((w, b),), _ = _fit_softmax_loss(x[:q], y[:q], max_iter=max_iter, seed=seed)
        return SoftmaxRegression(w, b)

    trace, model = _trace(solve, _checkpoints(checkpoints, len(x)), evaluator)
    return AttackResult(
        "tramer-equation-solving-softmax", queries_spent=len(x), stopped=stopped, trace=trace, model=model,
        params={"n_features": n_features, "n_classes": c, "method": method, "queries": len(x),
                "unknowns": softmax_unknowns(n_features, c) if c else None, "low": low, "high": high, "seed": seed},
        metrics={} if not trace.points else dict(trace.points[-1].metrics),
    )


# -- MLP ------------------------------------------------------------------------------------------------
def extract_mlp(oracle: Oracle, n_features: int, hidden: Sequence[int], *, queries: int | None = None,
                n_classes: int | None = None, activation: str = "relu", restarts: int = 3, max_iter: int = 500,
                low: float = 0.0, high: float = 1.0, sampler: Sampler | None = None, seed: int = 0,
                evaluator: Any = None, checkpoints: Sequence[int] | None = None) -> AttackResult:
    """An MLP of known architecture (``hidden`` widths, ``activation``) with softmax outputs.

    ``queries`` defaults to the number of unknowns (``n_classes`` is then required)."""
    if queries is None:
        if n_classes is None:
            raise UsageError("extract_mlp needs queries, or n_classes to count the unknowns")
        queries = NumpyMLP.count_params(n_features, hidden, n_classes)
    x, y, stopped = _queries(oracle, n_features, queries, sampler, low, high, seed)
    y = check_posteriors(y, "equation solving")
    x = np.asarray(x, np.float64)
    c = y.shape[1] if y.ndim == 2 else (n_classes or 0)

    def solve(q: int) -> NumpyMLP | None:
        if q == 0:
            return None
        layers, _ = _fit_softmax_loss(x[:q], y[:q], hidden=hidden, activation=activation, restarts=restarts,
                                      max_iter=max_iter, seed=seed)
        return NumpyMLP(layers, activation)

    trace, model = _trace(solve, _checkpoints(checkpoints, len(x)), evaluator)
    return AttackResult(
        "tramer-equation-solving-mlp", queries_spent=len(x), stopped=stopped, trace=trace, model=model,
        params={"n_features": n_features, "hidden": list(hidden), "n_classes": c, "activation": activation,
                "queries": queries, "unknowns": NumpyMLP.count_params(n_features, hidden, c) if c else None,
                "restarts": restarts, "seed": seed},
        metrics={} if not trace.points else dict(trace.points[-1].metrics),
    )
