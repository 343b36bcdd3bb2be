"""Tramèr et al.'s label-only retraining attacks (USENIX Security 2016, Section 6.1).

The attacker sees only the victim's labels and retrains a substitute on the points it queried.
The three strategies differ in *which* points they query:

* uniform retraining (:func:`mlcapsule.attacks.uniform_retraining`): uniform points of the box;
* :func:`line_search_retraining`: a model-agnostic generalisation of Lowd & Meek. Start from
  some points (uniform, or the attacker's natural ones), take pairs with different labels and
  bisect the segment between them: each midpoint is queried, and replaces the endpoint of its
  label. After ``steps`` bisections the pair straddles the decision boundary within
  ``|x1 - x2| / 2**steps``. Every queried midpoint is a training point (the authors' code keeps
  them all), so the training set concentrates around the boundaries;
* :func:`adaptive_retraining`: active learning. The budget is split into ``rounds``; the first
  round queries uniform points, and every later round trains the substitute on all answers so
  far and queries the points it is least sure about: 3/4 of the round chosen from a pool of
  uniform candidates (the smallest gap between the substitute's top two posteriors, or the
  substitute's own decision boundary found by line search on it, which costs no query), 1/4
  uniform, as in the authors' code.

Multiclass pairs: a midpoint may get a third label; it then replaces the second endpoint (the
authors' rule), so the pair still straddles *a* boundary of its first endpoint's class.

The substitute is the torch model of :func:`mlcapsule.attacks.retraining` (``hidden=(64,)`` by
default; ``hidden=()`` gives a softmax regression, the model class Tramèr et al. retrained
against logistic regressions). :func:`compare_label_only_retraining` runs the three at equal
budgets.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..errors import UsageError
from ._run import spend
from .extraction import SubstituteFactory, _default_factory, _fit, uniform_retraining
from .models import TorchPredictor
from .oracle import Oracle, as_labels, is_label_output
from .results import STOP_DONE, AttackResult, Trace

__all__ = ["line_search_retraining", "adaptive_retraining", "compare_label_only_retraining",
           "bisect_pairs", "RETRAINING_STRATEGIES"]

RETRAINING_STRATEGIES = ("uniform", "line-search", "adaptive")


class _Labelled:
    """Every answered query so far, as labels; trains the substitute and traces fidelity."""

    def __init__(self, oracle: Oracle, n_classes: int | None, factory: SubstituteFactory, fit: dict[str, Any],
                 evaluator: Any) -> None:
        self.oracle = oracle
        self.n_classes = n_classes
        self.factory = factory
        self.fit_kwargs = fit
        self.evaluator = evaluator
        self.xs: list[np.ndarray] = []
        self.ys: list[np.ndarray] = []
        self.trace = Trace()
        self.model: TorchPredictor | None = None
        self.stopped = STOP_DONE

    @property
    def done(self) -> bool:
        return self.stopped != STOP_DONE

    def ask(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Query ``x`` (a budget may cut it short); returns the rows answered and their labels."""
        ax, ay, self.stopped = spend(self.oracle, np.asarray(x, dtype=np.float32))
        if not len(ax):
            return np.asarray(ax, np.float32), np.empty((0,), np.int64)
        if self.n_classes is None:
            if is_label_output(ay) or np.asarray(ay).ndim != 2:
                raise UsageError("the oracle answers labels: pass n_classes")
            self.n_classes = int(np.asarray(ay).shape[1])
        labels = as_labels(ay)
        self.xs.append(np.asarray(ax, np.float32).reshape(len(ax), -1))
        self.ys.append(labels)
        return np.asarray(ax, np.float32), labels

    def labels(self) -> np.ndarray:
        return np.concatenate(self.ys) if self.ys else np.empty((0,), np.int64)

    def retrain(self, **trace_extra: float) -> TorchPredictor | None:
        if not self.xs or self.n_classes is None:
            return self.model
        x, y = np.concatenate(self.xs), np.concatenate(self.ys)
        self.model = _fit(self.factory, x, y, self.n_classes, **self.fit_kwargs)
        if self.evaluator is not None:
            self.trace.add(self.oracle.queries_spent, **trace_extra, **self.evaluator(self.model))
        return self.model

    def result(self, attack: str, params: dict[str, Any], extra: dict[str, Any] | None = None) -> AttackResult:
        return AttackResult(attack, queries_spent=self.oracle.queries_spent, stopped=self.stopped, trace=self.trace,
                            model=self.model, params=params,
                            metrics={} if not self.trace.points else dict(self.trace.points[-1].metrics),
                            extra=extra or {})


def _fit_kwargs(epochs: int, lr: float, batch_size: int, seed: int,
                input_shape: Sequence[int] | None) -> dict[str, Any]:
    return {"epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed, "input_shape": input_shape}


def _checkpoints(queries: int, checkpoints: Sequence[int] | None) -> list[int]:
    if queries < 1:
        raise UsageError(f"queries must be positive, got {queries}")
    return sorted({int(c) for c in (checkpoints or []) if 0 < int(c) < queries} | {queries})


def _pick_pairs(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` index pairs ``(i, j)`` with different labels, spread evenly over the label pairs
    seen (so that every boundary between observed classes gets its share)."""
    classes = np.unique(labels)
    if len(classes) < 2 or n <= 0:
        return np.empty((0, 2), np.int64)
    members = {int(c): np.flatnonzero(labels == c) for c in classes}
    combos = [(int(a), int(b)) for k, a in enumerate(classes) for b in classes[k + 1:]]
    order = rng.permutation(len(combos))
    out = np.empty((n, 2), np.int64)
    for t in range(n):
        a, b = combos[order[t % len(combos)]]
        out[t, 0] = rng.choice(members[a])
        out[t, 1] = rng.choice(members[b])
    return out


def bisect_pairs(predict: Callable[[np.ndarray], np.ndarray], x1: np.ndarray, y1: np.ndarray, x2: np.ndarray,
                 steps: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bisect ``steps`` times between ``x1[i]`` (label ``y1[i]``) and ``x2[i]`` with ``predict``
    (labels of a batch; any model, no budget). Returns the final endpoints and every midpoint,
    ``[steps * n, d]``. The same rule as the oracle line search."""
    a, b = np.array(x1, np.float32), np.array(x2, np.float32)
    mids = []
    for _ in range(steps):
        mid = (a + b) / 2
        same = np.asarray(predict(mid)) == y1
        a[same], b[~same] = mid[same], mid[~same]
        mids.append(mid)
    return a, b, np.concatenate(mids) if mids else a[:0]


def line_search_retraining(oracle: Oracle, shape: Sequence[int], *, low: float, high: float, queries: int,
                           n_classes: int | None = None, start_x: np.ndarray | None = None,
                           init_fraction: float = 0.25, steps: int = 5, pair_batch: int = 32,
                           checkpoints: Sequence[int] | None = None, substitute: SubstituteFactory | None = None,
                           hidden: Sequence[int] = (64,), epochs: int = 50, lr: float = 1e-2, batch_size: int = 32,
                           input_shape: Sequence[int] | None = None, seed: int = 0,
                           evaluator: Any = None) -> AttackResult:
    """Tramèr et al.'s line-search retraining, labels only.

    The starting points are ``start_x`` (the attacker's natural inputs, queried first and
    charged) if given, else ``init_fraction * queries`` uniform points of ``[low, high]^shape``;
    more uniform points are drawn while they all have one label. The rest of the budget goes to
    line searches: ``pair_batch`` pairs at a time, each bisected ``steps`` times (one query per
    step, the midpoints of a batch sent together). A substitute is trained on every answer at
    each checkpoint (exact query counts)."""
    if steps < 1:
        raise UsageError(f"steps must be >= 1, got {steps}")
    if not high > low:
        raise UsageError(f"the query domain needs low < high, got [{low}, {high}]")
    points = _checkpoints(queries, checkpoints)
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)
    run = _Labelled(oracle, n_classes, substitute or _default_factory(hidden),
                    _fit_kwargs(epochs, lr, batch_size, seed, input_shape), evaluator)

    def uniform(n: int) -> np.ndarray:
        return rng.uniform(low, high, size=(n, *shape)).astype(np.float32).reshape(n, -1)

    spent = 0
    pool_x: list[np.ndarray] = []
    if start_x is not None:
        sx = np.asarray(start_x, np.float32).reshape(len(start_x), -1)[:queries]
        ax, _ = run.ask(sx)
        pool_x.append(ax.reshape(len(ax), -1))
        spent += len(ax)
    else:
        n0 = max(2, min(queries, int(round(init_fraction * queries))))
        ax, _ = run.ask(uniform(n0))
        pool_x.append(ax.reshape(len(ax), -1))
        spent += len(ax)
    chunk = max(2, int(round(init_fraction * queries)) // 4)
    while not run.done and spent < queries and len(np.unique(run.labels())) < 2:
        ax, _ = run.ask(uniform(min(chunk, queries - spent)))
        pool_x.append(ax.reshape(len(ax), -1))
        spent += len(ax)
    px, py = np.concatenate(pool_x), run.labels().copy()
    n_start = len(px)
    trained_at = -1
    for cp in points:
        if cp <= spent:
            continue
        while not run.done and spent < cp:
            left = cp - spent
            pairs = _pick_pairs(py, min(pair_batch, -(-left // steps)), rng)
            if not len(pairs):  # one label everywhere: uniform points are all the attack can do
                ax, _ = run.ask(uniform(left))
                spent += len(ax)
                continue
            a, b, ya = px[pairs[:, 0]].copy(), px[pairs[:, 1]].copy(), py[pairs[:, 0]]
            for _ in range(steps):
                k = min(len(a), cp - spent)
                if k <= 0 or run.done:
                    break
                mx, my = run.ask((a[:k] + b[:k]) / 2)
                spent += len(mx)
                same = my == ya[:len(my)]
                idx = np.arange(len(my))
                a[idx[same]], b[idx[~same]] = mx[same], mx[~same]
        run.retrain(boundary_points=float(spent - n_start))
        trained_at = spent
        if run.done:
            break
    if run.xs and trained_at != spent:
        run.retrain(boundary_points=float(spent - n_start))
    return run.result("tramer-line-search-retraining",
                      {"queries": queries, "steps": steps, "start_points": n_start, "pair_batch": pair_batch,
                       "low": low, "high": high, "epochs": epochs, "seed": seed, "checkpoints": points},
                      {"queried_x": np.concatenate(run.xs) if run.xs else np.empty((0, int(np.prod(shape))))})


def adaptive_retraining(oracle: Oracle, shape: Sequence[int], *, low: float, high: float, queries: int,
                        n_classes: int | None = None, rounds: int = 8, selection: str = "margin",
                        random_fraction: float = 0.25, pool_size: int = 2000, steps: int = 8,
                        start_x: np.ndarray | None = None, substitute: SubstituteFactory | None = None,
                        hidden: Sequence[int] = (64,), epochs: int = 50, lr: float = 1e-2, batch_size: int = 32,
                        input_shape: Sequence[int] | None = None, seed: int = 0,
                        evaluator: Any = None) -> AttackResult:
    """Tramèr et al.'s adaptive retraining (active learning), labels only.

    ``queries`` are spent in ``rounds`` rounds of about equal size. The first round queries
    ``start_x`` (if given) or uniform points. Each later round trains the substitute on every
    answer so far, draws ``pool_size`` uniform candidates and queries ``1 - random_fraction``
    of the round chosen by ``selection``, the rest uniform:

    * ``"margin"``: the candidates with the smallest gap between the substitute's top two
      posteriors (the least certain);
    * ``"boundary"``: points on the substitute's decision boundary, found by bisecting
      (``steps`` times, on the substitute, no query) between candidates it labels differently;
      ``"margin"`` when it gives the pool one label (the authors' rule).

    The fidelity is traced after every round."""
    if selection not in ("margin", "boundary"):
        raise UsageError(f"selection must be 'margin' or 'boundary', got {selection!r}")
    if rounds < 1:
        raise UsageError(f"rounds must be >= 1, got {rounds}")
    if not 0.0 <= random_fraction <= 1.0:
        raise UsageError(f"random_fraction must be in [0, 1], got {random_fraction}")
    if not high > low:
        raise UsageError(f"the query domain needs low < high, got [{low}, {high}]")
    _checkpoints(queries, None)
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)
    run = _Labelled(oracle, n_classes, substitute or _default_factory(hidden),
                    _fit_kwargs(epochs, lr, batch_size, seed, input_shape), evaluator)

    def uniform(n: int) -> np.ndarray:
        return rng.uniform(low, high, size=(n, *shape)).astype(np.float32).reshape(n, -1)

    sizes = [queries // rounds + (1 if r < queries % rounds else 0) for r in range(rounds)]
    sizes = [s for s in sizes if s > 0]
    spent = 0
    chosen: dict[str, int] = {"margin": 0, "boundary": 0, "uniform": 0}
    for r, size in enumerate(sizes):
        if r == 0:
            first = (uniform(size) if start_x is None
                     else np.asarray(start_x, np.float32).reshape(len(start_x), -1)[:size])
            batch = first if len(first) == size else np.concatenate([first, uniform(size - len(first))])
            chosen["uniform"] += size
        else:
            model = run.model
            n_pick = int(round((1.0 - random_fraction) * size))
            picked, how = _select(model, uniform(pool_size), n_pick, selection, steps, rng)
            chosen[how] += len(picked)
            chosen["uniform"] += size - len(picked)
            batch = np.concatenate([picked, uniform(size - len(picked))])
        ax, _ = run.ask(batch)
        spent += len(ax)
        run.retrain(round=float(r))
        if run.done:
            break
    return run.result("tramer-adaptive-retraining",
                      {"queries": queries, "rounds": len(sizes), "selection": selection,
                       "random_fraction": random_fraction, "pool_size": pool_size, "low": low, "high": high,
                       "epochs": epochs, "seed": seed},
                      {"chosen": chosen,
                       "queried_x": np.concatenate(run.xs) if run.xs else np.empty((0, int(np.prod(shape))))})


def _select(model: TorchPredictor | None, pool: np.ndarray, n: int, selection: str, steps: int,
            rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """``n`` points of the pool (or of the substitute's boundary) the substitute is least sure about."""
    if model is None or n <= 0:
        return pool[:0], "uniform"
    probs = model.predict_proba(pool)
    labels = probs.argmax(axis=1)
    if selection == "boundary" and len(np.unique(labels)) > 1:
        pairs = _pick_pairs(labels, n, rng)
        a, b, _ = bisect_pairs(model.predict, pool[pairs[:, 0]], labels[pairs[:, 0]], pool[pairs[:, 1]], steps)
        return ((a + b) / 2).astype(np.float32), "boundary"
    top = np.sort(probs, axis=1)
    margin = top[:, -1] - top[:, -2] if probs.shape[1] > 1 else np.zeros(len(pool))
    return pool[np.argsort(margin, kind="stable")[:n]], "margin"


def compare_label_only_retraining(make_oracle: Callable[[], Oracle], shape: Sequence[int], *, low: float,
                                  high: float, budgets: Sequence[int], n_classes: int, evaluator: Any,
                                  strategies: Sequence[str] = RETRAINING_STRATEGIES,
                                  options: dict[str, dict[str, Any]] | None = None,
                                  **common: Any) -> dict[str, dict[int, dict[str, float]]]:
    """Run each label-only strategy at each budget on a fresh oracle (``make_oracle()``), with
    the same substitute settings (``common``: hidden, epochs, seed, ...) and per-strategy
    ``options``; returns ``{strategy: {budget: metrics}}``."""
    options = options or {}
    out: dict[str, dict[int, dict[str, float]]] = {}
    for name in strategies:
        if name not in RETRAINING_STRATEGIES:
            raise UsageError(f"unknown strategy {name!r}; choose from {', '.join(RETRAINING_STRATEGIES)}")
        out[name] = {}
        for budget in budgets:
            kw = {**common, **options.get(name, {})}
            oracle = make_oracle()
            if name == "uniform":
                res = uniform_retraining(oracle, shape, low=low, high=high, queries=budget, n_classes=n_classes,
                                         evaluator=evaluator, soft=False, **kw)
            elif name == "line-search":
                res = line_search_retraining(oracle, shape, low=low, high=high, queries=budget,
                                             n_classes=n_classes, evaluator=evaluator, **kw)
            else:
                res = adaptive_retraining(oracle, shape, low=low, high=high, queries=budget, n_classes=n_classes,
                                          evaluator=evaluator, **kw)
            out[name][int(budget)] = {**res.metrics, "queries_spent": float(res.queries_spent)}
    return out
