"""kennen (Oh et al., ICLR 2018, "Towards Reverse-Engineering Black-Box Neural Networks").

A *metamodel* predicts attributes of a black-box MNIST classifier (its activation, whether it
has dropout or max-pooling, its kernel size, its depth, its optimiser) from its answers to a few
queries. It is trained on a *zoo* of white-box nets whose attributes are known:

* **kennen-o**: the queries are fixed natural images (MNIST validation images); a meta-classifier
  (an MLP with one softmax head per attribute) is trained on the zoo's answers to them;
* **kennen-io**: the queries themselves are optimised too, by gradient through the white-box
  zoo, alternately with the meta-classifier. With no constraint on the pixel values (the
  paper's setting, ``clip=None``) they become unnatural inputs, which is what the kennen-io
  detector of issue 12 catches.

Public API (numpy at import; torch is imported when a zoo is built or a metamodel trained):

* :data:`KENNEN_ATTRIBUTES`, :class:`NetConfig`, :class:`ZooSettings`, :func:`sample_zoo_configs`,
  :func:`build_zoo` (cached under :func:`default_cache_dir`);
* :class:`KennenSettings`, :func:`train_kennen` (kennen-o or kennen-io on a training zoo,
  evaluated on held-out zoo nets against chance) -> :class:`KennenResult` with its
  :class:`KennenModel`;
* :func:`infer_attributes` (the attack: send the model's queries to an oracle and predict);
* :func:`craft_kennen_inputs` and :func:`kennen_detector_data`: the 4,500 + 500 crafted inputs
  (and benign MNIST beside them) that the kennen-io detector is trained and tested on.

See ``docs/attacks.md`` (section kennen-io) for the threat model and the measured figures.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import UsageError
from ._run import check_posteriors, spend
from .oracle import Oracle
from .results import STOP_DONE, AttackResult

if TYPE_CHECKING:  # pragma: no cover
    from .kennen_zoo import ModelZoo

__all__ = [
    "KENNEN_ATTRIBUTES", "DETECTOR_CRAFT", "NetConfig", "ZooSettings", "KennenSettings", "KennenModel", "KennenResult",
    "CraftedInputs", "DetectorData", "sample_zoo_configs", "build_zoo", "split_zoo", "train_kennen",
    "infer_attributes", "zoo_answers", "craft_kennen_inputs", "kennen_detector_data", "default_cache_dir",
]

#: The attributes the zoo varies and kennen predicts, with their values (the paper's MNIST-NETS
#: architecture attributes, and its optimiser attribute restricted to SGD and Adam).
KENNEN_ATTRIBUTES: dict[str, tuple[Any, ...]] = {
    "act": ("relu", "elu", "prelu", "tanh"),
    "drop": ("yes", "no"),
    "pool": ("max_2", "none"),
    "ks": (3, 5),
    "n_conv": (2, 3, 4),
    "n_fc": (2, 3, 4),
    "opt": ("sgd", "adam"),
}

#: log-probabilities are floored here, so that answers of exactly 0 give finite features.
LOG_FLOOR = float(np.log(1e-12))


def default_cache_dir() -> Path:
    """``$MLCAPSULE_CACHE/kennen``, else ``~/.cache/mlcapsule/kennen``."""
    if os.environ.get("MLCAPSULE_CACHE"):
        return Path(os.environ["MLCAPSULE_CACHE"]) / "kennen"
    return Path.home() / ".cache" / "mlcapsule" / "kennen"


@dataclass(frozen=True)
class NetConfig:
    """One zoo net: the attributes kennen predicts, and the seed of its weights and data."""

    act: str = "relu"  # relu, elu, prelu, tanh
    drop: str = "yes"  # dropout (p = 0.5) after the hidden fc layers: yes, no
    pool: str = "max_2"  # 2x2 max-pool after the first two convolutions: max_2, none
    ks: int = 5  # kernel size: 3, 5
    n_conv: int = 2  # convolutions: 2, 3, 4
    n_fc: int = 2  # fully connected layers, the output layer included: 2, 3, 4
    opt: str = "adam"  # the optimiser it was trained with: sgd, adam
    seed: int = 0

    def attribute(self, name: str) -> Any:
        if name not in KENNEN_ATTRIBUTES:
            raise UsageError(f"unknown kennen attribute {name!r}; known: {', '.join(KENNEN_ATTRIBUTES)}")
        return getattr(self, name)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ZooSettings:
    """How each zoo net is trained (part of its cache key)."""

    train_images: int = 1000  # a random subset of the first 50,000 MNIST training images, per net
    epochs: int = 2
    batch_size: int = 64
    lr_sgd: float = 0.1  # with momentum 0.5, as the paper's zoo (which used lr 0.01 for 100 epochs)
    lr_adam: float = 1e-3
    eval_images: int = 1000  # MNIST test images for each net's accuracy

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _space(space: Mapping[str, Sequence[Any]] | None) -> dict[str, tuple[Any, ...]]:
    out = {k: tuple(v) for k, v in KENNEN_ATTRIBUTES.items()}
    for k, v in (space or {}).items():
        if k not in KENNEN_ATTRIBUTES:
            raise UsageError(f"unknown kennen attribute {k!r}; known: {', '.join(KENNEN_ATTRIBUTES)}")
        bad = [x for x in v if x not in KENNEN_ATTRIBUTES[k]]
        if bad or not v:
            raise UsageError(f"kennen attribute {k!r} takes values among {KENNEN_ATTRIBUTES[k]}, not {list(v)}")
        out[k] = tuple(dict.fromkeys(v))
    return out


def sample_zoo_configs(n: int, *, space: Mapping[str, Sequence[Any]] | None = None, seed: int = 0,
                       balanced: bool = True) -> list[NetConfig]:
    """``n`` zoo configurations drawn from ``space`` (default: all of :data:`KENNEN_ATTRIBUTES`;
    pass e.g. ``{"pool": ["max_2"]}`` to restrict an attribute). With ``balanced``, each
    attribute's values are spread evenly over the ``n`` nets (then shuffled independently per
    attribute), so a small zoo still covers every value; otherwise each is drawn uniformly."""
    if n < 1:
        raise UsageError(f"a zoo needs at least one net, not {n}")
    sp = _space(space)
    rng = np.random.default_rng(seed)
    columns: dict[str, list[Any]] = {}
    for name, values in sp.items():
        if balanced:
            col = [values[i % len(values)] for i in range(n)]
            columns[name] = [col[i] for i in rng.permutation(n)]
        else:
            columns[name] = [values[i] for i in rng.integers(0, len(values), size=n)]
    seeds = rng.integers(0, 2**31 - 1, size=n)
    return [NetConfig(**{k: columns[k][i] for k in sp}, seed=int(seeds[i])) for i in range(n)]


def build_zoo(configs: Sequence[NetConfig], *, settings: ZooSettings | None = None,
              cache_dir: str | os.PathLike[str] | None = None, cache: bool = True,
              root: str | os.PathLike[str] | None = None) -> ModelZoo:
    """Train (or load from the cache) one torch net per configuration: a
    :class:`~mlcapsule.attacks.kennen_zoo.ModelZoo`. ``cache_dir`` defaults to
    :func:`default_cache_dir`; ``root`` is the shared datasets folder."""
    from .kennen_zoo import build_zoo as _build

    return _build(configs, settings=settings, cache_dir=cache_dir, cache=cache, root=root)


def split_zoo(zoo: ModelZoo, n_test: int) -> tuple[ModelZoo, ModelZoo]:
    """(training nets, held-out nets): the last ``n_test`` nets are held out."""
    if not 0 < n_test < len(zoo):
        raise UsageError(f"hold out between 1 and {len(zoo) - 1} of the {len(zoo)} nets, not {n_test}")
    k = len(zoo) - n_test
    return zoo.subset(range(k)), zoo.subset(range(k, len(zoo)))


@dataclass(frozen=True)
class KennenSettings:
    """The metamodel and its training. ``method="o"``: fixed queries; ``"io"``: queries optimised.

    Training alternates, as in the authors' code: ``rounds`` times, ``meta_epochs`` epochs of the
    meta-classifier over the training zoo (the queries fixed), then (kennen-io) ``query_steps``
    gradient steps on the queries (the meta-classifier fixed), each over ``batch_models`` nets
    drawn from the zoo; a last meta phase fits the final queries.
    """

    method: str = "io"
    n_queries: int = 10
    hidden: tuple[int, ...] = (256,)
    rounds: int = 8
    meta_epochs: int = 50
    query_steps: int = 10
    batch_models: int = 10
    lr_meta: float = 1e-3
    weight_decay: float = 1e-3
    lr_query: float = 0.05  # Adam on the pixel values of the queries (in [0, 1] units)
    clip: tuple[float, float] | None = None  # None: unrestricted pixel values (the paper's kennen-io)
    init: str = "mnist"  # "mnist": validation images (the paper's "randval"); "uniform"; "gray"

    def __post_init__(self) -> None:
        if self.method not in ("o", "io"):
            raise UsageError(f"kennen method must be 'o' or 'io', not {self.method!r}")
        if self.init not in ("mnist", "uniform", "gray"):
            raise UsageError(f"kennen init must be 'mnist', 'uniform' or 'gray', not {self.init!r}")
        if self.n_queries < 1 or self.rounds < 1 or self.batch_models < 1:
            raise UsageError("kennen needs n_queries, rounds and batch_models of at least 1")
        if self.clip is not None and not self.clip[0] < self.clip[1]:
            raise UsageError(f"clip needs low < high, got {self.clip}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: The kennen-io sessions that craft the detector's malicious inputs: 100 queries each (the
#: paper's query count), so 4,500 + 500 inputs are 45 + 5 sessions.
DETECTOR_CRAFT = KennenSettings(method="io", n_queries=100, rounds=2, meta_epochs=30, query_steps=10,
                                batch_models=10)


@dataclass
class KennenModel:
    """A trained metamodel: its queries and its meta-classifier (a torch module)."""

    queries: np.ndarray  # float32 [n, 1, 28, 28], pixel values (in [0, 1] unless unrestricted)
    attributes: dict[str, tuple[Any, ...]]  # the attributes it predicts, with their values in label order
    meta: Any  # torch.nn.Module: features [B, n * 10] -> {attribute: logits}
    settings: KennenSettings

    def features(self, posteriors: np.ndarray) -> np.ndarray:
        """The meta-classifier's input from the answers to the queries: log-probabilities
        ``[n, classes]`` (floored at :data:`LOG_FLOOR`), flattened (or ``[B, n, classes]`` -> ``[B, n * classes]``)."""
        p = np.nan_to_num(np.asarray(posteriors, dtype=np.float64), nan=0.0)
        return np.maximum(np.log(np.maximum(p, 0.0) + 1e-300), LOG_FLOOR).reshape(*p.shape[:-2], -1).astype(
            np.float32)

    def predict_proba(self, posteriors: np.ndarray) -> dict[str, np.ndarray]:
        """Each attribute's probabilities ``[B, values]`` from answers ``[B, n, classes]`` (or ``[n, classes]``)."""
        import torch

        f = self.features(posteriors)
        f = f.reshape(1, -1) if f.ndim == 1 else f
        self.meta.eval()
        with torch.no_grad():
            out = self.meta(torch.from_numpy(f))
        return {k: torch.softmax(v, dim=1).numpy().astype(np.float64) for k, v in out.items()}

    def predict(self, posteriors: np.ndarray) -> list[dict[str, Any]]:
        """The predicted attribute values, one dict per net."""
        probs = self.predict_proba(posteriors)
        n = len(next(iter(probs.values())))
        return [{k: self.attributes[k][int(np.argmax(v[i]))] for k, v in probs.items()} for i in range(n)]


@dataclass
class KennenResult:
    """A metamodel and its attribute-prediction accuracy on held-out zoo nets."""

    model: KennenModel
    accuracy: dict[str, float]  # on the held-out nets
    chance: dict[str, float]  # 1 / number of values (the paper's "chance")
    majority: dict[str, float]  # the most frequent held-out value's share (a stronger baseline)
    train_accuracy: dict[str, float]
    n_train: int
    n_test: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)  # loss and accuracy after each round

    def beats_chance(self, margin: float = 0.0) -> list[str]:
        """The attributes whose held-out accuracy exceeds both baselines by more than ``margin``."""
        return [k for k, a in self.accuracy.items() if a > max(self.chance[k], self.majority[k]) + margin]

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.model.settings.method, "settings": self.model.settings.to_dict(),
                "accuracy": self.accuracy, "chance": self.chance, "majority": self.majority,
                "train_accuracy": self.train_accuracy, "n_train": self.n_train, "n_test": self.n_test,
                "seconds": self.seconds, "history": self.history}


def train_kennen(train: ModelZoo, test: ModelZoo | None = None, *, settings: KennenSettings | None = None,
                 attributes: Sequence[str] | None = None, seed: int = 0,
                 root: str | os.PathLike[str] | None = None,
                 init_images: np.ndarray | None = None) -> KennenResult:
    """Train a kennen metamodel on the ``train`` zoo and measure it on the held-out ``test`` zoo.

    ``attributes``: which to predict (default: every attribute with more than one value among
    the training nets). ``init_images``: the initial queries (float pixels ``[n, 1, 28, 28]``);
    by default ``settings.n_queries`` MNIST validation images drawn with ``seed``."""
    from .kennen_meta import fit

    settings = settings or KennenSettings()
    t0 = time.perf_counter()
    model, history = fit(train, settings, attributes=attributes, seed=seed, root=root, init_images=init_images)
    train_acc = _zoo_accuracy(model, train)
    if test is not None and len(test):
        acc = _zoo_accuracy(model, test)
        truth = {k: [c.attribute(k) for c in test.configs] for k in model.attributes}
        majority = {k: max(v.count(x) for x in set(v)) / len(v) for k, v in truth.items()}
    else:
        acc = {k: float("nan") for k in model.attributes}
        majority = dict(acc)
    chance = {k: 1.0 / len(v) for k, v in model.attributes.items()}
    return KennenResult(model, acc, chance, majority, train_acc, len(train), len(test) if test is not None else 0,
                        time.perf_counter() - t0, history)


def zoo_answers(model: KennenModel, zoo: ModelZoo) -> np.ndarray:
    """The zoo nets' posteriors ``[nets, n, 10]`` on the model's queries (white-box, uncharged)."""
    from .kennen_meta import zoo_posteriors

    return zoo_posteriors(zoo, model.queries)


def _zoo_accuracy(model: KennenModel, zoo: ModelZoo) -> dict[str, float]:
    preds = model.predict(zoo_answers(model, zoo))
    return {k: float(np.mean([p[k] == c.attribute(k) for p, c in zip(preds, zoo.configs, strict=True)]))
            for k in model.attributes}


def infer_attributes(oracle: Oracle, model: KennenModel, *, input_shape: Sequence[int] | None = None,
                     truth: NetConfig | Mapping[str, Any] | None = None) -> AttackResult:
    """The attack: send the model's ``n`` queries to ``oracle`` (each row is charged) and predict
    the black box's attributes from its posteriors.

    ``input_shape`` reshapes each query for the oracle (e.g. ``(784,)`` for a flat input; the
    default is ``[1, 28, 28]``). The result's ``extra["attributes"]`` holds the predicted
    values and ``extra["probabilities"]`` each attribute's probabilities; with ``truth`` (the
    black box's real configuration), ``metrics`` has ``"<attribute>.correct"`` (1 or 0) and
    ``"correct"`` (their mean). A budget that ends before all ``n`` answers leaves no prediction."""
    x = np.asarray(model.queries, dtype=np.float32)
    if input_shape is not None:
        x = x.reshape(len(x), *input_shape)
    _, y, stopped = spend(oracle, x)
    result = AttackResult(attack="kennen-" + model.settings.method, queries_spent=oracle.queries_spent,
                          stopped=stopped, params={"n_queries": len(x), **model.settings.to_dict()})
    if stopped != STOP_DONE or len(y) < len(x):
        return result
    post = check_posteriors(y, "kennen")
    probs = model.predict_proba(post[None])
    predicted = {k: model.attributes[k][int(np.argmax(v[0]))] for k, v in probs.items()}
    result.extra = {"attributes": predicted, "probabilities": {k: v[0].tolist() for k, v in probs.items()}}
    if truth is not None:
        get = truth.attribute if isinstance(truth, NetConfig) else truth.__getitem__
        correct = {k: float(predicted[k] == get(k)) for k in predicted}
        result.metrics = {f"{k}.correct": v for k, v in correct.items()}
        result.metrics["correct"] = float(np.mean(list(correct.values()))) if correct else float("nan")
    result.trace.add(result.queries_spent, **result.metrics)
    return result


# -- the crafted inputs of the kennen-io detector (issue 12 item 5) -----------------------------
@dataclass
class CraftedInputs:
    """kennen-io queries from independent sessions (one metamodel each)."""

    x: np.ndarray  # float32 [n, 1, 28, 28]
    session: np.ndarray  # int64 [n]: the session of each query
    init: np.ndarray  # int64 [n]: the index in the MNIST validation pool it started from
    seconds: float = 0.0  # time spent crafting (0 when read from the cache)


def craft_kennen_inputs(zoo: ModelZoo, sessions: int, *, settings: KennenSettings | None = None, seed: int = 0,
                        first_session: int = 0, cache_dir: str | os.PathLike[str] | None = None,
                        cache: bool = True, root: str | os.PathLike[str] | None = None) -> CraftedInputs:
    """Run ``sessions`` independent kennen-io sessions against the white-box ``zoo`` and return
    their optimised queries (``settings.n_queries`` each, in session order).

    Session ``s`` starts from its own MNIST validation images (validation-pool rows
    ``s * n_queries`` to ``(s + 1) * n_queries`` of a permutation fixed by ``seed``), so the
    sessions never share a starting image, and its metamodel is seeded with ``seed + s``. The
    result is cached as one ``.npz`` per session, keyed by the zoo, the settings and the seeds."""
    from .kennen_zoo import mnist_pools, to_pixels

    settings = settings or KennenSettings()
    if settings.method != "io":
        raise UsageError("the crafted inputs come from kennen-io: use KennenSettings(method='io')")
    pools = mnist_pools(root)
    perm = np.random.default_rng(seed).permutation(len(pools.val_x))
    q = settings.n_queries
    if (first_session + sessions) * q > len(perm):
        raise UsageError(f"{first_session + sessions} sessions of {q} queries need more than the "
                         f"{len(perm)} validation images")
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    zoo_key = hashlib.sha256(json.dumps([c.to_dict() for c in zoo.configs] + [zoo.settings.to_dict()],
                                        sort_keys=True).encode()).hexdigest()[:16]
    xs, ss, inits = [], [], []
    spent = 0.0
    for s in range(first_session, first_session + sessions):
        idx = perm[s * q:(s + 1) * q]
        key = hashlib.sha256(json.dumps({"zoo": zoo_key, "settings": settings.to_dict(), "seed": seed, "session": s},
                                        sort_keys=True).encode()).hexdigest()[:24]
        path = folder / f"crafted-{key}.npz"
        x: np.ndarray | None = None
        if cache and path.exists():
            try:
                with np.load(path) as blob:
                    x = np.asarray(blob["x"], dtype=np.float32)
            except Exception:  # damaged: craft again
                x = None
        if x is None or x.shape != (q, 1, 28, 28):
            from .kennen_meta import fit

            t0 = time.perf_counter()
            model, _ = fit(zoo, settings, seed=seed + s, root=root, init_images=to_pixels(pools.val_x[idx]))
            spent += time.perf_counter() - t0
            x = model.queries
            if cache:
                folder.mkdir(parents=True, exist_ok=True)
                tmp = folder / f"crafted-{key}.tmp{os.getpid()}.npz"
                np.savez_compressed(tmp, x=x)
                os.replace(tmp, path)
        xs.append(x)
        ss.append(np.full(q, s, np.int64))
        inits.append(idx.astype(np.int64))
    return CraftedInputs(np.concatenate(xs), np.concatenate(ss), np.concatenate(inits), spent)


@dataclass
class DetectorData:
    """Benign MNIST and kennen-io inputs for the kennen-io detector, all float32 ``[n, 1, 28, 28]``."""

    train_benign: np.ndarray
    train_malicious: np.ndarray
    test_benign: np.ndarray
    test_malicious: np.ndarray
    train_sessions: np.ndarray  # the kennen-io session of each malicious row
    test_sessions: np.ndarray
    seconds: float = 0.0


def kennen_detector_data(zoo: ModelZoo, *, n_train: int = 4500, n_test: int = 500,
                         settings: KennenSettings | None = None, seed: int = 0,
                         cache_dir: str | os.PathLike[str] | None = None, cache: bool = True,
                         root: str | os.PathLike[str] | None = None) -> DetectorData:
    """The MLCapsule paper's kennen-io detector data: ``n_train`` + ``n_test`` crafted inputs
    (4,500 + 500 by default) and as many benign MNIST images beside them.

    The malicious test rows come from their own kennen-io sessions (never a session that gave a
    training row), so train and test are disjoint by session and by starting image. The benign
    training rows are MNIST training images drawn with ``seed``; the benign test rows are the
    first ``n_test`` MNIST test images. ``settings`` default to :data:`DETECTOR_CRAFT`."""
    from .kennen_zoo import mnist_pools, to_pixels

    settings = settings or DETECTOR_CRAFT
    q = settings.n_queries
    n_tr_sessions = -(-n_train // q)
    n_te_sessions = -(-n_test // q)
    tr = craft_kennen_inputs(zoo, n_tr_sessions, settings=settings, seed=seed, cache_dir=cache_dir, cache=cache,
                             root=root)
    te = craft_kennen_inputs(zoo, n_te_sessions, settings=settings, seed=seed, first_session=n_tr_sessions,
                             cache_dir=cache_dir, cache=cache, root=root)
    pools = mnist_pools(root)
    benign_idx = np.random.default_rng(seed).choice(len(pools.train_x), size=n_train, replace=False)
    return DetectorData(
        train_benign=to_pixels(pools.train_x[benign_idx]), train_malicious=tr.x[:n_train],
        test_benign=to_pixels(pools.test_x[:n_test]), test_malicious=te.x[:n_test],
        train_sessions=tr.session[:n_train], test_sessions=te.session[:n_test], seconds=tr.seconds + te.seconds)
