"""Extraction by retraining a substitute on the victim's answers (torch, CPU).

* :func:`jbda` — Papernot et al. (AsiaCCS 2017), Jacobian-based dataset augmentation: from a
  small seed set, label with the victim, train a substitute, then for every known point
  ``x`` add ``x + λ·sign(∂F_{O(x)}(x)/∂x)`` (F: the substitute), label the new points, retrain;
  ``ρ`` rounds spend ``|S0|·2^ρ`` queries. The victim's labels only are used. λ flips sign
  every ``tau`` rounds (Papernot's periodic step size) when ``tau`` is set.
* :func:`knockoff` — Orekondy et al. (CVPR 2019), Knockoff Nets with the *random* policy:
  natural images from another distribution (the transfer set), answered with posteriors, and
  a substitute trained on the posteriors (soft labels).
* :func:`retraining` — the general loop behind both: draw queries, answer, retrain at each
  checkpoint. With uniform queries and labels it is Tramèr et al.'s label-only "uniform
  retraining" attack (Section 6), and with posteriors the classic uniform-query baseline.

Each returns an :class:`~mlcapsule.attacks.results.AttackResult` with the final substitute as
``model`` and, with an ``evaluator``, fidelity/accuracy against the queries spent.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..errors import UsageError
from ._run import Sampler, spend, uniform_sampler
from .models import TorchPredictor
from .oracle import Oracle, as_labels, is_label_output
from .results import STOP_DONE, AttackResult, Trace

__all__ = ["jbda", "knockoff", "retraining", "uniform_retraining", "SubstituteFactory"]

#: Builds a fresh substitute (a torch module with logits out) for ``(n_inputs, n_classes, seed)``.
SubstituteFactory = Callable[[int, int, int], Any]


def _default_factory(hidden: Sequence[int]) -> SubstituteFactory:
    def build(n_inputs: int, n_classes: int, seed: int) -> Any:
        from .substitute import mlp

        return mlp(n_inputs, hidden, n_classes, seed=seed)

    return build


def _targets(y: np.ndarray, n_classes: int, soft: bool) -> np.ndarray:
    if soft and not is_label_output(y) and np.asarray(y).ndim == 2:
        return np.asarray(y, dtype=np.float32)
    return as_labels(y)


def _fit(factory: SubstituteFactory, x: np.ndarray, y: np.ndarray, n_classes: int, *, epochs: int, lr: float,
         batch_size: int, seed: int, input_shape: Sequence[int] | None) -> TorchPredictor:
    from .substitute import train

    flat = int(np.prod(x.shape[1:])) if input_shape is None else int(np.prod(input_shape))
    module = factory(flat, n_classes, seed)
    return train(module, x.reshape(len(x), -1), y, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                 input_shape=input_shape)


def jbda(oracle: Oracle, seed_x: np.ndarray, *, n_classes: int, rounds: int = 4, lam: float = 0.1,
         tau: int | None = None, low: float | None = None, high: float | None = None,
         substitute: SubstituteFactory | None = None, hidden: Sequence[int] = (64,), epochs: int = 50,
         lr: float = 1e-2, batch_size: int = 32, input_shape: Sequence[int] | None = None, seed: int = 0,
         evaluator: Any = None) -> AttackResult:
    """Papernot et al.'s substitute training with Jacobian-based augmentation.

    ``seed_x`` is the attacker's initial set S0 (natural inputs, e.g. a few per class), ``lam``
    the step λ in input units, ``low``/``high`` clip the synthetic points to the input domain."""
    from .substitute import jacobian_sign

    if rounds < 0:
        raise UsageError(f"rounds must be >= 0, got {rounds}")
    factory = substitute or _default_factory(hidden)
    known_x = np.asarray(seed_x, dtype=np.float32).reshape(len(seed_x), -1)
    new_x = known_x
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    trace = Trace()
    model: TorchPredictor | None = None
    stopped = STOP_DONE
    for rho in range(rounds + 1):
        ax, ay, stopped = spend(oracle, new_x)
        if len(ax):
            xs.append(np.asarray(ax, np.float32).reshape(len(ax), -1))
            ys.append(as_labels(ay))
        x_all, y_all = np.concatenate(xs), np.concatenate(ys)
        if not len(x_all):
            break
        model = _fit(factory, x_all, y_all, n_classes, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                     input_shape=input_shape)
        if evaluator is not None:
            trace.add(oracle.queries_spent, round=rho, **evaluator(model))
        if stopped != STOP_DONE or rho == rounds:
            break
        step = lam if tau is None else lam * (-1.0) ** (rho // tau)
        moved = x_all + step * jacobian_sign(model, x_all, y_all).reshape(x_all.shape)
        if low is not None or high is not None:
            moved = np.clip(moved, low, high)
        new_x = moved.astype(np.float32)
    return AttackResult(
        "papernot-jbda", queries_spent=oracle.queries_spent, stopped=stopped, trace=trace, model=model,
        params={"seed_size": len(seed_x), "rounds": rounds, "lam": lam, "tau": tau, "epochs": epochs, "seed": seed},
        metrics={} if not trace.points else dict(trace.points[-1].metrics),
        extra={"queried_x": np.concatenate(xs) if xs else known_x[:0]},
    )


def retraining(oracle: Oracle, sampler: Sampler, *, queries: int, n_classes: int | None = None,
               checkpoints: Sequence[int] | None = None, soft: bool = True, substitute: SubstituteFactory | None = None,
               hidden: Sequence[int] = (64,), epochs: int = 50, lr: float = 1e-2, batch_size: int = 32,
               input_shape: Sequence[int] | None = None, seed: int = 0, evaluator: Any = None,
               attack: str = "retraining") -> AttackResult:
    """Query ``queries`` rows drawn by ``sampler`` in the order of ``checkpoints``; at each
    checkpoint, train a fresh substitute on every answer so far (posteriors when ``soft`` and
    the oracle gives them, labels otherwise)."""
    if queries < 1:
        raise UsageError(f"queries must be positive, got {queries}")
    factory = substitute or _default_factory(hidden)
    rng = np.random.default_rng(seed)
    points = sorted({int(c) for c in (checkpoints or []) if 0 < int(c) < queries} | {queries})
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    trace = Trace()
    model: TorchPredictor | None = None
    stopped = STOP_DONE
    done = 0
    for point in points:
        batch = np.asarray(sampler(rng, point - done), dtype=np.float32)
        ax, ay, stopped = spend(oracle, batch)
        done = point
        if len(ax):
            xs.append(np.asarray(ax, np.float32))
            ys.append(np.asarray(ay))
        if not xs:
            break
        x_all, y_all = np.concatenate(xs), np.concatenate(ys)
        if n_classes is None:
            if is_label_output(y_all) or y_all.ndim != 2:
                raise UsageError("the oracle answers labels: pass n_classes")
            n_classes = int(y_all.shape[1])
        model = _fit(factory, x_all, _targets(y_all, n_classes, soft), n_classes, epochs=epochs, lr=lr,
                     batch_size=batch_size, seed=seed, input_shape=input_shape)
        if evaluator is not None:
            trace.add(oracle.queries_spent, **evaluator(model))
        if stopped != STOP_DONE:
            break
    return AttackResult(
        attack, queries_spent=oracle.queries_spent, stopped=stopped, trace=trace, model=model,
        params={"queries": queries, "soft": soft, "epochs": epochs, "seed": seed, "checkpoints": points},
        metrics={} if not trace.points else dict(trace.points[-1].metrics),
    )


def pool_sampler(pool: np.ndarray) -> Sampler:
    """Draws from ``pool`` without replacement (in a random order fixed by the generator)."""
    pool = np.asarray(pool, dtype=np.float32)
    state: dict[str, Any] = {}

    def draw(rng: np.random.Generator, n: int) -> np.ndarray:
        if "order" not in state:
            state["order"] = rng.permutation(len(pool))
            state["next"] = 0
        start = state["next"]
        if start + n > len(pool):
            raise UsageError(f"the transfer set has {len(pool)} inputs; {start + n} were asked for")
        state["next"] = start + n
        return pool[state["order"][start:start + n]]

    return draw


def knockoff(oracle: Oracle, transfer_set: np.ndarray, *, queries: int, n_classes: int | None = None,
             checkpoints: Sequence[int] | None = None, soft: bool = True, **kwargs: Any) -> AttackResult:
    """Knockoff Nets, random policy: ``queries`` inputs drawn without replacement from
    ``transfer_set`` (natural inputs of another distribution, already in the victim's input
    format), answered with posteriors; ``kwargs`` as for :func:`retraining`."""
    res = retraining(oracle, pool_sampler(transfer_set), queries=queries, n_classes=n_classes,
                     checkpoints=checkpoints, soft=soft, attack="knockoff-nets-random", **kwargs)
    res.params["transfer_set_size"] = len(transfer_set)
    return res


def uniform_retraining(oracle: Oracle, shape: Sequence[int], *, low: float, high: float, queries: int,
                       n_classes: int | None = None, checkpoints: Sequence[int] | None = None, soft: bool = False,
                       **kwargs: Any) -> AttackResult:
    """Uniform queries from the box ``[low, high]^shape``; labels only by default (Tramèr's
    uniform retraining), posteriors with ``soft=True``."""
    res = retraining(oracle, uniform_sampler(tuple(shape), low, high), queries=queries, n_classes=n_classes,
                     checkpoints=checkpoints, soft=soft, attack="uniform-retraining", **kwargs)
    res.params.update({"low": low, "high": high})
    return res
