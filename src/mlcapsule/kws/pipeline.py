"""The keyword-spotting use case end to end: data, training, packing, a spoken stream, scoring.

Used by ``examples/kws/run.py``, the tests and the benchmark. Training imports torch (lazily,
from :func:`train_model`); everything else here runs without it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ..enclave.detect import ChargePolicy
from . import BACKGROUND
from .data import Dataset, Recipe, Spoken, load, sentence
from .stream import Detection

Log = Callable[[str], Any]


@dataclass
class Model:
    onnx: onnx.ModelProto
    classes: tuple[str, ...]
    test_accuracy: float
    per_class: dict[str, float]
    train_seconds: float
    n_train: int
    n_test: int


#: The full spotter: 10 keywords, ~4,000 training clips (benchmarks/kws.py, examples/kws).
FULL_TRAINING: dict[str, Any] = {"epochs": 15, "channels": 64, "blocks": 4, "batch": 64, "lr": 1e-2,
                                 "label_smoothing": 0.05, "dropout": 0.1}
#: The tests' spotter: Recipe.tiny(), trained in seconds.
TINY_TRAINING: dict[str, Any] = {"epochs": 30, "channels": 32, "blocks": 2, "batch": 32, "lr": 1e-2,
                                 "label_smoothing": 0.0, "dropout": 0.0}


def train_model(recipe: Recipe, *, seed: int = 0, log: Log | None = None, dataset: Dataset | None = None,
                **training: Any) -> Model:
    """Train on ``recipe``'s data set (``training``: the options of :func:`.train.train`)."""
    from .train import to_onnx, train

    ds = dataset or load(recipe, log=log)
    t = train(ds, seed=seed, log=log, **training)
    return Model(to_onnx(t.net), ds.classes, t.test_accuracy, t.per_class, t.train_seconds,
                 len(ds.y_train), len(ds.y_test))


def pack_model(model: onnx.ModelProto, classes: Sequence[str], out: str | Path, *, provider_key: str | Path,
               per_detection: ChargePolicy | None = None, budget: int | None = None, force: bool = True,
               **kwargs: Any) -> Any:
    """Pack the spotter; with ``per_detection`` the capsule is charged per detection, and its
    detector runs in the enclave on these parameters."""
    import mlcapsule

    from ..enclave.format.manifest import Policy

    charge = {}
    if per_detection is not None:
        charge = ChargePolicy("detection", per_detection.smoothing, per_detection.threshold,
                              per_detection.refractory, per_detection.background or BACKGROUND).to_dict()
    return mlcapsule.pack(model, out, provider_key=provider_key, class_names=list(classes), force=force,
                          policy=Policy(budget=budget, charge=charge), name="keyword-spotter",
                          description="keyword spotting on raw 16 kHz audio (DS-CNN, log-mel front end in the graph)",
                          **kwargs)


# -- scoring a stream --------------------------------------------------------------------------------
@dataclass
class Score:
    true_positives: int
    false_positives: int
    false_negatives: int
    keywords_spoken: int
    detections: int

    @property
    def precision(self) -> float:
        return self.true_positives / self.detections if self.detections else 1.0

    @property
    def recall(self) -> float:
        return self.true_positives / self.keywords_spoken if self.keywords_spoken else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {"precision": round(self.precision, 3), "recall": round(self.recall, 3),
                "true_positives": self.true_positives, "false_positives": self.false_positives,
                "false_negatives": self.false_negatives, "keywords_spoken": self.keywords_spoken,
                "detections": self.detections}


def score(detections: Sequence[Detection], spoken: Sequence[Spoken], keywords: Sequence[str], *,
          window: float = 1.0, lag: float = 1.0) -> Score:
    """A detection at time t (the end of its window) is a true positive when a spoken keyword of
    the same label overlaps [t - window - lag, t] and has not been matched yet (``lag`` allows
    for the smoothing); anything else is a false positive. Spoken keywords never matched are
    false negatives."""
    targets = [s for s in spoken if s.word in keywords]
    used = [False] * len(targets)
    tp = fp = 0
    for d in detections:
        for j, s in enumerate(targets):
            if not used[j] and s.word == d.label and s.start <= d.time and s.end >= d.time - window - lag:
                used[j] = True
                tp += 1
                break
        else:
            fp += 1
    return Score(tp, fp, len(targets) - tp, len(targets), len(detections))


def keyword_sentence(keywords: Sequence[str], others: Sequence[str], *, n_keywords: int = 20, n_others: int = 20,
                  seed: int = 1, snr_db: float = 20.0, voices: Sequence[str] | None = None,
                  variants: Sequence[str] | None = None) -> tuple[np.ndarray, list[Spoken]]:
    """Keywords mixed with other words in random order, spoken by held-out voices over noise."""
    rng = np.random.default_rng(seed)
    words = [str(rng.choice(list(keywords))) for _ in range(n_keywords)] + \
            [str(rng.choice(list(others))) for _ in range(n_others)]
    order = rng.permutation(len(words))
    kw: dict[str, Any] = {}
    if voices is not None:
        kw["voices"] = voices
    if variants is not None:
        kw["variants"] = variants
    return sentence([words[i] for i in order], seed=seed, snr_db=snr_db, **kw)


def save_truth(path: str | Path, spoken: Sequence[Spoken]) -> None:
    Path(path).write_text(json.dumps([{"word": s.word, "start": round(s.start, 3), "end": round(s.end, 3)}
                                      for s in spoken], indent=1))
